"""The world's prompt-agnostic image quality: the counterpart of an aesthetic score.

It never reads the caption. A clean render is made of flat areas of palette colours with sharp
borders between them; blur, noise, faded or tinted colours each break one of three checks:

  solid   fraction of pixels within `SOLID_TOLERANCE` of a palette colour (object or background)
  crisp   fraction of neighbouring pixel pairs that are either nearly equal (a flat area) or both
          solid (a sharp border); blur leaves in-between pixels, noise makes every pair differ
  clean   fraction of the pixels not of an object colour that have the image's most common
          background colour (0 if every pixel has an object colour)

The quality is their mean, in [0, 1]: a clean render scores 1, pure noise near 0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from prdp_jax.rewards.registry import Reward, register
from prdp_jax.world import grammar

PALETTE = np.array(list(grammar.COLORS.values()) + list(grammar.BACKGROUNDS.values()), np.float32)
OBJECT_COLOURS = len(grammar.COLORS)   # palette ids below this are object colours
BACKGROUND_IDS = np.arange(OBJECT_COLOURS, len(PALETTE))
SOLID_TOLERANCE = 0.12   # Euclidean RGB distance to the nearest palette colour
FLAT_TOLERANCE = 0.06    # largest channel difference of two pixels of one flat area
CHECKS = ("solid", "crisp", "clean")


def quality_checks(images: np.ndarray) -> dict[str, np.ndarray]:
    """[B, H, W, 3] float32 in [0, 1] -> {check: [B] scores in [0, 1]} and their mean 'quality'."""
    images = np.asarray(images, np.float32)
    dist = np.linalg.norm(images[..., None, :] - PALETTE, axis=-1)        # [B, H, W, P]
    solid = dist.min(-1) <= SOLID_TOLERANCE                               # [B, H, W]
    label = np.where(solid, dist.argmin(-1), -1)

    def crisp_pairs(axis: int) -> np.ndarray:
        a = np.moveaxis(images, axis, 0)
        s = np.moveaxis(solid, axis, 0)
        flat = np.abs(a[1:] - a[:-1]).max(-1) <= FLAT_TOLERANCE
        return np.moveaxis(flat | (s[1:] & s[:-1]), 0, axis)

    crisp = np.concatenate([crisp_pairs(1).reshape(len(images), -1),
                            crisp_pairs(2).reshape(len(images), -1)], axis=1).mean(1)
    flat_label = label.reshape(len(images), -1)
    not_object = ((flat_label < 0) | (flat_label >= OBJECT_COLOURS)).sum(1)
    modal = np.max([(flat_label == b).sum(1) for b in BACKGROUND_IDS], axis=0)
    clean = modal / np.maximum(not_object, 1)
    out = {"solid": solid.reshape(len(images), -1).mean(1), "crisp": crisp, "clean": clean}
    out = {k: v.astype(np.float32) for k, v in out.items()}
    out["quality"] = np.mean([out[k] for k in CHECKS], axis=0).astype(np.float32)
    return out


def quality_scores(images: np.ndarray, captions: Sequence[str] = ()) -> tuple[np.ndarray, dict]:
    """[B, H, W, 3] images -> ([B] quality, {check: [B]}); captions are ignored."""
    checks = quality_checks(images)
    return checks.pop("quality"), checks


@register("quality")
def quality(config=None) -> Reward:
    """The world's prompt-agnostic image quality in [0, 1] (see module docstring)."""
    return Reward(lambda images, prompts, metadata: quality_scores(images, prompts))
