"""A text-conditional UNet with Stable Diffusion's structure, in Flax linen, NHWC throughout.

Parameter names and nesting follow the diffusers `UNet2DConditionModel` state dict, with list
indices folded into names: `down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight`
lives at params['down_blocks_0']['attentions_1']['transformer_blocks_0']['attn2']['to_k']['kernel'].
Sizes come from the module's fields (the same fields as diffusers' config), so one module serves the
tiny test configs, the embedded world and SD 1.x/2.x.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from prdp_jax.infra.errors import ConfigError
from prdp_jax.models.attention import Transformer2DModel
from prdp_jax.models.layers import Dtype, conv1x1, conv3x3

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep features as in diffusers' `get_timestep_embedding`.

    Args:
      timesteps: [B] timesteps (any numeric dtype).
    Returns:
      [B, dim] float32 features: [sin, cos] (or [cos, sin] when flip_sin_to_cos).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding`)."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
        x = nn.silu(x)
        return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(x)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (diffusers `ResnetBlock2D`)."""

    out_channels: int
    groups: int
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        """x: [B, H, W, C_in], temb: [B, D_t] or None (no time embedding, as in the VAE) ->
        [B, H, W, out_channels]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.GroupNorm(self.groups, epsilon=self.eps, name="norm1", **kw)(x)
        h = conv3x3(self.out_channels, "conv1", **kw)(nn.silu(h))
        if temb is not None:
            t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.GroupNorm(self.groups, epsilon=self.eps, name="norm2", **kw)(h)
        h = conv3x3(self.out_channels, "conv2", **kw)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv1x1(self.out_channels, "conv_shortcut", **kw)(x)
        return x + h


class _ResolutionBlock(nn.Module):
    """Fields and the resnet(+attention) layer shared by the down and up blocks."""

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    with_attention: bool
    resample: bool
    heads: int = 1
    transformer_layers: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_chunk: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def layer(self, i: int, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        """resnets_i, then attentions_i when the block has attention."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.out_channels, self.groups, self.eps, name=f"resnets_{i}", **kw)(x, temb)
        if self.with_attention:
            x = Transformer2DModel(self.heads, self.out_channels // self.heads, self.groups,
                                   self.transformer_layers, self.use_linear_projection,
                                   self.upcast_attention, self.attention_chunk,
                                   name=f"attentions_{i}", **kw)(x, context)
        return x


class DownBlock(_ResolutionBlock):
    """`CrossAttnDownBlock2D` (with_attention) or `DownBlock2D` (resample = downsample); returns
    the skip states too."""

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array):
        skips = []
        for i in range(self.num_layers):
            x = self.layer(i, x, temb, context)
            skips.append(x)
        if self.resample:
            x = Downsample2D(self.out_channels, self.dtype, self.param_dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock(_ResolutionBlock):
    """`CrossAttnUpBlock2D` (with_attention) or `UpBlock2D` (resample = upsample), consuming skip
    states last-first."""

    @nn.compact
    def __call__(self, x: jax.Array, skips: tuple, temb: jax.Array, context: jax.Array) -> jax.Array:
        skips = list(skips)
        for i in range(self.num_layers):
            x = self.layer(i, jnp.concatenate([x, skips.pop()], axis=-1), temb, context)
        if self.resample:
            x = Upsample2D(self.out_channels, self.dtype, self.param_dtype, name="upsamplers_0")(x)
        return x


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv named `conv`."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv3x3(self.channels, "conv", self.dtype, self.param_dtype, stride=2)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv named `conv`."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(self.channels, "conv", self.dtype, self.param_dtype)(x)


class MidBlock(nn.Module):
    """`UNetMidBlock2DCrossAttn`: resnet, (attention, resnet) x num_layers."""

    channels: int
    groups: int
    eps: float
    heads: int
    transformer_layers: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_chunk: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, self.groups, self.eps, name="resnets_0", **kw)(x, temb)
        x = Transformer2DModel(self.heads, self.channels // self.heads, self.groups,
                               self.transformer_layers, self.use_linear_projection,
                               self.upcast_attention, self.attention_chunk, name="attentions_0",
                               **kw)(x, context)
        return ResnetBlock2D(self.channels, self.groups, self.eps, name="resnets_1", **kw)(x, temb)


class UNet(nn.Module):
    """Stable Diffusion's `UNet2DConditionModel` (epsilon or v prediction), NHWC.

    Fields mirror the diffusers config. `num_attention_heads` is the number of heads per block
    (what SD 1.x's config confusingly calls `attention_head_dim`); head size = channels // heads.
    `class_embed_type="projection"` adds diffusers' projection class embedding (`class_embedding`,
    a TimestepEmbedding) of the mean text-context vector to the time embedding: a global pathway
    that lets a small from-scratch model learn caption conditioning fast. Stable Diffusion has none.
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    num_attention_heads: Union[int, Sequence[int]] = 8
    cross_attention_dim: int = 768
    transformer_layers_per_block: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    class_embed_type: Optional[str] = None
    remat: bool = False
    attention_chunk: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def heads(self) -> tuple[int, ...]:
        n = len(self.block_out_channels)
        heads = self.num_attention_heads
        return tuple(heads) if isinstance(heads, (tuple, list)) else (heads,) * n

    def validate(self) -> None:
        """Raises ConfigError for a configuration the architecture cannot build."""
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(f"unet: down_block_types and up_block_types need {n} entries "
                              f"(one per block_out_channels), got {len(self.down_block_types)} and "
                              f"{len(self.up_block_types)}")
        for kind in self.down_block_types:
            if kind not in DOWN_BLOCK_TYPES:
                raise ConfigError(f"unet: unknown down block type {kind!r}; known: {DOWN_BLOCK_TYPES}")
        for kind in self.up_block_types:
            if kind not in UP_BLOCK_TYPES:
                raise ConfigError(f"unet: unknown up block type {kind!r}; known: {UP_BLOCK_TYPES}")
        heads = self.heads()
        if len(heads) != n:
            raise ConfigError(f"unet: num_attention_heads needs {n} entries, got {len(heads)}")
        for ch, h in zip(self.block_out_channels, heads):
            if ch % self.norm_num_groups:
                raise ConfigError(f"unet: block channels {ch} not divisible by norm_num_groups "
                                  f"{self.norm_num_groups}")
            if ch % h:
                raise ConfigError(f"unet: block channels {ch} not divisible by {h} attention heads")
        if self.class_embed_type not in (None, "projection"):
            raise ConfigError(f"unet: class_embed_type must be None or 'projection', "
                              f"got {self.class_embed_type!r}")
        if self.sample_size % (2 ** (n - 1)):
            raise ConfigError(f"unet: sample_size {self.sample_size} must be divisible by "
                              f"{2 ** (n - 1)} for {n} resolution levels")

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        """Predicts noise (or v) for a noisy batch.

        Args:
          sample: [B, H, W, in_channels] noisy latents or pixels.
          timesteps: [B] (or scalar) integer timesteps.
          context: [B, L, cross_attention_dim] text embeddings.
        Returns:
          [B, H, W, out_channels] in `dtype`.
        """
        chex.assert_rank(sample, 4)
        chex.assert_rank(context, 3)
        chex.assert_axis_dimension(sample, 3, self.in_channels)
        chex.assert_axis_dimension(context, 2, self.cross_attention_dim)
        batch = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads = self.heads()
        channels = tuple(self.block_out_channels)
        common = dict(groups=self.norm_num_groups, eps=self.norm_eps,
                      transformer_layers=self.transformer_layers_per_block,
                      use_linear_projection=self.use_linear_projection,
                      upcast_attention=self.upcast_attention,
                      attention_chunk=self.attention_chunk, **kw)
        down_cls = nn.remat(DownBlock) if self.remat else DownBlock
        mid_cls = nn.remat(MidBlock) if self.remat else MidBlock
        up_cls = nn.remat(UpBlock) if self.remat else UpBlock

        temb = timestep_embedding(timesteps, channels[0], self.flip_sin_to_cos, self.freq_shift)
        temb = TimestepEmbedding(channels[0] * 4, name="time_embedding", **kw)(temb.astype(self.dtype))
        context = context.astype(self.dtype)
        if self.class_embed_type == "projection":
            temb = temb + TimestepEmbedding(channels[0] * 4, name="class_embedding", **kw)(
                context.mean(axis=1))

        x = conv3x3(channels[0], "conv_in", **kw)(sample.astype(self.dtype))
        skips = [x]
        for i, kind in enumerate(self.down_block_types):
            x, block_skips = down_cls(
                channels[i], self.layers_per_block, with_attention=kind == "CrossAttnDownBlock2D",
                resample=i < len(channels) - 1, heads=heads[i], name=f"down_blocks_{i}",
                **common)(x, temb, context)
            skips.extend(block_skips)

        x = mid_cls(channels[-1], heads=heads[-1], name="mid_block", **common)(x, temb, context)

        rev_channels, rev_heads = channels[::-1], heads[::-1]
        n_skip = self.layers_per_block + 1
        for i, kind in enumerate(self.up_block_types):
            block_skips, skips = tuple(skips[-n_skip:]), skips[:-n_skip]
            x = up_cls(rev_channels[i], n_skip, with_attention=kind == "CrossAttnUpBlock2D",
                       resample=i < len(channels) - 1, heads=rev_heads[i], name=f"up_blocks_{i}",
                       **common)(x, block_skips, temb, context)

        x = nn.GroupNorm(self.norm_num_groups, epsilon=self.norm_eps, name="conv_norm_out", **kw)(x)
        return conv3x3(self.out_channels, "conv_out", **kw)(nn.silu(x))
