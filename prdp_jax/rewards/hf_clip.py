"""A transformers CLIP folder as a reward model: weights, tokenizer and image preprocessing.

The folder holds config.json, model.safetensors (or pytorch_model.bin), the tokenizer files
(vocab.json + merges.txt, or tokenizer.json) and optionally preprocessor_config.json; the last
sets the resize / crop sizes and the normalisation (default: CLIP's, at the model's image size),
as transformers' CLIPImageProcessor reads it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from prdp_jax.infra import files
from prdp_jax.infra.errors import WeightsError
from prdp_jax.models import clip
from prdp_jax.rewards import clip_tokenizer
from prdp_jax.rewards.image_transform import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform
from prdp_jax.rewards.model_reward import FrozenParams, TextEmbeddings


def _side(value: Any, key: str) -> int:
    if isinstance(value, dict):
        value = value.get(key, value.get("height"))
    return int(value)


def image_transform(folder: str, image_size: int) -> ImageTransform:
    """The CLIPImageProcessor settings of `folder` (preprocessor_config.json), or CLIP's defaults."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return ImageTransform(size=image_size, crop=image_size)
    cfg = files.read_json(path)
    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if cfg.get(flag, True) is False:
            raise WeightsError(f"{path}: {flag}=false is not supported (the CLIP rewards resize, "
                               f"crop, rescale and normalise)")
    if cfg.get("resample", 3) != 3:
        raise WeightsError(f"{path}: resample={cfg['resample']} is not supported; only bicubic (3)")
    if abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise WeightsError(f"{path}: rescale_factor={cfg['rescale_factor']} is not supported; "
                           f"only 1/255")
    size = cfg.get("size", image_size)
    if isinstance(size, dict) and "shortest_edge" not in size:
        raise WeightsError(f"{path}: size={size} is not supported; the CLIP rewards resize the "
                           f"shortest edge ({{'shortest_edge': N}})")
    return ImageTransform(size=_side(size, "shortest_edge"),
                          crop=_side(cfg.get("crop_size", image_size), "height"),
                          mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
                          std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)))


@dataclasses.dataclass
class LoadedCLIP:
    model: clip.CLIPModel
    params: FrozenParams
    transform: ImageTransform
    text: TextEmbeddings | None

    def image_embeds(self, params: Any, images: jax.Array) -> jax.Array:
        """[B, H, W, 3] in [0, 1] -> [B, E] unit-norm (inside jit)."""
        return self.model.apply({"params": params}, self.transform(images),
                                method=clip.CLIPModel.image_embeds)


def load(folder: str, *, field: str, text: bool = True, tokenizer_folder: str = "",
         tokenizer_field: str = "") -> LoadedCLIP:
    """Loads a transformers CLIP folder; `text=False` reads only the vision tower.

    The tokenizer comes from `tokenizer_folder` when given, else from `folder`."""
    model, params = clip.load_hf_clip(folder, vision=True, text=text, field=field)
    transform = image_transform(folder, model.vision_model.image_size)
    if transform.crop != model.vision_model.image_size:
        raise WeightsError(f"{folder}: preprocessor crop_size {transform.crop} differs from the "
                           f"model's image_size {model.vision_model.image_size}")
    embeddings = None
    if text:
        tok = clip_tokenizer.load_tokenizer(tokenizer_folder or folder,
                                            field=tokenizer_field if tokenizer_folder else field)
        length = model.text_model.max_position_embeddings
        encode = jax.jit(lambda p, ids: model.apply({"params": p}, ids,
                                                    method=clip.CLIPModel.text_embeds))
        embeddings = TextEmbeddings(lambda prompts: clip_tokenizer.hf_ids(tok, prompts, length),
                                    encode)
    return LoadedCLIP(model, FrozenParams(params), transform, embeddings)


def cosine(image_emb: jax.Array, table: jax.Array, index: jax.Array) -> jax.Array:
    """[B, E] image embeddings, [U, E] text table, [B] rows -> [B] cosine similarities."""
    return jnp.sum(image_emb * jnp.asarray(table)[index], axis=-1)
