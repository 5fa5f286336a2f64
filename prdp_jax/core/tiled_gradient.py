"""The exact microbatched gradient of a trajectory-level objective.

The PRDP (and DDPO) losses couple all steps of a trajectory and all trajectories of a prompt, yet
each is a function of the per-step log-probs alone. So the gradient is taken in three phases:

1. `score`: log pi_theta of every stored transition, forward only, one tile of transitions at a
   time inside a `lax.map` (no gradient in the loop, so the loop is fine on every backend).
2. `loss_and_weights`: the loss and its exact gradient w = dL/d(log pi) with respect to those
   [n, T] log-probs (cheap: no model involved).
3. `accumulate_grad`: the gradient of sum(w * log pi_theta) over one tile, added to an
   accumulator; the trainer calls it once per tile from Python. By the chain rule the sum over tiles
   is exactly dL/dtheta, while memory holds one tile's activations, whatever T or images per prompt.

`loss_and_grad` takes the same gradient in one program where memory allows: every tile's forward
once with its activations kept, the weights, then every tile's backward (no second forward).

Transitions are never backpropagated through the chain: stored latents are data. A tile is
`Tiling.trajectories` trajectories x `Tiling.steps` steps, flattened into one batch so convolutions
run batched. Trajectories are viewed as [shards, n / shards] and each tile takes the same rows from
every shard, so on a mesh a tile is gathered without moving latents between devices.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

from prdp_jax.core import diffusion
from prdp_jax.infra import sharding
from prdp_jax.infra.errors import ConfigError


@flax.struct.dataclass
class Transitions:
    """Stored transitions of trajectories (trajectory-major, a prompt's images contiguous): a
    minibatch has leading dim [n]; an epoch's minibatches [M, n] (shapes below are a minibatch's).

    Attributes:
      latents: [n, T+1, H, W, C] float32 chains x_T .. x_0.
      context: [n, L, D] prompt embeddings of each trajectory.
      log_probs_old: [n, T] float32 log pi_theta_old of each transition.
      log_probs_ref: [n, T] float32 log pi_ref of each transition.
      rewards: [n] float32 raw rewards.
      advantages: [n] float32 DDPO advantages (zeros for PRDP).
    """

    latents: jax.Array
    context: jax.Array
    log_probs_old: jax.Array
    log_probs_ref: jax.Array
    rewards: jax.Array
    advantages: jax.Array


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a minibatch's n x T transitions split into tiles of `trajectories` x `steps`."""

    num_trajectories: int
    num_steps: int
    trajectories: int
    steps: int
    shards: int = 1

    def __post_init__(self):
        n, a, s = self.num_trajectories, self.trajectories, self.shards
        if a < 1 or self.steps < 1:
            raise ConfigError("train.microbatch_trajectories and train.microbatch_steps must be >= 1")
        if n % a:
            raise ConfigError(f"train.microbatch_trajectories={a} must divide the {n} trajectories of "
                              f"a minibatch (prompts_per_minibatch x images_per_prompt)")
        sharding.check_batch_divisible("train.microbatch_trajectories", a, s)

    @property
    def steps_per_tile(self) -> int:
        return min(self.steps, self.num_steps)

    @property
    def num_step_tiles(self) -> int:
        return math.ceil(self.num_steps / self.steps_per_tile)

    @property
    def num_trajectory_tiles(self) -> int:
        return self.num_trajectories // self.trajectories

    @property
    def num_tiles(self) -> int:
        return self.num_trajectory_tiles * self.num_step_tiles

    def tile_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """(j, c) for every tile: trajectory-tile and step-tile indices, [num_tiles] int32 each."""
        j, c = np.meshgrid(np.arange(self.num_trajectory_tiles), np.arange(self.num_step_tiles),
                           indexing="ij")
        return j.ravel().astype(np.int32), c.ravel().astype(np.int32)


Constrain = Callable[[jax.Array], jax.Array]


def _identity(x):
    return x


def _tile_rows(x: jax.Array, tiling: Tiling, j: jax.Array, constrain: Constrain) -> jax.Array:
    """[n, ...] -> [shards, trajectories / shards, ...]: tile j's rows of every shard."""
    rows = tiling.trajectories // tiling.shards
    x = constrain(x.reshape((tiling.shards, -1) + x.shape[1:]))
    return jax.lax.dynamic_slice_in_dim(x, j * rows, rows, axis=1)


def _tile_steps(tiling: Tiling, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Step indices [s] of step-tile c (clamped to T-1) and their validity mask [s]."""
    idx = c * tiling.steps_per_tile + jnp.arange(tiling.steps_per_tile)
    return jnp.minimum(idx, tiling.num_steps - 1), idx < tiling.num_steps


def tile_log_probs(denoiser: diffusion.Denoiser, params: chex.ArrayTree, mb: Transitions,
                   uncond_context: jax.Array, coeffs: diffusion.StepCoefficients, tiling: Tiling,
                   j: jax.Array, c: jax.Array, *, guidance_scale: float, reduce: str,
                   constrain: Constrain = _identity) -> tuple[jax.Array, jax.Array]:
    """log pi_params of one tile's stored transitions.

    Args:
      uncond_context: [1, L, D] embedding of the empty prompt.
      j, c: int32 scalars, the trajectory-tile and step-tile index.
    Returns:
      (log_probs [shards, trajectories / shards, steps] float32, valid [steps] bool).
    """
    steps, valid = _tile_steps(tiling, c)
    chain = _tile_rows(mb.latents, tiling, j, constrain)            # [S, a', T+1, H, W, C]
    x_t = jnp.take(chain, steps, axis=2)                            # [S, a', s, H, W, C]
    x_prev = jnp.take(chain, steps + 1, axis=2)
    context = _tile_rows(mb.context, tiling, j, constrain)          # [S, a', L, D]
    lead = x_t.shape[:3]
    size = math.prod(lead)
    context = jnp.broadcast_to(context[:, :, None], lead + context.shape[2:])
    per_step = lambda v: jnp.broadcast_to(jnp.asarray(v)[steps], lead).reshape(size)
    flat = lambda v: constrain(v.reshape((size,) + v.shape[3:]))
    x_t = flat(x_t)
    out = diffusion.guided_output(denoiser, params, x_t, per_step(coeffs.t).astype(jnp.int32),
                                  flat(context), uncond_context, guidance_scale)
    _, log_prob = diffusion.step(x_t, out, per_step(coeffs.c_x), per_step(coeffs.c_out),
                                 per_step(coeffs.sigma), x_prev=flat(x_prev), reduce=reduce)
    return log_prob.reshape(lead), valid


def score(denoiser: diffusion.Denoiser, params: chex.ArrayTree, mb: Transitions,
          uncond_context: jax.Array, coeffs: diffusion.StepCoefficients, tiling: Tiling, *,
          guidance_scale: float, reduce: str, constrain: Constrain = _identity,
          unroll: bool = False) -> jax.Array:
    """Phase 1: log pi_params of every stored transition of the minibatch, forward only.

    Args:
      unroll: one copy of the model per tile instead of a loop (`loss_and_grad` differentiates
        it: XLA:CPU runs a loop's backward convolutions on its slow generic path).
    Returns:
      [n, T] float32.
    """
    js, cs = tiling.tile_indices()

    def one(jc):
        log_prob, _ = tile_log_probs(denoiser, params, mb, uncond_context, coeffs, tiling, *jc,
                                     guidance_scale=guidance_scale, reduce=reduce,
                                     constrain=constrain)
        return log_prob

    if unroll:
        one_tile = jax.jit(one)  # traced (and differentiated) once, called per tile
        tiles = jnp.stack([one_tile((j, c)) for j, c in zip(js, cs)])
    else:
        tiles = jax.lax.map(one, (jnp.asarray(js), jnp.asarray(cs)))  # [tiles, S, a', s]
    nj, nc, s = tiling.num_trajectory_tiles, tiling.num_step_tiles, tiling.steps_per_tile
    tiles = tiles.reshape((nj, nc) + tiles.shape[1:])               # [nj, nc, S, a', s]
    out = jnp.transpose(tiles, (2, 0, 3, 1, 4)).reshape(tiling.num_trajectories, nc * s)
    return out[:, :tiling.num_steps]


Objective = Callable[[jax.Array, Transitions], tuple[jax.Array, dict]]


def loss_and_weights(objective: Objective, log_probs: jax.Array,
                     mb: Transitions) -> tuple[jax.Array, jax.Array, dict]:
    """Phase 2: the loss and w = dL/d(log_probs), both from the [n, T] log-probs alone.

    Returns:
      (loss scalar, weights [n, T] float32, aux dict).
    """
    (loss, aux), weights = jax.value_and_grad(objective, has_aux=True)(log_probs, mb)
    return loss, weights, aux


def accumulate_grad(denoiser: diffusion.Denoiser, params: chex.ArrayTree, mb: Transitions,
                    uncond_context: jax.Array, weights: jax.Array, j: jax.Array, c: jax.Array,
                    grads: chex.ArrayTree, coeffs: diffusion.StepCoefficients, tiling: Tiling, *,
                    guidance_scale: float, reduce: str,
                    constrain: Constrain = _identity,
                    trainable: Optional[chex.ArrayTree] = None) -> chex.ArrayTree:
    """Phase 3, one tile: grads + d/dparams sum(weights * log pi_params) over tile (j, c).

    Args:
      weights: [n, T] float32 from `loss_and_weights`.
      grads: the accumulator, a tree shaped like params.
      trainable: optional tree shaped like params of Python bools. Only the True leaves are
        differentiated (the others add exact zeros), so XLA drops the weight gradients of frozen
        layers and the backward pass through layers upstream of every trainable one.
    """
    steps, valid = _tile_steps(tiling, c)
    w = jnp.take(_tile_rows(weights, tiling, j, constrain), steps, axis=2)   # [S, a', s]
    w = jnp.where(valid, w, 0.0)

    def weighted(p):
        log_prob, _ = tile_log_probs(denoiser, p, mb, uncond_context, coeffs, tiling, j, c,
                                     guidance_scale=guidance_scale, reduce=reduce,
                                     constrain=constrain)
        return jnp.sum(jax.lax.stop_gradient(w) * log_prob)

    subset, merge, expand = trainable_subset(params, trainable)
    tile_grads = expand(jax.grad(lambda leaves: weighted(merge(leaves)))(subset))
    return jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads, tile_grads)


def trainable_subset(params: chex.ArrayTree, trainable: Optional[chex.ArrayTree]):
    """Splits params into the leaves to differentiate and the rest.

    Args:
      trainable: None (all) or a tree shaped like params of Python bools.
    Returns:
      (subset: list of the trainable leaves,
       merge: subset -> full params, the frozen leaves behind stop_gradient,
       expand: gradients of the subset -> a tree like params, exact zeros for frozen leaves).
    """
    leaves, treedef = jax.tree.flatten(params)
    flags = [True] * len(leaves) if trainable is None else treedef.flatten_up_to(trainable)

    def merge(subset):
        it = iter(subset)
        return treedef.unflatten([next(it) if f else jax.lax.stop_gradient(x)
                                  for x, f in zip(leaves, flags)])

    def expand(subset_grads):
        it = iter(subset_grads)
        return treedef.unflatten([next(it) if f else jnp.zeros_like(x)
                                  for x, f in zip(leaves, flags)])

    return [x for x, f in zip(leaves, flags) if f], merge, expand


def loss_and_grad(objective: Objective, denoiser: diffusion.Denoiser, params: chex.ArrayTree,
                  mb: Transitions, uncond_context: jax.Array, coeffs: diffusion.StepCoefficients,
                  tiling: Tiling, *, guidance_scale: float, reduce: str,
                  constrain: Constrain = _identity,
                  trainable: Optional[chex.ArrayTree] = None):
    """The three phases in one pass (`train.gradient="one_pass"`): every tile's forward with its
    activations kept (the `score` loop, differentiated), the loss and w = dL/d(log pi), then
    every tile's backward. The same gradient as `score` + `loss_and_weights` + `accumulate_grad`
    over all tiles, without the scoring pass's second forward; memory holds every tile's
    activations instead of one tile's.

    Returns:
      (loss scalar, log_probs [n, T], float32 grads shaped like params, aux dict).
    """
    subset, merge, expand = trainable_subset(params, trainable)

    def log_probs_of(leaves):
        return score(denoiser, merge(leaves), mb, uncond_context, coeffs, tiling,
                     guidance_scale=guidance_scale, reduce=reduce, constrain=constrain,
                     unroll=True)

    log_probs, backward = jax.vjp(log_probs_of, subset)
    loss, weights, aux = loss_and_weights(objective, log_probs, mb)
    (subset_grads,) = backward(weights)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), expand(subset_grads))
    return loss, log_probs, grads, aux
