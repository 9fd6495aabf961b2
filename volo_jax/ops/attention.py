"""Global multi-head self-attention (timm's `Attention`): VOLO's transformer blocks and
class attention, and the 'self_attention' token mixer of the ablation.

`self_attention` runs it the way the platform's rules say (`Rules.attention`, one of
`ATTENTION`): XLA's fused kernel (`jax.nn.dot_product_attention`), explicit heads-major
products (the CPU), or one Pallas kernel from qkv to the output (TPUs,
`ops.attention_pallas`). `dot_product_attention` is the product on split heads that the
first two, and class attention, go through.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from volo_jax import platforms
from volo_jax.errors import ConfigError
from volo_jax.layers import dense, softmax
from volo_jax.ops.attention_pallas import pallas_supported, self_attention_pallas, tensor_parallel

Dtype = Any

#: How self-attention can run (`platforms.Rules.attention`, `VOLO.attention_impl`).
ATTENTION = ("xla", "explicit", "pallas")
#: TPU generations whose Mosaic has no bf16 matrix products (the kernel's): XLA's there.
MOSAIC_UNSUPPORTED = ("TPU v2", "TPU v3")


def resolve_attention(impl: str, platform: str | None, device_kind: str | None = None) -> str:
    """'auto' -> how a model built for `platform` (and, where known, `device_kind`, e.g.
    'TPU v3') runs self-attention; anything else is checked (the kernel on a TPU that
    cannot compile it is a clear error)."""
    old_tpu = (
        platform == "tpu" and device_kind is not None and device_kind.startswith(MOSAIC_UNSUPPORTED)
    )
    if impl == "auto":
        return "xla" if old_tpu else platforms.rules(platform).attention
    if impl not in ATTENTION:
        raise ValueError(
            f"unknown self-attention implementation {impl!r}; choose 'auto' or one of "
            f"{', '.join(ATTENTION)}"
        )
    if impl == "pallas" and old_tpu:
        raise ConfigError(
            f"config.model_overrides.attention_impl='pallas' needs TPU v4 or newer: Mosaic on "
            f"{device_kind} has no bf16 matrix products; use 'auto' (here: 'xla')"
        )
    return impl


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    dropout: nn.Dropout,
    platform: str | None = None,
    impl: str = "auto",
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v, the softmax in float32.

    q: (B, Nq, heads, d); k, v: (B, Nk, heads, d) -> (B, Nq, heads, d). This is
    `jax.nn.dot_product_attention`, whose kernel the compiler of each platform picks,
    unless the weights are formed explicitly: where attention weights are dropped out
    (training with a non-zero rate, which the fused call does not take), and for a
    platform whose products want heads-major operands (`Rules.attention == 'explicit'`:
    the CPU's batched products) or `impl='explicit'`, with that platform's products.
    """
    rules = platforms.rules(platform)
    explicit = not (dropout.deterministic or dropout.rate == 0.0)
    if not explicit and rules.attention != "explicit" and impl != "explicit":
        return jax.nn.dot_product_attention(q, k, v)
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # (B, heads, N, d)
    logits = rules.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = softmax(logits * q.shape[-1] ** -0.5, -1, platform).astype(v.dtype)
    return jnp.swapaxes(rules.einsum("bhqk,bhkd->bhqd", dropout(weights), v), 1, 2)


def self_attention(
    qkv: jax.Array,
    heads: int,
    dropout: nn.Dropout,
    platform: str | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Multi-head self-attention from the qkv projection's output, as `impl` says
    ('auto': as `platform` runs it, `resolve_attention`).

    qkv: (B, N, 3C), C = heads * hd, laid out as timm's `qkv` layer makes it -> (B, N, C).
    'pallas' runs the kernel where it applies: no attention dropout, a shape it takes
    (`pallas_supported`), heads not split over a 'model' axis; otherwise, and for 'xla'
    and 'explicit', `dot_product_attention` on the split heads.
    """
    b, n, c3 = qkv.shape
    c = c3 // 3
    impl = resolve_attention(impl, platform)
    kernel = (
        impl == "pallas"
        and (dropout.deterministic or dropout.rate == 0.0)
        and pallas_supported(n, c, heads, qkv.dtype)
        and not tensor_parallel()
    )
    if kernel:
        return self_attention_pallas(qkv, heads)
    qkv = qkv.reshape(b, n, 3, heads, c // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # 3 x (B, N, heads, hd)
    return dot_product_attention(q, k, v, dropout, platform, impl).reshape(b, n, c)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (timm names: qkv, proj).

    Input (B, ..., C) with any token layout (tokens are flattened) -> same shape.
    qkv is column-parallel ('embed', 'heads'), proj row-parallel ('heads', 'embed').
    `impl`: how the attention runs (`self_attention`; 'auto': the platform's).
    """

    dim: int
    num_heads: int
    qkv_bias: bool = False
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        shape = x.shape
        tokens = x.reshape(shape[0], -1, shape[-1])
        qkv = dense(3 * self.dim, ("embed", "heads"), use_bias=self.qkv_bias, name="qkv", **dt)
        attn_drop = nn.Dropout(self.attn_drop, deterministic=not train)
        out = self_attention(qkv(tokens), self.num_heads, attn_drop, self.platform, self.impl)
        out = dense(self.dim, ("heads", "embed"), name="proj", **dt)(out)
        out = nn.Dropout(self.proj_drop, deterministic=not train)(out)
        return out.reshape(shape)
