"""The reward registry (a leaf: plugins import it to register, nothing here imports them).

A reward is a factory `(config) -> Reward`, registered by name; a `Reward` wraps a function

    reward(images, prompts, metadata) -> (rewards [B] float32, info: dict of [B] arrays)

that runs on the host (numpy images) or, if `on_device`, on the sharded device batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from prdp_jax.infra.registry import registrar

RewardFn = Callable[[Any, Sequence[str], Sequence[dict]], tuple[Any, dict]]


@dataclasses.dataclass(frozen=True)
class Reward:
    fn: RewardFn
    on_device: bool = False

    def __call__(self, images, prompts, metadata):
        return self.fn(images, prompts, metadata)


REGISTRY: dict[str, Callable[[Any], Reward]] = {}


# @register(name) on a factory `(config) -> Reward` registers a reward.
register = registrar(REGISTRY)
