"""The embedded world's compositional caption grammar and its seeded splits.

A scene is one or two objects, each a (size, colour, shape, position), on a background colour:

    a small red circle at the top left on a black background
    a large blue square at the top right and a small yellow triangle at the bottom left on a gray background

Objects of one scene have different colours and positions (the quadrants of a 2x2 grid), and no
object has the background's colour. Two-object captions list the objects in reading order of their
positions, so every scene has exactly one caption. 7 colours x 3 shapes x 2 sizes x 4 positions x
3 backgrounds give 504 one-object and 27,216 two-object captions. Colour-shape pairs in `HELDOUT_PAIRS` never occur
in training captions (nor in the base model's pretraining data); the held-out split consists of
captions that contain at least one of them.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from typing import Sequence

import numpy as np

from prdp_jax.infra.errors import PromptError, shorten

COLORS = {  # object colours, RGB in [0, 1]
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.15, 0.80),
    "orange": (1.00, 0.55, 0.00),
    "cyan": (0.10, 0.85, 0.90),
}
BACKGROUNDS = {
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("square", "circle", "triangle")
SIZES = ("small", "large")
POSITIONS = {  # name -> (row, col) on a 2x2 grid
    "top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1),
}
GRID = 2
HELDOUT_PAIRS = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"),
                 ("purple", "triangle"))
VOCABULARY = sorted(set(
    "a and at the on background".split() + list(SIZES) + list(COLORS) + list(SHAPES)
    + list(BACKGROUNDS) + [w for p in POSITIONS for w in p.split()]))
MAX_WORDS = 21  # "a large purple triangle at the bottom right and a small ... on a white background"


@dataclasses.dataclass(frozen=True)
class Obj:
    size: str
    color: str
    shape: str
    position: str

    @property
    def cell(self) -> tuple[int, int]:
        return POSITIONS[self.position]

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} at the {self.position}"


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str

    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects) + f" on a {self.background} background"

    def is_heldout(self) -> bool:
        return any((o.color, o.shape) in HELDOUT_PAIRS for o in self.objects)


def _valid(objects: Sequence[Obj], background: str) -> bool:
    colors = [o.color for o in objects]
    cells = [o.cell for o in objects]
    return (len(set(colors)) == len(colors) and len(set(cells)) == len(cells)
            and list(cells) == sorted(cells))


@functools.lru_cache(maxsize=None)
def _single_objects() -> tuple[Obj, ...]:
    return tuple(Obj(s, c, sh, p) for s, c, sh, p in
                 itertools.product(SIZES, COLORS, SHAPES, POSITIONS))


def random_scene(rng: np.random.Generator, *, heldout: bool | None = False,
                 two_object_prob: float = 0.5) -> Scene:
    """A uniformly random valid scene; `heldout` False = training compositions only, True = at
    least one held-out colour-shape pair, None = either."""
    objs = _single_objects()
    while True:
        count = 2 if rng.random() < two_object_prob else 1
        chosen = sorted((objs[i] for i in rng.choice(len(objs), size=count, replace=False)),
                        key=lambda o: o.cell)
        scene = Scene(tuple(chosen), str(rng.choice(list(BACKGROUNDS))))
        if not _valid(scene.objects, scene.background):
            continue
        if heldout is None or scene.is_heldout() == heldout:
            return scene


_OBJ = re.compile(r"a (small|large) (\w+) (\w+) at the ((?:top|bottom) (?:left|right))")


def parse(caption: str) -> Scene:
    """Caption -> Scene. Raises PromptError naming the first unknown word, or the malformed part."""
    text = " ".join(caption.lower().split())
    unknown = [w for w in re.findall(r"[a-z0-9]+", text) if w not in VOCABULARY]
    if unknown:
        raise PromptError(f"caption {shorten(caption)}: unknown word {unknown[0]!r}; the world's words are "
                          f"{' '.join(VOCABULARY)}")
    m = re.fullmatch(r"(.+) on a (\w+) background", text)
    if not m or m.group(2) not in BACKGROUNDS:
        raise PromptError(f"caption {shorten(caption)} does not end with 'on a <black|gray|white> background'")
    objects = []
    for part in m.group(1).split(" and "):
        om = _OBJ.fullmatch(part)
        if not om or om.group(2) not in COLORS or om.group(3) not in SHAPES:
            raise PromptError(f"caption {shorten(caption)}: {part!r} is not 'a <size> <colour> <shape> at the "
                              f"<position>'")
        objects.append(Obj(om.group(1), om.group(2), om.group(3), om.group(4)))
    if not 1 <= len(objects) <= 2 or not _valid(objects, m.group(2)):
        raise PromptError(f"caption {shorten(caption)} is not a valid scene (1-2 objects of different "
                          f"colours at different positions, in reading order)")
    return Scene(tuple(objects), m.group(2))


@dataclasses.dataclass(frozen=True)
class Splits:
    small: tuple[str, ...]         # the counterpart of the paper's 45 animals
    large: tuple[str, ...]         # the counterpart of the paper's 100K+ prompts
    large_sample: tuple[str, ...]  # a fixed evaluation sample of `large`
    heldout: tuple[str, ...]       # unseen colour-shape compositions


@functools.lru_cache(maxsize=8)
def splits(seed: int = 0, small: int = 32, large: int = 8192, large_sample: int = 64,
           heldout: int = 128) -> Splits:
    """Deterministic, seeded, disjoint splits of distinct captions."""
    rng = np.random.default_rng([seed, 1])
    train: dict[str, None] = {}
    while len(train) < large + small:
        train[random_scene(rng, heldout=False).caption()] = None
    train_list = list(train)
    held: dict[str, None] = {}
    while len(held) < heldout:
        held[random_scene(rng, heldout=True).caption()] = None
    large_list = tuple(train_list[:large])
    pick = np.random.default_rng([seed, 2]).choice(large, size=large_sample, replace=False)
    return Splits(small=tuple(train_list[large:]), large=large_list,
                  large_sample=tuple(large_list[i] for i in sorted(pick)), heldout=tuple(held))
