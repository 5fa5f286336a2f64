"""A CLIP text transformer in Flax linen (transformers' `CLIPTextModel`, under `text_model.`).

Parameter names follow the transformers state dict with list indices folded into names:
`text_model.encoder.layers.3.self_attn.q_proj.weight` lives at
params['encoder']['layers_3']['self_attn']['q_proj']['kernel'].
"""
from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from prdp_jax.infra.errors import ConfigError

Dtype = jnp.dtype

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
}


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (causal through `mask`)."""

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: [B, L, D], mask: [B, 1, L, L] bool (True = attend) or None (full attention, as in
        the CLIP vision tower) -> [B, L, D]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        head_dim = dim // self.heads
        split = lambda y: y.reshape(y.shape[:2] + (self.heads, head_dim))
        q = split(nn.Dense(dim, name="q_proj", **kw)(x))
        k = split(nn.Dense(dim, name="k_proj", **kw)(x))
        v = split(nn.Dense(dim, name="v_proj", **kw)(x))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask).reshape(x.shape)
        return nn.Dense(dim, name="out_proj", **kw)(out)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer; `mask` as in CLIPAttention (None = non-causal)."""

    heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.LayerNorm(epsilon=self.eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(self.heads, name="self_attn", **kw)(h, mask)
        h = nn.LayerNorm(epsilon=self.eps, name="layer_norm2", **kw)(x)
        h = MLP(self.intermediate_size, self.hidden_act, name="mlp", **kw)(h)
        return x + h


class MLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(self.intermediate_size, name="fc1", **kw)(x)
        return nn.Dense(x.shape[-1], name="fc2", **kw)(ACTIVATIONS[self.hidden_act](h))


class Encoder(nn.Module):
    """A stack of CLIPEncoderLayers: x [B, L, D], mask [B, 1, L, L] or None -> [B, L, D]."""

    num_layers: int
    heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        for i in range(self.num_layers):
            x = CLIPEncoderLayer(self.heads, self.intermediate_size, self.hidden_act, self.eps,
                                 name=f"layers_{i}", dtype=self.dtype,
                                 param_dtype=self.param_dtype)(x, mask)
        return x


class Embeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tok = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding", **kw)(input_ids)
        pos = nn.Embed(self.max_position_embeddings, self.hidden_size, name="position_embedding",
                       **kw)(jnp.arange(input_ids.shape[1])[None])
        return tok + pos


class TextEncoder(nn.Module):
    """CLIP text transformer: token + position embeddings, causal pre-LN encoder, final LayerNorm.

    Fields mirror transformers' `CLIPTextConfig`. `eos_token_id` picks the pooled position: the
    first occurrence of that id, or (the legacy rule, for eos_token_id == 2) the largest id.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def validate(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"text encoder: unknown hidden_act {self.hidden_act!r}; "
                              f"known: {tuple(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"text encoder: hidden_size {self.hidden_size} not divisible by "
                              f"{self.num_attention_heads} heads")

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        """Encodes token ids.

        Args:
          input_ids: [B, L] int32, L <= max_position_embeddings.
          attention_mask: optional [B, L] (1 = real token); causal masking is always applied.
        Returns:
          (last_hidden_state [B, L, hidden_size], pooled [B, hidden_size]) after final_layer_norm.
        """
        chex.assert_rank(input_ids, 2)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        length = input_ids.shape[1]
        x = Embeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                       name="embeddings", **kw)(input_ids)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        mask = jnp.broadcast_to(mask, (input_ids.shape[0], 1, length, length))
        x = Encoder(self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                    self.hidden_act, self.layer_norm_eps, name="encoder", **kw)(x, mask)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="final_layer_norm", **kw)(x)
        if self.eos_token_id == 2:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        pooled = x[jnp.arange(x.shape[0]), eos]
        return x, pooled
