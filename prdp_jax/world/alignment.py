"""The world's black-box alignment reward: does the image show what its caption says?

Each pixel is classified to the nearest palette colour (or 'unknown' if none is within
`COLOR_TOLERANCE`). Then each caption attribute is checked and scored in [0, 1]:

  background  fraction of the border pixels not of an object's colour that have the caption's
              background colour (objects may touch the border)
  count       1 if the number of object-coloured blobs equals the caption's object count
  per object, on the largest blob of the object's colour:
    colour    blob area / the area the object should have (capped at 1); 0 if no blob
    position  1 in the caption's quadrant, 0.5 in one sharing its row or column, 0 diagonally
    size      1 if the blob's extent is nearer the caption's size than the other size
    shape     1 if its fill of its bounding box classifies as the caption's shape
              (triangle < 0.66 <= circle < 0.92 <= square)

The reward is the mean of all checks (6 for one object, 10 for two). It never looks at the model.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from prdp_jax.rewards.registry import Reward, register
from prdp_jax.world import grammar
from prdp_jax.world.render import geometry, object_mask

PALETTE_NAMES = tuple(grammar.COLORS) + tuple(grammar.BACKGROUNDS)
PALETTE = np.array([grammar.COLORS.get(n, grammar.BACKGROUNDS.get(n)) for n in PALETTE_NAMES],
                   np.float32)
OBJECT_IDS = np.arange(len(grammar.COLORS))
COLOR_TOLERANCE = 0.25
ATTRIBUTES = ("background", "count", "colour", "position", "size", "shape")


def classify(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] in [0, 1] -> [H, W] palette index, or -1 where no colour is within tolerance."""
    d = np.linalg.norm(image[:, :, None, :] - PALETTE[None, None], axis=-1)
    idx = d.argmin(-1)
    return np.where(d.min(-1) <= COLOR_TOLERANCE, idx, -1)


def _expected_area(obj: grammar.Obj, image_size: int) -> int:
    return int(object_mask(obj, image_size).sum())


def shape_of(fill: float) -> str:
    return "triangle" if fill < 0.66 else "circle" if fill < 0.92 else "square"


def score_image(image: np.ndarray, scene: grammar.Scene) -> dict[str, float]:
    """Per-attribute scores in [0, 1] and their mean under 'total'."""
    size = image.shape[0]
    cell, extents = geometry(size)
    labels = classify(np.asarray(image, np.float32))
    bg = PALETTE_NAMES.index(scene.background)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    min_area = max(3, int(0.2 * extents["small"] ** 2))  # 40% of a small triangle
    blobs = 0
    for cid in OBJECT_IDS:
        comp, n = ndimage.label(labels == cid)
        if n:
            blobs += int((np.bincount(comp.ravel())[1:] >= min_area).sum())
    objects = [PALETTE_NAMES.index(o.color) for o in scene.objects]
    open_border = border[~np.isin(border, objects)]
    checks = {"background": float((open_border == bg).mean()) if open_border.size else 0.0,
              "count": float(blobs == len(scene.objects))}
    per_object = {k: [] for k in ("colour", "position", "size", "shape")}
    for obj in scene.objects:
        comp, n = ndimage.label(labels == PALETTE_NAMES.index(obj.color))
        areas = np.bincount(comp.ravel())[1:] if n else np.zeros(0)
        if not n or areas.max() < min_area:
            for k in per_object:
                per_object[k].append(0.0)
            continue
        blob = comp == (areas.argmax() + 1)
        area = int(areas.max())
        ys, xs = np.nonzero(blob)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        row = min(int(ys.mean() // cell), grammar.GRID - 1)
        col = min(int(xs.mean() // cell), grammar.GRID - 1)
        dist = abs(row - obj.cell[0]) + abs(col - obj.cell[1])
        extent = max(h, w)
        nearest_size = min(extents, key=lambda s: abs(extents[s] - extent))
        per_object["colour"].append(min(1.0, area / _expected_area(obj, size)))
        per_object["position"].append(1.0 if dist == 0 else 0.5 if dist == 1 else 0.0)
        per_object["size"].append(float(nearest_size == obj.size))
        per_object["shape"].append(float(shape_of(area / (h * w)) == obj.shape))
    values = [checks["background"], checks["count"]] + [v for vs in per_object.values() for v in vs]
    out = dict(checks, **{k: float(np.mean(v)) for k, v in per_object.items()})
    out["total"] = float(np.mean(values))
    return out


def alignment_scores(images: np.ndarray, captions: Sequence[str]) -> tuple[np.ndarray, dict]:
    """[B, H, W, 3] images and B captions -> ([B] rewards, {attribute: [B] scores})."""
    images = np.asarray(images, np.float32)
    rows = [score_image(img, grammar.parse(c)) for img, c in zip(images, captions)]
    info = {k: np.array([r[k] for r in rows], np.float32) for k in ATTRIBUTES}
    return np.array([r["total"] for r in rows], np.float32), info


@register("alignment")
def alignment(config=None) -> Reward:
    """The world's caption-alignment score in [0, 1] (see module docstring)."""
    return Reward(lambda images, prompts, metadata: alignment_scores(images, prompts))
