"""Global multi-head self-attention (timm's `Attention`): VOLO's transformer blocks and
class attention, and the 'self_attention' token mixer of the ablation.

`self_attention` runs it the way the platform's rules say (`Rules.attention`, one of
`ATTENTION`): XLA's attention (`jax.nn.dot_product_attention`), explicit heads-major
products (the CPU), cuDNN's fused flash attention (GPUs from Ampere on), or one Pallas
kernel from qkv to the output (TPUs, `ops.attention_pallas`). `dot_product_attention` is
the product on split heads that all but the last, and class attention, go through.
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
ATTENTION = ("xla", "explicit", "cudnn", "pallas")
#: TPU generations whose Mosaic has no bf16 matrix products (the kernel's): XLA's there.
MOSAIC_UNSUPPORTED = ("TPU v2", "TPU v3")
#: cuDNN's flash attention needs an Ampere or newer GPU.
CUDNN_MIN_CAPABILITY = (8, 0)


def resolve_attention(
    impl: str,
    platform: str | None,
    device_kind: str | None = None,
    compute_capability: tuple[int, int] | None = None,
) -> str:
    """'auto' -> how a model built for `platform` runs self-attention, for its devices
    where they are known (`device_kind`, e.g. 'TPU v3'; a GPU's `compute_capability`):
    XLA's on TPU v2 / v3 and on GPUs before Ampere. Anything else is checked: a kernel on
    a platform or chip that cannot run it is a clear error."""
    old_tpu = (
        platform == "tpu" and device_kind is not None and device_kind.startswith(MOSAIC_UNSUPPORTED)
    )
    old_gpu = compute_capability is not None and tuple(compute_capability) < CUDNN_MIN_CAPABILITY
    if impl == "auto":
        impl = platforms.rules(platform).attention
        return "xla" if (impl == "pallas" and old_tpu) or (impl == "cudnn" and old_gpu) else impl
    if impl not in ATTENTION:
        raise ValueError(
            f"unknown self-attention implementation {impl!r}; choose 'auto' or one of "
            f"{', '.join(ATTENTION)}"
        )
    field = f"config.model_overrides.attention_impl={impl!r}"
    if impl == "pallas" and platform not in ("tpu", "cpu", None):
        raise ConfigError(f"{field} is a TPU kernel; use 'auto' on {platform}")
    if impl == "pallas" and old_tpu:
        raise ConfigError(
            f"{field} needs TPU v4 or newer: Mosaic on {device_kind} has no bf16 matrix "
            f"products; use 'auto' (here: 'xla')"
        )
    if impl == "cudnn" and (platform != "gpu" or old_gpu):
        where = f"compute capability {compute_capability}" if old_gpu else platform
        raise ConfigError(
            f"{field} needs an NVIDIA GPU of compute capability 8.0 or newer, not {where}; "
            f"use 'auto'"
        )
    return impl


def cudnn_supported(q: jax.Array, k: jax.Array) -> bool:
    """Whether cuDNN's flash attention takes these (B, N, heads, d) operands: self-attention
    (as many queries as keys) in bf16 or fp16, heads of a multiple of 8 up to 128 channels."""
    d = q.shape[-1]
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    return half and q.shape[1] == k.shape[1] and d % 8 == 0 and d <= 128


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
    `jax.nn.dot_product_attention` (with `impl='cudnn'`, cuDNN's flash attention where
    it takes the operands, `cudnn_supported`), unless the weights are formed explicitly:
    where attention weights are dropped out (training with a non-zero rate, which the
    fused call does not take), and for `impl='explicit'` (the CPU's rule: its batched
    products want heads-major operands), with the platform's products. `impl='auto'`:
    the platform's (`resolve_attention`).
    """
    rules = platforms.rules(platform)
    impl = resolve_attention(impl, platform)
    dropped = not (dropout.deterministic or dropout.rate == 0.0)
    if not dropped and impl != "explicit":
        cudnn = impl == "cudnn" and cudnn_supported(q, k)
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn" if cudnn else None)
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
    (`pallas_supported`), heads not split over a 'model' axis; otherwise, and for 'xla',
    'explicit' and 'cudnn', `dot_product_attention` on the split heads.
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
