"""open_clip checkpoints (e.g. HPSv2's ViT-H-14) mapped onto our Flax CLIPModel.

open_clip names a CLIP like this (vision tower under `visual.`, text tower at the top level):

    visual.conv1.weight                     -> vision_model.embeddings.patch_embedding.weight
    visual.class_embedding                  -> vision_model.embeddings.class_embedding
    visual.positional_embedding             -> vision_model.embeddings.position_embedding.weight
    visual.ln_pre / visual.ln_post          -> vision_model.pre_layrnorm / post_layernorm
    visual.proj [width, embed] (x @ proj)   -> visual_projection.weight [embed, width] (transposed)
    token_embedding.weight, positional_embedding -> text_model.embeddings.{token,position}_embedding
    ln_final                                -> text_model.final_layer_norm
    text_projection [width, embed]          -> text_projection.weight (transposed)
    logit_scale                             -> logit_scale
    [visual.]transformer.resblocks.N.       -> {vision,text}_model.encoder.layers.N.
        ln_1, ln_2                          -> layer_norm1, layer_norm2
        attn.in_proj_weight [3D, D], attn.in_proj_bias [3D]  -> self_attn.{q,k,v}_proj (rows split
                                               in q, k, v order, as nn.MultiheadAttention packs them)
        attn.out_proj                       -> self_attn.out_proj
        mlp.c_fc, mlp.c_proj                -> mlp.fc1, mlp.fc2

The architecture comes from an open_clip model-config JSON (`embed_dim`, `vision_cfg`, `text_cfg`,
`quick_gelu`), either a built-in name (`ARCHITECTURES`) or a path to such a file. open_clip pools the
text tower at `argmax(ids)` (the end-of-text id is the largest); our TextEncoder does the same with
`eos_token_id=2` (transformers' legacy rule). Loading is strict, as HPSv2's `load_state_dict` is:
a missing, mis-shaped or unexpected key is a WeightsError.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import flax
import jax.numpy as jnp
import numpy as np

from prdp_jax.infra.errors import ConfigError, WeightsError
from prdp_jax.models import convert, weights
from prdp_jax.models.clip import CLIPModel, VisionTransformer
from prdp_jax.models.text_encoder import TextEncoder

# open_clip's model_configs/ViT-H-14.json (HPSv2 and HPSv2.1 both use it).
ARCHITECTURES = {
    "ViT-H-14": {
        "embed_dim": 1024,
        "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                       "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16,
                     "layers": 24},
    },
}

# Config options that change the computation and that our model does not implement.
_UNSUPPORTED_VISION = ("ls_init_value", "global_average_pool", "attentional_pool", "no_ln_pre",
                       "timm_model_name", "layers_per_stage", "final_ln_after_pool", "pos_embed_type")
_UNSUPPORTED_TEXT = ("hf_model_name", "ls_init_value", "embed_cls", "no_causal_mask", "proj_bias",
                     "final_ln_after_pool")
_NEUTRAL_POOL = {"pool_type": ("tok", "argmax"), "output_tokens": (False,), "proj_type": ("linear",)}

_FIXED = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "visual_projection.weight": "visual.proj",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual_projection.weight", "text_projection.weight"}
_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
          "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
_LAYER_KEY = re.compile(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
# Buffers open_clip may keep in a state dict that carry no weights.
_IGNORED = re.compile(r"(^|\.)attn_mask$")


def open_clip_source(hf_key: str) -> tuple[str, str | int | None]:
    """Where a transformers-layout key lives in an open_clip state dict.

    Returns:
      (open_clip key, how to read it: None = as is, 'T' = transposed, 0/1/2 = q/k/v third of a
      fused in_proj tensor).
    """
    m = _LAYER_KEY.fullmatch(hf_key)
    if m:
        tower, index, module, leaf = m.groups()
        base = ("visual." if tower == "vision" else "") + f"transformer.resblocks.{index}."
        if module in _QKV:
            return base + f"attn.in_proj_{leaf}", _QKV[module]
        if module not in _LAYER:
            raise KeyError(hf_key)
        return base + f"{_LAYER[module]}.{leaf}", None
    return _FIXED[hf_key], "T" if hf_key in _TRANSPOSED else None


def _file_shape(shape: tuple[int, ...], how) -> tuple[int, ...]:
    if how == "T":
        return tuple(reversed(shape))
    if isinstance(how, int):
        return (3 * shape[0],) + tuple(shape[1:])
    return tuple(shape)


def open_clip_to_hf(state_dict: Mapping[str, Any], abstract_params: Any, *,
                    source: str) -> dict[str, np.ndarray]:
    """Renames, splits and transposes an open_clip state dict into transformers' layout.

    Args:
      state_dict: open_clip keys -> arrays / tensors.
      abstract_params: our CLIPModel's param tree (shapes only), which decides what is read.
      source: the file name, for errors.
    Returns:
      transformers-layout keys -> float32 numpy arrays, ready for convert.state_dict_to_params.
    Raises:
      WeightsError naming the file, the open_clip key and expected vs found shape; also for keys
      the model does not use (open_clip options we do not implement, or a different model).
    """
    out, used = {}, set()
    flat = flax.traverse_util.flatten_dict(abstract_params)
    for path, leaf in flat.items():
        hf_key = convert.flax_path_to_torch_key(path)
        hf_shape = convert.torch_shape(path[-1], tuple(leaf.shape))
        key, how = open_clip_source(hf_key)
        want = _file_shape(hf_shape, how)
        if key not in state_dict:
            raise WeightsError(f"{source}: missing key {key!r} (expected shape {want}); is this an "
                               f"open_clip CLIP checkpoint of the configured architecture?")
        value = convert.to_numpy(state_dict[key])
        if tuple(value.shape) != want:
            raise WeightsError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the "
                               f"architecture expects {want}")
        used.add(key)
        if how == "T":
            value = value.T
        elif isinstance(how, int):
            value = value[how * hf_shape[0]:(how + 1) * hf_shape[0]]
        out[hf_key] = np.asarray(value, np.float32)
    extra = sorted(k for k in state_dict if k not in used and not _IGNORED.search(k))
    if extra:
        raise WeightsError(f"{source}: unexpected key {extra[0]!r} ({len(extra)} unused in all); the "
                           f"checkpoint has parts the configured open_clip architecture lacks")
    return out


def load_architecture(name_or_path: str, *, field: str = "") -> dict:
    """An open_clip model config: a built-in name (ARCHITECTURES) or a model-config JSON path."""
    if name_or_path in ARCHITECTURES:
        return ARCHITECTURES[name_or_path]
    if str(name_or_path).endswith(".json") and os.path.isfile(name_or_path):
        try:
            with open(name_or_path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{field}: {name_or_path} is not readable JSON ({e})") from None
    raise ConfigError(f"{field}={name_or_path!r}: not a known open_clip architecture "
                      f"({', '.join(ARCHITECTURES)}) nor an open_clip model-config .json file")


def model_from_architecture(arch: Mapping[str, Any], *, source: str = "architecture",
                            dtype: Any = jnp.float32) -> CLIPModel:
    """Our CLIPModel for an open_clip model config (ViT vision tower, built-in text tower)."""
    try:
        v, t = dict(arch["vision_cfg"]), dict(arch["text_cfg"])
        embed_dim = int(arch["embed_dim"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{source}: an open_clip model config needs embed_dim, vision_cfg and "
                          f"text_cfg") from None
    for cfg, names, tower in ((v, _UNSUPPORTED_VISION, "vision_cfg"), (t, _UNSUPPORTED_TEXT, "text_cfg")):
        for name in names:
            if cfg.get(name):
                raise ConfigError(f"{source}: {tower}.{name}={cfg[name]!r} is not supported")
        for name, ok in _NEUTRAL_POOL.items():
            if name in cfg and cfg[name] not in ok:
                raise ConfigError(f"{source}: {tower}.{name}={cfg[name]!r} is not supported")
    act = "quick_gelu" if arch.get("quick_gelu") else "gelu"
    image_size = v.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ConfigError(f"{source}: non-square image_size {image_size} is not supported")
        image_size = image_size[0]
    width = int(v.get("width", 768))
    vision = VisionTransformer(
        image_size=int(image_size), patch_size=int(v.get("patch_size", 16)), hidden_size=width,
        intermediate_size=int(width * float(v.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(v.get("layers", 12)),
        num_attention_heads=width // int(v.get("head_width", 64)), hidden_act=act,
        layer_norm_eps=1e-5, dtype=dtype)
    text_width = int(t.get("width", 512))
    text = TextEncoder(
        vocab_size=int(t.get("vocab_size", 49408)), hidden_size=text_width,
        intermediate_size=int(text_width * float(t.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(t.get("layers", 12)), num_attention_heads=int(t.get("heads", 8)),
        max_position_embeddings=int(t.get("context_length", 77)), hidden_act=act,
        layer_norm_eps=1e-5, eos_token_id=2, dtype=dtype)  # eos_token_id=2: pool at argmax(ids)
    return CLIPModel(vision, text, projection_dim=embed_dim, dtype=dtype)


def load_open_clip(checkpoint: str, arch: Mapping[str, Any], *, field: str = "",
                   arch_source: str = "architecture") -> tuple[CLIPModel, dict]:
    """Reads an open_clip checkpoint (bare state dict or {'state_dict': ...}, 'module.' prefix
    allowed; .pt/.pth/.bin through PyTorch or .safetensors) into (model, numpy float32 params)."""
    model = model_from_architecture(arch, source=arch_source)
    state_dict = weights.read_state_dict(checkpoint, field=field)
    state_dict = weights.unwrap_checkpoint(state_dict, checkpoint)
    abstract = model.abstract_params()
    hf = open_clip_to_hf(state_dict, abstract, source=checkpoint)
    return model, convert.state_dict_to_params(hf, abstract, source=checkpoint)
