"""Online reward finetuning (Algorithm 1 of PRDP, and the DDPO baseline) over a device mesh.

Each epoch: snapshot theta_old <- theta; draw prompts; sample B trajectories per prompt from
theta_old (one scan per sampler batch); reward the images; re-score every transition under
theta_old and the frozen reference (so the first update is exactly on-policy); then K passes over
the epoch's prompts in shuffled minibatches, one AdamW step per minibatch with the exact
microbatched gradient of `update.py`. Every step is a module-level pure function, jitted with
explicit shardings and compiled ahead of time; compile times and memory are logged at start.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prdp_jax import checkpoint as ckpt_lib
from prdp_jax import config as config_lib
from prdp_jax import ddpo, diffusion, evaluate, metrics as metrics_lib, pipeline as pipeline_lib
from prdp_jax import prompts as prompt_sets
from prdp_jax import preemption, rdp, rewards as rewards_lib, sampler, sharding, update
from prdp_jax.errors import ConfigError
from prdp_jax.progress import progress


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint must hold besides the JSON metadata.

    Attributes:
      params: the trainable UNet params.
      opt_state: the optax state (AdamW moments and step count).
      key: uint32 [2] raw PRNG key data; epoch e samples with fold_in(key, e).
    """

    params: Any
    opt_state: Any
    key: jax.Array


def trainable_labels(pattern: str, params) -> Any:
    """'train' / 'frozen' per param leaf: 'train' where `pattern` is found in its path."""
    regex = re.compile(pattern)
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if regex.search(sharding.param_path(path)) else "frozen", params)
    if "train" not in jax.tree.leaves(labels):
        first_path = jax.tree_util.tree_flatten_with_path(params)[0][0][0]
        raise ConfigError(f"train.trainable={pattern!r} matches no UNet param; paths look like "
                          f"{sharding.param_path(first_path)!r}")
    return labels


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay after a global-norm clip (paper Table 4), on the params
    that `train.trainable` selects (all by default; the others get zero updates and no state).

    Its state (both AdamW moments) is float32 whatever the params' dtype: `init` sees float32
    params, and the float32 gradients keep it float32 through every update.
    """
    t = config.train
    opt = optax.chain(
        optax.clip_by_global_norm(t.max_grad_norm),
        optax.adamw(t.learning_rate, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                    weight_decay=t.weight_decay, mu_dtype=jnp.float32))
    if t.trainable:
        # The clip sees only the trainable gradients: frozen ones never move anything.
        opt = optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()},
                                    functools.partial(trainable_labels, t.trainable))
    as_f32 = lambda params: jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    return optax.GradientTransformation(lambda params: opt.init(as_f32(params)), opt.update)


def make_objective(config: ml_collections.ConfigDict) -> update.Objective:
    """The loss as a function of per-step log-probs: (log_probs [n, T], minibatch) -> (loss, aux)."""
    if config.method == "prdp":
        p = config.prdp
        return lambda lp, mb: rdp.rdp_loss(
            lp, mb.log_probs_old, mb.log_probs_ref, mb.rewards,
            images_per_prompt=config.train.images_per_prompt, beta=p.beta, clip_eps=p.clip_eps,
            step_reduction=p.step_reduction)
    return lambda lp, mb: ddpo.ppo_loss(lp, mb.log_probs_old, mb.advantages,
                                        clip_range=config.ddpo.clip_range)


# ---------------------------------------------------------------------------------------------
# Module-level pure step functions (jitted with shardings in `Trainer`).
# ---------------------------------------------------------------------------------------------

def encode_prompts(pipe: pipeline_lib.Pipeline, frozen, ids: jax.Array) -> jax.Array:
    """[N, L] token ids -> [N, L, D] prompt embeddings."""
    return pipe.encode_text(frozen, ids)


def sample_batch(pipe: pipeline_lib.Pipeline, coeffs: diffusion.StepCoefficients,
                 config: ml_collections.ConfigDict, constrain, params, frozen,
                 prompt_context: jax.Array, uncond: jax.Array, key_data: jax.Array,
                 traj_index: jax.Array):
    """Samples trajectories and decodes their images.

    Args:
      prompt_context: [N, L, D] embeddings of the epoch's prompts.
      uncond: [1, L, D] embedding of "".
      key_data: uint32 [2] the epoch's key; trajectory g uses fold_in(key, g).
      traj_index: [b] int32 global trajectory indices (prompt = index // images_per_prompt).
    Returns:
      (Trajectory [b, ...], images [b, H, W, 3] float32 in [0, 1]).
    """
    key = jax.random.wrap_key_data(key_data)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, traj_index)
    context = constrain(prompt_context[traj_index // config.train.images_per_prompt])
    traj = sampler.sample(pipe.denoiser, params, coeffs, context, uncond, keys,
                          latent_shape=pipe.latent_shape,
                          guidance_scale=config.sample.guidance_scale,
                          reduce=config.sample.logprob_reduction, constrain=constrain)
    return traj, constrain(pipe.decode(frozen, traj.final))


def arrange(batches: tuple, prompt_context: jax.Array, rewards: jax.Array, advantages: jax.Array,
            traj_perm: jax.Array, *, images_per_prompt: int, num_minibatches: int) -> update.Minibatch:
    """Gathers an epoch's sampled trajectories into shuffled minibatches.

    Args:
      batches: sampler outputs, a tuple of Trajectory with leading size b each.
      prompt_context: [N, L, D]; rewards, advantages: [N*B]; traj_perm: [N*B] a permutation of
        trajectories that keeps each prompt's images contiguous.
    Returns:
      Minibatch with leading dims [M, n] (log_probs_old holds the sampler's log-probs until
      re-scored; log_probs_ref is zero until scored).
    """
    latents = jnp.concatenate([b.latents for b in batches])[traj_perm]
    log_probs = jnp.concatenate([b.log_probs for b in batches])[traj_perm]
    split = lambda x: x.reshape((num_minibatches, -1) + x.shape[1:])
    return update.Minibatch(
        latents=split(latents), context=split(prompt_context[traj_perm // images_per_prompt]),
        log_probs_old=split(log_probs), log_probs_ref=split(jnp.zeros_like(log_probs)),
        rewards=split(rewards[traj_perm]), advantages=split(advantages[traj_perm]))


def rearrange(epoch: update.Minibatch, traj_perm: jax.Array) -> update.Minibatch:
    """Reshuffles [M, n, ...] minibatches with a new trajectory permutation."""
    def one(x):
        flat = x.reshape((-1,) + x.shape[2:])[traj_perm]
        return flat.reshape(x.shape)
    return jax.tree.map(one, epoch)


def set_log_probs(epoch: update.Minibatch, old: jax.Array, ref: jax.Array) -> update.Minibatch:
    """Stores the re-scored [M, n, T] log-probs of theta_old and the reference."""
    return epoch.replace(log_probs_old=old, log_probs_ref=ref)


def minibatch(epoch: update.Minibatch, m: jax.Array) -> update.Minibatch:
    return jax.tree.map(lambda x: x[m], epoch)


def score_minibatch(pipe, coeffs, tiling, config, constrain, params, epoch, uncond, m):
    """[n, T] log pi_params of minibatch m's transitions (forward only)."""
    return update.score(pipe.denoiser, params, minibatch(epoch, m), uncond, coeffs, tiling,
                        guidance_scale=config.sample.guidance_scale,
                        reduce=config.sample.logprob_reduction, constrain=constrain)


def minibatch_weights(objective, epoch, m, log_probs):
    """(loss, dL/dlog_probs [n, T], aux) of minibatch m."""
    return update.loss_and_weights(objective, log_probs, minibatch(epoch, m))


def grad_tile(pipe, coeffs, tiling, config, constrain, params, epoch, uncond, weights, m, j, c, grads):
    """Adds tile (j, c) of minibatch m to the gradient accumulator (only the params that
    `train.trainable` selects are differentiated; the others' gradients stay exactly zero)."""
    t = config.train.trainable
    mask = (jax.tree.map(lambda label: label == "train", trainable_labels(t, params)) if t
            else None)
    return update.accumulate_grad(pipe.denoiser, params, minibatch(epoch, m), uncond, weights, j, c,
                                  grads, coeffs, tiling,
                                  guidance_scale=config.sample.guidance_scale,
                                  reduce=config.sample.logprob_reduction, constrain=constrain,
                                  trainable=mask)


def apply_gradients(optimizer, params, opt_state, grads):
    """One optimiser step; returns (params, opt_state, global grad norm before clipping)."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)


# ---------------------------------------------------------------------------------------------
# The trainer.
# ---------------------------------------------------------------------------------------------

class Trainer:
    """Compiles the step functions for one config and mesh, and runs epochs."""

    def __init__(self, config: ml_collections.ConfigDict, pipe: pipeline_lib.Pipeline, mesh: Mesh,
                 log=print):
        self.config, self.pipe, self.mesh, self.log = config, pipe, mesh, log
        t = config.train
        self.num_prompts, self.images_per_prompt = t.prompts_per_epoch, t.images_per_prompt
        self.num_traj = self.num_prompts * self.images_per_prompt
        self.num_minibatches = self.num_prompts // t.prompts_per_minibatch
        self.mb_traj = t.prompts_per_minibatch * self.images_per_prompt
        self.sample_size = config.sample.batch_size or self.num_traj
        self.shards = sharding.batch_shards(mesh)
        for what, size in (("an epoch's trajectories (prompts_per_epoch x images_per_prompt)",
                            self.num_traj),
                           ("sample.batch_size", self.sample_size),
                           ("a minibatch's trajectories (prompts_per_minibatch x images_per_prompt)",
                            self.mb_traj)):
            if size % self.shards:
                raise ConfigError(f"{what} = {size} is not divisible by the {self.shards} batch "
                                  f"shards (mesh.data x mesh.fsdp); change the batch or the mesh")
        self.schedule = diffusion.make_schedule(**config.schedule.to_dict())
        self.coeffs = diffusion.step_coefficients(self.schedule, config.sample.num_steps,
                                                  config.sample.eta, config.sample.final_step)
        self.num_steps = self.coeffs.num_stochastic  # the policy's steps (transitions per chain)
        self.tiling = update.Tiling(self.mb_traj, self.num_steps,
                                    trajectories=min(t.microbatch_trajectories, self.mb_traj),
                                    steps=t.microbatch_steps, shards=self.shards)
        self.optimizer = make_optimizer(config)
        self.objective = make_objective(config)
        self.param_shardings = jax.tree.map(lambda a: a.sharding, pipe.abstract_unet_params)
        self.batch = sharding.batch_sharding(mesh)
        self.repl = sharding.replicated(mesh)
        self.epoch_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
        self.constrain = sharding.constrain_batch(mesh)
        self._scalars: dict[int, jax.Array] = {}
        self._build_steps()

    # -- state ----------------------------------------------------------------------------------

    def abstract_state(self) -> TrainState:
        params = self.pipe.abstract_unet_params
        opt = jax.eval_shape(self.optimizer.init, params)
        opt_shardings = sharding.tree_shardings(opt, self.mesh,
                                                sharding.parse_rules(self.config.mesh.rules),
                                                self.config.mesh.fsdp_min_size)
        opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt,
                           opt_shardings)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.repl)
        return TrainState(params=params, opt_state=opt, key=key)

    def init_state(self, params) -> TrainState:
        abstract = self.abstract_state()
        opt_shardings = jax.tree.map(lambda a: a.sharding, abstract.opt_state)
        opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(params)
        key = sharding.put(np.asarray(jax.random.key_data(jax.random.key(self.config.seed))),
                           self.repl)
        return TrainState(params=params, opt_state=opt_state, key=key)

    # -- compiled steps ---------------------------------------------------------------------------

    def _build_steps(self) -> None:
        c, pipe, ps = self.config, self.pipe, self.param_shardings
        batch, repl, ep = self.batch, self.repl, self.epoch_sharding
        partial = functools.partial
        self._encode = jax.jit(partial(encode_prompts, pipe), out_shardings=repl)
        self._sample = jax.jit(
            partial(sample_batch, pipe, self.coeffs, c, self.constrain),
            in_shardings=(ps, None, repl, repl, repl, batch), out_shardings=(batch, batch))
        self._arrange = jax.jit(
            partial(arrange, images_per_prompt=self.images_per_prompt,
                    num_minibatches=self.num_minibatches),
            out_shardings=ep)
        self._rearrange = jax.jit(rearrange, out_shardings=ep, donate_argnums=0)
        self._set_log_probs = jax.jit(set_log_probs, out_shardings=ep, donate_argnums=0)
        self._score = jax.jit(partial(score_minibatch, pipe, self.coeffs, self.tiling, c,
                                      self.constrain),
                              in_shardings=(ps, ep, repl, repl), out_shardings=batch)
        self._weights = jax.jit(partial(minibatch_weights, self.objective),
                                in_shardings=(ep, repl, batch), out_shardings=(repl, batch, repl))
        self._grad = jax.jit(partial(grad_tile, pipe, self.coeffs, self.tiling, c, self.constrain),
                             in_shardings=(ps, ep, repl, batch, repl, repl, repl, ps),
                             out_shardings=ps, donate_argnums=7)
        self._apply = jax.jit(partial(apply_gradients, self.optimizer),
                              out_shardings=(ps, None, repl), donate_argnums=(0, 1))
        # Gradients accumulate in float32 whatever the params' dtype.
        self._zeros = jax.jit(lambda p: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), p),
                              out_shardings=ps)
        self._take = jax.jit(lambda x, m: x[m], out_shardings=batch)
        # The first k rows of a batch, replicated (sample grids on any number of hosts).
        self._head = jax.jit(lambda x, k: x[:k], static_argnums=1, out_shardings=repl)

    def scalar(self, i: int) -> jax.Array:
        """A replicated int32 scalar (compiled steps take indices as device arrays)."""
        if i not in self._scalars:
            self._scalars[i] = sharding.put(np.int32(i), self.repl)
        return self._scalars[i]

    def compile(self, frozen) -> dict:
        """Compiles the sampler, scorer, gradient and optimiser steps ahead of time and uses the
        compiled executables from then on.

        Returns {name: {seconds, temp_bytes, argument_bytes, output_bytes}} (XLA's memory
        analysis of each program, per device); also logs them.
        """
        abstract = self.abstract_state()
        sds = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
        n_ctx = self.pipe.tokenizer.max_length
        dim = self.pipe.text_encoder.hidden_size
        frozen_abs = jax.tree.map(lambda a: sds(a.shape, a.dtype, a.sharding), frozen)
        ctx = sds((self.num_prompts, n_ctx, dim), jnp.float32, self.repl)
        unc = sds((1, n_ctx, dim), jnp.float32, self.repl)
        key = sds((2,), jnp.uint32, self.repl)
        idx = sds((self.sample_size,), jnp.int32, self.batch)
        M, n, T = self.num_minibatches, self.mb_traj, self.num_steps
        ep = self.epoch_sharding
        epoch = update.Minibatch(
            latents=sds((M, n, T + 1) + self.pipe.latent_shape, jnp.float32, ep),
            context=sds((M, n, n_ctx, dim), jnp.float32, ep),
            log_probs_old=sds((M, n, T), jnp.float32, ep), log_probs_ref=sds((M, n, T), jnp.float32, ep),
            rewards=sds((M, n), jnp.float32, ep), advantages=sds((M, n), jnp.float32, ep))
        scalar = sds((), jnp.int32, self.repl)
        weights = sds((n, T), jnp.float32, self.batch)
        grads = jax.tree.map(lambda a: sds(a.shape, jnp.float32, a.sharding), abstract.params)
        todo = {
            "sample": (self._sample, (abstract.params, frozen_abs, ctx, unc, key, idx)),
            "score": (self._score, (abstract.params, epoch, unc, scalar)),
            "grad_tile": (self._grad, (abstract.params, epoch, unc, weights, scalar, scalar, scalar,
                                       grads)),
            "apply": (self._apply, (abstract.params, abstract.opt_state, grads)),
        }
        stats = {}
        for name, (fn, args) in todo.items():
            start = time.perf_counter()
            compiled = fn.lower(*args).compile()
            seconds = time.perf_counter() - start
            setattr(self, {"sample": "_sample", "score": "_score", "grad_tile": "_grad",
                           "apply": "_apply"}[name], compiled)
            mem = compiled.memory_analysis()
            stats[name] = {"seconds": seconds}
            mem_txt = ""
            if mem is not None:
                stats[name].update(temp_bytes=int(mem.temp_size_in_bytes),
                                   argument_bytes=int(mem.argument_size_in_bytes),
                                   output_bytes=int(mem.output_size_in_bytes))
                mem_txt = (f", temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
                           f"args {mem.argument_size_in_bytes / 2**20:.1f} MiB")
            self.log(f"compiled {name:<9} in {seconds:6.2f}s{mem_txt}")
        return stats

    # -- one epoch --------------------------------------------------------------------------------

    def sample_epoch(self, state: TrainState, frozen, prompts: list[str], epoch: int,
                     reward_fn: rewards_lib.Reward, show_progress: bool = True,
                     sampler_params=None, stop: Optional[Callable[[], bool]] = None
                     ) -> Optional[dict]:
        """Samples and rewards an epoch's trajectories from theta_old = state.params (or from
        `sampler_params`, e.g. the frozen reference for offline RDP), with the epoch's keys.

        `stop` is asked after every sampler batch; when it says so the epoch is abandoned (None
        is returned) and the state is untouched.
        """
        c = self.config
        sampler_params = state.params if sampler_params is None else sampler_params
        B = self.images_per_prompt
        ids = self.pipe.tokenizer(list(prompts))
        prompt_context = self._encode(frozen, ids)
        uncond = self._encode(frozen, self.pipe.tokenizer([""]))
        key = jax.device_put(jax.random.key_data(jax.random.fold_in(
            jax.random.wrap_key_data(state.key), epoch)), self.repl)
        batches, rewards, infos = [], [], []
        grid_rows = min(c.log.grid_prompts, self.num_prompts) * B
        grid_images = []
        num_batches = self.num_traj // self.sample_size
        sample_time = reward_time = 0.0
        for i in progress(range(num_batches), desc=f"epoch {epoch + 1} sample", leave=False,
                          enabled=show_progress and num_batches > 1):
            t0 = time.perf_counter()
            index = np.arange(i * self.sample_size, (i + 1) * self.sample_size, dtype=np.int32)
            traj, images = jax.block_until_ready(self._sample(
                sampler_params, frozen, prompt_context, uncond, key, sharding.put(index, self.batch)))
            batches.append(traj)
            t1 = time.perf_counter()
            sample_time += t1 - t0
            traj_prompts = [prompts[g // B] for g in index]
            meta = [{"prompt_index": int(g // B)} for g in index]
            value, info = rewards_lib.score(reward_fn, images, traj_prompts, meta)
            if value.shape != (self.sample_size,):
                raise ConfigError(f"reward {', '.join(self.config.reward.weights)} returned shape "
                                  f"{value.shape} for {self.sample_size} images; a reward must "
                                  f"return one float per image")
            rewards.append(value)
            infos.append(info)
            keep = int((index < grid_rows).sum())  # the grid's rows lead the epoch's trajectories
            if keep:
                grid_images.append(sharding.to_host(self._head(images, keep)))
            reward_time += time.perf_counter() - t1
            if stop is not None and stop():
                return None
        rewards = np.concatenate(rewards)
        info = {k: np.concatenate([d[k] for d in infos]) for k in infos[0]} if infos else {}
        return dict(batches=tuple(batches), prompt_context=prompt_context, uncond=uncond,
                    rewards=rewards, reward_info=info, prompts=list(prompts),
                    grid_images=np.concatenate(grid_images) if grid_images else None,
                    sample_time=sample_time, reward_time=reward_time)

    def prompt_permutation(self, epoch: int, pass_index: int) -> np.ndarray:
        """A trajectory permutation that shuffles prompts and keeps each prompt's images together."""
        order = np.random.default_rng([self.config.seed, epoch, pass_index]).permutation(self.num_prompts)
        B = self.images_per_prompt
        return (order[:, None] * B + np.arange(B)[None]).reshape(-1).astype(np.int32)

    def prepare_epoch(self, params, ref_params, sampled: dict, advantages: np.ndarray,
                      epoch: int) -> tuple[update.Minibatch, dict]:
        """Arranges the epoch's samples into minibatches (pass 0's shuffle) and scores every
        transition under the reference, and under theta_old (= params) unless
        `train.rescore_old` is off and the sampler's own log-probs can serve (online sampling).

        Returns:
          (epoch data with leading dims [M, n], {drift, score_time[, logprob_resample_mismatch]}).
        """
        t0 = time.perf_counter()
        uncond = sampled["uncond"]
        perm = self.prompt_permutation(epoch, 0)
        put = lambda x: sharding.put(np.asarray(x), self.repl)
        epoch_data = self._arrange(sampled["batches"], sampled["prompt_context"],
                                   put(sampled["rewards"]), put(advantages), put(perm))
        sampler_log_probs = epoch_data.log_probs_old
        ms = [self.scalar(m) for m in range(self.num_minibatches)]
        offline = self.config.train.sampling == "offline"
        info = {}
        if offline or self.config.train.rescore_old:
            old = jnp.stack([self._score(params, epoch_data, uncond, m) for m in ms])
            if not offline:
                info["logprob_resample_mismatch"] = float(jnp.abs(old - sampler_log_probs).max())
        else:
            old = sampler_log_probs
        ref = jnp.stack([self._score(ref_params, epoch_data, uncond, m) for m in ms])
        epoch_data = self._set_log_probs(epoch_data, old, ref)
        info.update(drift=float((old - ref).mean()), score_time=time.perf_counter() - t0)
        return epoch_data, info

    def update_epoch(self, state: TrainState, frozen, ref_params, sampled: dict,
                     advantages: np.ndarray, epoch: int,
                     show_progress: bool = True, stop: Optional[Callable[[], bool]] = None
                     ) -> Optional[tuple[TrainState, dict]]:
        """Re-scores the epoch's transitions, then runs K passes of minibatch updates.

        `stop` is asked after every optimiser step; when it says so the epoch is abandoned and
        None is returned (the state's buffers were donated to the updates: resume from disk).
        """
        M = self.num_minibatches
        uncond = sampled["uncond"]
        epoch_data, info = self.prepare_epoch(state.params, ref_params, sampled, advantages, epoch)
        t0 = time.perf_counter()
        params, opt_state = state.params, state.opt_state
        records = []
        steps = [(k, m) for k in range(self.config.train.passes_per_epoch) for m in range(M)]
        for k, m in progress(steps, desc=f"epoch {epoch + 1} update", leave=False,
                             enabled=show_progress):
            if m == 0 and k > 0:
                epoch_data = self._rearrange(epoch_data, sharding.put(self._relative_perm(epoch, k),
                                                                      self.repl))
            # At the first step the params are still theta_old, whose log-probs were just scored.
            log_probs = self._take(epoch_data.log_probs_old, self.scalar(0)) if k == m == 0 else None
            loss, grads, aux = self.minibatch_gradient(params, epoch_data, uncond, m, log_probs)
            params, opt_state, grad_norm = self._apply(params, opt_state, grads)
            records.append(dict(loss=loss, grad_norm=grad_norm, **aux))
            if stop is not None and stop():
                return None
        records = jax.device_get(records)
        update_time = time.perf_counter() - t0
        out = {k: float(np.mean([r[k] for r in records])) for k in records[0]}
        out.update(info, update_time=update_time)
        return state.replace(params=params, opt_state=opt_state), out

    def minibatch_gradient(self, params, epoch_data: update.Minibatch, uncond: jax.Array, m: int,
                           log_probs: Optional[jax.Array] = None):
        """Loss, exact gradient and aux of minibatch m (the three phases of `update.py`).

        Args:
          log_probs: [n, T] the minibatch's log-probs under `params` if already known.
        Returns:
          (loss, grads shaped like params, aux dict).
        """
        mi = self.scalar(m)
        if log_probs is None:
            log_probs = self._score(params, epoch_data, uncond, mi)
        loss, weights, aux = self._weights(epoch_data, mi, log_probs)
        grads = self._zeros(params)
        for j, c in zip(*self.tiling.tile_indices()):
            grads = self._grad(params, epoch_data, uncond, weights, mi, self.scalar(int(j)),
                               self.scalar(int(c)), grads)
        return loss, grads, aux

    def _relative_perm(self, epoch: int, pass_index: int) -> np.ndarray:
        """Permutation taking pass (k-1)'s order to pass k's order (both from prompt_permutation)."""
        prev = self.prompt_permutation(epoch, pass_index - 1)
        new = self.prompt_permutation(epoch, pass_index)
        where = np.empty_like(prev)
        where[prev] = np.arange(prev.size, dtype=prev.dtype)
        return where[new]

    def _trainable_summary(self) -> str:
        pattern = self.config.train.trainable
        if not pattern:
            return ""
        abstract = self.pipe.abstract_unet_params
        labels = jax.tree.leaves(trainable_labels(pattern, abstract))
        n = sum(math.prod(a.shape) for a, l in zip(jax.tree.leaves(abstract), labels)
                if l == "train")
        return f", finetuning {n / 1e6:.3f}M (train.trainable={pattern!r})"

    def summary(self) -> list[str]:
        c, t = self.config, self.config.train
        B, N, T = self.images_per_prompt, self.num_prompts, self.num_steps
        pairs = B * (B - 1) // 2
        n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(self.pipe.abstract_unet_params))
        til = self.tiling
        lines = [
            f"{c.method.upper()} | {len(self.mesh.devices.flat)} device(s), mesh "
            + " ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
            + f" | {jax.process_count()} process(es) | UNet {n_params / 1e6:.2f}M params"
            + self._trainable_summary(),
            f"epoch: {N} prompts x {B} images = {self.num_traj} trajectories x {T} steps = "
            f"{self.num_traj * T:,} transitions"
            + (" (+ a deterministic last step)" if self.coeffs.final else "")
            + f", sampled in batches of {self.sample_size}",
            f"updates: {t.passes_per_epoch} pass(es) x {self.num_minibatches} minibatch(es) of "
            f"{t.prompts_per_minibatch} prompts = {t.passes_per_epoch * self.num_minibatches} "
            f"optimizer steps per epoch",
        ]
        if c.method == "prdp":
            lines.append(f"pairs: up to {pairs} per prompt, {pairs * N:,} per epoch "
                         f"(those with a positive reward difference count); beta={c.prdp.beta:g}, "
                         f"clip eps={c.prdp.clip_eps:g}")
        else:
            lines.append(f"ddpo: clip range {c.ddpo.clip_range:g}, {c.ddpo.normalization} "
                         f"normalisation, advantages clipped to +-{c.ddpo.adv_clip_max:g}")
        lines.append(f"gradient tiles: {til.trajectories} trajectories x {til.steps_per_tile} steps "
                     f"= {til.trajectories * til.steps_per_tile} transitions, {til.num_tiles} per "
                     f"minibatch")
        return lines


# ---------------------------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------------------------

def prepare_workdir(workdir: str) -> str:
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"workdir {workdir} cannot be written ({e.strerror}); "
                          f"pass a writable --workdir") from None
    return workdir


def advantages_for(config: ml_collections.ConfigDict, tracker: Optional[ddpo.PerPromptStatTracker],
                   prompts: list[str], rewards: np.ndarray) -> np.ndarray:
    if config.method != "ddpo":
        return np.zeros_like(rewards)
    traj_prompts = [prompts[g // config.train.images_per_prompt] for g in range(rewards.size)]
    if config.ddpo.normalization == "per_prompt":
        adv = tracker.update(traj_prompts, rewards)
    else:
        adv = ddpo.batch_advantages(rewards)
    return ddpo.clip_advantages(adv, config.ddpo.adv_clip_max)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, log=print,
                       stop: Optional[preemption.StopSignal] = None) -> dict:
    """Trains (resuming from workdir's latest checkpoint if any) and returns the last metrics.

    `stop` records SIGTERM; a caller that installs it before startup (`main`) makes a SIGTERM
    during setup or compilation stop the run cleanly too. Without one, it is installed here, for
    the epochs only.
    """
    config_lib.validate(config)
    workdir = prepare_workdir(workdir)
    is_main = jax.process_index() == 0
    say = log if is_main else (lambda *a, **k: None)
    mesh = sharding.mesh_from_config(config.mesh)
    reward_fn = rewards_lib.combine(dict(config.reward.weights), config)
    train_prompts = prompt_sets.load(config.prompts.train, config)
    pipe = pipeline_lib.build(config, mesh, log=say)
    pipe.check_prompts(train_prompts, f"prompts.train={config.prompts.train}")
    for name in config.eval.sets:
        evaluate.load_eval_set(config, pipe, name)
    trainer = Trainer(config, pipe, mesh, log=say)
    for line in trainer.summary():
        say(line)

    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         config.checkpoint.max_to_keep,
                                         config_lib.fingerprint(config))
    frozen = pipe.frozen_params()
    ref_params = pipe.unet_params()
    prompt_sampler = prompt_sets.PromptSampler(train_prompts, config.seed)
    tracker = (ddpo.PerPromptStatTracker(config.ddpo.buffer_size, config.ddpo.min_count)
               if config.method == "ddpo" else None)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    start_epoch = checkpointer.latest_epoch()
    resumed = start_epoch is not None
    if not resumed:
        state = trainer.init_state(pipe.unet_params())
        start_epoch = 0
    else:
        state, meta = checkpointer.restore(start_epoch, trainer.abstract_state())
        prompt_sampler.position = int(meta["prompt_position"])
        if tracker is not None:
            tracker.load_state_dict(meta["stat_tracker"])
        writer.truncate_after(start_epoch)
        say(f"resumed from {checkpointer.directory}/{start_epoch} (epoch {start_epoch} done)")
    if is_main:
        metrics_lib.atomic_write_json(os.path.join(workdir, "config.json"), config.to_dict())
    trainer.compile(frozen)
    evaluator = evaluate.Evaluator(config, pipe, mesh, reward_fn) if config.eval.sets else None
    before = None
    if evaluator is not None:
        before = read_json(os.path.join(workdir, "eval", "before.json"))
        if before is None:
            say("evaluating the reference (before finetuning)")
            before = evaluator.run_sets(ref_params, None, frozen, "before", workdir,
                                        bool(config.log.progress) and is_main)
        for line in evaluate.table(before):
            say(line)

    last = {}
    show = bool(config.log.progress) and is_main
    offline = config.train.sampling == "offline"
    after = None  # the final evaluation, when the last epoch's periodic one provides it
    own_stop = stop is None
    stop = preemption.StopSignal() if own_stop else stop
    saved = start_epoch if resumed else None  # the last epoch whose state is on disk
    checkpoint_meta = lambda: {
        "prompt_position": prompt_sampler.position,
        "stat_tracker": tracker.state_dict() if tracker is not None else None}
    epoch, stopped = start_epoch, False
    try:
        for epoch in progress(range(start_epoch, config.train.epochs), desc="epochs",
                              initial=start_epoch, total=config.train.epochs, enabled=show):
            # `state` holds `epoch` completed epochs until the updates start; `meta` matches it.
            meta = checkpoint_meta()
            if stop.requested():
                stopped = True
                break
            t0 = time.perf_counter()
            prompts = prompt_sampler.sample(config.train.prompts_per_epoch)
            sampled = trainer.sample_epoch(state, frozen, prompts, epoch, reward_fn, show,
                                           sampler_params=ref_params if offline else None,
                                           stop=stop.requested)
            if sampled is None:
                stopped = True
                break
            advantages = advantages_for(config, tracker, prompts, sampled["rewards"])
            # A stop during the updates abandons the epoch only if its start is on disk;
            # otherwise the epoch finishes and is saved below.
            updated = trainer.update_epoch(state, frozen, ref_params, sampled, advantages, epoch,
                                           show, stop=stop.requested if saved == epoch else None)
            if updated is None:
                stopped = True
                break
            state, upd = updated
            done = epoch + 1
            rewards = sampled["rewards"]
            last = dict(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                        **{f"reward/{k}": float(np.mean(v))
                           for k, v in sampled["reward_info"].items() if np.ndim(v) == 1},
                        **upd, sample_time=sampled["sample_time"],
                        reward_time=sampled["reward_time"], epoch_time=time.perf_counter() - t0)
            if tracker is not None:
                last.update({f"ddpo/{k}": v for k, v in tracker.stats().items()})
            every = config.eval.every_epochs
            if evaluator is not None and every and done % every == 0:
                final = done == config.train.epochs
                after = evaluator.run_sets(state.params, ref_params, frozen,
                                           "after" if final else f"epoch_{done:05d}", workdir,
                                           show, grids=final)
                last.update(evaluate.flatten(after))
            writer.write(done, last)
            say(f"epoch {done}/{config.train.epochs} | reward {last['reward_mean']:.4f} "
                f"+- {last['reward_std']:.4f} | loss {last['loss']:.4g} "
                f"| clip {last['clip_frac']:.3f} | drift {last['drift']:.3g} "
                f"| {last['epoch_time']:.1f}s")
            if done % config.log.grid_every_epochs == 0 or epoch == 0:
                save_sample_grid(workdir, done, sampled, config)
            if done % config.checkpoint.every_epochs == 0 or done == config.train.epochs:
                checkpointer.save(done, state, checkpoint_meta())
                saved = done
        if stopped and epoch > 0 and saved != epoch:
            # Stopped before this epoch's updates (an abandoned update implies saved == epoch):
            # `state` is still that of `epoch` completed epochs, and `meta` is its metadata.
            checkpointer.save(epoch, state, meta)
            saved = epoch
    finally:
        if own_stop:
            stop.close()
        checkpointer.close()
        writer.close()
    if stopped:
        where = (f"the checkpoint of epoch {saved} is in {checkpointer.directory}" if saved
                 else "no epoch had finished")
        raise preemption.Preempted(f"stopped by SIGTERM in epoch {epoch + 1}; {where}; rerun the "
                                   f"same command to resume")
    result = {"metrics": last, "state": state, "trainer": trainer}
    if evaluator is not None:
        if after is None:
            say("evaluating the finetuned model")
            after = evaluator.run_sets(state.params, ref_params, frozen, "after", workdir, show)
        lines = evaluate.table(before, after)
        components = evaluate.component_table(before, after)
        for line in components + lines:
            say(line)
        if is_main:
            metrics_lib.atomic_write_json(os.path.join(workdir, "eval", "summary.json"),
                                          {"before": before, "after": after, "table": lines,
                                           "components": components,
                                           "epochs": config.train.epochs, "method": config.method})
            for name in config.eval.sets:
                grid = lambda label: os.path.join(workdir, "eval",
                                                  f"{label}_{prompt_sets.slug(name)}.png")
                if os.path.exists(grid("before")) and os.path.exists(grid("after")):
                    evaluate.side_by_side(grid("before"), grid("after"), grid("before_after"))
        result.update(before=before, after=after)
    return result


def read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_sample_grid(workdir: str, epoch: int, sampled: dict, config) -> None:
    images = sampled["grid_images"]
    if images is None:
        return
    B = config.train.images_per_prompt
    cols = min(config.log.grid_images, B)
    rows = images.shape[0] // B
    keep = (np.arange(rows)[:, None] * B + np.arange(cols)[None]).reshape(-1)
    captions = [f"{sampled['prompts'][g // B]}\nreward {sampled['rewards'][g]:.3f}" for g in keep]
    metrics_lib.save_grid(os.path.join(workdir, "samples", f"epoch_{epoch:05d}.png"),
                          images[keep], captions, columns=cols)
