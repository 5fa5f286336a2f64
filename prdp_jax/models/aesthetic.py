"""The LAION aesthetic predictor head (christophschuhmann/improved-aesthetic-predictor), in Flax.

`sac+logos+ava1-l14-linearMSE.pth` is the state dict of a torch `nn.Sequential` under `layers.`:

    layers.0  Linear(768, 1024)   layers.1  Dropout(0.2)
    layers.2  Linear(1024, 128)   layers.3  Dropout(0.2)
    layers.4  Linear(128, 64)     layers.5  Dropout(0.1)
    layers.6  Linear(64, 16)
    layers.7  Linear(16, 1)

There is no activation between the linear layers (the model is affine), and dropout is the identity
at inference. Its input is the L2-normalised CLIP ViT-L/14 image embedding (768 wide); its output is
on the 1-10 rating scale of the AVA / LAION aesthetics data.
"""
from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

WIDTHS = (1024, 128, 64, 16, 1)
LAYER_INDICES = (0, 2, 4, 6, 7)  # positions of the Linear layers in the nn.Sequential


class AestheticMLP(nn.Module):
    """[B, embed_dim] unit-norm image embeddings -> [B] aesthetic scores."""

    @nn.compact
    def __call__(self, embeds: jax.Array) -> jax.Array:
        chex.assert_rank(embeds, 2)
        x = embeds.astype(jnp.float32)
        for index, width in zip(LAYER_INDICES, WIDTHS):
            x = nn.Dense(width, name=f"layers_{index}")(x)
        return x[:, 0]
