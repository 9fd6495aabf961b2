"""Depth-wise convolution token mixers: DWNet's block with a static or a dynamic
depth-wise convolution, from "Demystifying Local Vision Transformer" (Han et al., arXiv
2106.04263; github Atten4Vis/DemystifyLocalViT). Conv, BatchNorm: `volo_jax.layers`.

Parameter names follow the PyTorch modules they port (`conv`, `bn`, DWNet's `conv0`,
`bn0`, ...), so `volo_jax.convert.torch_to_flax` converts their state dicts.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from volo_jax import platforms
from volo_jax.layers import batch_norm, conv2d, with_axes
from volo_jax.ops.patches import unfold
from volo_jax.ops.slices import window_slices

Dtype = Any


def dynamic_depthwise_conv(
    x: jax.Array,
    kernels: jax.Array,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    impl: str = "slices",
    platform: str | None = None,
) -> jax.Array:
    """A K x K depth-wise convolution with a different kernel for every image.

    Args:
      x: (B, H, W, C).
      kernels: (B, K*K, C), offsets row-major (kh, kw).
      impl: 'slices' (running multiply-add over strided views) or 'unfold'.
      platform: the platform 'unfold''s product is for (`volo_jax.platforms`).
    Returns:
      (B, h, w, C): out[b, i, j, c] = sum_k kernels[b, k, c] * x[b, i*s + kh - p, j*s + kw - p, c].
    """
    kernels = kernels.astype(x.dtype)
    if impl == "unfold":
        windows = unfold(x, kernel_size, stride, padding)  # (B, h, w, KK, C)
        return platforms.einsum("bhwkc,bkc->bhwc", windows, kernels, platform)
    if impl != "slices":
        raise ValueError(f"dynamic_depthwise_conv: impl must be 'slices' or 'unfold', got {impl!r}")
    parts = window_slices(x, kernel_size, stride, padding)
    out = parts[0] * kernels[:, None, None, 0]
    for k in range(1, len(parts)):
        out = out + parts[k] * kernels[:, None, None, k]
    return out


class DynamicDWConv(nn.Module):
    """SE-style dynamic depth-wise convolution (DWNet's `DynamicDWConv`).

    Global average pool -> 1x1 conv C -> C / reduction (no bias) -> BN -> ReLU -> 1x1
    conv to C*K*K: one K x K kernel per channel per image, shared over positions, plus
    a static bias (C,) initialised to zero. Names: conv1, bn, conv2, bias.

    Input (B, H, W, C) -> (B, H', W', C), H' = (H + 2 padding - K) // stride + 1.
    """

    dim: int
    kernel_size: int = 7
    stride: int = 1
    padding: int | None = None  # K // 2
    reduction: int = 4
    use_bias: bool = True
    impl: str = "slices"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, _, _, c = x.shape
        if c != self.dim:
            raise ValueError(f"DynamicDWConv(dim={self.dim}) got {c} channels")
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = dict(platform=self.platform, **dt)
        k = self.kernel_size
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)  # (B, 1, 1, C)
        y = conv2d(self.dim // self.reduction, 1, name="conv1", **conv)(pooled)
        y = nn.relu(batch_norm(train, "bn", **dt)(y))
        y = conv2d(self.dim * k * k, 1, use_bias=True, name="conv2", **conv)(y)
        # conv2's channel o = c * K*K + (kh * K + kw), as torch's view(B*C, 1, K, K).
        kernels = y.reshape(b, c, k * k).swapaxes(1, 2)
        padding = k // 2 if self.padding is None else self.padding
        out = dynamic_depthwise_conv(x, kernels, k, self.stride, padding, self.impl, self.platform)
        if self.use_bias:
            init = with_axes(nn.initializers.zeros, "conv_bias")
            bias = self.param("bias", init, (self.dim,), self.param_dtype)
            out = out + bias.astype(out.dtype)
        return out


class DWBlock(nn.Module):
    """DWNet's token mixer (`DWBlock`), the replacement of Swin's window attention:
    1x1 conv -> BN -> ReLU -> K x K depth-wise conv (static with bias, or dynamic)
    -> BN -> ReLU -> 1x1 conv -> BN. Names conv0, bn0, conv, bn, conv2, bn2.

    Input (B, H, W, C) -> (B, H, W, C). `num_heads` is accepted for the token-mixer
    interface and unused.
    """

    dim: int
    num_heads: int = 1
    kernel_size: int = 7
    dynamic: bool = False
    impl: str = "slices"  # of the dynamic conv, see `dynamic_depthwise_conv`
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"DWBlock(dim={self.dim}) got {x.shape[-1]} channels")
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = dict(platform=self.platform, **dt)
        k = self.kernel_size
        x = conv2d(self.dim, 1, name="conv0", **conv)(x)
        x = nn.relu(batch_norm(train, "bn0", **dt)(x))
        if self.dynamic:
            x = DynamicDWConv(self.dim, k, padding=k // 2, impl=self.impl, name="conv", **conv)(
                x, train
            )
        else:
            x = conv2d(
                self.dim, k, padding=k // 2, groups=self.dim, use_bias=True, name="conv", **conv
            )(x)
        x = nn.relu(batch_norm(train, "bn", **dt)(x))
        x = conv2d(self.dim, 1, name="conv2", **conv)(x)
        return batch_norm(train, "bn2", **dt)(x)
