"""Layers shared by the models (`volo_jax.models`) and the operators (`volo_jax.ops`).

Convolutions and BatchNorm with PyTorch's conventions (`conv2d`, `BatchNorm`,
`ConvNormAct`, `get_act`), LayerNorm with PyTorch's epsilon, Dense layers with timm's
init (`dense`), the MLP, stochastic depth and the pooled classifier head of the convnets;
exact GELU and softmax whose backward passes keep one tensor each (`gelu`, `softmax`).

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
from jax import lax

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
) -> nn.Dense:
    """`nn.Dense` whose kernel (in, out) has the logical `axes` and whose bias has the
    output's; kernel init timm's truncated normal (std 0.02) unless given."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=with_axes(kernel_init or dense_init(), *axes),
        bias_init=with_axes(nn.initializers.zeros, axes[1]),
        name=name,
        dtype=dtype,
        param_dtype=param_dtype,
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
) -> nn.Conv:
    """PyTorch's `Conv2d` in NHWC: symmetric padding, (k - 1) // 2 unless given; kernel
    init He-normal over fan-out unless given. Kernel axes `CONV_AXES`, bias `bias_axis`.

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
    )


def patchify(
    features: int, patch: int, dtype: Dtype | None, param_dtype: Dtype, name: str
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


def batch_norm(train: bool, name: str, dtype: Dtype | None, param_dtype: Dtype) -> BatchNorm:
    """`BatchNorm` normalising with the batch's statistics when `train`, else the running ones."""
    return BatchNorm(use_running_average=not train, dtype=dtype, param_dtype=param_dtype, name=name)


def after(x: Any, token: jax.Array) -> Any:
    """x (an array or a tree of arrays) made to depend on `token`: each leaf plus zero
    times token's first element. The same values (-0.0 aside) wherever that element is
    finite, NaN where it is not (a cotangent with a NaN or an infinity gives non-finite
    gradients either way).

    For a backward pass that recomputes from saved inputs: XLA:CPU drops optimization
    barriers before it schedules (its barrier expander leaves no order behind), and its
    default scheduler starts work that reads forward values alone as early as it can,
    with the forward pass, keeping the recomputed tensors alive through the backward. A
    data dependence on the cotangent is an order XLA keeps; it also keeps XLA from
    merging the recomputation with the forward's (CSE).
    """
    zero = lax.slice(token, (0,) * token.ndim, (1,) * token.ndim).reshape(()) * 0
    return jax.tree_util.tree_map(lambda leaf: leaf + zero.astype(leaf.dtype), x)


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
    """PyTorch's LayerNorm (eps 1e-5; flax's default is 1e-6), scale and bias on 'norm',
    whose backward keeps only its input: autodiff of flax's LayerNorm keeps the centred
    input and the normalised input scaled, two more tensors of x's size per norm (four
    per VOLO block); here the backward recomputes them from x with the same operations.
    Same parameters, values and gradients. (..., C) -> (..., C); a mask, or axes other
    than the last, take flax's own path.
    """

    epsilon: float = 1e-5
    scale_init: Initializer = with_axes(nn.initializers.ones, "norm")
    bias_init: Initializer = with_axes(nn.initializers.zeros, "norm")

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        plain = (
            mask is None
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


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as PyTorch's `nn.GELU()`, whose backward keeps only its input.

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


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
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


softmax.defvjp(_softmax_fwd, _softmax_bwd)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": gelu,
}


def get_act(name: str | None) -> Callable[[jax.Array], jax.Array]:
    """An activation by name ('relu', 'silu', 'gelu'), or the identity for None / ''."""
    if not name:
        return lambda x: x
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(_ACTIVATIONS)}")
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


class ClassifierHead(nn.Module):
    """Global average pool -> dropout -> Linear `fc` (timm's `ClassifierHead` of the
    convnets). (B, H, W, C) -> (B, num_classes); `pre_logits`: the pooled (B, C).

    The kernel's input axis is 'pooled' (kept whole by the default rules)."""

    num_classes: int
    drop_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

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

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_dim = self.out_dim or x.shape[-1]
        x = dense(self.hidden_dim, ("embed", "mlp"), name="fc1", **dt)(x)
        x = gelu(x)
        x = nn.Dropout(self.drop, deterministic=not train)(x)
        x = dense(out_dim, ("mlp", "embed"), name="fc2", **dt)(x)
        return nn.Dropout(self.drop, deterministic=not train)(x)
