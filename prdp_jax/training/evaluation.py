"""Fixed-seed evaluation: the same noise for the same (prompt, sample) in every method and run.

Sample j of prompt i of an evaluation set always uses the key fold_in(fold_in(key(seed), i), j),
whatever the batch size or device count. For each set we report the reward's mean and standard
error (over prompts, each prompt averaging its samples), every reward component, and the drift
from the reference: the mean per-step log-ratio log pi_theta - log pi_ref over the evaluation
trajectories of the set's first `eval.drift_prompts` prompts (0 for the reference itself).
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prdp_jax.core import tiled_gradient
from prdp_jax.infra import files
from prdp_jax.infra import metrics as metrics_lib
from prdp_jax.infra import sharding
from prdp_jax.infra.progress import progress
from prdp_jax.pipelines import base as pipeline_lib
from prdp_jax.prompts import sets as prompt_sets
from prdp_jax.rewards import combine as rewards_lib
from prdp_jax.training import steps as steps_lib


def sample_and_score(ctx: steps_lib.StepContext, params, ref_params, frozen,
                     prompt_context: jax.Array, uncond: jax.Array, key_data: jax.Array,
                     prompt_index: jax.Array, sample_index: jax.Array):
    """Samples a batch with fixed per-(prompt, sample) keys (the trainer's sampler step).

    Args:
      prompt_context: [P, L, D];  prompt_index, sample_index: [b] int32.
    Returns:
      (images [b, H, W, 3], drift [b]: the mean per-step log pi_params - log pi_ref of each
      trajectory, with log pi_params recorded by the sampler and log pi_ref re-scored; exactly 0
      when ref_params is None, i.e. when evaluating the reference itself).
    """
    base = jax.random.wrap_key_data(key_data)
    keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j))(
        prompt_index, sample_index)
    context = ctx.constrain(prompt_context[prompt_index])
    traj, images = steps_lib.sample_and_decode(ctx, params, frozen, context, uncond, keys)
    zeros = jnp.zeros(context.shape[:1], jnp.float32)
    if ref_params is None:
        return images, zeros
    transitions = tiled_gradient.Transitions(traj.latents, context, traj.log_probs, traj.log_probs,
                                     zeros, zeros)
    ref = tiled_gradient.score(ctx.pipe.denoiser, ref_params, transitions, uncond, ctx.coeffs,
                               ctx.score_tiling, **ctx.policy_kwargs)
    return images, (traj.log_probs - ref).mean(-1)


class Evaluator:
    """Compiles one fixed-size sampling+scoring step and evaluates prompt sets with it."""

    def __init__(self, config: ml_collections.ConfigDict, pipe: pipeline_lib.Pipeline, mesh,
                 reward_fn):
        self.config, self.pipe, self.mesh, self.reward_fn = config, pipe, mesh, reward_fn
        e = config.eval
        self.batch = e.batch_size
        shards = sharding.batch_shards(mesh)
        sharding.check_batch_divisible("eval.batch_size", self.batch, shards)
        coeffs = steps_lib.policy_coefficients(config)
        self.num_steps = coeffs.num_stochastic
        t = config.train
        traj = min(t.microbatch_trajectories, self.batch)
        traj -= traj % shards
        tiling = tiled_gradient.Tiling(self.batch, self.num_steps, trajectories=max(traj, shards),
                               steps=t.microbatch_steps, shards=shards)
        batch = sharding.batch_sharding(mesh)
        self.batch_sharding = batch
        self.repl = sharding.replicated(mesh)
        self._step = jax.jit(functools.partial(
            sample_and_score, steps_lib.step_context(config, pipe, mesh, coeffs, tiling)),
            out_shardings=(batch, batch))
        self._encode = jax.jit(pipe.encode_text, out_shardings=self.repl)
        self._head = jax.jit(lambda x, k: x[:k], static_argnums=1, out_shardings=self.repl)

    def run(self, params, ref_params, frozen, prompts: Sequence[str], samples_per_prompt: int,
            name: str = "", grid_path: str | None = None, show_progress: bool = True) -> dict:
        """Evaluates one prompt set; returns a JSON-ready dict of statistics.

        ref_params=None evaluates `params` as the reference itself (drift 0).
        """
        t0 = time.perf_counter()
        prompts = list(prompts)
        P, S = len(prompts), samples_per_prompt
        total = P * S
        padded = math.ceil(total / self.batch) * self.batch
        prompt_index = np.minimum(np.arange(padded) // S, P - 1).astype(np.int32)
        sample_index = (np.arange(padded) % S).astype(np.int32)
        context = self._encode(frozen, self.pipe.tokenizer(prompts))
        uncond = self._encode(frozen, self.pipe.tokenizer([""]))
        key = sharding.put(jax.random.key_data(jax.random.key(self.config.eval.seed)), self.repl)
        rewards, drifts, infos, grid, shuffled = [], [], [], [], []
        # The drift needs a scoring pass under the reference (as long as the sampling itself):
        # only the batches of the first `eval.drift_prompts` prompts take it.
        D = min(self.config.eval.get("drift_prompts", 0) or P, P)
        batches = range(0, padded, self.batch)
        for start in progress(batches, desc=f"eval {name}", leave=False,
                              enabled=show_progress and len(batches) > 1):
            sl = slice(start, start + self.batch)
            with_drift = prompt_index[start] < D
            images, drift = self._step(
                params, ref_params if with_drift else None, frozen, context, uncond, key,
                sharding.put(prompt_index[sl], self.batch_sharding),
                sharding.put(sample_index[sl], self.batch_sharding))
            keep = np.arange(start, start + self.batch) < total
            batch_prompts = [prompts[i] for i in prompt_index[sl]]
            value, info = rewards_lib.score(self.reward_fn, images, batch_prompts,
                                            [{"prompt_index": int(i)} for i in prompt_index[sl]])
            rewards.append(value[keep])
            if self.config.eval.shuffled_control:
                # The same images against another prompt's caption: how much of the reward the
                # caption explains (a caption-blind model scores the same on both).
                other = [prompts[(i + 1) % P] for i in prompt_index[sl]]
                shuffled.append(rewards_lib.score(self.reward_fn, images, other,
                                                  [{}] * len(other))[0][keep])
            infos.append({k: v[keep] for k, v in info.items() if np.ndim(v) == 1})
            drifts.append(sharding.to_host(drift)[keep])
            # The grid's prompts lead the set, so their images lead the batch.
            in_grid = int((keep & (prompt_index[sl] < self.config.log.grid_prompts)).sum())
            if grid_path is not None and in_grid:
                grid.append(sharding.to_host(self._head(images, in_grid)))
        rewards, drift = np.concatenate(rewards), np.concatenate(drifts)
        per_prompt = rewards.reshape(P, S).mean(1)
        drift = drift[:D * S]
        out = {
            "set": name, "prompts": P, "samples_per_prompt": S,
            "reward_mean": float(rewards.mean()),
            "reward_se": float(per_prompt.std(ddof=1) / math.sqrt(P)) if P > 1 else 0.0,
            "drift_mean": float(drift.mean()),
            "drift_se": float(drift.reshape(D, S).mean(1).std(ddof=1) / math.sqrt(D)) if D > 1 else 0.0,
            "drift_prompts": D,
            "components": {k: float(np.concatenate([d[k] for d in infos]).mean()) for k in infos[0]},
            # Per prompt too, so that each component's change gets its paired standard error.
            "per_prompt_components": {k: [float(v) for v in np.concatenate(
                [d[k] for d in infos]).reshape(P, S).mean(1)] for k in infos[0]},
            "seconds": time.perf_counter() - t0,
            # Kept so that a before/after change gets its paired standard error (same seeds).
            "per_prompt_reward": [float(v) for v in per_prompt],
        }
        if shuffled and P > 1:
            shuffled = np.concatenate(shuffled)
            out["reward_shuffled_captions"] = float(shuffled.mean())
        if grid_path is not None and grid:
            metrics_lib.save_reward_grid(grid_path, np.concatenate(grid), prompts, rewards,
                                         per_prompt=S, rows=self.config.log.grid_prompts,
                                         columns=S)
        return out

    def run_sets(self, params, ref_params, frozen, label: str, workdir: str,
                 show_progress: bool = True, grids: bool = True) -> dict:
        """Evaluates every set of `config.eval.sets`; writes eval/<label>.json (and grids)."""
        results, key = {}, config_key(self.config)
        for name in self.config.eval.sets:
            prompts = eval_prompts(self.config, name)  # checked at start (load_eval_set)
            results[name] = self.run(params, ref_params, frozen, prompts,
                                     self.config.eval.samples_per_prompt, name,
                                     os.path.join(workdir, "eval",
                                                  f"{label}_{prompt_sets.slug(name)}.png")
                                     if grids else None, show_progress)
            results[name]["config_key"] = key   # see `reusable`
        if jax.process_index() == 0:
            os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
            files.atomic_write_json(os.path.join(workdir, "eval", f"{label}.json"), results)
        return results


# Config sections an evaluation never reads (besides train, of which it reads only the gradient
# tiling of its drift pass, and prompts, whose file paths evaluation sets may name).
NOT_READ_BY_EVALUATION = ("method", "seed", "prdp", "ddpo", "log", "checkpoint")


def config_key(config: ml_collections.ConfigDict | dict) -> str:
    """A digest of every config field an evaluation of given params depends on (the model,
    world, schedule, sampling, reward, evaluation, prompt-file and mesh sections), of a config
    or of its JSON form."""
    import hashlib
    import json
    from prdp_jax.config import to_json
    d = json.loads(json.dumps(config) if isinstance(config, dict) else to_json(config))
    for k in NOT_READ_BY_EVALUATION:
        d.pop(k, None)
    d["train"] = {k: d["train"][k] for k in ("microbatch_trajectories", "microbatch_steps")}
    d["prompts"].pop("train")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def reusable(results: dict | None, config: ml_collections.ConfigDict) -> bool:
    """Whether a saved evaluation (eval/before.json) was made under `config`'s evaluation
    fields: a workdir resumed with another reward, set or model must not reuse it."""
    key = config_key(config)
    return bool(results) and set(results) == set(config.eval.sets) and all(
        r.get("config_key") == key for r in results.values())


def flatten(results: dict) -> dict:
    """{set: stats} -> flat scalars {'eval/<set>/<stat>': value} for a metrics row."""
    return {f"eval/{name}/{k}": v for name, r in results.items() for k, v in r.items()
            if isinstance(v, (int, float))
            and k not in ("prompts", "samples_per_prompt", "drift_prompts")}


def change_se(before: dict, after: dict, component: str | None = None) -> float | None:
    """Standard error of the reward (or a component's) change over prompts, pairing each prompt's
    before and after samples (they share their seeds); None when the per-prompt values are not
    both recorded."""
    if component is None:
        b, a = before.get("per_prompt_reward"), after.get("per_prompt_reward")
    else:
        b = before.get("per_prompt_components", {}).get(component)
        a = after.get("per_prompt_components", {}).get(component)
    if not b or not a or len(a) != len(b) or len(a) < 2:
        return None
    diff = np.asarray(a) - np.asarray(b)
    return float(diff.std(ddof=1) / math.sqrt(len(diff)))


def component_se(result: dict, component: str) -> float:
    values = result.get("per_prompt_components", {}).get(component)
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if values and len(values) > 1 else 0.0


def component_table(before: dict, after: dict | None = None) -> list[str]:
    """Per set, each reward component's mean ± standard error (and its change ± paired SE)."""
    lines = []
    for name, b in before.items():
        a = after.get(name) if after is not None else None
        lines.append(f"{name}: components")
        for k, v in b.get("components", {}).items():
            row = f"  {k:<30} {v:>7.4f} ± {component_se(b, k):.4f}"
            if a is not None and k in a.get("components", {}):
                se = change_se(b, a, k)
                row += (f"  {a['components'][k]:>7.4f} ± {component_se(a, k):.4f}  "
                        f"{a['components'][k] - v:+.4f}" + (f" ± {se:.4f}" if se is not None else ""))
            lines.append(row)
    return lines


def table(before: dict, after: dict | None = None) -> list[str]:
    """A before/after table, one row per evaluation set: reward mean ± standard error, its change
    ± the paired standard error of the change (same prompts and seeds before and after), the drift
    from the reference after finetuning, and (when evaluated) the reward of the same images scored
    against shuffled captions."""
    shuffled = any("reward_shuffled_captions" in r for r in before.values())
    head = f"{'set':<20} {'prompts':>7}  {'before':>15}"
    if after is not None:
        head += f"  {'after':>15}  {'change':>17}  {'drift (after)':>16}"
    if shuffled:
        head += "  shuffled captions" + (" (before/after)" if after is not None else "")
    lines = [head]
    for name, b in before.items():
        row = f"{name:<20} {b['prompts']:>7}  {b['reward_mean']:>7.4f} ± {b['reward_se']:.4f}"
        a = after.get(name) if after is not None else None
        if a is not None:
            se = change_se(b, a)
            change = f"{a['reward_mean'] - b['reward_mean']:+.4f}" + (
                f" ± {se:.4f}" if se is not None else "")
            row += (f"  {a['reward_mean']:>7.4f} ± {a['reward_se']:.4f}  {change:>17}  "
                    f"{a['drift_mean']:>8.4f} ± {a['drift_se']:.4f}")
        if shuffled and "reward_shuffled_captions" in b:
            row += f"  {b['reward_shuffled_captions']:.4f}"
            if a is not None and "reward_shuffled_captions" in a:
                row += f" / {a['reward_shuffled_captions']:.4f}"
        lines.append(row)
    return lines


def side_by_side(left: str, right: str, out: str, labels: tuple[str, str] = ("before", "after")) -> None:
    """Puts two grid PNGs side by side under a label each (the README's before/after picture)."""
    from PIL import Image, ImageDraw
    a, b = Image.open(left).convert("RGB"), Image.open(right).convert("RGB")
    gap, head = 12, 18
    canvas = Image.new("RGB", (a.width + gap + b.width, head + max(a.height, b.height)), "white")
    canvas.paste(a, (0, head))
    canvas.paste(b, (a.width + gap, head))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), labels[0], fill="black")
    draw.text((a.width + gap + 4, 3), labels[1], fill="black")
    files.atomic_save_image(canvas, out)


def eval_prompts(config: ml_collections.ConfigDict, name: str) -> list[str]:
    """The prompts of an evaluation set: its first `eval.max_prompts` (0 = all)."""
    prompts = prompt_sets.load(name, config)
    limit = config.eval.max_prompts
    return prompts[:limit] if limit else prompts


def load_eval_set(config: ml_collections.ConfigDict, pipe: pipeline_lib.Pipeline, name: str) -> list[str]:
    """`eval_prompts`, each checked by the pipeline's prompt validator (the world: every caption
    parses in its grammar) before anything runs."""
    prompts = eval_prompts(config, name)
    pipe.check_prompts(prompts, name)
    return prompts
