"""Global multi-head self-attention (timm's `Attention`): VOLO's transformer blocks and
class attention, and the 'self_attention' token mixer of the ablation.

`dot_product_attention` is the product every attention here goes through: XLA's fused
kernel where it can, explicit heads-major products where the platform's rules say so
(`volo_jax.platforms`: the CPU).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from volo_jax import platforms
from volo_jax.layers import dense, softmax

Dtype = Any


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, dropout: nn.Dropout, platform: str | None = None
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v, the softmax in float32.

    q: (B, Nq, heads, d); k, v: (B, Nk, heads, d) -> (B, Nq, heads, d). This is
    `jax.nn.dot_product_attention`, whose kernel the compiler of each platform picks,
    unless the weights are formed explicitly: where attention weights are dropped out
    (training with a non-zero rate, which the fused call does not take), and for a
    platform whose products want heads-major operands (`Rules.explicit_attention`: the
    CPU's batched products), with that platform's products.
    """
    rules = platforms.rules(platform)
    explicit = not (dropout.deterministic or dropout.rate == 0.0)
    if not explicit and not rules.explicit_attention:
        return jax.nn.dot_product_attention(q, k, v)
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # (B, heads, N, d)
    logits = rules.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = softmax(logits * q.shape[-1] ** -0.5, -1, platform).astype(v.dtype)
    return jnp.swapaxes(rules.einsum("bhqk,bhkd->bhqd", dropout(weights), v), 1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (timm names: qkv, proj).

    Input (B, ..., C) with any token layout (tokens are flattened) -> same shape.
    qkv is column-parallel ('embed', 'heads'), proj row-parallel ('heads', 'embed').
    """

    dim: int
    num_heads: int
    qkv_bias: bool = False
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        shape = x.shape
        tokens = x.reshape(shape[0], -1, shape[-1])
        b, n, c = tokens.shape
        qkv = dense(3 * self.dim, ("embed", "heads"), use_bias=self.qkv_bias, name="qkv", **dt)
        qkv = qkv(tokens).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # 3 x (B, N, heads, hd)
        attn_drop = nn.Dropout(self.attn_drop, deterministic=not train)
        out = dot_product_attention(q, k, v, attn_drop, self.platform).reshape(b, n, c)
        out = dense(self.dim, ("heads", "embed"), name="proj", **dt)(out)
        out = nn.Dropout(self.proj_drop, deterministic=not train)(out)
        return out.reshape(shape)
