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

from prdp_jax.errors import ConfigError

Dtype = jnp.dtype

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


def conv3x3(features: int, name: str, dtype: Dtype, param_dtype: Dtype, stride: int = 1) -> nn.Conv:
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                   dtype=dtype, param_dtype=param_dtype, name=name)


def conv1x1(features: int, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Conv:
    return nn.Conv(features, (1, 1), padding="VALID", dtype=dtype, param_dtype=param_dtype, name=name)


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


def _heads_first(x: jax.Array) -> jax.Array:
    """[B, N, H, D] <-> [B, H, N, D]."""
    return jnp.swapaxes(x, 1, 2)


@jax.custom_vjp
def matmul_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention as batched matmuls with its backward written out, for XLA:CPU.

    Equal to `jax.nn.dot_product_attention` (softmax in float32, probabilities cast back to the
    input dtype), but each matmul contracts its big [N, L] operand along its row-major minor
    axis, so XLA:CPU never transposes the probabilities; its generic attention lowering runs
    3.6x slower forward and 1.8x slower forward+backward on the CPU (benchmarks/NOTES.md).

    Args:
      q: [B, N, H, D]; k, v: [B, L, H, D].
    Returns:
      [B, N, H, D].
    """
    return _matmul_attention_fwd(q, k, v)[0]


def _matmul_attention_fwd(q, k, v):
    qh = _heads_first(q) * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)   # [B, H, N, D]
    kt = jnp.transpose(k, (0, 2, 3, 1))                                # [B, H, D, L]
    vh = _heads_first(v)                                               # [B, H, L, D]
    p = jax.nn.softmax(jnp.matmul(qh, kt).astype(jnp.float32), axis=-1).astype(v.dtype)
    return _heads_first(jnp.matmul(p, vh)), (qh, kt, vh, p)


def _matmul_attention_bwd(res, g):
    qh, kt, vh, p = res
    minor = lambda x: jnp.swapaxes(x, -1, -2)
    gh = _heads_first(g).astype(p.dtype)                               # [B, H, N, D]
    dv_t = jnp.matmul(minor(gh), p)                                    # [B, H, D, L]
    dp = jnp.matmul(gh, minor(vh)).astype(jnp.float32)                 # [B, H, N, L]
    pf = p.astype(jnp.float32)
    ds = (pf * (dp - jnp.sum(dp * pf, axis=-1, keepdims=True))).astype(p.dtype)
    scale = jnp.asarray(qh.shape[-1] ** -0.5, qh.dtype)
    dq = jnp.matmul(ds, minor(kt)) * scale                             # [B, H, N, D]
    dk_t = jnp.matmul(minor(qh), ds)                                   # [B, H, D, L] (qh is scaled)
    to_blhd = lambda x: jnp.transpose(x, (0, 3, 1, 2))
    return _heads_first(dq), to_blhd(dk_t), to_blhd(dv_t)


matmul_attention.defvjp(_matmul_attention_fwd, _matmul_attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention, [B, N, H, D] x [B, L, H, D] -> [B, N, H, D]: `matmul_attention` on CPU,
    `jax.nn.dot_product_attention` elsewhere (cuDNN flash attention on GPUs where it applies)."""
    if jax.default_backend() == "cpu":
        return matmul_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int) -> jax.Array:
    """Softmax attention computed at most `chunk` queries at a time (the largest divisor of N
    that fits), each chunk rematerialised in the backward pass: the [chunk, L] logits of one
    chunk are live instead of all [N, L].

    Args:
      q: [B, N, H, D]; k, v: [B, L, H, D]; chunk: the most queries per chunk (0: one chunk).
    Returns:
      [B, N, H, D], equal to attention(q, k, v) up to rounding.
    """
    b, n, h, d = q.shape
    if not chunk or n <= chunk:
        return attention(q, k, v)
    chunk = max(c for c in range(1, chunk + 1) if n % c == 0)
    blocks = jnp.moveaxis(q.reshape(b, n // chunk, chunk, h, d), 1, 0)
    one = jax.checkpoint(lambda qc: attention(qc, k, v))
    out = jax.lax.map(one, blocks)                                   # [N/chunk, B, chunk, H, D]
    return jnp.moveaxis(out, 0, 1).reshape(b, n, h, d)


class Attention(nn.Module):
    """Multi-head attention with to_q/to_k/to_v (no bias) and to_out.0 (diffusers `Attention`).

    `chunk` > 0 computes it `chunk` queries at a time (`chunked_attention`): less memory at high
    resolution (4096 tokens at SD's 64x64 latents), the same result."""

    heads: int
    head_dim: int
    upcast: bool = False
    chunk: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        """x: [B, N, D], context: [B, L, D_c] or None (self-attention) -> [B, N, D]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.head_dim
        context = x if context is None else context
        split = lambda y: y.reshape(y.shape[:2] + (self.heads, self.head_dim))
        q = split(nn.Dense(inner, use_bias=False, name="to_q", **kw)(x))
        k = split(nn.Dense(inner, use_bias=False, name="to_k", **kw)(context))
        v = split(nn.Dense(inner, use_bias=False, name="to_v", **kw)(context))
        if self.upcast:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
            v = v.astype(jnp.float32)
        out = chunked_attention(q, k, v, self.chunk).astype(self.dtype)
        out = out.reshape(out.shape[:2] + (inner,))
        return nn.Dense(x.shape[-1], name="to_out_0", **kw)(out)


class GEGLU(nn.Module):
    """proj to 2*inner, split, hidden * exact-GELU(gate)."""

    inner: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(2 * self.inner, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """net.0 = GEGLU(dim -> 4 dim), net.2 = Linear(4 dim -> dim)."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(x.shape[-1] * self.mult, name="net_0", **kw)(x)
        return nn.Dense(x.shape[-1], name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm and residual."""

    heads: int
    head_dim: int
    upcast_attention: bool = False
    attention_chunk: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: [B, N, D], context: [B, L, D_c] -> [B, N, D]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name: Attention(self.heads, self.head_dim, self.upcast_attention,
                                      self.attention_chunk, name=name, **kw)
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kw)
        x = x + attn("attn1")(norm("norm1")(x))
        x = x + attn("attn2")(norm("norm2")(x), context)
        return x + FeedForward(name="ff", **kw)(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in (1x1 conv or linear), transformer blocks, proj_out, residual."""

    heads: int
    head_dim: int
    groups: int
    num_layers: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_chunk: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: [B, H, W, C], context: [B, L, D_c] -> [B, H, W, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, ch = x.shape
        inner = self.heads * self.head_dim
        h = nn.GroupNorm(self.groups, epsilon=1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = nn.Dense(inner, name="proj_in", **kw)(h.reshape(b, hgt * wid, ch))
        else:
            h = conv1x1(inner, "proj_in", **kw)(h).reshape(b, hgt * wid, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.head_dim, self.upcast_attention,
                                      self.attention_chunk, name=f"transformer_blocks_{i}",
                                      **kw)(h, context)
        if self.use_linear_projection:
            h = nn.Dense(ch, name="proj_out", **kw)(h).reshape(b, hgt, wid, ch)
        else:
            h = conv1x1(ch, "proj_out", **kw)(h.reshape(b, hgt, wid, inner))
        return h + x


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
