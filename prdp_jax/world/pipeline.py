"""The world's pipeline source (`model.source = "world"`): its base folder (the one that ships, or
`world.base_dir`), verified against its manifest and world config, read by the Stable Diffusion
folder code, with prompts checked against the caption grammar."""
from __future__ import annotations

import dataclasses

import ml_collections
from jax.sharding import Mesh

from prdp_jax.pipelines import sd
from prdp_jax.pipelines.base import Pipeline, register_source
from prdp_jax.world import base, grammar


@register_source("world")
def build(config: ml_collections.ConfigDict, mesh: Mesh, log=print) -> Pipeline:
    """The pipeline of the world's base folder."""
    config.model.path = base.open_base(config).path
    return dataclasses.replace(sd.build(config, mesh, log=log), validate_prompt=grammar.parse)
