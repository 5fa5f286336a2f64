"""Deterministic rendering of world scenes into small RGB images.

The image is a 2x2 grid of cells of `cell = size // 2` pixels. An object is centred on its cell's
centre pixel; small objects span `cell - 5` pixels and large ones `cell - 1` (7 and 11 at 24 px),
so neighbouring objects never touch. Squares fill their box, circles are discs, triangles point up.
An optional seeded jitter moves objects by up to one pixel, staying inside the image (pretraining
data variety).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from prdp_jax.infra.errors import ConfigError
from prdp_jax.world.grammar import BACKGROUNDS, COLORS, GRID, Obj, Scene


def geometry(image_size: int) -> tuple[int, dict[str, int]]:
    """(cell size, {size name: extent in pixels}) for an image size."""
    if image_size % (2 * GRID) or image_size < 16:
        raise ConfigError(f"world.image_size must be a multiple of {2 * GRID} and >= 16, "
                          f"got {image_size}")
    cell = image_size // GRID
    return cell, {"small": cell - 5, "large": cell - 1}


def object_mask(obj: Obj, image_size: int, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """[H, W] bool mask of one object."""
    cell, extents = geometry(image_size)
    row, col = obj.cell
    h = (extents[obj.size] - 1) / 2
    clamp = lambda c: int(np.clip(c, h, image_size - 1 - h))  # jitter never pushes it out
    cy, cx = clamp(row * cell + cell // 2 + shift[0]), clamp(col * cell + cell // 2 + shift[1])
    yy, xx = np.mgrid[:image_size, :image_size]
    dy, dx = yy - cy, xx - cx
    inside = (np.abs(dy) <= h) & (np.abs(dx) <= h)
    if obj.shape == "circle":
        inside &= dy ** 2 + dx ** 2 <= (h + 0.5) ** 2
    elif obj.shape == "triangle":
        inside &= np.abs(dx) <= (dy + h) / 2 + 1e-9
    return inside


def render(scene: Scene, image_size: int = 24, jitter_seed: Optional[int] = None) -> np.ndarray:
    """[H, W, 3] float32 image in [0, 1]."""
    img = np.empty((image_size, image_size, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    rng = np.random.default_rng(jitter_seed) if jitter_seed is not None else None
    for obj in scene.objects:
        shift = tuple(rng.integers(-1, 2, size=2)) if rng is not None else (0, 0)
        img[object_mask(obj, image_size, shift)] = COLORS[obj.color]
    return img


def render_batch(scenes: Sequence[Scene], image_size: int = 24,
                 jitter_seeds: Optional[Sequence[int]] = None) -> np.ndarray:
    """[N, H, W, 3] float32 images in [0, 1]."""
    seeds = jitter_seeds if jitter_seeds is not None else [None] * len(scenes)
    return np.stack([render(s, image_size, j) for s, j in zip(scenes, seeds)])
