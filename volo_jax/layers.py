"""Layers shared by the models (`volo_jax.models`) and the operators (`volo_jax.ops`).

Convolutions and BatchNorm with PyTorch's conventions (`conv2d`, `BatchNorm`,
`ConvNormAct`, `get_act`), LayerNorm with PyTorch's epsilon, Dense layers with timm's
init (`dense`), the MLP, stochastic depth and the pooled classifier head of the convnets;
exact GELU, softmax and LayerNorm.

Every layer takes the `platform` its model is built for (`volo_jax.platforms`): for the
CPU, `dense` and `conv2d` carry the CPU's products and convolutions in flax's injection
points, and `gelu`, `softmax` and `TorchLayerNorm` have backward passes that keep one
tensor each (`RULES[platform].recompute_in_backward`).

Every parameter is made with its logical axes, one name a dimension (`with_axes`, flax's
logical partitioning): 'embed' the model width, 'heads' and 'mlp' the dimensions tensor
parallelism splits, 'classes', 'norm' and the conv_* names. `volo_jax.sharding.rules`
maps the names onto the device mesh. `model.init` returns the values boxed with their
names; `unbox` (`flax.linen.unbox`) strips them where variables are made, so that
`apply`, optax, orbax and the converter see plain arrays.

This module imports nothing from `volo_jax.models` or `volo_jax.ops`: both import it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta

from volo_jax import platforms
from volo_jax.platforms.cpu import after

Dtype = Any
Initializer = Callable[..., Any]

#: Unboxes a variables tree made by `init`: the plain arrays that `apply`, optax,
#: orbax and the converter take (`flax.core.meta.unbox`).
unbox = meta.unbox


def with_axes(init: Initializer, *names: str | None) -> Initializer:
    """`init` whose value carries the logical axis `names`, one a dimension (flax's
    `nn.with_logical_partitioning`); None: a dimension that is never split."""
    return nn.with_logical_partitioning(init, names)


def dense_init() -> nn.initializers.Initializer:
    """timm's init for Linear weights: truncated normal, std 0.02 (biases zero)."""
    return nn.initializers.truncated_normal(0.02)


#: He-normal over fan-out, the init of timm's / mmcv's convolutions.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

#: Logical axes of a convolution kernel (kh, kw, C_in / groups, C_out).
CONV_AXES = ("conv_height", "conv_width", "conv_in", "embed")


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    use_bias: bool = True,
    kernel_init: Initializer | None = None,
    name: str | None = None,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    platform: str | None = None,
) -> nn.Dense:
    """`nn.Dense` whose kernel (in, out) has the logical `axes` and whose bias has the
    output's; kernel init timm's truncated normal (std 0.02) unless given; `platform`'s
    products."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=with_axes(kernel_init or dense_init(), *axes),
        bias_init=with_axes(nn.initializers.zeros, axes[1]),
        name=name,
        dtype=dtype,
        param_dtype=param_dtype,
        dot_general=platforms.rules(platform).dot_general,
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
    kernel_init: Initializer = conv_init,
    bias_axis: str = "conv_bias",
    platform: str | None = None,
) -> nn.Conv:
    """PyTorch's `Conv2d` in NHWC: symmetric padding, (k - 1) // 2 unless given; kernel
    init He-normal over fan-out unless given. Kernel axes `CONV_AXES`, bias `bias_axis`;
    `platform`'s convolution.

    (B, H, W, C_in) -> (B, H', W', features), H' = (H + 2 padding - k) // stride + 1.
    """
    pad = (kernel_size - 1) // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=with_axes(kernel_init, *CONV_AXES),
        bias_init=with_axes(nn.initializers.zeros, bias_axis),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        conv_general_dilated=platforms.rules(platform).conv_general_dilated,
    )


def patchify(
    features: int,
    patch: int,
    dtype: Dtype | None,
    param_dtype: Dtype,
    name: str,
    platform: str | None = None,
) -> nn.Conv:
    """Non-overlapping patch projection: a conv with kernel = stride = `patch`, with bias
    (flax's default init); its bias goes with the width ('embed')."""
    return conv2d(
        features,
        patch,
        patch,
        padding=0,
        use_bias=True,
        name=name,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.linear.default_kernel_init,
        bias_axis="embed",
        platform=platform,
    )


class BatchNorm(nn.BatchNorm):
    """BatchNorm with PyTorch's defaults (eps 1e-5, momentum 0.1: flax's 0.9), its scale,
    bias and running statistics on the logical axis 'norm'. (..., C) -> (..., C)."""

    momentum: float = 0.9
    epsilon: float = 1e-5
    scale_init: Initializer = with_axes(nn.initializers.ones, "norm")
    bias_init: Initializer = with_axes(nn.initializers.zeros, "norm")

    @nn.nowrap
    def variable(self, col: str, name: str, init_fn: Any = None, *init_args: Any, **kw: Any) -> Any:
        # flax's BatchNorm makes its running statistics here, without metadata.
        if col == "batch_stats" and init_fn is not None:
            init_fn = with_axes(init_fn, "norm")
        return super().variable(col, name, init_fn, *init_args, **kw)


def batch_norm(
    train: bool,
    name: str,
    dtype: Dtype | None,
    param_dtype: Dtype,
    platform: str | None = None,
) -> BatchNorm:
    """`BatchNorm` normalising with the batch's statistics when `train`, else the running
    ones. It is the same on every platform; `platform` is taken with the other layer
    settings (`dtype`, `param_dtype`) that modules pass on together."""
    return BatchNorm(use_running_average=not train, dtype=dtype, param_dtype=param_dtype, name=name)


@functools.cache
def _layer_norm_keeping_input(
    epsilon: float, dtype: Dtype | None, param_dtype: Dtype, fast_variance: bool, f32: bool
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """(x, scale, bias) -> flax's LayerNorm of x over its last axis with these settings,
    whose backward keeps x, scale and bias and recomputes the rest (`TorchLayerNorm`)."""
    plain = nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=fast_variance,
        force_float32_reductions=f32,
    )

    def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
        return plain.apply({"params": {"scale": scale, "bias": bias}}, x)

    @jax.custom_vjp
    def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
        return normalize(x, scale, bias)

    def forward(x: jax.Array, scale: jax.Array, bias: jax.Array) -> tuple[jax.Array, Any]:
        return normalize(x, scale, bias), (x, scale, bias)

    def backward(saved: Any, g: jax.Array) -> tuple[jax.Array, ...]:
        return jax.vjp(normalize, *after(saved, g))[1](g)

    layer_norm.defvjp(forward, backward)
    return layer_norm


class TorchLayerNorm(nn.LayerNorm):
    """PyTorch's LayerNorm (eps 1e-5; flax's default is 1e-6), scale and bias on 'norm'.
    Built for a platform that recomputes in the backward (the CPU), its backward keeps
    only its input: autodiff of flax's LayerNorm keeps the centred input and the
    normalised input scaled, two more tensors of x's size per norm (four per VOLO
    block); here the backward recomputes them from x with the same operations. Same
    parameters, values and gradients. (..., C) -> (..., C); a mask, or axes other than
    the last, take flax's own path.
    """

    epsilon: float = 1e-5
    scale_init: Initializer = with_axes(nn.initializers.ones, "norm")
    bias_init: Initializer = with_axes(nn.initializers.zeros, "norm")
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        plain = (
            platforms.rules(self.platform).recompute_in_backward
            and mask is None
            and self.use_bias
            and self.use_scale
            and self.axis_name is None
            and self.reduction_axes in (-1, (-1,))
            and self.feature_axes in (-1, (-1,))
        )
        if not plain:
            return super().__call__(x, mask=mask)
        features = (x.shape[-1],)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        layer_norm = _layer_norm_keeping_input(
            self.epsilon,
            self.dtype,
            self.param_dtype,
            self.use_fast_variance,
            self.force_float32_reductions,
        )
        return layer_norm(x, scale, bias)


def _gelu_erf(x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=False)


def gelu(x: jax.Array, platform: str | None = None) -> jax.Array:
    """Exact (erf) GELU, as PyTorch's `nn.GELU()`; built for a platform that recomputes
    in the backward, with `_gelu_keeping_input`'s backward. (...) -> (...)."""
    if platforms.rules(platform).recompute_in_backward:
        return _gelu_keeping_input(x)
    return _gelu_erf(x)


@jax.custom_vjp
def _gelu_keeping_input(x: jax.Array) -> jax.Array:
    """Exact GELU whose backward keeps only its input.

    Autodiff of `nn.gelu(x, approximate=False)` keeps its two derivative terms (erfc and
    exp of the input, two more tensors of x's size per MLP) from the forward to the
    backward; here the backward recomputes them from x, with the same operations (the
    pullback of `nn.gelu`), fused with the product by the cotangent. Same values and
    gradients; (...) -> (...).
    """
    return _gelu_erf(x)


def _gelu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _gelu_erf(x), x


def _gelu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    # `after`: otherwise XLA merges the recomputed erfc with the forward's (CSE) and
    # keeps that alive until here again.
    return jax.vjp(_gelu_erf, after(x, g))[1](g)


_gelu_keeping_input.defvjp(_gelu_fwd, _gelu_bwd)


def softmax(x: jax.Array, axis: int = -1, platform: str | None = None) -> jax.Array:
    """`jax.nn.softmax(x, axis)`; built for a platform that recomputes in the backward,
    with `_softmax_keeping_output`'s backward. (...) -> (...)."""
    if platforms.rules(platform).recompute_in_backward:
        return _softmax_keeping_output(x, axis)
    return jax.nn.softmax(x, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax_keeping_output(x: jax.Array, axis: int) -> jax.Array:
    """`jax.nn.softmax(x, axis)` whose backward reads only its output y:
    dx = y * (g - sum(g * y)). Autodiff of `jax.nn.softmax` reads the unnormalised
    exponentials and their sums instead, so a train step keeps both them and y (which the
    attention product's gradient needs) from the forward to the backward: two tensors
    of the attention weights' size per attention layer where this keeps one.
    Same values; gradients equal within float rounding. (...) -> (...).
    """
    return jax.nn.softmax(x, axis=axis)


def _softmax_fwd(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    y = jax.nn.softmax(x, axis=axis)
    return y, y


def _softmax_bwd(axis: int, y: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (y * (g - jnp.sum(g * y, axis=axis, keepdims=True)),)


_softmax_keeping_output.defvjp(_softmax_fwd, _softmax_bwd)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": gelu,
}


def get_act(name: str | None, platform: str | None = None) -> Callable[[jax.Array], jax.Array]:
    """An activation by name ('relu', 'silu', 'gelu': `gelu` for `platform`), or the
    identity for None / ''."""
    if not name:
        return lambda x: x
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(_ACTIVATIONS)}")
    if name == "gelu":
        return functools.partial(gelu, platform=platform)
    return _ACTIVATIONS[name]


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
    platform: str | None = None

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
            platform=self.platform,
            **dt,
        )(x)
        if self.norm:
            x = batch_norm(train, "bn", **dt)(x)
        return get_act(self.act, self.platform)(x)


class ClassifierHead(nn.Module):
    """Global average pool -> dropout -> Linear `fc` (timm's `ClassifierHead` of the
    convnets). (B, H, W, C) -> (B, num_classes); `pre_logits`: the pooled (B, C).

    The kernel's input axis is 'pooled' (kept whole by the default rules)."""

    num_classes: int
    drop_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, pre_logits: bool = False) -> jax.Array:
        x = jnp.mean(x, axis=(1, 2))
        if pre_logits:
            return x
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        return dense(
            self.num_classes,
            ("pooled", "classes"),
            kernel_init=nn.initializers.normal(0.01),
            name="fc",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            platform=self.platform,
        )(x)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample (rng 'dropout').

    Input (B, ...) -> same shape; survivors are scaled by 1 / (1 - rate).
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        broadcast = tuple(range(1, x.ndim))
        return nn.Dropout(self.rate, broadcast_dims=broadcast, deterministic=False)(x)


class Mlp(nn.Module):
    """fc1 -> exact GELU (`gelu`) -> dropout -> fc2 -> dropout. (..., C) -> (..., out_dim or C).

    fc1 is column-parallel ('embed', 'mlp'), fc2 row-parallel ('mlp', 'embed')."""

    hidden_dim: int
    out_dim: int | None = None
    drop: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        out_dim = self.out_dim or x.shape[-1]
        x = dense(self.hidden_dim, ("embed", "mlp"), name="fc1", **dt)(x)
        x = gelu(x, self.platform)
        x = nn.Dropout(self.drop, deterministic=not train)(x)
        x = dense(out_dim, ("mlp", "embed"), name="fc2", **dt)(x)
        return nn.Dropout(self.drop, deterministic=not train)(x)
