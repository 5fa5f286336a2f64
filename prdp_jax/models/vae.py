"""Stable Diffusion's KL autoencoder (diffusers `AutoencoderKL`) in Flax linen, NHWC throughout.

Parameter names follow the diffusers state dict with list indices folded into names:
`decoder.up_blocks.1.resnets.2.conv1.weight` lives at
params['decoder']['up_blocks_1']['resnets_2']['conv1']['kernel']. The mid-block attention uses
diffusers' current names (group_norm, to_q, to_k, to_v, to_out.0); checkpoints that still carry the
legacy names (query, key, value, proj_attn) are renamed on load (`convert.rename_legacy_attention`).
"""
from __future__ import annotations

from typing import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from prdp_jax.infra.errors import ConfigError
from prdp_jax.models.layers import conv3x3
from prdp_jax.models.unet import ResnetBlock2D, Upsample2D

Dtype = jnp.dtype
EPS = 1e-6  # GroupNorm epsilon everywhere in diffusers' VAE.


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all pixels with a GroupNorm in front and a residual."""

    groups: int
    heads: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        y = nn.GroupNorm(self.groups, epsilon=EPS, name="group_norm", **kw)(x).reshape(b, h * w, c)
        split = lambda t: t.reshape(b, h * w, self.heads, c // self.heads)
        q = split(nn.Dense(c, name="to_q", **kw)(y))
        k = split(nn.Dense(c, name="to_k", **kw)(y))
        v = split(nn.Dense(c, name="to_v", **kw)(y))
        out = jax.nn.dot_product_attention(q, k, v).reshape(b, h * w, c)
        return x + nn.Dense(c, name="to_out_0", **kw)(out).reshape(b, h, w, c)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row at the bottom and one column on the right
    (diffusers' `Downsample2D` with padding=0, as the VAE encoder uses it)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype,
                       param_dtype=self.param_dtype, name="conv")(x)


class MidBlock(nn.Module):
    """`UNetMidBlock2D` without time embedding: resnet, attention (optional), resnet."""

    channels: int
    groups: int
    attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, self.groups, EPS, name="resnets_0", **kw)(x)
        if self.attention:
            x = SpatialSelfAttention(self.groups, name="attentions_0", **kw)(x)
        return ResnetBlock2D(self.channels, self.groups, EPS, name="resnets_1", **kw)(x)


class DownEncoderBlock(nn.Module):
    """Resnets, then (except at the last level) the asymmetric stride-2 downsampler."""

    channels: int
    num_layers: int
    groups: int
    downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, EPS, name=f"resnets_{j}", **kw)(x)
        if self.downsample:
            x = Downsample(self.channels, name="downsamplers_0", **kw)(x)
        return x


class UpDecoderBlock(nn.Module):
    """Resnets, then (except at the last level) nearest 2x upsampling and a conv."""

    channels: int
    num_layers: int
    groups: int
    upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, EPS, name=f"resnets_{j}", **kw)(x)
        if self.upsample:
            x = Upsample2D(self.channels, self.dtype, self.param_dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, in] -> moments [B, H/f, W/f, 2 * latent_channels], f = 2^(levels-1)."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    latent_channels: int
    mid_block_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = tuple(self.block_out_channels)
        x = conv3x3(channels[0], "conv_in", **kw)(x.astype(self.dtype))
        for i, ch in enumerate(channels):
            x = DownEncoderBlock(ch, self.layers_per_block, self.groups, i < len(channels) - 1,
                                 name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(channels[-1], self.groups, self.mid_block_attention, name="mid_block", **kw)(x)
        x = nn.GroupNorm(self.groups, epsilon=EPS, name="conv_norm_out", **kw)(x)
        return conv3x3(2 * self.latent_channels, "conv_out", **kw)(nn.silu(x))


class Decoder(nn.Module):
    """Latent [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels] (about [-1, 1])."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    out_channels: int
    mid_block_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = tuple(self.block_out_channels)[::-1]
        x = conv3x3(channels[0], "conv_in", **kw)(z.astype(self.dtype))
        x = MidBlock(channels[0], self.groups, self.mid_block_attention, name="mid_block", **kw)(x)
        for i, ch in enumerate(channels):
            x = UpDecoderBlock(ch, self.layers_per_block + 1, self.groups, i < len(channels) - 1,
                               name=f"up_blocks_{i}", **kw)(x)
        x = nn.GroupNorm(self.groups, epsilon=EPS, name="conv_norm_out", **kw)(x)
        return conv3x3(self.out_channels, "conv_out", **kw)(nn.silu(x))


class AutoencoderKL(nn.Module):
    """diffusers' `AutoencoderKL`: encoder + quant_conv, post_quant_conv + decoder.

    Fields mirror the diffusers VAE config. `scaling_factor` (and SD3-style `shift_factor`) map
    between VAE latents and the diffusion model's latents: z_diffusion = (z_vae - shift) * scale.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ConfigError(f"vae: block channels {ch} not divisible by norm_num_groups "
                                  f"{self.norm_num_groups}")

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(block_out_channels=tuple(self.block_out_channels),
                      layers_per_block=self.layers_per_block, groups=self.norm_num_groups,
                      mid_block_attention=self.mid_block_add_attention, **kw)
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        c2 = 2 * self.latent_channels
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(c2, (1, 1), padding="VALID", **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), padding="VALID", **kw)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent]
        float32 (VAE latents, before scaling_factor); logvar is clipped to [-30, 20] as in diffusers."""
        chex.assert_rank(images, 4)
        moments = self.encoder(images)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """VAE latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels] float32 in
        about [-1, 1]."""
        chex.assert_rank(z, 4)
        chex.assert_axis_dimension(z, 3, self.latent_channels)
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Diffusion latents [B, h, w, latent] -> images [B, h*f, w*f, 3] float32 in [0, 1]."""
        z = latents.astype(jnp.float32) / self.scaling_factor + self.shift_factor
        return jnp.clip((self.decode(z) + 1.0) / 2.0, 0.0, 1.0)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Encode (mean) then decode; used to create every parameter at init."""
        mean, _ = self.encode(images)
        return self.decode(mean)
