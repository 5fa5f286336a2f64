"""Loading prompt sets (registered ones, file presets, `file:` specs) and the deterministic prompt
sampler.

A prompt set is a function `(config) -> list[str]`, registered by name (`registry.py`; the
plugins' sets are there once `prdp_jax.plugins` is imported, as every entry point does). The
sampler walks an endless sequence of seeded permutations of the set; its whole state is one
integer position, so it is identical on every host and restores exactly from a checkpoint.
"""
from __future__ import annotations

import numpy as np

from prdp_jax.infra.errors import ConfigError
from prdp_jax.prompts import files, registry


def names() -> tuple[str, ...]:
    """The registered prompt sets' names."""
    return tuple(sorted(registry.REGISTRY))


def load(name: str, config=None) -> list[str]:
    """The prompts of a registered set, a file preset (`files.PRESETS`, path from
    `config.prompts.files`) or a `file:PATH[#FIELD]` spec; one clear error for an unknown name or
    an empty set."""
    if name.startswith("file:"):
        return files.load_spec(name, config)
    if name in files.PRESETS:
        return files.load_preset(name, config)
    if name not in registry.REGISTRY:
        raise ConfigError(f"unknown prompt set {name!r}; known: {', '.join(names())}, "
                          f"{', '.join(sorted(files.PRESETS))} or file:PATH[#FIELD]")
    prompts = list(registry.REGISTRY[name](config))
    if not prompts:
        raise ConfigError(f"prompt set {name!r} is empty")
    return prompts


def slug(name: str) -> str:
    """A file-name-safe label for a prompt set name (file: specs hold paths)."""
    import re
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "prompts"


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
