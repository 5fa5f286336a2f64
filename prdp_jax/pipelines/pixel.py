"""The pixel-space pipeline from a fresh init (`model.source = "random"`): the UNet and text
encoder that `config.model` describes, initialised from `model.init_seed` (the reference is that
init), and a word tokenizer over the training prompt set's vocabulary."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from prdp_jax.infra import sharding
from prdp_jax.infra.errors import ConfigError
from prdp_jax.models.tokenizers import WordTokenizer
from prdp_jax.pipelines.base import (Pipeline, init_sharded, pixel_decode, register_source,
                                     text_encoder_from_config, unet_from_config)
from prdp_jax.prompts import sets as prompt_sets


@register_source("random")
def build(config: ml_collections.ConfigDict, mesh: Mesh, log=print) -> Pipeline:
    """A fresh pixel-space model (weights materialise on demand, sharded)."""
    length = config.model.text_encoder.max_position_embeddings
    vocab_prompts = list(prompt_sets.load(config.prompts.train, config)) + [""]
    tokenizer = WordTokenizer.from_prompts(vocab_prompts, max_length=length)
    unet = unet_from_config(config)
    text_encoder = text_encoder_from_config(config, tokenizer.vocab_size)
    if unet.cross_attention_dim != text_encoder.hidden_size:
        raise ConfigError(f"model.unet.cross_attention_dim={unet.cross_attention_dim} must equal "
                          f"model.text_encoder.hidden_size={text_encoder.hidden_size}")
    size = unet.sample_size
    latent_shape = (size, size, unet.in_channels)
    key_unet, key_text = jax.random.split(jax.random.key(config.model.init_seed))
    unet_init, abstract, unet_shardings = init_sharded(
        unet, mesh, config, key_unet, jnp.zeros((1,) + latent_shape), jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, length, unet.cross_attention_dim)))
    text_init, _, text_shardings = init_sharded(text_encoder, mesh, config, key_text,
                                                jnp.zeros((1, length), jnp.int32))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, unet_shardings)
    unet_params = lambda: unet_init(key_unet)
    frozen_params = lambda: {"text_encoder": text_init(key_text)}
    return Pipeline(
        unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, latent_shape=latent_shape,
        decode=pixel_decode, unet_params=unet_params, frozen_params=frozen_params,
        abstract_unet_params=abstract, gather=sharding.gather_over_fsdp(unet_shardings))
