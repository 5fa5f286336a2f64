"""The world's prompt sets, registered in the core prompt registry (seeded by `config.world`)."""
from __future__ import annotations

from prdp_jax.prompts.registry import register
from prdp_jax.world import grammar


def world_splits(config) -> grammar.Splits:
    w = config.world if config is not None and "world" in config else None
    if w is None:
        return grammar.splits()
    return grammar.splits(w.seed, w.small_prompts, w.large_prompts, w.large_sample_prompts,
                          w.heldout_prompts)


@register("world_small")
def world_small(config=None):
    """A few training compositions: the counterpart of the paper's 45 animals."""
    return list(world_splits(config).small)


@register("world_large")
def world_large(config=None):
    """Thousands of training compositions: the counterpart of the paper's 100K+ prompts."""
    return list(world_splits(config).large)


@register("world_large_sample")
def world_large_sample(config=None):
    """A fixed evaluation sample of world_large."""
    return list(world_splits(config).large_sample)


@register("world_heldout")
def world_heldout(config=None):
    """Captions with colour-shape pairs that no training caption (or pretraining image) has."""
    return list(world_splits(config).heldout)
