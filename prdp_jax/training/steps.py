"""The trainer's compiled steps: module-level pure functions, jitted with explicit shardings and
compiled ahead of time.

Every step takes a `StepContext` (the pipeline, the policy's step coefficients, the gradient
tiling, CFG and the batch constraint) as its first, static argument. `Steps` bundles the jitted
functions; `compile_steps` lowers the four heavy ones for the run's shapes before the first
epoch and logs their compile times and memory.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prdp_jax.core import diffusion
from prdp_jax.core import sampler
from prdp_jax.core import tiled_gradient
from prdp_jax.infra import sharding
from prdp_jax.training.state import TrainState, trainable_labels

if TYPE_CHECKING:
    from prdp_jax.pipelines.base import Pipeline


@dataclasses.dataclass(frozen=True)
class EpochShape:
    """An epoch's batch arithmetic, checked against the mesh.

    Attributes:
      prompts: N prompts per epoch;  images_per_prompt: B trajectories per prompt.
      minibatches: M minibatches per pass;  minibatch_trajectories: n = N / M x B.
      sample_batch: trajectories per sampler call;  shards: the batch's shards on the mesh.
    """

    prompts: int
    images_per_prompt: int
    minibatches: int
    minibatch_trajectories: int
    sample_batch: int
    shards: int

    @property
    def trajectories(self) -> int:
        return self.prompts * self.images_per_prompt

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, mesh: Mesh) -> "EpochShape":
        t = config.train
        shape = cls(prompts=t.prompts_per_epoch, images_per_prompt=t.images_per_prompt,
                    minibatches=t.prompts_per_epoch // t.prompts_per_minibatch,
                    minibatch_trajectories=t.prompts_per_minibatch * t.images_per_prompt,
                    sample_batch=(config.sample.batch_size
                                  or t.prompts_per_epoch * t.images_per_prompt),
                    shards=sharding.batch_shards(mesh))
        for what, size in (("an epoch's trajectories (prompts_per_epoch x images_per_prompt)",
                            shape.trajectories),
                           ("sample.batch_size", shape.sample_batch),
                           ("a minibatch's trajectories (prompts_per_minibatch x images_per_prompt)",
                            shape.minibatch_trajectories)):
            sharding.check_batch_divisible(what, size, shape.shards)
        return shape


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What every model step closes over (static: a change recompiles)."""

    pipe: Pipeline
    coeffs: diffusion.StepCoefficients
    tiling: tiled_gradient.Tiling        # the gradient's tiles
    score_tiling: tiled_gradient.Tiling  # the forward-only scoring passes' tiles
    guidance_scale: float
    reduce: str                  # per-step log-prob over latent elements: "mean" or "sum"
    constrain: Callable          # pins a batch-leading array to the mesh's batch axes

    @property
    def policy_kwargs(self) -> dict:
        return dict(guidance_scale=self.guidance_scale, reduce=self.reduce,
                    constrain=self.constrain)


def policy_coefficients(config: ml_collections.ConfigDict) -> diffusion.StepCoefficients:
    """The sampler's per-step coefficients for `config.schedule` and `config.sample`."""
    schedule = diffusion.make_schedule(**config.schedule.to_dict())
    return diffusion.step_coefficients(schedule, config.sample.num_steps, config.sample.eta,
                                       config.sample.final_step)


def step_context(config: ml_collections.ConfigDict, pipe: Pipeline, mesh: Mesh,
                 coeffs: diffusion.StepCoefficients, tiling: tiled_gradient.Tiling) -> StepContext:
    score_steps = config.train.score_microbatch_steps or tiling.steps
    return StepContext(pipe=pipe, coeffs=coeffs, tiling=tiling,
                       score_tiling=dataclasses.replace(tiling, steps=score_steps),
                       guidance_scale=config.sample.guidance_scale,
                       reduce=config.sample.logprob_reduction,
                       constrain=sharding.constrain_batch(mesh))


# ---------------------------------------------------------------------------------------------
# Pure step functions.
# ---------------------------------------------------------------------------------------------

def sample_and_decode(ctx: StepContext, params, frozen, context: jax.Array, uncond: jax.Array,
                      keys: jax.Array) -> tuple[sampler.Trajectory, jax.Array]:
    """Samples one trajectory per row and decodes its image (the training and evaluation sampler).

    Args:
      context: [b, L, D] prompt embeddings per trajectory;  uncond: [1, L, D] embedding of "".
      keys: [b] PRNG keys.
    Returns:
      (Trajectory [b, ...], images [b, H, W, 3] float32 in [0, 1]).
    """
    traj = sampler.sample(ctx.pipe.denoiser, params, ctx.coeffs, ctx.constrain(context), uncond,
                          keys, latent_shape=ctx.pipe.latent_shape, **ctx.policy_kwargs)
    return traj, ctx.constrain(ctx.pipe.decode(frozen, traj.final))


def sample_batch(ctx: StepContext, images_per_prompt: int, params, frozen,
                 prompt_context: jax.Array, uncond: jax.Array, key_data: jax.Array,
                 traj_index: jax.Array):
    """Samples an epoch's trajectories `traj_index` ([b] int32; prompt = index // B).

    Args:
      prompt_context: [N, L, D] embeddings of the epoch's prompts.
      key_data: uint32 [2] the epoch's key; trajectory g uses fold_in(key, g).
    Returns:
      (Trajectory [b, ...], images [b, H, W, 3] float32 in [0, 1]).
    """
    key = jax.random.wrap_key_data(key_data)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, traj_index)
    return sample_and_decode(ctx, params, frozen, prompt_context[traj_index // images_per_prompt],
                             uncond, keys)


def arrange(batches: tuple, prompt_context: jax.Array, rewards: jax.Array, advantages: jax.Array,
            traj_perm: jax.Array, *, images_per_prompt: int,
            num_minibatches: int) -> tiled_gradient.Transitions:
    """Gathers an epoch's sampled trajectories into shuffled minibatches.

    Args:
      batches: sampler outputs, a tuple of Trajectory with leading size b each.
      prompt_context: [N, L, D]; rewards, advantages: [N*B]; traj_perm: [N*B] a permutation of
        trajectories that keeps each prompt's images contiguous.
    Returns:
      Transitions with leading dims [M, n] (log_probs_old holds the sampler's log-probs until
      re-scored; log_probs_ref is zero until scored).
    """
    latents = jnp.concatenate([b.latents for b in batches])[traj_perm]
    log_probs = jnp.concatenate([b.log_probs for b in batches])[traj_perm]
    split = lambda x: x.reshape((num_minibatches, -1) + x.shape[1:])
    return tiled_gradient.Transitions(
        latents=split(latents), context=split(prompt_context[traj_perm // images_per_prompt]),
        log_probs_old=split(log_probs), log_probs_ref=split(jnp.zeros_like(log_probs)),
        rewards=split(rewards[traj_perm]), advantages=split(advantages[traj_perm]))


def rearrange(data: tiled_gradient.Transitions, traj_perm: jax.Array) -> tiled_gradient.Transitions:
    """Reshuffles [M, n, ...] minibatches with a new trajectory permutation."""
    def one(x):
        flat = x.reshape((-1,) + x.shape[2:])[traj_perm]
        return flat.reshape(x.shape)
    return jax.tree.map(one, data)


def set_log_probs(data: tiled_gradient.Transitions, old: jax.Array, ref: jax.Array) -> tiled_gradient.Transitions:
    """Stores the re-scored [M, n, T] log-probs of theta_old and the reference."""
    return data.replace(log_probs_old=old, log_probs_ref=ref)


def minibatch(data: tiled_gradient.Transitions, m: jax.Array) -> tiled_gradient.Transitions:
    """Minibatch m ([n, ...]) of an epoch's [M, n, ...] transitions."""
    return jax.tree.map(lambda x: x[m], data)


def score_minibatch(ctx: StepContext, params, data: tiled_gradient.Transitions, uncond, m):
    """[n, T] log pi_params of minibatch m's transitions (forward only)."""
    return tiled_gradient.score(ctx.pipe.score_denoiser, params, minibatch(data, m), uncond,
                                ctx.coeffs, ctx.score_tiling, **ctx.policy_kwargs)


def minibatch_weights(objective: tiled_gradient.Objective, data: tiled_gradient.Transitions, m, log_probs):
    """(loss, dL/dlog_probs [n, T], aux) of minibatch m."""
    return tiled_gradient.loss_and_weights(objective, log_probs, minibatch(data, m))


def trainable_mask(trainable: str, params):
    """A tree like params of Python bools (True: finetuned), or None when all are."""
    if not trainable:
        return None
    return jax.tree.map(lambda label: label == "train", trainable_labels(trainable, params))


def grad_tile(ctx: StepContext, trainable: str, params, data: tiled_gradient.Transitions, uncond,
              weights, m, j, c, grads):
    """Adds tile (j, c) of minibatch m to the gradient accumulator (only the params that
    `trainable` selects are differentiated; the others' gradients stay exactly zero)."""
    return tiled_gradient.accumulate_grad(ctx.pipe.score_denoiser, params, minibatch(data, m),
                                          uncond, weights, j, c, grads, ctx.coeffs, ctx.tiling,
                                          trainable=trainable_mask(trainable, params),
                                          **ctx.policy_kwargs)


def loss_and_grad(ctx: StepContext, objective: tiled_gradient.Objective, trainable: str, params,
                  data: tiled_gradient.Transitions, uncond, m):
    """(loss, float32 grads shaped like params, aux) of minibatch m in one pass
    (`train.gradient="one_pass"`): the forward once, its activations kept for the backward."""
    loss, _, grads, aux = tiled_gradient.loss_and_grad(
        objective, ctx.pipe.score_denoiser, params, minibatch(data, m), uncond, ctx.coeffs,
        ctx.tiling,
        trainable=trainable_mask(trainable, params), **ctx.policy_kwargs)
    return loss, grads, aux


# What `apply_gradients` found non-finite (0: nothing, the step was applied).
NONFINITE = ("", "the loss", "the gradient norm", "the parameters after the update")


def apply_gradients(optimizer: optax.GradientTransformation, trainable: str, params, opt_state,
                    grads, loss):
    """One optimiser step, refused when anything is non-finite.

    Returns (params, opt_state, global grad norm before clipping, status): status is an int32
    index into `NONFINITE` (0: applied); on any other status params and opt_state are returned
    unchanged, so a NaN or Inf never reaches the state. Only the `trainable` params are checked
    and guarded: the others' gradients are exactly zero and their updates too (a guard over
    every leaf made this elementwise step 5x slower to compile).
    """
    mask = trainable_mask(trainable, params) or jax.tree.map(lambda _: True, params)
    subset = lambda tree: [x for x, f in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if f]
    grad_norm = optax.tree.norm(subset(grads))
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    status = jnp.where(~jnp.isfinite(loss), 1, jnp.where(
        ~jnp.isfinite(grad_norm), 2,
        jnp.where(~jnp.isfinite(optax.tree.norm(subset(new_params))), 3, 0)))
    ok = status == 0
    new_params = jax.tree.map(lambda new, old, f: jnp.where(ok, new, old) if f else new,
                              new_params, params, mask)
    new_opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_opt_state, opt_state)
    return new_params, new_opt_state, grad_norm, status.astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The bundle of jitted steps.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted (after `compile_steps`, compiled) steps of one config on one mesh."""

    encode: Callable        # (frozen, ids [N, L]) -> [N, L, D]
    sample: Callable        # sample_batch
    arrange: Callable
    rearrange: Callable
    set_log_probs: Callable
    score: Callable         # score_minibatch
    weights: Callable       # minibatch_weights
    grad_tile: Callable
    loss_and_grad: Callable  # one-pass loss and gradient of a minibatch
    apply: Callable         # apply_gradients
    zeros: Callable         # params -> float32 zeros like them (the gradient accumulator)
    take: Callable          # (x [M, ...], m) -> x[m], batch-sharded
    head: Callable          # (x, k) -> x[:k], replicated


@dataclasses.dataclass(frozen=True)
class Shardings:
    params: Any
    batch: NamedSharding        # leading dim over the batch axes
    replicated: NamedSharding
    epoch: NamedSharding        # [M, n, ...]: minibatch axis replicated, n over the batch axes


def shardings_for(pipe: Pipeline, mesh: Mesh) -> Shardings:
    return Shardings(params=jax.tree.map(lambda a: a.sharding, pipe.abstract_unet_params),
                     batch=sharding.batch_sharding(mesh), replicated=sharding.replicated(mesh),
                     epoch=NamedSharding(mesh, P(None, sharding.BATCH_AXES)))


def build_steps(ctx: StepContext, shape: EpochShape, sh: Shardings, trainable: str,
                optimizer: optax.GradientTransformation, objective: tiled_gradient.Objective) -> Steps:
    partial = functools.partial
    batch, repl, ep, ps = sh.batch, sh.replicated, sh.epoch, sh.params
    return Steps(
        encode=jax.jit(ctx.pipe.encode_text, out_shardings=repl),
        sample=jax.jit(partial(sample_batch, ctx, shape.images_per_prompt),
                       in_shardings=(ps, None, repl, repl, repl, batch),
                       out_shardings=(batch, batch)),
        arrange=jax.jit(partial(arrange, images_per_prompt=shape.images_per_prompt,
                                num_minibatches=shape.minibatches), out_shardings=ep),
        rearrange=jax.jit(rearrange, out_shardings=ep, donate_argnums=0),
        set_log_probs=jax.jit(set_log_probs, out_shardings=ep, donate_argnums=0),
        score=jax.jit(partial(score_minibatch, ctx), in_shardings=(ps, ep, repl, repl),
                      out_shardings=batch),
        weights=jax.jit(partial(minibatch_weights, objective), in_shardings=(ep, repl, batch),
                        out_shardings=(repl, batch, repl)),
        grad_tile=jax.jit(partial(grad_tile, ctx, trainable),
                          in_shardings=(ps, ep, repl, batch, repl, repl, repl, ps),
                          out_shardings=ps, donate_argnums=7),
        loss_and_grad=jax.jit(partial(loss_and_grad, ctx, objective, trainable),
                              in_shardings=(ps, ep, repl, repl), out_shardings=(repl, ps, repl)),
        apply=jax.jit(partial(apply_gradients, optimizer, trainable),
                      out_shardings=(ps, None, repl, repl),
                      donate_argnums=(0, 1)),
        # Gradients accumulate in float32 whatever the params' dtype.
        zeros=jax.jit(lambda p: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), p),
                      out_shardings=ps),
        take=jax.jit(lambda x, m: x[m], out_shardings=batch),
        # The first k rows of a batch, replicated (sample grids on any number of hosts).
        head=jax.jit(lambda x, k: x[:k], static_argnums=1, out_shardings=repl))


def compile_steps(steps: Steps, ctx: StepContext, shape: EpochShape, sh: Shardings,
                  abstract: TrainState, frozen, gradient: str = "tiled", log=print,
                  parallel: bool = True) -> tuple[Steps, dict]:
    """Compiles the sampler, scorer, gradient (`grad_tile`, or `loss_and_grad` when `gradient`
    is "one_pass") and optimiser steps ahead of time, side by side (`parallel`: one per core;
    each step's seconds then include the others' contention) or one after another.

    Returns (the steps with those four compiled, {name: {seconds, temp_bytes, argument_bytes,
    output_bytes}}: XLA's memory analysis of each program, per device); also logs them.
    """
    sds = lambda shp, dtype, s: jax.ShapeDtypeStruct(shp, dtype, sharding=s)
    pipe = ctx.pipe
    n_ctx, dim = pipe.tokenizer.max_length, pipe.text_encoder.hidden_size
    frozen_abs = jax.tree.map(lambda a: sds(a.shape, a.dtype, a.sharding), frozen)
    repl, ep = sh.replicated, sh.epoch
    ctx_abs = sds((shape.prompts, n_ctx, dim), jnp.float32, repl)
    unc = sds((1, n_ctx, dim), jnp.float32, repl)
    key = sds((2,), jnp.uint32, repl)
    idx = sds((shape.sample_batch,), jnp.int32, sh.batch)
    M, n, T = shape.minibatches, shape.minibatch_trajectories, ctx.coeffs.num_stochastic
    data = tiled_gradient.Transitions(
        latents=sds((M, n, T + 1) + pipe.latent_shape, jnp.float32, ep),
        context=sds((M, n, n_ctx, dim), jnp.float32, ep),
        log_probs_old=sds((M, n, T), jnp.float32, ep),
        log_probs_ref=sds((M, n, T), jnp.float32, ep),
        rewards=sds((M, n), jnp.float32, ep), advantages=sds((M, n), jnp.float32, ep))
    scalar = sds((), jnp.int32, repl)
    weights = sds((n, T), jnp.float32, sh.batch)
    grads = jax.tree.map(lambda a: sds(a.shape, jnp.float32, a.sharding), abstract.params)
    todo = {  # the longest compile first: the others share the second core meanwhile
        **({"loss_and_grad": (abstract.params, data, unc, scalar)} if gradient == "one_pass" else
           {"grad_tile": (abstract.params, data, unc, weights, scalar, scalar, scalar, grads)}),
        "sample": (abstract.params, frozen_abs, ctx_abs, unc, key, idx),
        "score": (abstract.params, data, unc, scalar),
        "apply": (abstract.params, abstract.opt_state, grads, sds((), jnp.float32, repl)),
    }
    def compile_one(name):
        start = time.perf_counter()
        program = getattr(steps, name).lower(*todo[name]).compile()
        return program, time.perf_counter() - start

    # XLA compiles outside the GIL: the steps compile side by side, one per core.
    workers = max(1, min(len(todo), os.cpu_count() or 1)) if parallel else 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        done = dict(zip(todo, pool.map(compile_one, todo)))
    compiled, stats = {}, {}
    for name, (program, seconds) in done.items():
        compiled[name] = program
        mem = program.memory_analysis()
        stats[name] = {"seconds": seconds}
        mem_txt = ""
        if mem is not None:
            stats[name].update(temp_bytes=int(mem.temp_size_in_bytes),
                               argument_bytes=int(mem.argument_size_in_bytes),
                               output_bytes=int(mem.output_size_in_bytes))
            mem_txt = (f", temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
                       f"args {mem.argument_size_in_bytes / 2**20:.1f} MiB")
        log(f"compiled {name:<13} in {seconds:6.2f}s{mem_txt}")
    return dataclasses.replace(steps, **compiled), stats


def scalars(count: int, replicated: NamedSharding) -> list[jax.Array]:
    """Replicated int32 scalars 0..count-1 (compiled steps take indices as device arrays)."""
    return [sharding.put(np.int32(i), replicated) for i in range(count)]
