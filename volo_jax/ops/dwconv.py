"""Convolution blocks: conv + BatchNorm + activation, depth-wise convolution and the
dynamic depth-wise convolution of "Demystifying Local Vision Transformer" (Han et al.,
arXiv 2106.04263; DWNet, github Atten4Vis/DemystifyLocalViT).

Parameter names follow the PyTorch modules they port (`conv`, `bn`, DWNet's `conv0`,
`bn0`, ...), so `volo_jax.convert.torch_to_flax` converts their state dicts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from volo_jax.ops.patches import unfold, window_slices

Dtype = Any

#: He-normal over fan-out, the init of timm's / mmcv's convolutions.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
}


def get_act(name: str | None) -> Callable[[jax.Array], jax.Array]:
    """An activation by name ('relu', 'silu', 'gelu'), or the identity for None / ''."""
    if not name:
        return lambda x: x
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def batch_norm(train: bool, name: str, dtype: Dtype | None, param_dtype: Dtype) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (eps 1e-5, momentum 0.1)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def conv2d(
    features: int,
    kernel_size: int,
    stride: int = 1,
    padding: int | None = None,
    groups: int = 1,
    use_bias: bool = False,
    name: str | None = None,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
) -> nn.Conv:
    """PyTorch's `Conv2d` in NHWC: symmetric padding, (k - 1) // 2 unless given."""
    pad = (kernel_size - 1) // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class ConvNormAct(nn.Module):
    """conv -> BatchNorm -> activation, named `conv`, `bn` (timm's `ConvNormAct`,
    mmcv's `ConvModule`). Without the norm the conv gets a bias (mmcv's bias='auto').

    Input (B, H, W, C_in) -> (B, H / stride, W / stride, features).
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    padding: int | None = None
    groups: int = 1
    norm: bool = True
    act: str | None = "relu"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv2d(
            self.features,
            self.kernel_size,
            self.stride,
            self.padding,
            self.groups,
            use_bias=not self.norm,
            name="conv",
            **dt,
        )(x)
        if self.norm:
            x = batch_norm(train, "bn", **dt)(x)
        return get_act(self.act)(x)


def dynamic_depthwise_conv(
    x: jax.Array,
    kernels: jax.Array,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    impl: str = "slices",
) -> jax.Array:
    """A K x K depth-wise convolution with a different kernel for every image.

    Args:
      x: (B, H, W, C).
      kernels: (B, K*K, C), offsets row-major (kh, kw).
      impl: 'slices' (running multiply-add over strided views) or 'unfold'.
    Returns:
      (B, h, w, C): out[b, i, j, c] = sum_k kernels[b, k, c] * x[b, i*s + kh - p, j*s + kw - p, c].
    """
    kernels = kernels.astype(x.dtype)
    if impl == "unfold":
        windows = unfold(x, kernel_size, stride, padding)  # (B, h, w, KK, C)
        return jnp.einsum("bhwkc,bkc->bhwc", windows, kernels)
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

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, _, _, c = x.shape
        if c != self.dim:
            raise ValueError(f"DynamicDWConv(dim={self.dim}) got {c} channels")
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        k = self.kernel_size
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)  # (B, 1, 1, C)
        y = conv2d(self.dim // self.reduction, 1, name="conv1", **dt)(pooled)
        y = nn.relu(batch_norm(train, "bn", **dt)(y))
        y = conv2d(self.dim * k * k, 1, use_bias=True, name="conv2", **dt)(y)
        # conv2's channel o = c * K*K + (kh * K + kw), as torch's view(B*C, 1, K, K).
        kernels = y.reshape(b, c, k * k).swapaxes(1, 2)
        padding = k // 2 if self.padding is None else self.padding
        out = dynamic_depthwise_conv(x, kernels, k, self.stride, padding, self.impl)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.dim,), self.param_dtype)
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

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"DWBlock(dim={self.dim}) got {x.shape[-1]} channels")
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        k = self.kernel_size
        x = conv2d(self.dim, 1, name="conv0", **dt)(x)
        x = nn.relu(batch_norm(train, "bn0", **dt)(x))
        if self.dynamic:
            x = DynamicDWConv(self.dim, k, padding=k // 2, impl=self.impl, name="conv", **dt)(
                x, train
            )
        else:
            x = conv2d(
                self.dim, k, padding=k // 2, groups=self.dim, use_bias=True, name="conv", **dt
            )(x)
        x = nn.relu(batch_norm(train, "bn", **dt)(x))
        x = conv2d(self.dim, 1, name="conv2", **dt)(x)
        return batch_norm(train, "bn2", **dt)(x)
