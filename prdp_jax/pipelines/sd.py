"""The Stable Diffusion pipeline (`model.source = "diffusers"`): a local diffusers folder's UNet,
VAE, CLIP text encoder, tokenizer and scheduler, as a `base.Pipeline`. A pixel-space folder
(the embedded world's base: no VAE, a word tokenizer) is read by the same code.

Latents are (H/f, W/f, C) for images of `model.resolution` (default: the UNet's sample_size x the
VAE's downscale f, i.e. 512 for SD 1.x). `decode` runs the VAE decoder on latents / scaling_factor
inside the jitted sampler step, sharded like the batch. Weights are read on the first call of
`unet_params` / `frozen_params` (never at build), kept on the host, and each call puts a fresh
sharded copy on the devices: the frozen reference and the trainable start are both the folder's
UNet, and the reference is never read from a training checkpoint. `build` writes the folder's
absolute path into `model.path` and (with `model.schedule_from_folder`) its scheduler settings into
`schedule`, so the run's saved config.json records what was used.
"""
from __future__ import annotations

import functools

import jax
import ml_collections
from jax.sharding import Mesh

from prdp_jax.infra import sharding
from prdp_jax.infra.errors import ConfigError
from prdp_jax.models import diffusers_folder
from prdp_jax.models.tokenizers import CLIPTokenizer, WordTokenizer
from prdp_jax.models.vae import AutoencoderKL
from prdp_jax.pipelines.base import DTYPES, Pipeline, pixel_decode, register_source


def latent_shape(folder: diffusers_folder.Folder, resolution: int) -> tuple[int, int, int]:
    """(H/f, W/f, latent channels) for square images of `resolution` pixels (0 = the default)."""
    f = folder.vae.downscale if folder.vae is not None else 1
    unet = folder.unet
    resolution = resolution or unet.sample_size * f
    multiple = f * 2 ** (len(unet.block_out_channels) - 1)
    if resolution % multiple:
        raise ConfigError(f"model.resolution={resolution} must be a multiple of {multiple} "
                          f"(VAE downscale {f} x UNet downsampling)")
    return (resolution // f, resolution // f, unet.in_channels)


def _put_tree(tree, shardings):
    return jax.tree.map(lambda a, s: sharding.put(a, s), tree, shardings)


@register_source("diffusers")
def build(config: ml_collections.ConfigDict, mesh: Mesh, log=print) -> Pipeline:
    """The Pipeline of the folder at `config.model.path` (reads configs only; weights on demand)."""
    m = config.model
    if not m.path:
        raise ConfigError("model.source='diffusers' needs model.path, the local diffusers folder "
                          "(e.g. --config.model.path=/data/stable-diffusion-v1-4)")
    folder = diffusers_folder.open_folder(
        m.path, dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], remat=bool(m.remat),
        attention_chunk=int(m.attention_chunk), variant=m.variant)
    m.path = folder.path  # absolute: the run's config.json and fingerprint name the folder exactly
    if m.schedule_from_folder:
        config.schedule.update(folder.schedule)
        log(f"schedule from {folder.component('scheduler')}: "
            + ", ".join(f"{k}={v}" for k, v in sorted(folder.schedule.items())))
    if folder.vae is None:
        tokenizer = WordTokenizer.from_folder(folder.component("tokenizer"))
    else:
        tokenizer = CLIPTokenizer(folder.component("tokenizer"),
                                  folder.text_encoder.max_position_embeddings)
    if tokenizer.vocab_size > folder.text_encoder.vocab_size:
        raise diffusers_folder.WeightsError(
            f"{folder.component('tokenizer')}: {tokenizer.vocab_size} tokens but the text encoder "
            f"embeds only {folder.text_encoder.vocab_size}")
    shape = latent_shape(folder, int(m.resolution))
    rules = sharding.parse_rules(config.mesh.rules)
    shard = lambda tree: sharding.tree_shardings(tree, mesh, rules, config.mesh.fsdp_min_size)
    abstract_unet = folder.abstract_unet()
    unet_shardings = shard(abstract_unet)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_unet, unet_shardings)
    frozen_shardings = {"text_encoder": shard(folder.abstract_text_encoder())}
    if folder.vae is not None:
        frozen_shardings["vae"] = shard(folder.abstract_vae())

    @functools.lru_cache(maxsize=None)
    def host_weights(name: str):
        loader = {"unet": folder.load_unet, "vae": folder.load_vae,
                  "text_encoder": folder.load_text_encoder}[name]
        log(f"reading {folder.component(name)}")
        return loader()

    def unet_params():
        return _put_tree(host_weights("unet"), unet_shardings)

    def frozen_params():
        return {name: _put_tree(host_weights(name), s) for name, s in frozen_shardings.items()}

    vae = folder.vae

    def vae_decode(frozen, latents: jax.Array) -> jax.Array:
        """(frozen params, latents [B, h, w, C]) -> images [B, h*f, w*f, 3] float32 in [0, 1]."""
        return vae.apply({"params": frozen["vae"]}, latents, method=AutoencoderKL.decode_latents)

    decode = vae_decode if vae is not None else pixel_decode
    if vae is None:
        log(f"pixel-space model from {folder.path}: images {shape}, UNet {m.dtype} activations, "
            f"{m.param_dtype} weights")
    else:
        log(f"Stable Diffusion from {folder.path}: latents {shape}, images "
            f"{shape[0] * vae.downscale}px, UNet {m.dtype} activations, {m.param_dtype} weights")
    return Pipeline(
        unet=folder.unet, text_encoder=folder.text_encoder, tokenizer=tokenizer,
        latent_shape=shape, decode=decode, unet_params=unet_params, frozen_params=frozen_params,
        abstract_unet_params=abstract, gather=sharding.gather_over_fsdp(unet_shardings))

