"""The base's pretraining data: clean renders mixed with degraded ones, as web data is.

A web-trained text-to-image model has seen good and bad images for every kind of caption, so for
every prompt some of its samples come out clean and right and others do not: the good mode is
there and reward finetuning has to find it. The world's base is pretrained the same way. Each
pretraining image is drawn, independently of its caption, as

    clean       the caption's scene rendered exactly (with the usual one-pixel jitter)
    blur        the clean render under a Gaussian blur
    noise       the clean render plus Gaussian pixel noise
    faded       colours blended towards grey (a washed-out, low-contrast image)
    tinted      every colour shifted towards `TINT`, a warm cast (an old photo's filter)
    misplaced   an object moved to another free cell
    misshapen   an object drawn with another shape or size
    mismatch    the render of another, random training scene (a caption that does not match)

with probabilities `DEGRADATIONS`: no caption predicts which. The first four hurt the
prompt-agnostic quality of the image, the last three its alignment with the caption. Degraded
scenes never contain a held-out colour-shape pair, so those stay unseen in pretraining.

The cast and the fade are the largest shares, and each has one direction: like a web model's
colour casts and washed-out looks, they are global modes that a sampler commits to in its first,
noisiest steps, so for every caption some samples fall into them and others do not. (A first mix
of seven equal shares with randomly directed tints gave a base whose degraded samples were a mild,
general noisiness instead; see docs/world.md.)
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import ndimage

from prdp_jax.world import grammar, render

# Kind -> probability of a pretraining image. Half of them are clean.
DEGRADATIONS = {
    "clean": 0.5,
    "blur": 0.05, "noise": 0.05, "faded": 0.1, "tinted": 0.2,
    "misplaced": 1 / 30, "misshapen": 1 / 30, "mismatch": 1 / 30,
}
TINT = np.array([1.0, 0.45, -0.8]) / np.linalg.norm([1.0, 0.45, -0.8])  # warm: up red, down blue
KINDS = tuple(DEGRADATIONS)


def _with_object(scene: grammar.Scene, i: int, obj: grammar.Obj) -> grammar.Scene:
    objects = sorted(scene.objects[:i] + (obj,) + scene.objects[i + 1:], key=lambda o: o.cell)
    return dataclasses.replace(scene, objects=tuple(objects))


def misplaced(scene: grammar.Scene, rng: np.random.Generator) -> grammar.Scene:
    """One object moved to a cell no other object occupies."""
    i = int(rng.integers(len(scene.objects)))
    taken = {o.position for o in scene.objects}
    free = [p for p in grammar.POSITIONS if p not in taken]
    obj = dataclasses.replace(scene.objects[i], position=str(rng.choice(free)))
    return _with_object(scene, i, obj)


def misshapen(scene: grammar.Scene, rng: np.random.Generator) -> grammar.Scene:
    """One object with another shape (never a held-out colour-shape pair) or the other size."""
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    options = [dataclasses.replace(obj, shape=s) for s in grammar.SHAPES
               if s != obj.shape and (obj.color, s) not in grammar.HELDOUT_PAIRS]
    options.append(dataclasses.replace(obj, size="large" if obj.size == "small" else "small"))
    return _with_object(scene, i, options[int(rng.integers(len(options)))])


def degrade(scene: grammar.Scene, kind: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] float32 image in [0, 1] of `scene` under degradation `kind`."""
    if kind == "misplaced":
        scene = misplaced(scene, rng)
    elif kind == "misshapen":
        scene = misshapen(scene, rng)
    elif kind == "mismatch":
        scene = grammar.random_scene(rng, heldout=False)
    image = render.render(scene, image_size, int(rng.integers(2 ** 31)))
    if kind == "blur":
        sigma = rng.uniform(0.7, 1.4)
        image = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="nearest")
    elif kind == "noise":
        image = image + rng.normal(0.0, rng.uniform(0.08, 0.2), image.shape)
    elif kind == "faded":
        image = image + rng.uniform(0.35, 0.6) * (0.5 - image)
    elif kind == "tinted":
        image = image + rng.uniform(0.2, 0.3) * TINT
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def pretraining_batch(captions: Sequence[str], image_size: int, rng: np.random.Generator,
                      degradations: dict[str, float] = DEGRADATIONS) -> tuple[np.ndarray, list[str]]:
    """([B, H, W, 3] images in [0, 1], the B kinds drawn) for B captions, a pure function of rng."""
    probs = np.array([degradations.get(k, 0.0) for k in KINDS], np.float64)
    kinds = [KINDS[i] for i in rng.choice(len(KINDS), size=len(captions), p=probs / probs.sum())]
    images = np.stack([degrade(grammar.parse(c), k, image_size, rng)
                       for c, k in zip(captions, kinds)])
    return images, kinds
