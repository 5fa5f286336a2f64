"""Black-box rewards: a registry of functions with one signature.

    reward(images, prompts, metadata) -> (rewards [B] float32, info: dict of [B] arrays)

`images` are [B, H, W, 3] float32 in [0, 1]: a numpy array for host rewards, a (sharded) jax Array
for rewards marked `on_device`. No gradient of a reward is ever taken. Each registry entry is a
factory `(config) -> Reward`, so rewards that load models read their paths from config.
`combine` builds the weighted sum of named rewards that `config.reward.weights` asks for.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from prdp_jax.errors import ConfigError

RewardFn = Callable[[Any, Sequence[str], Sequence[dict]], tuple[Any, dict]]


@dataclasses.dataclass(frozen=True)
class Reward:
    fn: RewardFn
    on_device: bool = False

    def __call__(self, images, prompts, metadata):
        return self.fn(images, prompts, metadata)


_REGISTRY: dict[str, Callable[[Any], Reward]] = {}


def register(name: str):
    def deco(factory: Callable[[Any], Reward]):
        _REGISTRY[name] = factory
        return factory
    return deco


def names() -> tuple[str, ...]:
    _import_builtin()
    return tuple(sorted(_REGISTRY))


def build(name: str, config: Any = None) -> Reward:
    _import_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown reward {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name](config)


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
        total, info, host_images = 0.0, {}, None
        for name, (w, reward) in parts.items():
            if reward.on_device:
                value, sub = reward(images, prompts, metadata)
            else:
                if host_images is None:
                    host_images = np.asarray(images)
                value, sub = reward(host_images, prompts, metadata)
            value = value if all_on_device else np.asarray(value, np.float32)
            info[name] = value
            info.update({f"{name}/{k}": v for k, v in sub.items()})
            total = total + w * value
        return total, info

    return Reward(fn, on_device=on_device)


def _with_component(name: str, reward: Reward) -> Reward:
    def fn(images, prompts, metadata):
        value, info = reward(images, prompts, metadata)
        return value, {name: value, **{f"{name}/{k}": v for k, v in info.items()}}
    return Reward(fn, on_device=reward.on_device)


def _import_builtin() -> None:
    # Importing a module registers its rewards.
    from prdp_jax.rewards import jpeg  # noqa: F401
    from prdp_jax.rewards import aesthetic, clipscore, hpsv2, pickscore  # noqa: F401
    from prdp_jax.world import alignment  # noqa: F401
