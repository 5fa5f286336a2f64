"""Black-box rewards by name: building them, their weighted sum, and scoring a batch where it lies.

    reward(images, prompts, metadata) -> (rewards [B] float32, info: dict of [B] arrays)

`images` are [B, H, W, 3] float32 in [0, 1]: a numpy array for host rewards, a (sharded) jax Array
for rewards marked `on_device`. No gradient of a reward is ever taken. Each registry entry is a
factory `(config) -> Reward`, so rewards that load models read their paths from config.
`combine` builds the weighted sum of named rewards that `config.reward.weights` asks for.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

from prdp_jax import plugins  # noqa: F401  (registers the built-in rewards)
from prdp_jax.infra import sharding
from prdp_jax.infra.errors import ConfigError
from prdp_jax.rewards import registry
from prdp_jax.rewards.registry import Reward


def names() -> tuple[str, ...]:
    """The registered rewards' names."""
    return tuple(sorted(registry.REGISTRY))


def build(name: str, config: Any = None) -> Reward:
    """The registered reward `name`, built from `config`."""
    if name not in registry.REGISTRY:
        raise ConfigError(f"unknown reward {name!r}; known: {', '.join(names())}")
    return registry.REGISTRY[name](config)


def combine(weights: Mapping[str, float], config: Any = None) -> Reward:
    """The weighted sum of named rewards; `info` holds each component under its name.

    The sum is on device when any part is: on-device parts get the images as they come, host
    parts a numpy copy (made once). With only on-device parts the total stays a device array;
    otherwise every part is brought to the host.
    """
    if not weights:
        raise ConfigError("reward.weights is empty; name at least one reward, e.g. "
                          "--config.reward.weights='{\"jpeg_compressibility\": 1.0}'")
    parts = {name: (float(w), build(name, config)) for name, w in weights.items()}
    if len(parts) == 1:
        (name, (w, reward)), = parts.items()
        if w == 1.0:
            return _with_component(name, reward)
    on_device = any(r.on_device for _, r in parts.values())
    all_on_device = all(r.on_device for _, r in parts.values())

    def fn(images, prompts, metadata):
        total, info = 0.0, {}
        for name, (w, reward) in parts.items():
            if all_on_device:
                value, sub = reward(images, prompts, metadata)
            else:
                value, sub = score(reward, images, prompts, metadata)
            info[name] = value
            info.update({f"{name}/{k}": v for k, v in sub.items()})
            total = total + w * value
        return total, info

    return Reward(fn, on_device=on_device)


def score(reward: Reward, images, prompts: Sequence[str],
          metadata: Sequence[dict]) -> tuple[np.ndarray, dict]:
    """Runs a reward where the images are and returns the whole batch's results on every process.

    Args:
      images: [B, H, W, 3] in [0, 1]: a batch-sharded jax Array (on one host or many) or numpy.
      prompts, metadata: B entries each, in batch order.
    Returns:
      (rewards [B] float32, info {name: [B] array}) as numpy. On-device rewards run on the sharded
      batch; host rewards run on each process's own rows, and the results are gathered.
    """
    total = len(prompts)
    if reward.on_device:
        value, info = reward(images, prompts, metadata)
        return (sharding.to_host(value).astype(np.float32),
                {k: sharding.to_host(v) for k, v in info.items()})
    if not isinstance(images, jax.Array) or images.is_fully_addressable:
        value, info = reward(np.asarray(images), prompts, metadata)
        return np.asarray(value, np.float32), {k: np.asarray(v) for k, v in info.items()}
    rows, local = sharding.local_rows(images)
    value, info = reward(local, [prompts[r] for r in rows], [metadata[r] for r in rows])
    gather = lambda v: sharding.gather_rows(rows, np.asarray(v), total)
    return gather(np.asarray(value, np.float32)), {k: gather(v) for k, v in info.items()}


def _with_component(name: str, reward: Reward) -> Reward:
    def fn(images, prompts, metadata):
        value, info = reward(images, prompts, metadata)
        return value, {name: value, **{f"{name}/{k}": v for k, v in info.items()}}
    return Reward(fn, on_device=reward.on_device)
