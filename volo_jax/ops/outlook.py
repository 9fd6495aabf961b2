"""Outlook attention (VOLO, arXiv 2106.13112): attention weights generated from the
centre token of each K x K window, applied to the window's values, folded back.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from volo_jax.ops.matmul import Dense, einsum
from volo_jax.ops.outlook_pallas import outlook_aggregate_pallas
from volo_jax.ops.patches import (
    fold,
    fold_planes,
    fold_slices,
    planes_unfold,
    planes_window_slices,
    to_planes,
    unfold,
    window_slices,
)

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
    out = einsum("bxynij,bxyjnd->bxyind", attn, windows)  # (B, h, w, KK, heads, hd)
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
    out = einsum("bxynij,bxynjd->bxynid", attn, windows)  # (B, h, w, heads, KK, hd)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _aggregate_planes(
    v: jax.Array, attn: jax.Array, kernel_size: int, stride: int, padding: int
) -> jax.Array:
    """The same on stride planes (`patches.to_planes`): every window offset a
    unit-stride slice, the K^4 multiply-adds per window elementwise in float32, the fold
    a sum of unit-stride placements; XLA:CPU fuses the product and the fold into one
    loop. Custom VJP: d_attn is one batched matmul of the gathered windows of the
    cotangent and of v (`planes_unfold`, one fused gather each), d_v the transposed
    products folded the same way; no layout copies of the windows."""
    return _aggregate_planes_fwd(v, attn, kernel_size, stride, padding)[0]


def _aggregate_planes_fwd(
    v: jax.Array, attn: jax.Array, kernel_size: int, stride: int, padding: int
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
    d_attn = einsum("bxynid,bxynjd->bxynij", g_windows, v_windows)
    g_parts = [g_windows[:, :, :, :, k] for k in range(g_windows.shape[4])]
    d_v = fold_planes(_window_products(attn, g_parts, True), size, *geometry)
    return d_v.reshape(g.shape).astype(planes.dtype), d_attn.astype(attn.dtype)


_aggregate_planes.defvjp(_aggregate_planes_fwd, _aggregate_planes_bwd)


#: Implementations of `outlook_aggregate`, equal within float rounding (tested):
#: 'pallas' is the fused kernel of `outlook_pallas` (interpret mode on the CPU).
IMPLEMENTATIONS = {
    "reference": _aggregate_reference,
    "slices": _aggregate_slices,
    "planes": _aggregate_planes,
    "pallas": outlook_aggregate_pallas,
}

#: What `impl="auto"` runs, per JAX backend: the fastest measured by
#: benchmarks/bench_ops.py. CPU: 'planes', the fastest forward and by far the fastest
#: forward+backward, with the smallest memory plan (VOLO-D1 outlooker, batch 8: the
#: aggregate ~0.7x the forward and ~0.55x the forward+backward time of 'slices', the whole
#: layer ~0.9x and ~0.43x; 'slices' differentiates through its folds by autodiff, which
#: XLA:CPU runs as big strided pads and layout copies). GPU and TPU keep 'slices' until
#: 'planes' and the Pallas kernel have been timed there (docs/performance.md).
DEFAULT_IMPLEMENTATION = {"cpu": "planes", "gpu": "slices", "tpu": "slices"}


def resolve_implementation(impl: str) -> str:
    """'auto' -> the default for the current backend; anything else is checked."""
    if impl == "auto":
        return DEFAULT_IMPLEMENTATION.get(jax.default_backend(), "reference")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown outlook attention implementation {impl!r}; choose 'auto' or one of "
            f"{sorted(IMPLEMENTATIONS)}"
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
      impl: a key of `IMPLEMENTATIONS`, or 'auto' for the backend's fastest.
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
        dense = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.truncated_normal(0.02),
        )
        v = Dense(self.dim, use_bias=self.qkv_bias, name="v", **dense)(x)
        # Average pool with kernel = stride = s, ceil mode: partial windows average
        # only the positions they cover, as PyTorch's AvgPool2d(ceil_mode=True).
        pad = ((0, -height % s), (0, -width % s))
        pooled = nn.avg_pool(x, (s, s), (s, s), padding=pad, count_include_pad=False)
        h, w = pooled.shape[1:3]
        logits = Dense(k**4 * self.num_heads, name="attn", **dense)(pooled)
        logits = logits.reshape(b, h, w, self.num_heads, k * k, k * k) * scale
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        attn = nn.Dropout(self.attn_drop, deterministic=not train)(attn)
        x = outlook_aggregate(v, attn, k, s, self.padding, self.impl)
        x = Dense(self.dim, name="proj", **dense)(x)
        return nn.Dropout(self.proj_drop, deterministic=not train)(x)
