"""JPEG (in)compressibility, as DDPO defines it: the size in kB of the image saved at quality 95."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from prdp_jax.rewards.registry import Reward, register


def to_uint8(images) -> np.ndarray:
    """[B, H, W, 3] float in [0, 1] -> uint8 (round half to even, clipped)."""
    return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def jpeg_kilobytes(images) -> np.ndarray:
    """[B, H, W, 3] float in [0, 1] -> [B] float32 JPEG sizes in kB (1 kB = 1000 bytes)."""
    sizes = []
    for image in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000.0)
    return np.asarray(sizes, np.float32)


@register("jpeg_compressibility")
def jpeg_compressibility(config=None) -> Reward:
    """Minus the JPEG size in kB: smaller files score higher."""
    return Reward(lambda images, prompts, metadata: (-jpeg_kilobytes(images), {}))


@register("jpeg_incompressibility")
def jpeg_incompressibility(config=None) -> Reward:
    """The JPEG size in kB: larger files score higher."""
    return Reward(lambda images, prompts, metadata: (jpeg_kilobytes(images), {}))
