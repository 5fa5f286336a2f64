"""Builds the pipeline a config names (`model.source`), from the registered sources."""
from __future__ import annotations

import ml_collections
from jax.sharding import Mesh

from prdp_jax import plugins  # noqa: F401  (registers the built-in sources)
from prdp_jax.infra.errors import ConfigError
from prdp_jax.pipelines.base import SOURCES, Pipeline, score_dtype_of


def build_pipeline(config: ml_collections.ConfigDict, mesh: Mesh, log=print) -> Pipeline:
    """The pipeline of `config.model.source`:

    'random': a fresh init from `model.init_seed` (reference = init), word tokenizer over the
      training prompt set's vocabulary (pipelines/pixel.py);
    'world': the embedded world's base folder `world.base_dir`, verified against its manifest and
      read like a Stable Diffusion folder (world/pipeline.py);
    'diffusers': Stable Diffusion from the local diffusers folder `model.path` (pipelines/sd.py).
    """
    source = config.model.source
    if source not in SOURCES:
        raise ConfigError(f"model.source must be one of {', '.join(repr(s) for s in sorted(SOURCES))}"
                          f", got {source!r}")
    pipe = SOURCES[source](config, mesh, log=log)
    pipe.score_dtype = score_dtype_of(config)
    if pipe.score_dtype is not None:
        log(f"stored transitions are scored with {config.model.score_dtype} activations "
            f"(model.score_dtype); the sampler runs in {config.model.dtype}")
    return pipe
