"""How far one optimiser step moves the per-step log-ratio in the world: the scale the proximal
clip must have to bind.

    python -m prdp_jax.experiments.calibrate [--quick]

One epoch of the small-scale regime from the shipped base (seed 0): sample, score, one AdamW step
of PRDP at the world's rate over all the epoch's pairs, then re-score the same transitions:
|log pi_theta1 - log pi_theta_old| per transition (per-step log-probs are means over the image's
elements, as in training). The findings' clip (PRDP's eps and DDPO's ratio clip) is the median of
that, to one significant digit (`findings.clip_rule`): from the second pass on, the clip then
binds on about half of the transitions, as the paper's small-scale regime needs. Writes
docs/results/clip_calibration.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def one_step_log_ratios(config) -> np.ndarray:
    """[M, n, T] |log pi_theta1 - log pi_theta_old| of an epoch's transitions after one AdamW step
    (minibatch 0) from the base, under `config`."""
    from prdp_jax.infra import sharding
    from prdp_jax.pipelines.factory import build_pipeline
    from prdp_jax.prompts import sets as prompt_sets
    from prdp_jax.rewards import combine as rewards_lib
    from prdp_jax.training import epoch as epoch_lib
    from prdp_jax.training import state as state_lib
    mesh = sharding.mesh_from_config(config.mesh)
    pipe = build_pipeline(config, mesh, log=lambda *a, **k: None)
    frozen = pipe.frozen_params()
    setup, _ = epoch_lib.compile_setup(epoch_lib.make_setup(config, pipe, mesh), frozen,
                                       log=lambda *a, **k: None)
    prompts = prompt_sets.PromptSampler(prompt_sets.load(config.prompts.train, config),
                                        config.seed).sample(config.train.prompts_per_epoch)
    reward_fn = rewards_lib.combine(dict(config.reward.weights), config)
    state = setup.init_state(pipe.unet_params())
    samples = epoch_lib.sample_and_reward(
        setup, state.params, frozen, prompts,
        state_lib.epoch_key(state, 0, setup.shardings.replicated), reward_fn, 0, False)
    data, _ = epoch_lib.score_transitions(setup, state.params, pipe.unet_params(), samples,
                                          np.zeros_like(samples.rewards), 0)
    old = np.asarray(data.log_probs_old)
    loss, grads, _ = epoch_lib.minibatch_gradient(setup, state.params, data, samples.uncond, 0,
                                                  epoch_lib.known_log_probs(setup, data))
    params, _, _, _ = setup.steps.apply(state.params, state.opt_state, grads, loss)
    new = np.asarray(epoch_lib.score_all(setup, params, data, samples.uncond))
    return np.abs(new - old)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m prdp_jax.experiments.calibrate",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny world (CI smoke)")
    p.add_argument("--out", help="default docs/results/clip_calibration.json (--quick: runs/)")
    p.add_argument("--runs", default="runs/experiments-quick",
                   help="with --quick: the run folders whose base/ holds the tiny world's base")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from prdp_jax.experiments import findings, runner
    from prdp_jax.infra import files, runtime
    size = runner.SIZES["quick" if args.quick else "full"]
    base_dir = os.path.join(args.runs, "base") if args.quick else None
    config = runner.run_config(size, "small", findings.Arm("PRDP", findings.prdp()), 0, {},
                               base_dir)
    runtime.setup(config)
    t0 = time.perf_counter()
    moved = one_step_log_ratios(config)
    q = np.quantile(moved, (0.1, 0.25, 0.5, 0.75, 0.9))
    result = {"regime": "small", "learning_rate": config.train.learning_rate,
              "transitions": int(moved.size), "quantiles": {"10": q[0], "25": q[1], "50": q[2],
                                                            "75": q[3], "90": q[4]},
              "clip": findings.clip_rule(float(q[2])), "seconds": time.perf_counter() - t0}
    out = args.out or ("runs/experiments-quick/clip_calibration.json" if args.quick
                       else "docs/results/clip_calibration.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    files.atomic_write_json(out, {k: (float(v) if isinstance(v, np.floating) else v)
                                  for k, v in result.items()})
    print(f"one step at lr {result['learning_rate']:g}: |per-step log-ratio| median "
          f"{q[2]:.2e} (quartiles {q[1]:.2e} .. {q[3]:.2e}) over {moved.size} transitions; "
          f"the findings' clip: {result['clip']:g} ({out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
