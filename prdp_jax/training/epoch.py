"""The phases of one epoch, each a function of a `Setup` (config, pipeline, mesh, compiled steps):

  sample_and_reward    N x B trajectories from a snapshot of the policy, and their images' rewards
  score_transitions    the epoch's transitions in shuffled minibatches, scored under theta_old and
                       the frozen reference (`score_all`: every minibatch under some params)
  minibatch_gradient   one minibatch's loss and exact gradient (score, weights, gradient tiles)

`algorithm.train_epoch` puts them together as Algorithm 1.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from prdp_jax.core import tiled_gradient
from prdp_jax.infra import sharding
from prdp_jax.infra.errors import ConfigError
from prdp_jax.infra.progress import progress
from prdp_jax.rewards import combine as rewards_lib
from prdp_jax.training import state as state_lib
from prdp_jax.training import steps as steps_lib

if TYPE_CHECKING:
    from prdp_jax.pipelines.base import Pipeline


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything an epoch needs that stays fixed through a run."""

    config: ml_collections.ConfigDict
    pipe: "Pipeline"
    mesh: Mesh
    shape: steps_lib.EpochShape
    ctx: steps_lib.StepContext
    shardings: steps_lib.Shardings
    optimizer: optax.GradientTransformation
    steps: steps_lib.Steps
    index: tuple        # replicated int32 scalars 0, 1, ... (minibatch and tile indices)

    @property
    def num_steps(self) -> int:
        """T: the policy's steps (transitions) per trajectory."""
        return self.ctx.coeffs.num_stochastic

    def abstract_state(self) -> state_lib.TrainState:
        return state_lib.abstract_state(self.config, self.pipe.abstract_unet_params, self.mesh,
                                        self.optimizer)

    def init_state(self, params) -> state_lib.TrainState:
        return state_lib.init_state(self.abstract_state(), params, self.config.seed,
                                    self.optimizer)


def make_setup(config: ml_collections.ConfigDict, pipe: "Pipeline", mesh: Mesh) -> Setup:
    """Checks the epoch's batch arithmetic against the mesh and jits the steps."""
    t = config.train
    shape = steps_lib.EpochShape.from_config(config, mesh)
    coeffs = steps_lib.policy_coefficients(config)
    n = shape.minibatch_trajectories
    tiling = tiled_gradient.Tiling(n, coeffs.num_stochastic, trajectories=min(t.microbatch_trajectories, n),
                           steps=t.microbatch_steps, shards=shape.shards)
    ctx = steps_lib.step_context(config, pipe, mesh, coeffs, tiling)
    sh = steps_lib.shardings_for(pipe, mesh)
    optimizer = state_lib.make_optimizer(config)
    steps = steps_lib.build_steps(ctx, shape, sh, t.trainable, optimizer,
                                  state_lib.make_objective(config))
    # Indices the steps take: minibatch m, trajectory tile j and step tile c.
    count = max(shape.minibatches, tiling.num_trajectory_tiles, tiling.num_step_tiles)
    return Setup(config=config, pipe=pipe, mesh=mesh, shape=shape, ctx=ctx, shardings=sh,
                 optimizer=optimizer, steps=steps,
                 index=tuple(steps_lib.scalars(count, sh.replicated)))


def compile_setup(setup: Setup, frozen, log=print, parallel: bool = True) -> tuple[Setup, dict]:
    """`setup` with its heavy steps compiled ahead of time (side by side unless not
    `parallel`), and the compile stats."""
    steps, stats = steps_lib.compile_steps(setup.steps, setup.ctx, setup.shape, setup.shardings,
                                           setup.abstract_state(), frozen,
                                           setup.config.train.gradient, log=log,
                                           parallel=parallel)
    return dataclasses.replace(setup, steps=steps), stats


# ---------------------------------------------------------------------------------------------
# SAMPLING
# ---------------------------------------------------------------------------------------------

@flax.struct.dataclass
class EpochSamples:
    """An epoch's sampled trajectories and their rewards (trajectory g is image g % B of prompt
    g // B).

    Attributes:
      batches: the sampler's Trajectory outputs, [sample_batch, ...] each, in trajectory order.
      prompt_context: [N, L, D] prompt embeddings;  uncond: [1, L, D] embedding of "".
      rewards: [N*B] float32;  reward_info: {component: [N*B]} the reward's parts.
      grid_images: [rows*B, H, W, 3] the leading prompts' images for the sample grid, or None.
    """

    prompts: list = flax.struct.field(pytree_node=False)
    batches: tuple
    prompt_context: jax.Array
    uncond: jax.Array
    rewards: np.ndarray
    reward_info: dict
    grid_images: Optional[np.ndarray]
    sample_time: float = flax.struct.field(pytree_node=False)
    reward_time: float = flax.struct.field(pytree_node=False)


def sample_and_reward(setup: Setup, params, frozen, prompts: list[str], key: jax.Array,
                      reward_fn: rewards_lib.Reward, epoch: int, show_progress: bool = True,
                      stop: Optional[Callable[[], bool]] = None) -> Optional[EpochSamples]:
    """Samples B trajectories per prompt from the policy `params` with the epoch's `key`, one
    sampler batch at a time, and queries the black-box reward on each batch's images.

    `stop` is asked after every sampler batch; when it says so the epoch is abandoned (None).
    """
    c, shape, steps = setup.config, setup.shape, setup.steps
    B, size = shape.images_per_prompt, shape.sample_batch
    prompt_context = steps.encode(frozen, setup.pipe.tokenizer(list(prompts)))
    uncond = steps.encode(frozen, setup.pipe.tokenizer([""]))
    batches, rewards, infos, grid_images = [], [], [], []
    grid_rows = min(c.log.grid_prompts, shape.prompts) * B
    num_batches = shape.trajectories // size
    sample_time = reward_time = 0.0
    for i in progress(range(num_batches), desc=f"epoch {epoch + 1} sample", leave=False,
                      enabled=show_progress and num_batches > 1):
        t0 = time.perf_counter()
        index = np.arange(i * size, (i + 1) * size, dtype=np.int32)
        traj, images = jax.block_until_ready(steps.sample(
            params, frozen, prompt_context, uncond, key,
            sharding.put(index, setup.shardings.batch)))
        batches.append(traj)
        t1 = time.perf_counter()
        sample_time += t1 - t0
        value, info = rewards_lib.score(reward_fn, images, [prompts[g // B] for g in index],
                                        [{"prompt_index": int(g // B)} for g in index])
        if value.shape != (size,):
            raise ConfigError(f"reward {', '.join(c.reward.weights)} returned shape {value.shape} "
                              f"for {size} images; a reward must return one float per image")
        rewards.append(value)
        infos.append(info)
        keep = int((index < grid_rows).sum())  # the grid's rows lead the epoch's trajectories
        if keep:
            grid_images.append(sharding.to_host(steps.head(images, keep)))
        reward_time += time.perf_counter() - t1
        if stop is not None and stop():
            return None
    info = {k: np.concatenate([d[k] for d in infos]) for k in infos[0]} if infos else {}
    return EpochSamples(prompts=list(prompts), batches=tuple(batches),
                        prompt_context=prompt_context, uncond=uncond,
                        rewards=np.concatenate(rewards), reward_info=info,
                        grid_images=np.concatenate(grid_images) if grid_images else None,
                        sample_time=sample_time, reward_time=reward_time)


# ---------------------------------------------------------------------------------------------
# TRAINING
# ---------------------------------------------------------------------------------------------

def prompt_permutation(config: ml_collections.ConfigDict, epoch: int, pass_index: int) -> np.ndarray:
    """[N*B] trajectory order of pass k: prompts shuffled, each prompt's images kept together."""
    t = config.train
    order = np.random.default_rng([config.seed, epoch, pass_index]).permutation(t.prompts_per_epoch)
    B = t.images_per_prompt
    return (order[:, None] * B + np.arange(B)[None]).reshape(-1).astype(np.int32)


def reshuffle(setup: Setup, data: tiled_gradient.Transitions, epoch: int,
              pass_index: int) -> tiled_gradient.Transitions:
    """Pass (k-1)'s minibatches reshuffled into pass k's order."""
    prev = prompt_permutation(setup.config, epoch, pass_index - 1)
    new = prompt_permutation(setup.config, epoch, pass_index)
    where = np.empty_like(prev)
    where[prev] = np.arange(prev.size, dtype=prev.dtype)
    return setup.steps.rearrange(data, sharding.put(where[new], setup.shardings.replicated))


def score_transitions(setup: Setup, old_params, ref_params, samples: EpochSamples,
                      advantages: np.ndarray, epoch: int) -> tuple[tiled_gradient.Transitions, dict]:
    """The epoch's transitions in pass 0's shuffled minibatches ([M, n, ...]), with
    log pi_ref of every transition, and log pi_theta_old re-scored (unless `train.rescore_old`
    is off and the sampler's own log-probs can serve: online sampling).

    Returns (transitions, {drift, score_time[, logprob_resample_mismatch]}).
    """
    t0 = time.perf_counter()
    steps, repl = setup.steps, setup.shardings.replicated
    put = lambda x: sharding.put(np.asarray(x), repl)
    data = steps.arrange(samples.batches, samples.prompt_context, put(samples.rewards),
                         put(advantages), put(prompt_permutation(setup.config, epoch, 0)))
    sampler_log_probs = data.log_probs_old
    offline = setup.config.train.sampling == "offline"
    info = {}
    if offline or setup.config.train.rescore_old:
        old = score_all(setup, old_params, data, samples.uncond)
        if not offline:
            info["logprob_resample_mismatch"] = float(jnp.abs(old - sampler_log_probs).max())
    else:
        old = sampler_log_probs
    ref = score_all(setup, ref_params, data, samples.uncond)
    data = steps.set_log_probs(data, old, ref)
    info.update(drift=float((old - ref).mean()), score_time=time.perf_counter() - t0)
    return data, info


def score_all(setup: Setup, params, data: tiled_gradient.Transitions, uncond: jax.Array
              ) -> jax.Array:
    """[M, n, T] log pi_params of every stored transition, minibatch by minibatch."""
    return jnp.stack([setup.steps.score(params, data, uncond, m)
                      for m in setup.index[:setup.shape.minibatches]])


def known_log_probs(setup: Setup, data: tiled_gradient.Transitions) -> jax.Array:
    """[n, T] log pi_theta_old of minibatch 0: at an epoch's first step theta is still theta_old,
    whose log-probs were just stored, so that step needs no scoring pass."""
    return setup.steps.take(data.log_probs_old, setup.index[0])


def minibatch_gradient(setup: Setup, params, data: tiled_gradient.Transitions, uncond: jax.Array, m: int,
                       log_probs: Optional[jax.Array] = None):
    """Loss, exact gradient and aux of minibatch m: the three phases of `tiled_gradient.py`
    (`train.gradient="tiled"`), or all three in one pass ("one_pass").

    Args:
      log_probs: [n, T] the minibatch's log-probs under `params` if already known (the tiled
        gradient then skips its scoring pass).
    Returns:
      (loss, grads shaped like params, aux dict).
    """
    steps, index = setup.steps, setup.index
    if setup.config.train.gradient == "one_pass":
        return steps.loss_and_grad(params, data, uncond, index[m])
    if log_probs is None:
        log_probs = steps.score(params, data, uncond, index[m])
    loss, weights, aux = steps.weights(data, index[m], log_probs)
    grads = steps.zeros(params)
    for j, c in zip(*setup.ctx.tiling.tile_indices()):
        grads = steps.grad_tile(params, data, uncond, weights, index[m], index[int(j)],
                                index[int(c)], grads)
    return loss, grads, aux
