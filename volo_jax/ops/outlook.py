"""Outlook attention (VOLO, arXiv 2106.13112): attention weights generated from the
centre token of each K x K window, applied to the window's values, folded back.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from volo_jax.errors import ConfigError
from volo_jax.layers import dense, softmax
from volo_jax.ops import cpu
from volo_jax.ops.outlook_pallas import outlook_aggregate_pallas, outlook_attention_pallas
from volo_jax.ops.patches import fold, unfold
from volo_jax.ops.slices import fold_slices, window_slices

Dtype = Any


def _aggregate_reference(
    v: jax.Array, attn: jax.Array, kernel_size: int, stride: int, padding: int
) -> jax.Array:
    """unfold (conv patches) -> per-window attention -> fold (scatter-add)."""
    b, height, width, c = v.shape
    heads, kk = attn.shape[3], attn.shape[4]
    windows = unfold(v, kernel_size, stride, padding)  # (B, h, w, KK, C)
    h, w = windows.shape[1:3]
    windows = windows.reshape(b, h, w, kk, heads, c // heads)
    out = jnp.einsum("bxynij,bxyjnd->bxyind", attn, windows)  # (B, h, w, KK, heads, hd)
    return fold(out.reshape(b, h, w, kk, c), (height, width), kernel_size, stride, padding)


def _aggregate_slices(
    v: jax.Array, attn: jax.Array, kernel_size: int, stride: int, padding: int
) -> jax.Array:
    """The same with windows as K*K strided slices stacked head-major, so the attention
    product is a plain batched matmul, and the fold as a sum of strided placements."""
    b, height, width, c = v.shape
    heads = attn.shape[3]
    geometry = (kernel_size, stride, padding)
    parts = window_slices(v.reshape(b, height, width, heads, c // heads), *geometry)
    windows = jnp.stack(parts, axis=4)  # (B, h, w, heads, KK, hd)
    out = jnp.einsum("bxynij,bxynjd->bxynid", attn, windows)  # (B, h, w, heads, KK, hd)
    folded = fold_slices(
        [out[:, :, :, :, k] for k in range(len(parts))], (height, width), *geometry
    )
    return folded.reshape(b, height, width, c)


#: Implementations of `outlook_aggregate`, equal within float rounding (tested):
#: 'planes' is the CPU's (`volo_jax.ops.cpu`), 'pallas' the fused kernel of
#: `outlook_pallas` (compiled on GPU and TPU, interpret mode on the CPU).
IMPLEMENTATIONS = {
    "reference": _aggregate_reference,
    "slices": _aggregate_slices,
    "planes": cpu.aggregate_planes,
    "pallas": outlook_aggregate_pallas,
}

#: What `impl="auto"` runs on each accelerator: of the implementations that compile
#: there, the one whose VOLO-D1 train step moves the fewest bytes per image (XLA:TPU's
#: cost model; on GPUs, whose compile-only client has none, the compiled HLO's count),
#: measured by benchmarks/compile_table.py at 128 images a device, bf16 (the table and
#: its machines are in docs/performance.md, "What `outlook_impl="auto"` runs"). Its
#: speed on the chips is not measured yet. On the CPU, `cpu.cpu_kernels` makes it
#: `cpu.OUTLOOK_IMPLEMENTATION`.
ACCELERATOR_IMPLEMENTATIONS = {"tpu": "pallas", "cuda": "pallas"}
#: Where the platform is not known while tracing (a plain `jax.jit(model.apply)` outside
#: the trainer's `for_platform`): an implementation that is plain XLA on every platform
#: (the kernel would run in Pallas' interpreter on a CPU).
ACCELERATOR_IMPLEMENTATION = "slices"


#: TPU generations whose Mosaic compiler lacks what the Pallas kernel needs (bf16 matrix
#: products: "Unsupported matmul RHS type"): 'auto' takes TPU_FALLBACK there, the
#: implementation with the fewest bytes per image after the kernel on TPU v5e.
MOSAIC_UNSUPPORTED = ("TPU v2", "TPU v3")
TPU_FALLBACK = "reference"


def _old_tpu(device_kind: str | None) -> bool:
    return device_kind is not None and device_kind.startswith(MOSAIC_UNSUPPORTED)


def resolve_implementation(impl: str) -> str:
    """'auto' -> the implementation for the platform being traced for; anything else is
    checked (the Pallas kernel on a TPU that cannot compile it is a clear error)."""
    kind = cpu.traced_device_kind()
    if impl == "auto":
        if cpu.tracing_for_cpu():
            return cpu.OUTLOOK_IMPLEMENTATION
        platform = cpu.traced_accelerator()
        if platform == "tpu" and _old_tpu(kind):
            return TPU_FALLBACK
        return ACCELERATOR_IMPLEMENTATIONS.get(platform, ACCELERATOR_IMPLEMENTATION)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown outlook attention implementation {impl!r}; choose 'auto' or one of "
            f"{sorted(IMPLEMENTATIONS)}"
        )
    if impl == "pallas" and cpu.traced_accelerator() == "tpu" and _old_tpu(kind):
        raise ConfigError(
            f"config.model_overrides.outlook_impl='pallas' needs TPU v4 or newer: Mosaic "
            f"on {kind} has no bf16 matrix products; use 'auto' (here: {TPU_FALLBACK!r}) "
            f"or another of {sorted(IMPLEMENTATIONS)}"
        )
    return impl


def outlook_aggregate(
    v: jax.Array,
    attn: jax.Array,
    kernel_size: int,
    stride: int,
    padding: int,
    impl: str = "auto",
) -> jax.Array:
    """Applies per-window attention to unfolded values and folds the result back.

    Args:
      v: values, (B, H, W, C) with C = heads * head_dim.
      attn: attention weights, (B, h, w, heads, K*K, K*K) (output offset, input
        offset), h, w the window grid of `unfold(v, K, stride, padding)`.
      impl: a key of `IMPLEMENTATIONS`, or 'auto' (see `resolve_implementation`).
    Returns:
      (B, H, W, C): the sum over every window covering a position.
    """
    fn = IMPLEMENTATIONS[resolve_implementation(impl)]
    return fn(v, attn, kernel_size, stride, padding)


class OutlookAttention(nn.Module):
    """Multi-head outlook attention, parameter names as timm's `OutlookAttention`.

    Attributes:
      dim: channels C; num_heads divides it.
      kernel_size, padding, stride: window geometry K, p, s (VOLO: 3, 1, 2).
      impl: how the windows are gathered and folded (see `IMPLEMENTATIONS`).
    Input (B, H, W, C) -> output (B, H, W, C).
    """

    dim: int
    num_heads: int
    kernel_size: int = 3
    padding: int = 1
    stride: int = 1
    qkv_bias: bool = False
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, height, width, c = x.shape
        if c != self.dim or self.dim % self.num_heads:
            raise ValueError(
                f"OutlookAttention(dim={self.dim}, num_heads={self.num_heads}) got {c} channels"
            )
        k, s = self.kernel_size, self.stride
        scale = (self.dim // self.num_heads) ** -0.5
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        v = dense(self.dim, ("embed", "heads"), use_bias=self.qkv_bias, name="v", **dt)(x)
        # Average pool with kernel = stride = s, ceil mode: partial windows average
        # only the positions they cover, as PyTorch's AvgPool2d(ceil_mode=True).
        pad = ((0, -height % s), (0, -width % s))
        pooled = nn.avg_pool(x, (s, s), (s, s), padding=pad, count_include_pad=False)
        h, w = pooled.shape[1:3]
        logits = dense(k**4 * self.num_heads, ("embed", "heads"), name="attn", **dt)(pooled)
        logits = logits.reshape(b, h, w, self.num_heads, k * k, k * k) * scale
        impl = resolve_implementation(self.impl)
        dropout = nn.Dropout(self.attn_drop, deterministic=not train)
        if impl == "pallas" and (dropout.deterministic or self.attn_drop == 0.0):
            # The kernel takes the logits: softmax, aggregation and fold in one pass.
            x = outlook_attention_pallas(v, logits, k, s, self.padding)
        else:
            attn = softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
            x = outlook_aggregate(v, dropout(attn), k, s, self.padding, impl)
        x = dense(self.dim, ("heads", "embed"), name="proj", **dt)(x)
        return nn.Dropout(self.proj_drop, deterministic=not train)(x)
