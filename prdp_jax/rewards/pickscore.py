"""PickScore (Kirstain et al. 2023): a CLIP-H finetuned on Pick-a-Pic preferences.

    pickscore(image, prompt) = exp(logit_scale) * cos(image_emb, text_emb) / 100

with the unit-norm CLIP image and text embeddings. The reference code ranks images by
exp(logit_scale) * cos (about 20 for a good match: exp(logit_scale) is 100 in PickScore_v1); PRDP
reports it divided by 100, about 0.2, which is the scale returned here.

Config: `reward.pickscore.path` is a transformers CLIP folder of `yuvalkirstain/PickScore_v1`
(config.json + model.safetensors or pytorch_model.bin). Its processor is the
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` one: the CLIP tokenizer and CLIP's 224 px bicubic
resize / crop / normalisation. Put the tokenizer files (vocab.json + merges.txt or tokenizer.json)
in the same folder, or point `reward.pickscore.tokenizer_path` at a folder that has them.
"""
from __future__ import annotations

import jax.numpy as jnp

from prdp_jax.rewards import hf_clip
from prdp_jax.rewards.model_reward import image_text_reward, required_path, section
from prdp_jax.rewards.registry import Reward, register


def build(folder: str, tokenizer_folder: str = "") -> Reward:
    loaded = hf_clip.load(folder, field="reward.pickscore.path", tokenizer_folder=tokenizer_folder,
                          tokenizer_field="reward.pickscore.tokenizer_path")

    def score(params, images, table, index):
        cos = hf_clip.cosine(loaded.image_embeds(params, images), table, index)
        return jnp.exp(params["logit_scale"]) * cos / 100.0

    return image_text_reward(score, loaded.params, loaded.text)


@register("pickscore")
def pickscore(config=None) -> Reward:
    """exp(logit_scale) * cos / 100 of PickScore_v1 (about 0.2)."""
    path = required_path(config, "pickscore", "path",
                         "a transformers folder of yuvalkirstain/PickScore_v1 with tokenizer files")
    return build(path, str(section(config, "pickscore").get("tokenizer_path", "") or ""))
