"""Small layers shared by the UNet, its attention and the VAE."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

Dtype = jnp.dtype


def conv3x3(features: int, name: str, dtype: Dtype, param_dtype: Dtype, stride: int = 1) -> nn.Conv:
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                   dtype=dtype, param_dtype=param_dtype, name=name)


def conv1x1(features: int, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Conv:
    return nn.Conv(features, (1, 1), padding="VALID", dtype=dtype, param_dtype=param_dtype, name=name)
