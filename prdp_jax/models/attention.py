"""Attention for the UNet: scaled dot-product attention (plain, chunked over queries for long
sequences, with a memory-light custom gradient), and the transformer block of Stable Diffusion's
cross-attention layers (`Transformer2DModel`), with diffusers' parameter names."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from prdp_jax.models.layers import Dtype, conv1x1


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
