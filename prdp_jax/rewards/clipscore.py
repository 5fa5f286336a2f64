"""CLIPScore (Hessel et al. 2021), reference-free:

    clipscore(image, prompt) = 2.5 * max(cos(image_emb, text_emb), 0)

with the unit-norm CLIP image and text embeddings; w = 2.5 stretches the usual cosines (about
0.2-0.4) towards [0, 1]. Hessel et al. prefix captions with "A photo depicts"; the prompt is used
as given here, as text-to-image reward code does. `info['cos']` holds the raw cosine.

Config: `reward.clipscore.path` is a transformers CLIP folder (config.json, weights, tokenizer
files), e.g. `openai/clip-vit-base-patch32` (Hessel et al.'s ViT-B/32) or
`openai/clip-vit-large-patch14`.
"""
from __future__ import annotations

import jax.numpy as jnp

from prdp_jax.rewards import hf_clip
from prdp_jax.rewards.model_reward import image_text_reward, required_path
from prdp_jax.rewards.registry import Reward, register

W = 2.5


def build(folder: str) -> Reward:
    loaded = hf_clip.load(folder, field="reward.clipscore.path")

    def score(params, images, table, index):
        cos = hf_clip.cosine(loaded.image_embeds(params, images), table, index)
        return W * jnp.maximum(cos, 0.0), {"cos": cos}

    return image_text_reward(score, loaded.params, loaded.text)


@register("clipscore")
def clipscore(config=None) -> Reward:
    """2.5 * max(cos, 0) of a CLIP folder."""
    return build(required_path(config, "clipscore", "path",
                               "a transformers CLIP folder, e.g. openai/clip-vit-base-patch32"))
