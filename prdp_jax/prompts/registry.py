"""The prompt-set registry (a leaf: plugins import it to register, nothing here imports them).

A prompt set is a function `(config) -> list[str]`, registered by name. The two built-in sets of
the paper's small scale are registered here; the world's sets in `world/prompts.py`.
"""
from __future__ import annotations

from typing import Callable

from prdp_jax.infra.registry import registrar

# The 45 common animals of DDPO's and PRDP's small-scale experiments.
ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox "
    "wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog "
    "chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo").split()

PromptSet = Callable[[object], list]
REGISTRY: dict[str, PromptSet] = {}


# @register(name) on a function `(config) -> list[str]` registers it as a prompt set.
register = registrar(REGISTRY)


@register("animals")
def animals(config=None) -> list[str]:
    """'a painting of a <animal>' for the 45 common animals (paper, small scale: "A painting of a
    <animal>"; DDPO's code writes it lower-case, and CLIP's tokenizer lower-cases anyway)."""
    return [f"a painting of a {a}" for a in ANIMALS]


@register("animal_names")
def animal_names(config=None) -> list[str]:
    """The bare animal names, a tiny vocabulary for from-scratch demos."""
    return list(ANIMALS)
