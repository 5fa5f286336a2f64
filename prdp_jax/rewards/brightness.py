"""Brightness: the mean luma of the image, a smooth host reward in [0, 1].

Unlike JPEG size it is a continuous function of the pixels, so runs that differ only by float
rounding (another device layout, another number of hosts) get rewards that differ only by
rounding too: the reward of choice for equivalence checks and quick demos.
"""
from __future__ import annotations

import numpy as np

from prdp_jax.rewards.registry import Reward, register

LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 weights of R, G, B


def mean_luma(images) -> np.ndarray:
    """[B, H, W, 3] float in [0, 1] -> [B] float32 mean luma."""
    images = np.asarray(images, np.float32)
    return (images @ LUMA).reshape(images.shape[0], -1).mean(-1).astype(np.float32)


@register("brightness")
def brightness(config=None) -> Reward:
    """The mean luma in [0, 1]: brighter images score higher."""
    return Reward(lambda images, prompts, metadata: (mean_luma(images), {}))
