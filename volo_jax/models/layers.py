"""Building blocks shared by the models: MLP, stochastic depth, self-attention."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from volo_jax.ops import cpu

Dtype = Any

#: PyTorch's LayerNorm (eps 1e-5; flax's default is 1e-6).
TorchLayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-5)


def dense_init() -> nn.initializers.Initializer:
    """timm's init for Linear weights: truncated normal, std 0.02 (biases zero)."""
    return nn.initializers.truncated_normal(0.02)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample (rng 'dropout').

    Input (B, ...) -> same shape; survivors are scaled by 1 / (1 - rate).
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        broadcast = tuple(range(1, x.ndim))
        return nn.Dropout(self.rate, broadcast_dims=broadcast, deterministic=False)(x)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> dropout -> fc2 -> dropout. (..., C) -> (..., out_dim or C)."""

    hidden_dim: int
    out_dim: int | None = None
    drop: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense_init())
        out_dim = self.out_dim or x.shape[-1]
        x = nn.Dense(self.hidden_dim, name="fc1", **dense)(x)
        x = nn.gelu(x, approximate=False)
        x = nn.Dropout(self.drop, deterministic=not train)(x)
        x = nn.Dense(out_dim, name="fc2", **dense)(x)
        return nn.Dropout(self.drop, deterministic=not train)(x)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, dropout: nn.Dropout
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v, the softmax in float32.

    q: (B, Nq, heads, d); k, v: (B, Nk, heads, d) -> (B, Nq, heads, d). This is
    `jax.nn.dot_product_attention`, whose kernel the compiler of each platform picks,
    unless the weights are formed explicitly: where attention weights are dropped out
    (training with a non-zero rate, which the fused call does not take), and in the CPU
    branch (`ops.cpu.ATTENTION_IMPLEMENTATION`), whose batched products want heads-major
    operands.
    """
    explicit = not (dropout.deterministic or dropout.rate == 0.0)
    if not explicit and not (cpu.tracing_for_cpu() and cpu.ATTENTION_IMPLEMENTATION == "explicit"):
        return jax.nn.dot_product_attention(q, k, v)
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # (B, heads, N, d)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", dropout(weights), v), 1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (timm names: qkv, proj).

    Input (B, ..., C) with any token layout (tokens are flattened) -> same shape.
    """

    dim: int
    num_heads: int
    qkv_bias: bool = False
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense_init())
        shape = x.shape
        tokens = x.reshape(shape[0], -1, shape[-1])
        b, n, c = tokens.shape
        qkv = nn.Dense(3 * self.dim, use_bias=self.qkv_bias, name="qkv", **dense)(tokens)
        qkv = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # 3 x (B, N, heads, hd)
        attn_drop = nn.Dropout(self.attn_drop, deterministic=not train)
        out = dot_product_attention(q, k, v, attn_drop).reshape(b, n, c)
        out = nn.Dense(self.dim, name="proj", **dense)(out)
        out = nn.Dropout(self.proj_drop, deterministic=not train)(out)
        return out.reshape(shape)
