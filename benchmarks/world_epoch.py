"""One epoch of the README's main job (`configs/world.py`), phase by phase, on two source trees.

    python -m benchmarks --cases world_epoch                 # this tree against BASELINE
    python benchmarks/world_epoch.py --epochs 3              # a child: one tree, JSON on stdout

The harness checks the baseline commit out into a temporary git worktree and runs this file as a
child process in each tree (that tree's `prdp_jax` and `configs/world.py`, each with its own
defaults), alternating old and new, on the same machine. A child builds the main job's setup,
compiles it, runs one warm-up epoch and `--epochs` timed ones on the first 8 training captions
(every epoch the same prompts, so both trees do the same work), and times every compiled step
by phase, blocking after each call:

  sampling            the sampler steps (and the prompts' text encoding)
  reward              the black-box reward on each sampler batch
  reference scoring   log pi_ref (and a re-score of log pi_theta_old if the config asks for it)
  update: score       the update's forward-only scoring of each minibatch (tiled gradient)
  update: gradient    the gradient tiles and loss weights, or the one-pass loss and gradient
  apply               the AdamW steps
  transfers           host -> device puts and device -> host copies
  other               the rest of the epoch's wall time (Python, dispatch)

The child is self-contained: it uses only APIs that both trees have.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

# The commit before issue 26's changes (the README's main job as it was).
BASELINE = "be5b0a9"
PHASES = ("sampling", "reward", "reference scoring", "update: score", "update: gradient",
          "apply", "transfers", "other")
STEP_PHASES = {"encode": "sampling", "sample": "sampling", "head": "sampling",
               "score": "update: score", "weights": "update: gradient",
               "zeros": "update: gradient", "grad_tile": "update: gradient",
               "loss_and_grad": "update: gradient", "apply": "apply"}


class PhaseTimer:
    """Seconds per phase; a call inside an outer timed region counts to the outer phase."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.active = None

    @contextlib.contextmanager
    def phase(self, name):
        if self.active is not None:
            yield
            return
        self.active, t0 = name, time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0
            self.active = None

    def wrap(self, name, fn):
        import jax

        def timed(*args, **kwargs):
            with self.phase(name):
                return jax.block_until_ready(fn(*args, **kwargs))
        return timed


def child(epochs: int, recipe: str) -> dict:
    """Runs in a source tree's root: times its world main job's epochs (see the module doc)."""
    sys.path.insert(0, os.getcwd())
    from prdp_jax import config as config_lib
    config = config_lib.load_file(f"configs/world.py:{recipe}")
    config.log.compile_cache = ""
    from prdp_jax.infra import runtime
    runtime.setup(config)
    import jax
    import numpy as np
    import prdp_jax
    from prdp_jax.infra import sharding
    from prdp_jax.pipelines.factory import build_pipeline
    from prdp_jax.prompts import sets as prompt_sets
    from prdp_jax.rewards import combine as rewards_lib
    from prdp_jax.training import algorithm
    from prdp_jax.training import epoch as epoch_lib

    mesh = sharding.mesh_from_config(config.mesh)
    reward_fn = rewards_lib.combine(dict(config.reward.weights), config)
    prompts = prompt_sets.load(config.prompts.train, config)[:config.train.prompts_per_epoch]
    pipe = build_pipeline(config, mesh, log=lambda *a: None)
    setup = epoch_lib.make_setup(config, pipe, mesh)
    frozen, ref_params = pipe.frozen_params(), pipe.unet_params()
    t0 = time.perf_counter()
    setup, stats = epoch_lib.compile_setup(setup, frozen, log=lambda *a: None)
    compile_s = time.perf_counter() - t0

    timer = PhaseTimer()
    steps = setup.steps
    setup = dataclasses.replace(setup, steps=dataclasses.replace(steps, **{
        f.name: timer.wrap(STEP_PHASES.get(f.name, "other"), getattr(steps, f.name))
        for f in dataclasses.fields(steps)}))
    score_transitions = algorithm.score_transitions
    algorithm.score_transitions = lambda *a, **k: timer.wrap(
        "reference scoring", score_transitions)(*a, **k)
    reward = dataclasses.replace(reward_fn, fn=timer.wrap("reward", reward_fn.fn))
    put, to_host = sharding.put, sharding.to_host
    sharding.put = lambda *a, **k: timer.wrap("transfers", put)(*a, **k)
    sharding.to_host = lambda *a, **k: timer.wrap("transfers", to_host)(*a, **k)

    state = setup.init_state(pipe.unet_params())
    rows = []
    for epoch in range(epochs + 1):   # epoch 0 warms up
        timer.seconds.clear()
        start = time.perf_counter()
        state, samples, metrics = algorithm.train_epoch(setup, state, frozen, ref_params, prompts,
                                                        epoch, reward, None, False)
        wall = time.perf_counter() - start
        row = {p: timer.seconds.get(p, 0.0) for p in PHASES}
        row["other"] += wall - sum(row.values())
        row.update(wall=wall, loss=float(metrics["loss"]),
                   reward_mean=float(np.mean(samples.rewards)))
        rows.append(row)
    timed = rows[1:]
    t = config.train
    return {
        "tree": os.path.dirname(os.path.dirname(os.path.abspath(prdp_jax.__file__))),
        "devices": jax.device_count(), "compile_s": compile_s,
        "compile": {k: v["seconds"] for k, v in stats.items()},
        "config": {"prompts_per_epoch": t.prompts_per_epoch, "images_per_prompt": t.images_per_prompt,
                   "prompts_per_minibatch": t.prompts_per_minibatch,
                   "passes_per_epoch": t.passes_per_epoch, "num_steps": config.sample.num_steps,
                   "tile": [t.microbatch_trajectories, t.microbatch_steps],
                   "gradient": t.get("gradient", "tiled"), "sample_batch": config.sample.batch_size,
                   "score_tile_steps": t.get("score_microbatch_steps", 0) or t.microbatch_steps},
        "epochs": rows,
        "mean": {k: float(np.mean([r[k] for r in timed])) for k in (*PHASES, "wall")},
    }


def run_child(tree: str, epochs: int, recipe: str, script: str) -> dict:
    """This file as a child process in `tree` (its prdp_jax first on the path)."""
    env = dict(os.environ, PYTHONPATH=tree)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    env["XLA_FLAGS"] = flags
    proc = subprocess.run([sys.executable, script, "--epochs", str(epochs), "--recipe", recipe],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"world_epoch child in {tree} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if os.path.realpath(result["tree"]) != os.path.realpath(tree):
        raise RuntimeError(f"the child in {tree} imported prdp_jax from {result['tree']}")
    return result


@contextlib.contextmanager
def worktree(commit: str):
    """A temporary detached git worktree of `commit` of this repository."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tempfile.mkdtemp(prefix="prdp-baseline-")
    subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", "--force", path, commit],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", path],
                       capture_output=True)


def compare(baseline, epochs: int, rounds: int, recipe: str, log=print) -> dict:
    """The current tree against the commit `baseline` (None: this tree only), `rounds`
    alternating child runs of each."""
    import numpy as np
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.abspath(__file__)
    runs = {"old": [], "new": []} if baseline else {"new": []}
    with (worktree(baseline) if baseline else contextlib.nullcontext()) as old_tree:
        trees = (("old", old_tree), ("new", here)) if baseline else (("new", here),)
        for r in range(rounds):
            for side, tree in trees:
                result = run_child(tree, epochs, recipe, script)
                runs[side].append(result)
                log(f"  world_epoch {side} round {r + 1}: {result['mean']['wall']:.2f}s an epoch "
                    f"(compile {result['compile_s']:.1f}s)")
    mean = {side: {k: float(np.mean([run["mean"][k] for run in rs]))
                   for k in (*PHASES, "wall")} for side, rs in runs.items()}
    row = {"case": "world_epoch", "kind": "world_epoch", "baseline": baseline, "recipe": recipe,
           "epochs": epochs, "rounds": rounds, "runs": runs, "mean": mean}
    if baseline:
        old_e, new_e = runs["old"][0]["epochs"], runs["new"][0]["epochs"]
        rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)
        row.update(ratio=mean["new"]["wall"] / mean["old"]["wall"],
                   loss_rel_diff=max(rel(n["loss"], o["loss"]) for n, o in zip(new_e, old_e)),
                   reward_rel_diff=max(rel(n["reward_mean"], o["reward_mean"])
                                       for n, o in zip(new_e, old_e)))
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--recipe", default="prdp")
    args = p.parse_args()
    print(json.dumps(child(args.epochs, args.recipe)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
