"""CLIP in Flax linen: the vision transformer and the two-tower model, in transformers' layout.

Parameter paths follow transformers' `CLIPModel` state dict with list indices folded into names
(see models/convert.py):

    vision_model.embeddings.patch_embedding.weight   -> vision_model/embeddings/patch_embedding/kernel
    vision_model.embeddings.class_embedding          -> vision_model/embeddings/class_embedding
    vision_model.embeddings.position_embedding.weight
    vision_model.pre_layrnorm.*, vision_model.encoder.layers.N.*, vision_model.post_layernorm.*
    text_model.*   (models/text_encoder.py's TextEncoder)
    visual_projection.weight, text_projection.weight, logit_scale

The vision encoder reuses the text encoder's layers without a mask (full attention). Images enter
already preprocessed (resized, cropped, normalised; see rewards/image_transform.py) as
[B, S, S, C] float32, channels last.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prdp_jax.infra import files
from prdp_jax.infra.errors import WeightsError
from prdp_jax.models import convert, weights
from prdp_jax.models.text_encoder import ACTIVATIONS, Encoder, TextEncoder

Dtype = jnp.dtype

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for fields a config.json leaves out.
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                     layer_norm_eps=1e-5, eos_token_id=49407)
VISION_DEFAULTS = dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                       num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu",
                       layer_norm_eps=1e-5, num_channels=3)


class VisionEmbeddings(nn.Module):
    """Patch embedding (a stride-`patch_size` conv, no bias), a learned class token, and learned
    position embeddings: [B, S, S, C] -> [B, 1 + (S / patch_size)^2, D]."""

    image_size: int
    patch_size: int
    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = self.patch_size
        x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    name="patch_embedding", **kw)(pixels)
        x = x.reshape(x.shape[0], -1, self.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (self.hidden_size,),
                         self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[-1])), x],
                            axis=1)
        num_positions = (self.image_size // p) ** 2 + 1
        pos = nn.Embed(num_positions, self.hidden_size, name="position_embedding", **kw)(
            jnp.arange(num_positions)[None])
        return x + pos


class VisionTransformer(nn.Module):
    """CLIP's ViT: embeddings, pre-LayerNorm, a non-causal encoder, LayerNorm of the class token.

    Fields mirror transformers' `CLIPVisionConfig` (`pre_layrnorm` is transformers' spelling).
    """

    image_size: int = 224
    patch_size: int = 32
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixels: [B, image_size, image_size, num_channels] normalised ->
        (last_hidden_state [B, 1 + patches, D], pooled [B, D] = post_layernorm(class token))."""
        chex.assert_shape(pixels, (None, self.image_size, self.image_size, self.num_channels))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = VisionEmbeddings(self.image_size, self.patch_size, self.hidden_size,
                             name="embeddings", **kw)(pixels)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        x = Encoder(self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                    self.hidden_act, self.layer_norm_eps, name="encoder", **kw)(x, None)
        pooled = nn.LayerNorm(epsilon=self.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        return x, pooled


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module):
    """Two towers and their projections. Either tower may be None (e.g. an image-only reward).

    `image_embeds` / `text_embeds` give L2-normalised float32 embeddings, as transformers'
    `get_image_features` / `get_text_features` followed by `x / ||x||`.
    """

    vision_model: VisionTransformer | None
    text_model: TextEncoder | None
    projection_dim: int = 512
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        if self.vision_model is not None:
            self.visual_projection = nn.Dense(self.projection_dim, **kw)
        if self.text_model is not None:
            self.text_projection = nn.Dense(self.projection_dim, **kw)
        if self.vision_model is not None and self.text_model is not None:
            self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)),
                                          (), self.param_dtype)

    def image_embeds(self, pixels: jax.Array) -> jax.Array:
        """pixels: [B, S, S, 3] preprocessed -> [B, projection_dim] unit-norm float32."""
        return _normalize(self.visual_projection(self.vision_model(pixels)[1]))

    def text_embeds(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: [N, L] int32 -> [N, projection_dim] unit-norm float32."""
        return _normalize(self.text_projection(self.text_model(input_ids)[1]))

    def __call__(self, pixels: jax.Array | None = None, input_ids: jax.Array | None = None):
        """Both embeddings (None for a missing tower or input); used for init."""
        image = self.image_embeds(pixels) if self.vision_model is not None else None
        text = self.text_embeds(input_ids) if self.text_model is not None else None
        if self.vision_model is not None and self.text_model is not None:
            _ = self.logit_scale
        return image, text

    def abstract_params(self) -> Any:
        """The param tree as ShapeDtypeStructs (nothing is allocated)."""
        pixels = ids = None
        if self.vision_model is not None:
            v = self.vision_model
            pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
        if self.text_model is not None:
            ids = jnp.zeros((1, self.text_model.max_position_embeddings), jnp.int32)
        return jax.eval_shape(lambda: self.init(jax.random.key(0), pixels, ids))["params"]


def _fields(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    return {k: type(v)(cfg[k]) if k in cfg and cfg[k] is not None else v
            for k, v in defaults.items()}


def _check_act(act: str, where: str) -> None:
    if act not in ACTIVATIONS:
        raise WeightsError(f"{where}: hidden_act {act!r} is not supported; known: {tuple(ACTIVATIONS)}")


def from_hf_config(cfg: Mapping[str, Any], *, vision: bool = True, text: bool = True,
                   source: str = "config.json", dtype: Dtype = jnp.float32) -> CLIPModel:
    """A CLIPModel from transformers' CLIPConfig dict (or a CLIPVisionConfig / CLIPTextConfig one).

    `text_config_dict` / `vision_config_dict` (older configs) override `text_config` /
    `vision_config`, as transformers does.
    """
    model_type = cfg.get("model_type", "clip")
    if model_type == "clip_vision_model":
        text_cfg, vision_cfg = None, cfg
    elif model_type == "clip_text_model":
        text_cfg, vision_cfg = cfg, None
    else:
        text_cfg = {**(cfg.get("text_config") or {}), **(cfg.get("text_config_dict") or {})}
        vision_cfg = {**(cfg.get("vision_config") or {}), **(cfg.get("vision_config_dict") or {})}
    if vision and vision_cfg is None:
        raise WeightsError(f"{source}: a {model_type} config has no vision tower")
    if text and text_cfg is None:
        raise WeightsError(f"{source}: a {model_type} config has no text tower")
    vision_model = text_model = None
    if vision:
        f = _fields(vision_cfg, VISION_DEFAULTS)
        _check_act(f["hidden_act"], f"{source} vision_config")
        vision_model = VisionTransformer(**f, dtype=dtype)
    if text:
        f = _fields(text_cfg, TEXT_DEFAULTS)
        _check_act(f["hidden_act"], f"{source} text_config")
        text_model = TextEncoder(**f, dtype=dtype)
    return CLIPModel(vision_model, text_model, projection_dim=int(cfg.get("projection_dim", 512)),
                     dtype=dtype)


def load_hf_clip(folder: str, *, vision: bool = True, text: bool = True,
                 field: str = "") -> tuple[CLIPModel, dict]:
    """Reads a transformers CLIP folder (config.json + model.safetensors or pytorch_model.bin).

    Returns:
      (model, params as numpy float32). Only the requested towers' weights are read into params.
    Raises:
      WeightsError naming the folder / file, the key and expected vs found shape (and `field`).
    """
    if folder and os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "config.json")):
        raise WeightsError(f"{folder}: no config.json; expected a transformers CLIP folder"
                           f"{f' (set {field})' if field else ''}")
    state_dict, source = weights.read_hf_folder(folder, field=field)
    cfg = files.read_json(os.path.join(folder, "config.json"), field=field)
    model = from_hf_config(cfg, vision=vision, text=text, source=os.path.join(folder, "config.json"))
    params = convert.state_dict_to_params(state_dict, model.abstract_params(), source=source)
    return model, params
