"""Outlook attention (VOLO, arXiv 2106.13112): attention weights generated from the
centre token of each K x K window, applied to the window's values, folded back.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from volo_jax import platforms
from volo_jax.errors import ConfigError
from volo_jax.layers import dense, softmax
from volo_jax.ops.outlook_pallas import outlook_aggregate_pallas, outlook_attention_pallas
from volo_jax.ops.patches import fold, unfold
from volo_jax.ops.planes import fold_planes, planes_unfold, planes_window_slices, to_planes
from volo_jax.ops.slices import fold_slices, window_slices

Dtype = Any


def _aggregate_reference(
    v: jax.Array,
    attn: jax.Array,
    kernel_size: int,
    stride: int,
    padding: int,
    platform: str | None = None,
) -> jax.Array:
    """unfold (conv patches) -> per-window attention -> fold (scatter-add)."""
    b, height, width, c = v.shape
    heads, kk = attn.shape[3], attn.shape[4]
    windows = unfold(v, kernel_size, stride, padding)  # (B, h, w, KK, C)
    h, w = windows.shape[1:3]
    windows = windows.reshape(b, h, w, kk, heads, c // heads)
    out = platforms.einsum("bxynij,bxyjnd->bxyind", attn, windows, platform)  # (B,h,w,KK,n,hd)
    return fold(out.reshape(b, h, w, kk, c), (height, width), kernel_size, stride, padding)


def _aggregate_slices(
    v: jax.Array,
    attn: jax.Array,
    kernel_size: int,
    stride: int,
    padding: int,
    platform: str | None = None,
) -> jax.Array:
    """The same with windows as K*K strided slices stacked head-major, so the attention
    product is a plain batched matmul, and the fold as a sum of strided placements."""
    b, height, width, c = v.shape
    heads = attn.shape[3]
    geometry = (kernel_size, stride, padding)
    parts = window_slices(v.reshape(b, height, width, heads, c // heads), *geometry)
    windows = jnp.stack(parts, axis=4)  # (B, h, w, heads, KK, hd)
    out = platforms.einsum("bxynij,bxynjd->bxynid", attn, windows, platform)  # (B,h,w,n,KK,hd)
    folded = fold_slices(
        [out[:, :, :, :, k] for k in range(len(parts))], (height, width), *geometry
    )
    return folded.reshape(b, height, width, c)


def _window_products(attn: jax.Array, parts: list[jax.Array], transpose: bool) -> list[jax.Array]:
    """out_i = sum_j attn[..., i, j] * parts[j] (or, transposed, sum over i of
    attn[..., i, j] * parts[i]) for every offset, in float32.

    Args:
      attn: (B, h, w, heads, KK, KK).
      parts: KK arrays (B, h, w, heads, hd).
    Returns:
      KK float32 arrays (B, h, w, heads, hd).
    """
    a = attn.astype(jnp.float32)
    xs = [p.astype(jnp.float32) for p in parts]

    def weight(i: int, j: int) -> jax.Array:  # (B, h, w, heads, 1), no transposed copy
        return (a[..., j, i] if transpose else a[..., i, j])[..., None]

    return [
        functools.reduce(jnp.add, [weight(i, j) * x for j, x in enumerate(xs)])
        for i in range(len(xs))
    ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _aggregate_planes(
    v: jax.Array,
    attn: jax.Array,
    kernel_size: int,
    stride: int,
    padding: int,
    platform: str | None,
) -> jax.Array:
    """Outlook aggregation (`outlook.outlook_aggregate`'s contract) on stride planes
    (`patches.to_planes`): every window offset a unit-stride slice, the K^4
    multiply-adds per window elementwise in float32, the fold a sum of unit-stride
    placements; XLA:CPU fuses the product and the fold into one loop. Custom VJP: d_attn
    is one batched matmul of the gathered windows of the cotangent and of v
    (`planes_unfold`, one fused gather each), d_v the transposed products folded the same
    way; no layout copies of the windows. The products follow `platform`'s rules."""
    return _aggregate_planes_fwd(v, attn, kernel_size, stride, padding, platform)[0]


def _aggregate_planes_fwd(
    v: jax.Array,
    attn: jax.Array,
    kernel_size: int,
    stride: int,
    padding: int,
    platform: str | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    b, height, width, c = v.shape
    heads = attn.shape[3]
    geometry = (kernel_size, stride, padding)
    planes = to_planes(v.reshape(b, height, width, heads, c // heads), *geometry)
    parts = planes_window_slices(planes, (height, width), *geometry)
    out = fold_planes(_window_products(attn, parts, False), (height, width), *geometry)
    return out.reshape(v.shape).astype(v.dtype), (planes, attn)


def _aggregate_planes_bwd(
    kernel_size: int,
    stride: int,
    padding: int,
    platform: str | None,
    residuals: tuple[jax.Array, jax.Array],
    g: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    planes, attn = residuals  # planes of v (B, Hq, s, Wq, s, heads, hd)
    b, height, width, _ = g.shape
    heads = attn.shape[3]
    geometry = (kernel_size, stride, padding)
    size = (height, width)
    g_planes = to_planes(g.astype(planes.dtype).reshape(b, height, width, heads, -1), *geometry)
    g_windows = planes_unfold(g_planes, size, *geometry, axis=4)  # (B, h, w, heads, KK, hd)
    v_windows = planes_unfold(planes, size, *geometry, axis=4)
    d_attn = platforms.einsum("bxynid,bxynjd->bxynij", g_windows, v_windows, platform)
    g_parts = [g_windows[:, :, :, :, k] for k in range(g_windows.shape[4])]
    d_v = fold_planes(_window_products(attn, g_parts, True), size, *geometry)
    return d_v.reshape(g.shape).astype(planes.dtype), d_attn.astype(attn.dtype)


_aggregate_planes.defvjp(_aggregate_planes_fwd, _aggregate_planes_bwd)


def _aggregate_pallas(
    v: jax.Array,
    attn: jax.Array,
    kernel_size: int,
    stride: int,
    padding: int,
    platform: str | None = None,
) -> jax.Array:
    """The Pallas kernels (`outlook_pallas`; they pick their own kernel per platform)."""
    return outlook_aggregate_pallas(v, attn, kernel_size, stride, padding)


#: Implementations of `outlook_aggregate`, equal within float rounding (tested):
#: 'planes' is the CPU's, 'pallas' the fused kernel of `outlook_pallas` (compiled on GPU
#: and TPU, interpret mode on the CPU). What 'auto' runs on each platform is
#: `platforms.RULES[platform].outlook_impl`: on the accelerators, of the implementations
#: that compile there, the one whose VOLO-D1 train step moves the fewest bytes per image
#: (benchmarks/compile_table.py; docs/performance.md, "What `outlook_impl="auto"` runs").
IMPLEMENTATIONS = {
    "reference": _aggregate_reference,
    "slices": _aggregate_slices,
    "planes": _aggregate_planes,
    "pallas": _aggregate_pallas,
}

#: TPU generations whose Mosaic compiler lacks what the Pallas kernel needs (bf16 matrix
#: products: "Unsupported matmul RHS type"): 'auto' takes TPU_FALLBACK there, the
#: implementation with the fewest bytes per image after the kernel on TPU v5e.
MOSAIC_UNSUPPORTED = ("TPU v2", "TPU v3")
TPU_FALLBACK = "reference"


def _old_tpu(device_kind: str | None) -> bool:
    return device_kind is not None and device_kind.startswith(MOSAIC_UNSUPPORTED)


def resolve_implementation(impl: str, platform: str | None, device_kind: str | None = None) -> str:
    """'auto' -> the implementation of a model built for `platform` (and, where known,
    `device_kind`, e.g. 'TPU v3'); anything else is checked (the Pallas kernel on a TPU
    that cannot compile it is a clear error)."""
    old_tpu = platform == "tpu" and _old_tpu(device_kind)
    if impl == "auto":
        return TPU_FALLBACK if old_tpu else platforms.rules(platform).outlook_impl
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown outlook attention implementation {impl!r}; choose 'auto' or one of "
            f"{sorted(IMPLEMENTATIONS)}"
        )
    if impl == "pallas" and old_tpu:
        raise ConfigError(
            f"config.model_overrides.outlook_impl='pallas' needs TPU v4 or newer: Mosaic "
            f"on {device_kind} has no bf16 matrix products; use 'auto' (here: "
            f"{TPU_FALLBACK!r}) or another of {sorted(IMPLEMENTATIONS)}"
        )
    return impl


def outlook_aggregate(
    v: jax.Array,
    attn: jax.Array,
    kernel_size: int,
    stride: int,
    padding: int,
    impl: str = "auto",
    platform: str | None = None,
) -> jax.Array:
    """Applies per-window attention to unfolded values and folds the result back.

    Args:
      v: values, (B, H, W, C) with C = heads * head_dim.
      attn: attention weights, (B, h, w, heads, K*K, K*K) (output offset, input
        offset), h, w the window grid of `unfold(v, K, stride, padding)`.
      impl: a key of `IMPLEMENTATIONS`, or 'auto' (see `resolve_implementation`).
      platform: the platform the products are for (`volo_jax.platforms`).
    Returns:
      (B, H, W, C): the sum over every window covering a position.
    """
    fn = IMPLEMENTATIONS[resolve_implementation(impl, platform)]
    return fn(v, attn, kernel_size, stride, padding, platform)


class OutlookAttention(nn.Module):
    """Multi-head outlook attention, parameter names as timm's `OutlookAttention`.

    Attributes:
      dim: channels C; num_heads divides it.
      kernel_size, padding, stride: window geometry K, p, s (VOLO: 3, 1, 2).
      impl: how the windows are gathered and folded (see `IMPLEMENTATIONS`; 'auto':
        `platform`'s choice).
      platform: the platform the layer is built for (`volo_jax.platforms`).
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
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, height, width, c = x.shape
        if c != self.dim or self.dim % self.num_heads:
            raise ValueError(
                f"OutlookAttention(dim={self.dim}, num_heads={self.num_heads}) got {c} channels"
            )
        k, s = self.kernel_size, self.stride
        scale = (self.dim // self.num_heads) ** -0.5
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        v = dense(self.dim, ("embed", "heads"), use_bias=self.qkv_bias, name="v", **dt)(x)
        # Average pool with kernel = stride = s, ceil mode: partial windows average
        # only the positions they cover, as PyTorch's AvgPool2d(ceil_mode=True).
        pad = ((0, -height % s), (0, -width % s))
        pooled = nn.avg_pool(x, (s, s), (s, s), padding=pad, count_include_pad=False)
        h, w = pooled.shape[1:3]
        logits = dense(k**4 * self.num_heads, ("embed", "heads"), name="attn", **dt)(pooled)
        logits = logits.reshape(b, h, w, self.num_heads, k * k, k * k) * scale
        impl = resolve_implementation(self.impl, self.platform)
        dropout = nn.Dropout(self.attn_drop, deterministic=not train)
        if impl == "pallas" and (dropout.deterministic or self.attn_drop == 0.0):
            # The kernel takes the logits: softmax, aggregation and fold in one pass.
            x = outlook_attention_pallas(v, logits, k, s, self.padding)
        else:
            attn = softmax(logits.astype(jnp.float32), -1, self.platform).astype(v.dtype)
            x = outlook_aggregate(v, dropout(attn), k, s, self.padding, impl, self.platform)
        x = dense(self.dim, ("heads", "embed"), name="proj", **dt)(x)
        return nn.Dropout(self.proj_drop, deterministic=not train)(x)
