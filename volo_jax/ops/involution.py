"""Involution (Li et al., "Involution: Inverting the Inherence of Convolution for Visual
Recognition", CVPR 2021; official code github d-li14/involution).

A K x K kernel is generated at every output position from that position's own feature
and shared by the C / G channels of each of the G groups:

    y[b, i, j, g*Cg + c] = sum_{u,v} W[b, i, j, g, u*K + v] x[b, i*s + u - p, j*s + v - p, g*Cg + c]

Parameter names are those of the official `involution` module (mmcv `ConvModule`s):
conv1/conv, conv1/bn, conv2/conv (with bias).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from volo_jax import platforms
from volo_jax.layers import ConvNormAct, dense
from volo_jax.ops.patches import unfold
from volo_jax.ops.slices import window_slices

Dtype = Any


def involution_aggregate(
    x: jax.Array,
    kernels: jax.Array,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    impl: str = "slices",
    platform: str | None = None,
) -> jax.Array:
    """Applies per-position, per-group kernels to the K x K windows of `x`.

    Args:
      x: (B, H, W, C), C divisible by the number of groups G.
      kernels: (B, h, w, G, K*K), h, w the window grid of `unfold(x, K, stride, padding)`.
      impl: 'slices' (a running multiply-add over the K*K strided views of `x`; its
        gradient is pads and slices only) or 'unfold' (materialised windows, einsum).
      platform: the platform 'unfold''s product is for (`volo_jax.platforms`).
    Returns:
      (B, h, w, C).
    """
    b, height, width, c = x.shape
    groups, kk = kernels.shape[3], kernels.shape[4]
    geometry = (kernel_size, stride, padding, dilation)
    if c % groups or kk != kernel_size**2:
        raise ValueError(
            f"kernels of shape {kernels.shape} do not fit a {kernel_size}x{kernel_size} "
            f"involution of {c} channels ({groups} groups must divide them)"
        )
    grouped = x.reshape(b, height, width, groups, c // groups)
    kernels = kernels.astype(x.dtype)
    if impl == "unfold":
        windows = unfold(x, *geometry)  # (B, h, w, KK, C)
        h, w = windows.shape[1:3]
        windows = windows.reshape(b, h, w, kk, groups, c // groups)
        out = platforms.einsum("bhwgk,bhwkgc->bhwgc", kernels, windows, platform)
    elif impl == "slices":
        parts = window_slices(grouped, *geometry)  # K*K of (B, h, w, G, C/G)
        out = parts[0] * kernels[..., 0, None]
        for k in range(1, kk):
            out = out + parts[k] * kernels[..., k, None]
    else:
        raise ValueError(f"involution_aggregate: impl must be 'slices' or 'unfold', got {impl!r}")
    if out.shape[1:4] != kernels.shape[1:4]:
        raise ValueError(f"kernels of shape {kernels.shape} do not fit windows {out.shape}")
    return out.reshape(*out.shape[:3], c)


class Involution(nn.Module):
    """Involution with kernel generation as in RedNet.

    (avg-pool by stride) -> 1x1 conv C -> C / reduction + BN + ReLU -> 1x1 conv to
    G*K*K (with bias) -> per-position kernels applied to the K x K windows of the
    input (zero padded, stride s), shared within each group of C / G channels.

    Attributes:
      dim: channels C.
      kernel_size: K (RedNet: 7, 3 in the stem).
      stride: output stride s; kernels come from the s x s average-pooled input.
      groups: G; default C // 16 (RedNet's 16 channels a group).
      reduction: r of the kernel-generating bottleneck (RedNet: 4).
      proj: add a Dense `proj` after the aggregation (token-mixer use; not in RedNet).
      impl: 'slices' or 'unfold', see `involution_aggregate`.
    Input (B, H, W, C) -> (B, H / s, W / s, C).
    """

    dim: int
    kernel_size: int = 7
    stride: int = 1
    groups: int | None = None
    reduction: int = 4
    dilation: int = 1
    proj: bool = False
    impl: str = "slices"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @property
    def num_groups(self) -> int:
        return self.groups or max(self.dim // 16, 1)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _, height, width, c = x.shape
        g, k, s = self.num_groups, self.kernel_size, self.stride
        if c != self.dim or self.dim % g:
            raise ValueError(f"Involution(dim={self.dim}, groups={g}) got {c} channels")
        if height % s or width % s:
            raise ValueError(
                f"Involution with stride {s} needs H, W divisible by it, got {x.shape}"
            )
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        pooled = x if s == 1 else nn.avg_pool(x, (s, s), (s, s))
        y = ConvNormAct(self.dim // self.reduction, name="conv1", **dt)(pooled, train)
        y = ConvNormAct(k * k * g, norm=False, act=None, name="conv2", **dt)(y, train)
        b, h, w, _ = y.shape
        kernels = y.reshape(b, h, w, g, k * k)  # conv2 channel = g * K*K + (u * K + v)
        pad = self.dilation * (k - 1) // 2
        out = involution_aggregate(x, kernels, k, s, pad, self.dilation, self.impl, self.platform)
        if self.proj:
            out = dense(self.dim, ("heads", "embed"), name="proj", **dt)(out)
        return out
