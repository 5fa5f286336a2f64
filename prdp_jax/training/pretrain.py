"""Base-model pretraining with the standard denoising objective.

The UNet and the text encoder are trained together on (image, caption) pairs: x_t is the image
noised to a uniformly drawn timestep, the UNet predicts the noise (or v), and a caption is replaced
by "" with probability `cfg_dropout` so that classifier-free guidance works. Uses the core's
optimiser family (AdamW with global-norm clipping), mesh/sharding rules and Orbax checkpointing:
with a `Checkpointer` the state is saved every `checkpoint_every` steps and a rerun resumes from
the latest save, bitwise as if never stopped (batches and noise are pure functions of the step).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from prdp_jax.core import diffusion
from prdp_jax.infra import sharding
from prdp_jax.infra.progress import progress
from prdp_jax.training.checkpoint import Checkpointer


@flax.struct.dataclass
class PretrainState:
    params: Any      # {'unet': ..., 'text_encoder': ...}
    ema: Any         # exponential moving average of params (what the base model keeps)
    opt_state: Any
    step: jax.Array


def denoising_loss(unet, text_encoder, params, images: jax.Array, ids: jax.Array,
                   empty_ids: jax.Array, key: jax.Array, *, alphas_cumprod: jax.Array,
                   prediction_type: str, cfg_dropout: float) -> jax.Array:
    """Mean squared error of the noise (or v) prediction.

    Args:
      images: [B, H, W, C] clean images in [-1, 1].
      ids: [B, L] caption token ids;  empty_ids: [1, L] ids of "".
      alphas_cumprod: [num_train_timesteps] float32.
    """
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    batch = images.shape[0]
    t = jax.random.randint(k_t, (batch,), 0, alphas_cumprod.shape[0])
    noise = jax.random.normal(k_noise, images.shape, jnp.float32)
    a = alphas_cumprod[t][:, None, None, None]
    x_t = jnp.sqrt(a) * images + jnp.sqrt(1 - a) * noise
    drop = jax.random.uniform(k_drop, (batch,)) < cfg_dropout
    ids = jnp.where(drop[:, None], empty_ids, ids)
    context = text_encoder.apply({"params": params["text_encoder"]}, ids)[0]
    out = unet.apply({"params": params["unet"]}, x_t, t, context).astype(jnp.float32)
    target = noise if prediction_type == "epsilon" else jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * images
    return jnp.mean(jnp.square(out - target))


def make_optimizer(pc: ml_collections.ConfigDict) -> optax.GradientTransformation:
    warmup = min(pc.warmup_steps, pc.steps // 2)  # short runs (tests) still decay
    schedule = optax.warmup_cosine_decay_schedule(0.0, pc.learning_rate, warmup, max(pc.steps, 1),
                                                  end_value=pc.learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(pc.max_grad_norm),
                       optax.adamw(schedule, weight_decay=pc.weight_decay))


def train_step(unet, text_encoder, optimizer, loss_kwargs, ema_decay, state: PretrainState,
               images, ids, empty_ids, key):
    loss, grads = jax.value_and_grad(
        lambda p: denoising_loss(unet, text_encoder, p, images, ids, empty_ids, key, **loss_kwargs)
    )(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema, params)
    return state.replace(params=params, ema=ema, opt_state=opt_state, step=state.step + 1), loss


def pretrain(unet, text_encoder, init_params: Any, param_shardings: Any,
             batches: Callable[[int], tuple[np.ndarray, np.ndarray]], empty_ids: np.ndarray,
             schedule: diffusion.Schedule, pc: ml_collections.ConfigDict, mesh: Mesh, log=print,
             show_progress: bool = True, checkpointer: Checkpointer | None = None,
             checkpoint_every: int = 250) -> tuple[Any, dict]:
    """Trains to `pc.steps` steps; returns (EMA params, {'loss': losses every 25 steps, 'seconds'}).

    Args:
      init_params: {'unet', 'text_encoder'} initial params (sharded as `param_shardings`).
      batches: step -> (images [B, H, W, C] in [-1, 1], ids [B, L]), deterministic in step.
      checkpointer: where to save the state every `checkpoint_every` steps and at the end, and
        to resume from (its latest save) if it holds one.
    """
    optimizer = make_optimizer(pc)
    batch_sharding = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)
    opt_abstract = jax.eval_shape(optimizer.init, init_params)
    opt_shardings = sharding.tree_shardings(opt_abstract, mesh)
    state_shardings = PretrainState(params=param_shardings, ema=param_shardings,
                                    opt_state=opt_shardings, step=repl)
    start = checkpointer.latest_epoch() if checkpointer is not None else None
    if start is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                jax.eval_shape(lambda p: PretrainState(
                                    p, p, optimizer.init(p), jnp.zeros((), jnp.int32)), init_params),
                                state_shardings)
        state, meta = checkpointer.restore(start, abstract)
        losses, seconds = list(meta["loss"]), float(meta["seconds"])
        log(f"resuming pretraining from step {start} of {pc.steps} ({checkpointer.directory})")
    else:
        state = PretrainState(
            params=init_params, ema=jax.tree.map(jnp.copy, init_params),
            opt_state=jax.jit(optimizer.init, out_shardings=opt_shardings)(init_params),
            step=jnp.zeros((), jnp.int32))
        start, losses, seconds = 0, [], 0.0
    loss_kwargs = dict(alphas_cumprod=jnp.asarray(schedule.alphas_cumprod, jnp.float32),
                       prediction_type=schedule.prediction_type, cfg_dropout=pc.cfg_dropout)
    step_fn = jax.jit(
        lambda s, x, i, e, k: train_step(unet, text_encoder, optimizer, loss_kwargs, pc.ema_decay,
                                         s, x, i, e, k),
        in_shardings=(state_shardings, batch_sharding, batch_sharding, repl, repl),
        out_shardings=(state_shardings, repl), donate_argnums=0)
    key = jax.random.key(pc.seed)
    empty = sharding.put(np.asarray(empty_ids, np.int32), repl)
    t0 = time.perf_counter() - seconds

    def save(step: int) -> None:
        if checkpointer is not None:
            checkpointer.save(step, state, {"loss": losses, "seconds": time.perf_counter() - t0})

    bar = progress(range(start, pc.steps), desc="pretraining base", enabled=show_progress,
                   initial=start, total=pc.steps)
    for step in bar:
        images, ids = batches(step)
        state, loss = step_fn(state, sharding.put(np.asarray(images, np.float32), batch_sharding),
                              sharding.put(np.asarray(ids, np.int32), batch_sharding), empty,
                              jax.random.fold_in(key, step))
        if step % 25 == 0 or step == pc.steps - 1:
            losses.append(float(loss))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses[-4:]):.4f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < pc.steps:
            save(step + 1)
    if start < pc.steps:
        save(pc.steps)
    seconds = time.perf_counter() - t0
    log(f"pretrained the base for {pc.steps} steps in {seconds:.0f}s; final loss "
        f"{np.mean(losses[-4:]):.4f}")
    return state.ema, {"loss": losses, "seconds": seconds}
