"""The NaN/Inf guard's cost: the guarded optimiser step against an unguarded one, and both
against a whole world epoch, measured in one run.

    python -m benchmarks.guard [--config configs/world.py] [--repeats 30] [--out docs/guard.json]

The guarded step (`training/steps.py::apply_gradients`) adds, on device, a finiteness check of
the loss, the gradient norm and the updated parameters and a select that keeps the old state on
a refused step. The unguarded step is optax's AdamW update alone. The epoch is one
`algorithm.train_epoch` of the config (after a warm-up epoch), whose optimiser steps are the
guarded ones; the reward's finiteness check is on the host, inside the epoch. Target: the guard
costs at most 2% of the epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/world.py")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="docs/guard.json")
    args = parser.parse_args()

    from prdp_jax import config as config_lib
    from prdp_jax import plugins  # noqa: F401
    from prdp_jax.infra import runtime, sharding
    from prdp_jax.pipelines.factory import build_pipeline
    from prdp_jax.prompts import sets as prompt_sets
    from prdp_jax.rewards import combine as rewards_lib
    from prdp_jax.training import algorithm
    from prdp_jax.training.epoch import compile_setup, make_setup
    from benchmarks.__main__ import machine

    config = config_lib.load_file(args.config)
    config.log.progress = False
    runtime.setup(config)
    mesh = sharding.mesh_from_config(config.mesh)
    pipe = build_pipeline(config, mesh, log=lambda *a: None)
    setup, _ = compile_setup(make_setup(config, pipe, mesh), pipe.frozen_params(),
                             log=lambda *a: None)
    frozen, ref = pipe.frozen_params(), pipe.unet_params()
    state = setup.init_state(pipe.unet_params())
    reward = rewards_lib.combine(dict(config.reward.weights), config)
    sampler = prompt_sets.PromptSampler(prompt_sets.load(config.prompts.train, config), 0)
    epoch_seconds = []
    for epoch in range(2):   # the first warms up
        t0 = time.perf_counter()
        state, _, _ = algorithm.train_epoch(setup, state, frozen, ref,
                                            sampler.sample(config.train.prompts_per_epoch),
                                            epoch, reward, show_progress=False)
        epoch_seconds.append(time.perf_counter() - t0)
    steps_per_epoch = config.train.passes_per_epoch * setup.shape.minibatches

    optimizer = setup.optimizer
    ps = setup.shardings.params

    def plain(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

    plain = jax.jit(plain, out_shardings=(ps, None, setup.shardings.replicated))
    guarded = setup.steps.apply
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, jnp.float32), state.params)
    loss = sharding.put(jnp.float32(1.0), setup.shardings.replicated)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    times = {"guarded": [], "plain": []}
    for _ in range(args.repeats + 3):
        for name in times:   # alternated, so that both see the same machine state
            params, opt_state = copy(state.params), copy(state.opt_state)
            jax.block_until_ready((params, opt_state))
            t0 = time.perf_counter()
            out = (guarded(params, opt_state, grads, loss) if name == "guarded"
                   else plain(params, opt_state, grads))
            jax.block_until_ready(out)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[3:]) for k, v in times.items()}
    extra = max(med["guarded"] - med["plain"], 0.0) * steps_per_epoch
    result = {
        "config": args.config, "machine": machine(),
        "apply_guarded_s": med["guarded"], "apply_plain_s": med["plain"],
        "steps_per_epoch": steps_per_epoch, "epoch_s": epoch_seconds[-1],
        "guard_fraction_of_epoch": extra / epoch_seconds[-1], "target": 0.02,
    }
    result["met"] = result["guard_fraction_of_epoch"] <= result["target"]
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
