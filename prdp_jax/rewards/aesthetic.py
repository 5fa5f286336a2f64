"""The LAION aesthetic score, as DDPO and PRDP use it: on its 1-10 rating scale,

    aesthetic(image) = MLP(e / ||e||),  e = CLIP ViT-L/14 image embedding (get_image_features)

with the improved-aesthetic-predictor MLP `sac+logos+ava1-l14-linearMSE.pth` (models/aesthetic.py).
Prompts are ignored. Preprocessing is transformers' CLIPImageProcessor (224 px bicubic, centre crop,
CLIP normalisation) on the 8-bit image, as DDPO's scorer does.

Config: `reward.aesthetic.clip_path` is a transformers folder of `openai/clip-vit-large-patch14`
(config.json + model.safetensors or pytorch_model.bin; only the vision tower is read, no tokenizer
needed), `reward.aesthetic.mlp_path` the `.pth` file (a torch pickle: reading it needs PyTorch) or a
`.safetensors` copy with the same keys.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from prdp_jax.models import convert, weights
from prdp_jax.models.aesthetic import AestheticMLP
from prdp_jax.rewards import hf_clip
from prdp_jax.rewards.model_reward import FrozenParams, image_text_reward, required_path
from prdp_jax.rewards.registry import Reward, register


def build(clip_folder: str, mlp_path: str) -> Reward:
    loaded = hf_clip.load(clip_folder, field="reward.aesthetic.clip_path", text=False)
    mlp = AestheticMLP()
    dim = loaded.model.projection_dim
    abstract = jax.eval_shape(lambda: mlp.init(jax.random.key(0), jnp.zeros((1, dim))))["params"]
    state_dict = weights.read_state_dict(mlp_path, field="reward.aesthetic.mlp_path")
    mlp_params = convert.state_dict_to_params(state_dict, abstract, source=mlp_path)
    params = FrozenParams({"clip": loaded.params.host, "mlp": mlp_params})

    def score(p, images):
        embeds = loaded.image_embeds(p["clip"], images)
        return mlp.apply({"params": p["mlp"]}, embeds)

    return image_text_reward(score, params, None)


@register("aesthetic")
def aesthetic(config=None) -> Reward:
    """LAION aesthetic predictor on CLIP ViT-L/14 image embeddings (1-10 scale)."""
    clip_path = required_path(config, "aesthetic", "clip_path",
                              "a transformers folder of openai/clip-vit-large-patch14")
    mlp_path = required_path(config, "aesthetic", "mlp_path",
                             "the file sac+logos+ava1-l14-linearMSE.pth")
    return build(clip_path, mlp_path)
