"""The training state and its optimiser: what a checkpoint holds, built abstractly first.

`abstract_state` gives the state's shapes, dtypes and shardings without allocating it (for the
ahead-of-time compile and for an Orbax restore); `init_state` allocates a fresh one.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from prdp_jax.core import ddpo
from prdp_jax.core import rdp
from prdp_jax.core import tiled_gradient
from prdp_jax.infra import sharding
from prdp_jax.infra.errors import ConfigError


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint must hold besides the JSON metadata.

    Attributes:
      params: the UNet params (theta).
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


def trainable_count(pattern: str, params) -> int:
    """How many parameters `pattern` selects (all of them when it is empty)."""
    leaves = jax.tree.leaves(params)
    if not pattern:
        return sum(math.prod(a.shape) for a in leaves)
    labels = jax.tree.leaves(trainable_labels(pattern, params))
    return sum(math.prod(a.shape) for a, label in zip(leaves, labels) if label == "train")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay after a global-norm clip (paper Table 4), on the params
    that `train.trainable` selects (all by default; the others get zero updates and no state).

    Its state (both AdamW moments) is float32 whatever the params' dtype: `init` sees float32
    params, and the float32 gradients keep it float32 through every tiled_gradient.
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


def make_objective(config: ml_collections.ConfigDict) -> tiled_gradient.Objective:
    """The loss as a function of per-step log-probs: (log_probs [n, T], minibatch) -> (loss, aux)."""
    if config.method == "prdp":
        p = config.prdp
        return lambda lp, mb: rdp.rdp_loss(
            lp, mb.log_probs_old, mb.log_probs_ref, mb.rewards,
            images_per_prompt=config.train.images_per_prompt, beta=p.beta, clip_eps=p.clip_eps,
            step_reduction=p.step_reduction)
    return lambda lp, mb: ddpo.ppo_loss(lp, mb.log_probs_old, mb.advantages,
                                        clip_range=config.ddpo.clip_range)


def abstract_state(config: ml_collections.ConfigDict, abstract_params, mesh: Mesh,
                   optimizer: optax.GradientTransformation) -> TrainState:
    """The state's ShapeDtypeStructs with their shardings (the params' come with them)."""
    opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_shardings = sharding.tree_shardings(opt, mesh, sharding.parse_rules(config.mesh.rules),
                                            config.mesh.fsdp_min_size)
    opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt,
                       opt_shardings)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
    return TrainState(params=abstract_params, opt_state=opt, key=key)


def init_state(abstract: TrainState, params, seed: int,
               optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state around `params`, laid out as `abstract` says."""
    opt_shardings = jax.tree.map(lambda a: a.sharding, abstract.opt_state)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    key = sharding.put(np.asarray(jax.random.key_data(jax.random.key(seed))), abstract.key.sharding)
    return TrainState(params=params, opt_state=opt_state, key=key)


def epoch_key(state: TrainState, epoch: int, replicated) -> jax.Array:
    """uint32 [2] key data of `epoch`: fold_in(state.key, epoch), replicated."""
    return jax.device_put(jax.random.key_data(jax.random.fold_in(
        jax.random.wrap_key_data(state.key), epoch)), replicated)
