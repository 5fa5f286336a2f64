"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 finetuned on human preferences.

    hpsv2(image, prompt) = cos(image_emb, text_emb)

with the unit-norm open_clip image and text embeddings, as HPSv2's `score` computes it
(`image_features @ text_features.T` of normalised features, no logit scale): about 0.25-0.35 for
Stable Diffusion images.

Preprocessing is HPSv2's validation transform: the 8-bit image to a float tensor, bicubic resize of
the shortest side to 224 (antialiased, as torchvision >= 0.17 does on tensors), centre crop
(torchvision's offset rounding), CLIP normalisation. Tokenisation is open_clip's (BPE, 77 tokens,
zero padding; see clip_tokenizer.open_clip_ids), read from a CLIP tokenizer folder.

Config (`reward.hpsv2`):
  checkpoint      HPS_v2_compressed.pt or HPS_v2.1_compressed.pt (a torch pickle holding
                  {'state_dict': open_clip state dict}; a bare state dict, a 'module.' prefix or a
                  .safetensors copy also load). Reading a .pt needs PyTorch.
  tokenizer_path  a folder with the CLIP tokenizer (vocab.json + merges.txt or tokenizer.json),
                  e.g. a copy of openai/clip-vit-large-patch14 or laion/CLIP-ViT-H-14-laion2B-s32B-b79K.
  version         "v2.0" or "v2.1" (same architecture; recorded for the run's record).
  model           the open_clip architecture: "ViT-H-14" (both versions) or an open_clip
                  model-config .json file.
"""
from __future__ import annotations

import jax

from prdp_jax.infra.errors import ConfigError
from prdp_jax.models import open_clip
from prdp_jax.models.clip import CLIPModel
from prdp_jax.rewards import clip_tokenizer
from prdp_jax.rewards.hf_clip import cosine
from prdp_jax.rewards.image_transform import ImageTransform
from prdp_jax.rewards.registry import Reward, register
from prdp_jax.rewards.model_reward import (FrozenParams, TextEmbeddings, image_text_reward,
                                           required_path, section)

VERSIONS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def build(checkpoint: str, tokenizer_folder: str, model: str = "ViT-H-14") -> Reward:
    arch = open_clip.load_architecture(model, field="reward.hpsv2.model")
    clip_model, params = open_clip.load_open_clip(checkpoint, arch, field="reward.hpsv2.checkpoint",
                                                  arch_source=model)
    tok = clip_tokenizer.load_tokenizer(tokenizer_folder, field="reward.hpsv2.tokenizer_path")
    size = clip_model.vision_model.image_size
    transform = ImageTransform(size=size, crop=size, pil_rounding=False, crop_offset="round")
    length = clip_model.text_model.max_position_embeddings
    encode = jax.jit(lambda p, ids: clip_model.apply({"params": p}, ids,
                                                     method=CLIPModel.text_embeds))
    text = TextEmbeddings(lambda prompts: clip_tokenizer.open_clip_ids(tok, prompts, length), encode)

    def score(p, images, table, index):
        image_emb = clip_model.apply({"params": p}, transform(images), method=CLIPModel.image_embeds)
        return cosine(image_emb, table, index)

    return image_text_reward(score, FrozenParams(params), text)


@register("hpsv2")
def hpsv2(config=None) -> Reward:
    """Cosine of HPSv2 (or v2.1) image and prompt embeddings (about 0.25-0.35)."""
    cfg = section(config, "hpsv2")
    version = str(cfg.get("version", "v2.0"))
    if version not in VERSIONS:
        raise ConfigError(f"reward.hpsv2.version must be one of {tuple(VERSIONS)}, got {version!r}")
    checkpoint = required_path(config, "hpsv2", "checkpoint",
                               f"the file {VERSIONS[version]}")
    tokenizer = required_path(config, "hpsv2", "tokenizer_path",
                              "a CLIP tokenizer folder (vocab.json + merges.txt)")
    return build(checkpoint, tokenizer, str(cfg.get("model", "ViT-H-14") or "ViT-H-14"))
