"""Global multi-head self-attention (timm's `Attention`): VOLO's transformer blocks and
class attention, and the 'self_attention' token mixer of the ablation.

`dot_product_attention` is the product every attention here goes through: XLA's fused
kernel where it can, explicit heads-major products in the CPU branch (`ops.cpu`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from volo_jax.layers import dense, softmax
from volo_jax.ops import cpu

Dtype = Any


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
    weights = softmax(logits * q.shape[-1] ** -0.5, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", dropout(weights), v), 1, 2)


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

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shape = x.shape
        tokens = x.reshape(shape[0], -1, shape[-1])
        b, n, c = tokens.shape
        qkv = dense(3 * self.dim, ("embed", "heads"), use_bias=self.qkv_bias, name="qkv", **dt)
        qkv = qkv(tokens).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # 3 x (B, N, heads, hd)
        attn_drop = nn.Dropout(self.attn_drop, deterministic=not train)
        out = dot_product_attention(q, k, v, attn_drop).reshape(b, n, c)
        out = dense(self.dim, ("heads", "embed"), name="proj", **dt)(out)
        out = nn.Dropout(self.proj_drop, deterministic=not train)(out)
        return out.reshape(shape)
