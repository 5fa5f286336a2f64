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
overwritten. A record also names the host that trained it (CPU, vector extensions, JAX), since
runs on CPUs that round differently are equally valid draws but not bitwise repeatable.
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import json
import os
import tempfile
from typing import Callable, Mapping

import ml_collections

from prdp_jax import config as config_lib
from prdp_jax.config import to_json
from prdp_jax.experiments.findings import Arm, Regime, Scale
from prdp_jax.infra import files, runtime
from prdp_jax.infra.errors import UserError
from prdp_jax.training import loop

EVAL_SETS = ("world_small", "world_large_sample", "world_heldout")
COMPONENTS = ("alignment", "quality")


@dataclasses.dataclass(frozen=True)
class Size:
    """How big every run of an experiment is: each scale's prompt set, regime and evaluation."""

    recipe: str               # configs/world.py recipe the runs start from
    scales: Mapping[str, Scale]
    seeds: int                # seeds per arm
    lr_grid: tuple            # learning rates of the sweep (extended while its best is an edge)
    sweep_scale: str = "large"


FULL_LARGE = Regime(epochs=16, prompts_per_epoch=8, images_per_prompt=8, prompts_per_minibatch=2,
                    passes_per_epoch=1)
FULL_SMALL = Regime(epochs=8, prompts_per_epoch=8, images_per_prompt=8, prompts_per_minibatch=8,
                    passes_per_epoch=10)
QUICK_LARGE = Regime(epochs=2, prompts_per_epoch=4, images_per_prompt=4, prompts_per_minibatch=2,
                     passes_per_epoch=1)
QUICK_SMALL = Regime(epochs=2, prompts_per_epoch=4, images_per_prompt=4, prompts_per_minibatch=4,
                     passes_per_epoch=2)

SIZES = {
    # large: the main job (16 epochs of 8 captions x 8 images, 4 AdamW steps an epoch: 1,024
    # queries, 64 updates; ~4.5 minutes of training on a 2-core CPU). small: the paper's
    # small-scale regime, K = 10 passes of one AdamW step over all 64 trajectories of an epoch,
    # 8 epochs (512 queries, 80 updates; ~14 minutes). Each run is evaluated once, at its end, on
    # the first 256 captions of each set (world_small has 32) x 4 fixed-seed samples (~4 minutes;
    # the base's evaluation is shared by every run); its training-batch reward is its curve.
    # At small scale the verdicts read world_small, whose 32 captions x 4 samples measure a gain
    # to ~0.005 (the rate sweep), too coarse for the power rule: its runs take 32 samples a
    # caption (the large sets' first 32 captions x 32 then cost what 256 x 4 do).
    # The rate grid brackets the main job's 1e-4.
    "full": Size(recipe="prdp", scales={
        "small": Scale("world_small", FULL_SMALL, eval_prompts=32, eval_samples=32),
        "large": Scale("world_large", FULL_LARGE, eval_prompts=256, eval_samples=4),
        "large_k": Scale("world_large", FULL_SMALL, eval_prompts=256, eval_samples=4)},
        seeds=3, lr_grid=(3e-5, 1e-4, 3e-4)),
    # The CI smoke: a tiny model pretrained for a few steps, every code path once.
    "quick": Size(recipe="tiny", scales={
        "small": Scale("world_small", QUICK_SMALL, eval_prompts=4, eval_samples=2),
        "large": Scale("world_large", QUICK_LARGE, eval_prompts=4, eval_samples=2),
        "large_k": Scale("world_large", QUICK_SMALL, eval_prompts=4, eval_samples=2)},
        seeds=1, lr_grid=(3e-3,)),
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
               base_dir: str | None = None, reward: Mapping[str, float] | None = None
               ) -> ml_collections.ConfigDict:
    """The config of one run: the world recipe, the size, the scale, the arm, the seed (and the
    reward, if a finding trains on one component of the world's)."""
    c = world_config(size.recipe)
    if base_dir:
        c.world.base_dir = base_dir
    method = arm.overrides.get("method", "prdp")
    c.method = method
    where = size.scales[scale]
    r = where.regime
    c.prompts.train = where.train_set
    t = c.train
    t.epochs, t.prompts_per_epoch, t.passes_per_epoch = r.epochs, r.prompts_per_epoch, \
        r.passes_per_epoch
    t.images_per_prompt, t.prompts_per_minibatch = r.images_per_prompt, r.prompts_per_minibatch
    t.learning_rate = learning_rates.get(method, t.learning_rate)
    # The findings' clip (findings.CLIP, 1e-5) is within a few times of the sampler's rounding
    # against the scorer (~4e-6): theta_old is scored by the scorer, so at theta = theta_old the
    # clip sees exactly 0 (docs/stable_diffusion.md#precision).
    t.rescore_old = True
    if reward:
        c.reward.weights = dict(reward)
    c.eval.sets = EVAL_SETS
    c.eval.every_epochs = 0                      # the base (shared) and the end
    c.eval.max_prompts = where.eval_prompts
    c.eval.samples_per_prompt = where.eval_samples
    c.eval.shuffled_control = False
    c.log.progress = False
    c.log.grid_every_epochs = r.epochs
    c.checkpoint.every_epochs = 1                # an interrupted run loses at most an epoch
    c.checkpoint.max_to_keep = 1
    c.seed = seed
    for k, v in arm.overrides.items():
        if k != "method":
            config_lib.set_field(c, k, v)
    return c


def reference_key(config: ml_collections.ConfigDict | dict) -> str:
    """A digest of every config field the base model's evaluation depends on (of a config, or
    of its JSON form as a record keeps it): `evaluation.config_key`."""
    from prdp_jax.training import evaluation
    return evaluation.config_key(config)


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


def recorded_host(record: str) -> str:
    """The host that trained the run recorded in `record`, in words (runtime.host)."""
    with open(record) as f:
        h = json.load(f).get("host")
    if not h:
        return "a host not recorded (records before 8 December 2026)"
    isa = "AVX-512" if h["avx512"] else "AVX2" if h["avx2"] else "no AVX2"
    return f"{h['cpu']} ({isa}), JAX {h['jax']}"


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
    # A pipeline resolves its weights' folder into the config it is given (`model.path`); the
    # caller's config goes on to be a run's, whose record must keep the path as it was asked.
    config = copy.deepcopy(config)
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


# A base evaluation on this machine agrees with the recorded one when the two means differ by at
# most this fraction of the evaluation's standard error: another CPU's rounding moves the mean of
# the same shipped base by ~6e-7 (3e-5 of the SE); another base moves it by a fair part of it.
BASE_TOLERANCE = 1e-3


def check_base(before: dict, expected: Mapping[str, float], records_dir: str) -> None:
    """Refuses to add runs to `records_dir` from a base that evaluates differently from the one
    its records start from. The shipped base is the same file everywhere (SHA-256 verified), but
    a CPU with other vector instructions rounds its evaluation differently in the last digits,
    which `BASE_TOLERANCE` admits; a base pretrained afresh (`world.base_dir`) is another model,
    and runs from two models cannot be compared."""
    differ = {n: (before[n]["reward_mean"], r) for n, r in expected.items()
              if n in before and abs(before[n]["reward_mean"] - r)
              > BASE_TOLERANCE * before[n]["reward_se"]}
    if differ:
        name, (here, there) = next(iter(differ.items()))
        raise UserError(
            f"this machine's base model is not the one the runs recorded in {records_dir} start "
            f"from ({name}: {here:.6f} here, {there:.6f} there, more than "
            f"{BASE_TOLERANCE:g} of the evaluation's SE apart), so new runs would not be "
            f"comparable with them: use the base those runs used (world.base_dir), or pass --out "
            f"and --runs to start a separate set of results")


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
        files.atomic_write_json(record, {"config": wanted, "curve": out,
                                         "host": runtime.host()})
    return out


def curve(workdir: str, config: ml_collections.ConfigDict) -> dict:
    """A finished run's learning curve, from its files (queries 0 = the base model):

    {'queries', 'train_reward', 'drift', 'clip_frac': one per epoch;
     'clip_frac_by_pass': per epoch, the clip fraction of each pass (K > 1 only);
     'eval': {set: {'queries', 'reward', 'se', 'drift': base, [periodic,] final;
                    'gain_se': the paired standard error over prompts of final - base;
                    'components': {name: [base, final]}, 'components_gain_se': {name: se}}}}
    """
    from prdp_jax.training import evaluation
    per_epoch = config.train.prompts_per_epoch * config.train.images_per_prompt
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(workdir, "eval", "before.json")) as f:
        before = json.load(f)
    with open(os.path.join(workdir, "eval", "after.json")) as f:
        after = json.load(f)
    K = config.train.passes_per_epoch
    out = {"queries": [r["epoch"] * per_epoch for r in rows],
           "train_reward": [r["reward_mean"] for r in rows],
           "drift": [r["drift"] for r in rows], "clip_frac": [r["clip_frac"] for r in rows],
           "eval": {}}
    if K > 1:
        out["clip_frac_by_pass"] = [[r[f"clip_frac/pass{k + 1}"] for k in range(K)] for r in rows]
    final_q = config.train.epochs * per_epoch
    for name in config.eval.sets:
        points = [(0, before[name]["reward_mean"], before[name]["reward_se"], 0.0)]
        points += [(r["epoch"] * per_epoch, r[f"eval/{name}/reward_mean"],
                    r[f"eval/{name}/reward_se"], r[f"eval/{name}/drift_mean"])
                   for r in rows if f"eval/{name}/reward_mean" in r
                   and r["epoch"] * per_epoch < final_q]
        a = after[name]
        points.append((final_q, a["reward_mean"], a["reward_se"], a["drift_mean"]))
        q, m, se, d = (list(v) for v in zip(*points))
        # the world's two components, alone or inside the preference reward
        comps = {k.rsplit("/", 1)[-1]: k for k in before[name].get("components", {})
                 if k in COMPONENTS or k in [f"preference/{c}" for c in COMPONENTS]}
        out["eval"][name] = {
            "queries": q, "reward": m, "se": se, "drift": d,
            "gain_se": evaluation.change_se(before[name], a),
            "components": {c: [before[name]["components"][k], a["components"][k]]
                           for c, k in comps.items()},
            "components_gain_se": {c: evaluation.change_se(before[name], a, k)
                                   for c, k in comps.items()}}
    return out
