"""A text-to-image pipeline: tokenizer, text encoder, UNet, decoder and their frozen weights, and
the registry of the sources a pipeline is built from (`model.source`).

A source is a function `(config, mesh, log) -> Pipeline` registered by name; it returns the
modules and one function per weight set, each of which materialises straight into its sharded
layout: the UNet start (called once for the trainable params and once for the frozen reference,
which is loaded from its own source, never from a training checkpoint) and the frozen text
encoder. This module is a leaf: sources import it to register (`pixel.py`, `sd.py`,
`world/pipeline.py`); `factory.build_pipeline` looks them up.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from prdp_jax.infra import sharding
from prdp_jax.infra.errors import ConfigError
from prdp_jax.infra.registry import registrar
from prdp_jax.models.text_encoder import TextEncoder
from prdp_jax.models.tokenizers import WordTokenizer
from prdp_jax.models.unet import UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Source = Callable[[ml_collections.ConfigDict, Mesh, Callable], "Pipeline"]
SOURCES: dict[str, Source] = {}


# @register_source(name) on a function `(config, mesh, log) -> Pipeline` registers a source.
register_source = registrar(SOURCES)


@dataclasses.dataclass
class Pipeline:
    """Modules, tokenizer and weight loaders of one model.

    Attributes:
      unet: the UNet module; `denoiser` wraps its apply.
      text_encoder: the CLIP-style text module.
      tokenizer: [N] strings -> [N, L] int32 ids.
      latent_shape: (H, W, C) of one latent.
      decode: (frozen params, latents [B, H, W, C]) -> images [B, H', W', 3] float32 in [0, 1].
      unet_params: () -> the initial (and reference) UNet params, sharded.
      frozen_params: () -> {'text_encoder': ..., 'vae': ...} frozen params, sharded.
      abstract_unet_params: the UNet param tree as ShapeDtypeStructs with shardings.
      gather: applied to the UNet params inside every denoiser call (jit): all-gathers them over
        the 'fsdp' axis (sharding.gather_over_fsdp); identity by default.
      validate_prompt: raises PromptError for a prompt the pipeline cannot use (the world: a
        caption outside its grammar); None = any prompt the tokenizer takes.
      score_dtype: the UNet's activation dtype in `score_denoiser` (model.score_dtype); None =
        the UNet's own.
    """

    unet: UNet
    text_encoder: TextEncoder
    tokenizer: Callable[[Sequence[str]], np.ndarray]
    latent_shape: tuple[int, int, int]
    decode: Callable[[Any, jax.Array], jax.Array]
    unet_params: Callable[[], Any]
    frozen_params: Callable[[], Any]
    abstract_unet_params: Any
    gather: Callable[[Any], Any] = lambda params: params
    validate_prompt: Callable[[str], None] | None = None
    score_dtype: Any = None

    def check_prompts(self, prompts: Sequence[str], where: str) -> None:
        """Tokenizes (and, for the world, parses) every prompt of a set up front: one error naming
        the set, the prompt's index and the prompt, before any work is done."""
        from prdp_jax.infra.errors import PromptError, shorten
        if self.validate_prompt is None and not isinstance(self.tokenizer, WordTokenizer):
            return  # a CLIP tokenizer takes any text (and truncates)
        for i, prompt in enumerate(prompts):
            try:
                ids = self.tokenizer([prompt])
                if isinstance(self.tokenizer, WordTokenizer) and \
                        not (ids >= self.tokenizer.first_word_id).any():
                    raise PromptError(f"prompt {shorten(prompt)} has no word the tokenizer knows "
                                      f"(it would train as the empty, unconditional prompt)")
                if self.validate_prompt is not None:
                    self.validate_prompt(prompt)
            except PromptError as e:
                raise PromptError(f"{where}, prompt {i + 1}: {e}") from None

    def denoiser(self, params, x, t, context):
        """(params, x [B,H,W,C], t [B], context [B,L,D]) -> [B,H,W,C] model output."""
        return self.unet.apply({"params": self.gather(params)}, x, t, context)

    def score_denoiser(self, params, x, t, context):
        """`denoiser` with the activations in `score_dtype`: the model that scores stored
        transitions (the sampler keeps `denoiser`)."""
        unet = self.unet if self.score_dtype is None else self.unet.clone(dtype=self.score_dtype)
        return unet.apply({"params": self.gather(params)}, x, t, context)

    def encode_text(self, frozen, ids: jax.Array) -> jax.Array:
        """[N, L] ids -> [N, L, D] last hidden states."""
        return self.text_encoder.apply({"params": frozen["text_encoder"]}, ids)[0]


def score_dtype_of(config: ml_collections.ConfigDict):
    """The scorer's activation dtype when `model.score_dtype` differs from `model.dtype`, else
    None (the UNet's own)."""
    score = config.model.get("score_dtype", "")
    return DTYPES[score] if score and score != config.model.dtype else None


def unet_from_config(config: ml_collections.ConfigDict) -> UNet:
    fields = config.model.unet.to_dict()
    for k, v in fields.items():
        if isinstance(v, list):
            fields[k] = tuple(v)
    try:
        unet = UNet(**fields, remat=bool(config.model.remat),
                    attention_chunk=int(config.model.attention_chunk),
                    dtype=DTYPES[config.model.dtype],
                    param_dtype=DTYPES[config.model.param_dtype])
    except TypeError as e:
        raise ConfigError(f"model.unet: {e}") from None
    unet.validate()
    return unet


def text_encoder_from_config(config: ml_collections.ConfigDict, vocab_size: int) -> TextEncoder:
    fields = config.model.text_encoder.to_dict()
    if fields.get("vocab_size", -1) == -1:
        fields["vocab_size"] = vocab_size
    try:
        enc = TextEncoder(**fields)
    except TypeError as e:
        raise ConfigError(f"model.text_encoder: {e}") from None
    enc.validate()
    return enc


def pixel_decode(frozen, latents: jax.Array) -> jax.Array:
    """Pixel-space models: [-1, 1] -> [0, 1]."""
    return jnp.clip((latents.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def init_sharded(module, mesh: Mesh, config: ml_collections.ConfigDict, key: jax.Array, *args):
    """Initialises a module's params directly into their sharded layout (abstract shapes first)."""
    abstract = jax.eval_shape(lambda k: module.init(k, *args)["params"], key)
    rules = sharding.parse_rules(config.mesh.rules)
    shardings = sharding.tree_shardings(abstract, mesh, rules, config.mesh.fsdp_min_size)
    init = jax.jit(lambda k: module.init(k, *args)["params"], out_shardings=shardings)
    return init, abstract, shardings
