"""Runs experiment arms through the trainer and reads their learning curves back.

A run is `training.loop.train_and_evaluate` on the world config with an arm's overrides, a scale,
a size and a seed, in its own work directory. A run that finished before (its eval/summary.json exists
and its config.json matches) is read back instead of rerun; an interrupted one resumes from its
checkpoint. Curves come from metrics.jsonl (one row per epoch, with the periodic evaluation) and
eval/before.json (the base model, at zero reward queries).

Every arm and seed of a size evaluates the same base model on the same fixed seeds, so the
reference evaluation is computed once and shared: `run` keeps each before.json under
`<runs>/before/<key>.json`, keyed by every config field the evaluation reads (the model, world,
schedule, sampling, reward, evaluation, prompt-file and mesh sections; not the method, its
hyperparameters, the training prompts or the run's seed), and places it in a new run's workdir,
whose trainer then reads it instead of sampling it again (~40 s of a full-size run). The shared
copy brings no before-grids.

Run folders are local and large (checkpoints), so each finished run also leaves a record, a small
JSON file of its config and curve (`record=`; the experiments keep them under
docs/results/runs/ and commit them). A record whose config equals the run's is read back instead
of training again, on any machine: the findings of a later session build on the runs of an
earlier one. A record whose config differs (the code or the size changed) is retrained and
overwritten.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import tempfile
from typing import Callable, Mapping

import ml_collections

from prdp_jax import config as config_lib
from prdp_jax.config import to_json
from prdp_jax.experiments.findings import Arm
from prdp_jax.infra import files
from prdp_jax.infra.errors import UserError
from prdp_jax.training import loop

EVAL_SETS = ("world_small", "world_large_sample", "world_heldout")
TRAIN_SETS = {"small": "world_small", "large": "world_large"}


@dataclasses.dataclass(frozen=True)
class Size:
    """How big every run of an experiment is."""

    recipe: str               # configs/world.py recipe the runs start from
    epochs: int
    prompts_per_epoch: int
    images_per_prompt: int
    prompts_per_minibatch: int
    eval_every: int           # evaluate on the fixed-seed sets every this many epochs
    eval_prompts: int         # first this many prompts of each evaluation set
    eval_samples: int         # samples per evaluation prompt
    seeds: int                # seeds per arm
    lr_grid: tuple            # learning rates of the sweep

    @property
    def queries_per_epoch(self) -> int:
        return self.prompts_per_epoch * self.images_per_prompt


SIZES = {
    # The world job's budget (16 epochs x 64 queries). A run is ~8 minutes on a 2-core CPU
    # (cached base; 23.5 s epochs and five evaluations of 3 x 32 prompts x 2 samples; the recorded
    # runs took ~10, before the update differentiated only the trainable params), so a finding of
    # 2 arms x 3 seeds takes under an hour, and the shared rate sweep (2 methods x 3 rates) one
    # more. The grid brackets the world's cross-attention rate 1e-4.
    "full": Size(recipe="prdp", epochs=16, prompts_per_epoch=16, images_per_prompt=4,
                 prompts_per_minibatch=8, eval_every=4, eval_prompts=32, eval_samples=2, seeds=3,
                 lr_grid=(3e-5, 1e-4, 3e-4)),
    # The CI smoke: a tiny model pretrained for a few steps, every code path once.
    "quick": Size(recipe="tiny", epochs=2, prompts_per_epoch=4, images_per_prompt=4,
                  prompts_per_minibatch=2, eval_every=2, eval_prompts=4, eval_samples=2, seeds=1,
                  lr_grid=(3e-3,)),
}


def world_config(recipe: str) -> ml_collections.ConfigDict:
    """configs/world.py:<recipe> from the repository root."""
    return config_lib.load_named("world", recipe)


def arm_key(size: Size, arm: Arm) -> str:
    """The folder name of an arm's runs: its overrides that change the world config, so that an
    arm set to a config default (PRDP at the config's own beta) shares the runs of the plain arm."""
    base = world_config(size.recipe)
    changed = {k: v for k, v in arm.overrides.items()
               if k == "method" or config_lib.get_field(base, k) != v}
    return Arm(arm.name, changed).key()


def run_config(size: Size, scale: str, arm: Arm, seed: int, learning_rates: Mapping[str, float],
               base_dir: str | None = None) -> ml_collections.ConfigDict:
    """The config of one run: the world recipe, the size, the scale, the arm, the seed."""
    c = world_config(size.recipe)
    if base_dir:
        c.world.base_dir = base_dir
    method = arm.overrides.get("method", "prdp")
    c.method = method
    c.prompts.train = TRAIN_SETS[scale]
    t = c.train
    t.epochs, t.prompts_per_epoch = size.epochs, size.prompts_per_epoch
    t.images_per_prompt, t.prompts_per_minibatch = size.images_per_prompt, size.prompts_per_minibatch
    t.learning_rate = learning_rates.get(method, t.learning_rate)
    c.eval.sets = EVAL_SETS
    c.eval.every_epochs = size.eval_every
    c.eval.max_prompts = size.eval_prompts
    c.eval.samples_per_prompt = size.eval_samples
    c.eval.shuffled_control = False
    c.log.progress = False
    c.log.grid_every_epochs = size.epochs
    c.checkpoint.every_epochs = size.eval_every  # an interrupted run resumes from its last eval
    c.checkpoint.max_to_keep = 1
    c.seed = seed
    for k, v in arm.overrides.items():
        if k != "method":
            config_lib.set_field(c, k, v)
    return c


# Config sections the reference evaluation never reads (besides train, of which it reads only the
# gradient tiling of its drift pass, and prompts, whose file paths evaluation sets may name).
NOT_READ_BY_EVALUATION = ("method", "seed", "prdp", "ddpo", "log", "checkpoint")


def reference_key(config: ml_collections.ConfigDict | dict) -> str:
    """A digest of every config field the base model's evaluation depends on (of a config, or
    of its JSON form as a record keeps it)."""
    d = json.loads(json.dumps(config) if isinstance(config, dict) else to_json(config))
    for k in NOT_READ_BY_EVALUATION:
        d.pop(k, None)
    d["train"] = {k: d["train"][k] for k in ("microbatch_trajectories", "microbatch_steps")}
    d["prompts"].pop("train")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def reference_path(reference_cache: str, config: ml_collections.ConfigDict) -> str:
    """Where `reference_cache` keeps the base model's evaluation under `config`."""
    return os.path.join(reference_cache, reference_key(config) + ".json")


def recorded(config: ml_collections.ConfigDict, record: str | None) -> dict | None:
    """The curve kept in `record` if it was made with exactly `config`, else None."""
    if not record or not os.path.exists(record):
        return None
    with open(record) as f:
        kept = json.load(f)
    return kept["curve"] if kept.get("config") == json.loads(to_json(config)) else None


def recorded_base(records_dir: str, config: ml_collections.ConfigDict) -> dict | None:
    """{set: reward} of the base model that the records under `records_dir` sharing `config`'s
    reference evaluation start from (their curves' first point), or None if there are none."""
    key = reference_key(config)
    for path in sorted(glob.glob(os.path.join(records_dir, "**", "*.json"), recursive=True)):
        with open(path) as f:
            kept = json.load(f)
        if "config" in kept and reference_key(kept["config"]) == key:
            return {n: e["reward"][0] for n, e in kept["curve"]["eval"].items()}
    return None


def reference(config: ml_collections.ConfigDict, reference_cache: str, log: Callable = print
              ) -> dict:
    """The base model's evaluation (a run's eval/before.json) under `config`, computed on this
    machine once (pretraining the base if it is not cached) and kept in `reference_cache`."""
    path = reference_path(reference_cache, config)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    from prdp_jax.infra import sharding
    from prdp_jax.pipelines.factory import build_pipeline
    from prdp_jax.rewards import combine as rewards
    from prdp_jax.training import evaluation
    mesh = sharding.mesh_from_config(config.mesh)
    pipe = build_pipeline(config, mesh, log=log)
    evaluator = evaluation.Evaluator(config, pipe, mesh,
                                     rewards.combine(dict(config.reward.weights), config))
    with tempfile.TemporaryDirectory() as tmp:
        before = evaluator.run_sets(pipe.unet_params(), None, pipe.frozen_params(), "before", tmp,
                                    show_progress=False, grids=False)
    os.makedirs(reference_cache, exist_ok=True)
    files.atomic_write_json(path, before)
    return before


def check_base(before: dict, expected: Mapping[str, float], records_dir: str) -> None:
    """Refuses to add runs to `records_dir` from a base that evaluates differently from the one
    its records start from. The base is pretrained on each machine; a CPU that rounds
    differently (another vector instruction set) pretrains a different model, and runs from two
    bases cannot be compared."""
    differ = {n: (before[n]["reward_mean"], r) for n, r in expected.items()
              if n in before and before[n]["reward_mean"] != r}
    if differ:
        name, (here, there) = next(iter(differ.items()))
        raise UserError(
            f"this machine's base model is not the one the runs recorded in {records_dir} start "
            f"from ({name}: {here:.4f} here, {there:.4f} there; its CPU pretrains it differently), "
            f"so new runs would not be comparable with them: run on a machine that reproduces "
            f"the base, or pass --out and --runs to start a separate set of results")


def run(config: ml_collections.ConfigDict, workdir: str, log: Callable = print,
        reference_cache: str | None = None, record: str | None = None) -> dict:
    """Trains (or reads back) one run; returns its curve (see `curve`). With `reference_cache`
    (a folder), the before-finetuning evaluation is shared between runs; with `record` (a JSON
    path), a finished run is kept as, and read back from, its config and curve (module
    docstring)."""
    wanted = json.loads(to_json(config))
    kept = recorded(config, record)
    if kept is not None:
        return kept
    done = os.path.join(workdir, "eval", "summary.json")
    saved = os.path.join(workdir, "config.json")
    before = os.path.join(workdir, "eval", "before.json")
    shared = reference_path(reference_cache, config) if reference_cache else None
    finished = False
    if os.path.exists(done) and os.path.exists(saved):
        with open(saved) as f:
            finished = wanted == json.load(f)
    if not finished:
        if shared and os.path.exists(shared) and not os.path.exists(before):
            os.makedirs(os.path.dirname(before), exist_ok=True)
            with open(shared) as f:
                files.atomic_write_json(before, json.load(f))
        loop.train_and_evaluate(config, workdir, log=log)
    if shared and not os.path.exists(shared):
        os.makedirs(reference_cache, exist_ok=True)
        with open(before) as f:
            files.atomic_write_json(shared, json.load(f))
    out = curve(workdir, config)
    if record:
        os.makedirs(os.path.dirname(record), exist_ok=True)
        files.atomic_write_json(record, {"config": wanted, "curve": out})
    return out


def curve(workdir: str, config: ml_collections.ConfigDict) -> dict:
    """{'queries': [...], 'train_reward': [...], 'drift': [...], 'eval': {set: {'queries',
    'reward', 'se', 'drift'}}} from a finished run's files (queries 0 = the base model)."""
    per_epoch = config.train.prompts_per_epoch * config.train.images_per_prompt
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(workdir, "eval", "before.json")) as f:
        before = json.load(f)
    out = {"queries": [r["epoch"] * per_epoch for r in rows],
           "train_reward": [r["reward_mean"] for r in rows],
           "drift": [r["drift"] for r in rows], "eval": {}}
    for name in config.eval.sets:
        points = [(0, before[name]["reward_mean"], before[name]["reward_se"], 0.0)]
        points += [(r["epoch"] * per_epoch, r[f"eval/{name}/reward_mean"],
                    r[f"eval/{name}/reward_se"], r[f"eval/{name}/drift_mean"])
                   for r in rows if f"eval/{name}/reward_mean" in r]
        q, m, se, d = (list(v) for v in zip(*points))
        out["eval"][name] = {"queries": q, "reward": m, "se": se, "drift": d}
    return out
