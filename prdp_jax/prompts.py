"""Prompt sets (a small registry, one signature) and the deterministic prompt sampler.

A prompt set is a function `(config) -> list[str]`, registered by name. The sampler walks an
endless sequence of seeded permutations of the set; its whole state is one integer position, so it
is identical on every host and restores exactly from a checkpoint.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from prdp_jax.errors import ConfigError

# The 45 common animals of DDPO's and PRDP's small-scale experiments.
ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox "
    "wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog "
    "chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo").split()

PromptSet = Callable[[object], list]
_REGISTRY: dict[str, PromptSet] = {}


def register(name: str):
    def deco(fn: PromptSet) -> PromptSet:
        _REGISTRY[name] = fn
        return fn
    return deco


def _import_builtin() -> None:
    # Importing a module registers its prompt sets.
    from prdp_jax.world import prompts  # noqa: F401


def names() -> tuple[str, ...]:
    _import_builtin()
    return tuple(sorted(_REGISTRY))


def load(name: str, config=None) -> list[str]:
    """The prompts of a registered set, a file preset (`prompt_files.PRESETS`, path from
    `config.prompts.files`) or a `file:PATH[#FIELD]` spec; one clear error for an unknown name or
    an empty set."""
    _import_builtin()
    from prdp_jax import prompt_files
    if name.startswith("file:"):
        return prompt_files.load_spec(name, config)
    if name in prompt_files.PRESETS:
        return prompt_files.load_preset(name, config)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown prompt set {name!r}; known: {', '.join(names())}, "
                          f"{', '.join(sorted(prompt_files.PRESETS))} or file:PATH[#FIELD]")
    prompts = list(_REGISTRY[name](config))
    if not prompts:
        raise ConfigError(f"prompt set {name!r} is empty")
    return prompts


@register("animals")
def animals(config=None) -> list[str]:
    """'a painting of a <animal>' for the 45 common animals (paper, small scale: "A painting of a
    <animal>"; DDPO's code writes it lower-case, and CLIP's tokenizer lower-cases anyway)."""
    return [f"a painting of a {a}" for a in ANIMALS]


def slug(name: str) -> str:
    """A file-name-safe label for a prompt set name (file: specs hold paths)."""
    import re
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "prompts"


@register("animal_names")
def animal_names(config=None) -> list[str]:
    """The bare animal names, a tiny vocabulary for from-scratch demos."""
    return list(ANIMALS)


class PromptSampler:
    """Draws prompts from seeded permutations of a prompt set, without replacement per cycle.

    State: `position`, the number of prompts drawn so far.
    """

    def __init__(self, prompts: list[str], seed: int, position: int = 0):
        self.prompts = list(prompts)
        self.seed = int(seed)
        self.position = int(position)

    def _order(self, cycle: int) -> np.ndarray:
        return np.random.default_rng([self.seed, cycle]).permutation(len(self.prompts))

    def indices(self, count: int) -> np.ndarray:
        """The next `count` prompt indices (advances the position)."""
        n = len(self.prompts)
        pos = self.position + np.arange(count)
        out = np.empty(count, np.int64)
        for cycle in np.unique(pos // n):
            sel = pos // n == cycle
            out[sel] = self._order(int(cycle))[pos[sel] % n]
        self.position += count
        return out

    def sample(self, count: int) -> list[str]:
        return [self.prompts[i] for i in self.indices(count)]
