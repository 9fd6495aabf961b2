"""The CPU's kernels: what a function runs when it is lowered for XLA:CPU, in one place.

`cpu_kernels(fn)` wraps a function (a model's `apply`, a train step's forward) so that,
where it is lowered for the CPU, its matrix products and convolutions follow the rules
below, outlook attention's `impl="auto"` is 'planes' and self-attention forms its weights
with heads-major products (`ATTENTION_IMPLEMENTATION`); lowered for a GPU or a TPU it
is `fn` unchanged (`jax.lax.platform_dependent`: the branch is chosen by the platform
being lowered for, never by the host that traces, so an export made on a CPU host for a
TPU carries none of this). Models and operators are written with plain `nn.Dense`,
`nn.Conv`, `jnp.einsum` and `jax.nn.dot_product_attention`; the CPU branch rewrites
their products in the traced program.

The product rules. XLA:CPU runs a bf16 x bf16 -> f32 product on its matrix-unit library
(AMX where the CPU has it: about 5x the float32 rate on an AMX Xeon; AVX-512 BF16 on
AMD Zen 4/5), but a bf16 -> bf16 product on a generic path slower than float32. So:
- bfloat16 (or float16) operands: the product accumulates in float32 and is cast back
  to their dtype (or to the product's requested output dtype);
- float32 operands under `jax_default_matmul_precision` 'bfloat16' (what a TPU does
  with float32 by default; `--config.matmul_precision=bfloat16` in training): the
  operands are rounded to bfloat16 and the result stays float32;
- float32 otherwise: XLA's own product.
Operands are laid out row-major (batch, M, K) x (batch, K, N) first, the only form the
matrix-unit library takes. Gradients follow the same rule (custom VJPs), and a float32
operand's gradient stays float32. Convolutions: patch projections (stride = kernel) are
products over rows of patches; other convolutions are XLA's, in float32, with their
weight gradient as shifted products (`_shifted_weight_grad`). The measurements behind
each rule are in docs/performance.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import string
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import source_info_util  # keeps op names through the rewrite (profiles)
from jax.extend import core as jex

from volo_jax.layers import after
from volo_jax.ops.planes import fold_planes, planes_unfold, planes_window_slices, to_planes

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]
_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _low_precision(dtype: Any) -> bool:
    """Whether `dtype` is bfloat16 / float16."""
    return jnp.dtype(dtype) in _LOW_PRECISION


def _transpose_copy(x: jax.Array, perm: Sequence[int]) -> jax.Array:
    """`jnp.transpose(x, perm)` through a unit axis, which XLA keeps as a real copy: a plain
    transpose of a product's operand is folded into the dot's dimension numbers, and
    XLA:CPU then runs that dot in float32 with upcast operands."""
    return jnp.transpose(x[None], [0, *(i + 1 for i in perm)])[0]


def _operand_dtype(a: jax.Array, b: jax.Array, precision: Any) -> Any:
    """The dtype a product's operands are rounded to on the CPU (module docstring), or
    None to leave the product to XLA as it is."""
    if jnp.dtype(a.dtype) != jnp.dtype(b.dtype):
        return None
    dtype = jnp.dtype(a.dtype)
    if _low_precision(dtype):
        return dtype
    fast = str(jax.config.jax_default_matmul_precision).lower() in ("bfloat16", "fastest")
    if dtype == jnp.float32 and precision is None and fast:
        return jnp.dtype(jnp.bfloat16)
    return None


def _product_f32(spec: str, a: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
    """The product `spec` (explicit, no `...`) as one (batch, M, K) x (batch, K, N) matmul
    with float32 output, in `spec`'s output order.

    The operands are transposed and reshaped to that row-major form first: XLA:CPU's
    matrix-unit library takes only it, and a product over a transposed operand (a weight
    gradient, which sums over the tokens) would otherwise fall back to float32, or fail.
    """
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    batch = [c for c in sa if c in sb and c in out]
    contract = [c for c in sa if c in sb and c not in out]
    free_a = [c for c in sa if c not in sb]
    free_b = [c for c in sb if c not in sa]
    size = dict(zip(sa, a.shape, strict=True)) | dict(zip(sb, b.shape, strict=True))

    def as_matrix(x: jax.Array, sub: str, rows: list[str], cols: list[str]) -> jax.Array:
        perm = [sub.index(c) for c in batch + rows + cols]
        if perm != sorted(perm):
            x = _transpose_copy(x, perm)
        shape = [size[c] for c in batch]
        return x.reshape(
            *([np.prod(shape, dtype=int)] if batch else []),
            np.prod([size[c] for c in rows], dtype=int),
            np.prod([size[c] for c in cols], dtype=int),
        )

    lhs = as_matrix(a, sa, free_a, contract)
    rhs = as_matrix(b, sb, contract, free_b)
    nb = 1 if batch else 0
    dims = (((nb + 1,), (nb,)), ((0,), (0,)) if batch else ((), ()))
    y = lax.dot_general(lhs, rhs, dims, precision, preferred_element_type=jnp.float32)
    produced = batch + free_a + free_b
    y = y.reshape([size[c] for c in produced])
    return jnp.transpose(y, [produced.index(c) for c in out])


def _product(
    spec: str, a: jax.Array, b: jax.Array, precision: Any, dtype: Any, out_dtype: Any
) -> jax.Array:
    """`_product_f32` of `a` and `b` rounded to `dtype`, cast to `out_dtype`. Its gradients
    are such products too, each in its operand's own dtype: a float32 operand's gradient
    is the float32 result of bf16 operands, never rounded to bf16 on the way."""
    return _rounded_product(
        spec, a, b, precision, jnp.dtype(dtype), jnp.dtype(out_dtype), a.dtype, b.dtype
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5, 6, 7))
def _rounded_product(
    spec: str,
    a: jax.Array,
    b: jax.Array,
    precision: Any,
    dtype: Any,
    out_dtype: Any,
    a_dtype: Any,
    b_dtype: Any,
) -> jax.Array:
    return _product_f32(spec, a.astype(dtype), b.astype(dtype), precision).astype(out_dtype)


def _rounded_product_fwd(spec, a, b, precision, dtype, out_dtype, a_dtype, b_dtype):
    a, b = a.astype(dtype), b.astype(dtype)  # the residuals are the rounded operands
    return _product_f32(spec, a, b, precision).astype(out_dtype), (a, b)


def _rounded_product_bwd(spec, precision, dtype, out_dtype, a_dtype, b_dtype, residuals, g):
    a, b = residuals
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    # Every index of one operand is in the output or in the other operand (no index is
    # summed within a single operand), so each gradient is one more product.
    da = _product(f"{out},{sb}->{sa}", g, b, precision, dtype, a_dtype)
    db = _product(f"{sa},{out}->{sb}", a, g, precision, dtype, b_dtype)
    return da, db


_rounded_product.defvjp(_rounded_product_fwd, _rounded_product_bwd)


def _explicit_spec(spec: str, a: jax.Array, b: jax.Array) -> str:
    """`spec` with `...` spelled out as letters; checks that it is a plain two-operand
    product (no index summed within a single operand)."""
    spec = spec.replace(" ", "")
    inputs, sep, out = spec.partition("->")
    operands = inputs.split(",")
    if not sep or len(operands) != 2:
        raise ValueError(f"einsum spec {spec!r}: give two operands and an explicit '->'")
    if "..." in spec:
        spare = [c for c in string.ascii_uppercase if c not in spec]
        counts = [
            x.ndim - len(s) + 3 if "..." in s else 0 for s, x in zip(operands, (a, b), strict=True)
        ]
        widest = max(counts)
        operands = [
            s.replace("...", "".join(spare[widest - n : widest]))
            for s, n in zip(operands, counts, strict=True)
        ]
        out = out.replace("...", "".join(spare[:widest]))
    sa, sb = operands
    if set(sa) - set(out) - set(sb) or set(sb) - set(out) - set(sa):
        raise ValueError(f"einsum spec {spec!r}: an index is summed within one operand")
    return f"{sa},{sb}->{out}"


def einsum(spec: str, a: jax.Array, b: jax.Array, precision: Any = None) -> jax.Array:
    """`jnp.einsum` of two operands with an explicit `->`, with the CPU precision rule of
    the module docstring."""
    dtype = _operand_dtype(a, b, precision)
    if dtype is None:
        return jnp.einsum(spec, a, b, precision=precision)
    return _product(_explicit_spec(spec, a, b), a, b, precision, dtype, a.dtype)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: DimensionNumbers,
    precision: Any = None,
    preferred_element_type: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """`lax.dot_general` with the product rule of the module docstring; the result has
    `preferred_element_type` (default: the operands' dtype)."""
    dtype = _operand_dtype(lhs, rhs, precision)
    if kwargs.get("out_sharding") is None:
        kwargs.pop("out_sharding", None)
    if kwargs or dtype is None:
        return lax.dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs
        )
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    letters = iter(string.ascii_letters)
    sa: list[str] = [""] * lhs.ndim
    sb: list[str] = [""] * rhs.ndim
    batch = []
    for i, j in zip(lhs_batch, rhs_batch, strict=True):
        sa[i] = sb[j] = next(letters)
        batch.append(sa[i])
    for i, j in zip(lhs_contract, rhs_contract, strict=True):
        sa[i] = sb[j] = next(letters)
    free: list[str] = []
    for subscripts in (sa, sb):
        for i, letter in enumerate(subscripts):
            if not letter:
                subscripts[i] = next(letters)
                free.append(subscripts[i])
    spec = f"{''.join(sa)},{''.join(sb)}->{''.join(batch + free)}"
    out_dtype = lhs.dtype if preferred_element_type is None else preferred_element_type
    return _product(spec, lhs, rhs, precision, dtype, out_dtype)


_NHWC = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)
Padding = tuple[tuple[int, int], tuple[int, int]]


def _shifted_weight_grad(
    x: jax.Array,
    g: jax.Array,
    kernel: tuple[int, int],
    strides: tuple[int, int],
    pad: Padding,
    dtype: Any,
) -> jax.Array:
    """The weight gradient of an NHWC convolution, (kh, kw, C, O), float32: the input
    shifted (and strided) by each kernel offset, transposed (C x positions), times the
    output gradient (positions x O), as canonical batched products over chunks of output
    rows, summed over the chunks; the operands are `dtype` (bfloat16 under a bfloat16
    matmul precision).

    XLA:CPU computes it as a convolution with an output-sized kernel over transposed
    copies, at a fraction of the rate of its batched products (docs/performance.md has
    the stem's weight-gradient times and rates, with their machines).
    """
    kh, kw = kernel
    sh, sw = strides
    n, ho, wo, o = g.shape
    c = x.shape[-1]
    # Chunks of at least 1024 output positions: each product's reduction stays in cache.
    rows = max(d for d in range(1, ho + 1) if ho % d == 0 and (ho // d * wo >= 1024 or d == 1))
    s, k = n * rows, ho // rows * wo
    xt = jnp.transpose(jnp.pad(x.astype(dtype), ((0, 0), pad[0], pad[1], (0, 0))), (3, 0, 1, 2))
    gg = g.astype(dtype).reshape(s, k, o)
    taps = [
        # (C, N, Ho, Wo) -> (C, S, K) -> (S, C, K).
        _transpose_copy(
            xt[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw].reshape(
                c, s, k
            ),
            (1, 0, 2),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    # Offsets stacked up to 64 rows a product (one offset a product for 64+ channels, 21
    # for the 3 channels of an image): fewer, larger products for few channels, and no
    # stacked copy of a wide input, which would cost memory and time for nothing.
    per = max(1, 64 // c)
    dims = (((2,), (1,)), ((0,), (0,)))
    dw = [
        lax.dot_general(
            jnp.stack(taps[t : t + per], 1).reshape(s, -1, k),
            gg,
            dims,
            preferred_element_type=jnp.float32,
        ).sum(0)
        for t in range(0, len(taps), per)
    ]
    return jnp.concatenate(dw).reshape(kh, kw, c, o)


def _conv_xla(
    x: jax.Array, w: jax.Array, strides: tuple[int, int], pad: Padding, precision: Any
) -> jax.Array:
    return lax.conv_general_dilated(
        x, w, strides, pad, dimension_numbers=_NHWC, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_shifted_cpu(
    x: jax.Array,
    w: jax.Array,
    strides: tuple[int, int],
    pad: Padding,
    precision: Any,
    grad_dtype: Any,
) -> jax.Array:
    """XLA's NHWC / HWIO convolution and input gradient, with `_shifted_weight_grad`'s
    weight gradient (`grad_dtype` operands)."""
    return _conv_xla(x, w, strides, pad, precision)


def _conv_shifted_cpu_fwd(x, w, strides, pad, precision, grad_dtype):
    return _conv_xla(x, w, strides, pad, precision), (x, w)


def _conv_shifted_cpu_bwd(strides, pad, precision, grad_dtype, residuals, g):
    x, w = residuals
    # The weight gradient's shifted copies of x, 9x its size for a 3 x 3 kernel, read x
    # alone: XLA:CPU made them with the forward pass and kept them through the whole
    # backward until they waited for g (docs/performance.md, "Train-step memory on the
    # CPU").
    _, input_grad = jax.vjp(lambda x: _conv_xla(x, w, strides, pad, precision), x)
    (dx,) = input_grad(g)
    dw = _shifted_weight_grad(after(x, g), g, w.shape[:2], strides, pad, grad_dtype)
    return dx, dw.astype(w.dtype)


_conv_shifted_cpu.defvjp(_conv_shifted_cpu_fwd, _conv_shifted_cpu_bwd)


def _patch_conv(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
    """A convolution whose stride equals its kernel, unpadded (a patch projection, NHWC /
    HWIO): every output position is one kh x kw x C patch times the kernel, computed as kh
    products over rows of patches, (N, Ho, Wo, kw*C) x (kw*C, O), summed in float32, with
    this module's precision rule. XLA:CPU's convolution gradients are 2-3x slower at
    VOLO's patch projections (112 x 112 x 64 -> 28 x 28 x 192, 28 x 28 x 192 -> 14 x 14
    x 384), in float32 as in bfloat16."""
    n, h, wd, c = x.shape
    kh, kw, _, o = w.shape
    ho, wo = h // kh, wd // kw
    rows = x[:, : ho * kh, : wo * kw].reshape(n, ho, kh, wo, kw * c)
    kernel = w.reshape(kh, kw * c, o)
    dtype = _operand_dtype(x, w, precision)
    spec = "nhwk,ko->nhwo"
    terms = [
        jnp.einsum(spec, rows[:, :, i], kernel[i], precision=precision)
        if dtype is None
        else _product(spec, rows[:, :, i], kernel[i], precision, dtype, jnp.float32)
        for i in range(kh)
    ]
    return sum(terms[1:], terms[0]).astype(x.dtype)


def _cpu_rule(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: Any,
    feature_group_count: int,
    batch_group_count: int,
) -> tuple[str, Padding] | None:
    """Which of this module's CPU convolutions computes the convolution, with its explicit
    padding: "patch" (`_patch_conv`: stride = kernel, unpadded), "shifted"
    (`_conv_shifted_cpu`: any other kernel larger than 1 x 1); None for XLA's own. Both
    take 2-D NHWC / HWIO, undilated, ungrouped convolutions of one dtype."""
    if (
        lhs.ndim != 4
        or lhs.dtype != rhs.dtype
        or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        or feature_group_count != 1
        or batch_group_count != 1
        or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC
    ):
        return None
    kernel, strides = tuple(rhs.shape[:2]), tuple(window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], kernel, strides, padding)
    (top, bottom), (left, right) = padding
    pad = (int(top), int(bottom)), (int(left), int(right))
    if strides == kernel and pad == ((0, 0), (0, 0)):
        return "patch", pad
    if kernel != (1, 1):
        return "shifted", pad
    return None


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated`, with three CPU rules (pass as
    `nn.Conv(conv_general_dilated=...)`):
    - a convolution whose stride equals its kernel (patch projections) is `_patch_conv`'s
      products, with the precision rule of the module docstring;
    - other convolutions are XLA's in float32: low-precision operands are convolved in
      float32 (XLA:CPU's bf16 convolutions are no faster) and cast back, and a float32
      convolution stays float32 under any matmul precision;
    - except their weight gradient (kernels larger than 1 x 1), which is
      `_shifted_weight_grad`'s products (VOLO's stem), with the precision rule.
    """
    args = (
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
    )
    if preferred_element_type is not None:
        return lax.conv_general_dilated(lhs, rhs, *args, precision, preferred_element_type)
    rule = _cpu_rule(lhs, rhs, *args)
    if rule is not None and rule[0] == "patch":
        return _patch_conv(lhs, rhs, precision)
    low = _low_precision(lhs.dtype) and lhs.dtype == rhs.dtype
    x, w = (lhs.astype(jnp.float32), rhs.astype(jnp.float32)) if low else (lhs, rhs)
    if rule is not None and rule[0] == "shifted" and x.dtype == jnp.float32:
        grad_dtype = _operand_dtype(lhs, rhs, precision) or jnp.dtype(jnp.float32)
        out = _conv_shifted_cpu(x, w, tuple(window_strides), rule[1], precision, grad_dtype)
    else:
        out = lax.conv_general_dilated(x, w, *args, precision)
    return out.astype(lhs.dtype)


# ---------------------------------------------------------------------------------------------
# Outlook attention on the CPU
# ---------------------------------------------------------------------------------------------

#: What outlook attention's `impl="auto"` runs in the CPU branch: the fastest forward and
#: by far the fastest forward+backward on XLA:CPU, with the smallest memory plan
#: (benchmarks/bench_ops.py; docs/performance.md).
OUTLOOK_IMPLEMENTATION = "planes"

#: How `ops.attention.dot_product_attention` runs in the CPU branch: 'explicit' forms the
#: weights with heads-major products, (B, heads, N, d) operands, which XLA:CPU's batched
#: products take without a copy per operand; `jax.nn.dot_product_attention`'s token-major
#: einsums add two layout copies per block forward and eight per gradient (their cost is
#: in docs/performance.md).
#: 'fused' would call `jax.nn.dot_product_attention` as other platforms do.
ATTENTION_IMPLEMENTATION = "explicit"


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
def aggregate_planes(
    v: jax.Array, attn: jax.Array, kernel_size: int, stride: int, padding: int
) -> jax.Array:
    """Outlook aggregation (`outlook.outlook_aggregate`'s contract) on stride planes
    (`patches.to_planes`): every window offset a unit-stride slice, the K^4
    multiply-adds per window elementwise in float32, the fold a sum of unit-stride
    placements; XLA:CPU fuses the product and the fold into one loop. Custom VJP: d_attn
    is one batched matmul of the gathered windows of the cotangent and of v
    (`planes_unfold`, one fused gather each), d_v the transposed products folded the same
    way; no layout copies of the windows."""
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
    # A custom VJP's backward is traced after `cpu_kernels` has rewritten the program, so
    # its product picks the CPU rule itself ('planes' may be asked for on any platform).
    spec = "bxynid,bxynjd->bxynij"
    d_attn = lax.platform_dependent(
        g_windows,
        v_windows,
        cpu=functools.partial(einsum, spec),
        default=functools.partial(jnp.einsum, spec),
    )
    g_parts = [g_windows[:, :, :, :, k] for k in range(g_windows.shape[4])]
    d_v = fold_planes(_window_products(attn, g_parts, True), size, *geometry)
    return d_v.reshape(g.shape).astype(planes.dtype), d_attn.astype(attn.dtype)


aggregate_planes.defvjp(_aggregate_planes_fwd, _aggregate_planes_bwd)


# ---------------------------------------------------------------------------------------------
# XLA:CPU's instruction scheduler
# ---------------------------------------------------------------------------------------------

#: XLA:CPU's instruction schedulers (its `xla_cpu_scheduler_type` option) by the names a
#: config gives them. 'default' leaves the choice to XLA (and to `XLA_FLAGS`): XLA's
#: source takes its concurrency-optimized scheduler unless that plan costs much more
#: memory than the memory-optimized one (a ratio allowed that shrinks as programs grow).
#: 'memory' always takes the memory-optimized one (list, DFS and post-order schedules, the
#: smallest peak of the three); 'concurrency' always the other, which lets independent
#: operations run at once and starts work as early as its operands allow. Neither plans
#: less memory for every program, nor is faster (docs/performance.md, "Train-step memory
#: on the CPU", has VOLO-D1's plans and step times with each).
CPU_SCHEDULERS = {
    "default": None,
    "memory": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "concurrency": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
}


def compiler_options(platform: str, scheduler: str = "default") -> dict[str, str] | None:
    """`jax.jit(..., compiler_options=...)` for a function compiled for `platform`: XLA:CPU's
    `scheduler` (a key of `CPU_SCHEDULERS`) on the CPU; None (XLA's defaults) for
    'default' and on other platforms, whose compilers do not read the option."""
    if scheduler not in CPU_SCHEDULERS:
        raise ValueError(
            f"unknown CPU scheduler {scheduler!r}; choose one of {', '.join(CPU_SCHEDULERS)}"
        )
    value = CPU_SCHEDULERS[scheduler]
    if platform != "cpu" or value is None:
        return None
    return {"xla_cpu_scheduler_type": value}


# ---------------------------------------------------------------------------------------------
# The CPU branch
# ---------------------------------------------------------------------------------------------

#: What the code being traced is traced for: None (not decided: `cpu_kernels` leaves the
#: choice to the lowering), "other" (a GPU or TPU), an accelerator's platform ("tpu",
#: "cuda", "rocm": `for_platform`), "cpu", or "rewriting" (inside `cpu_kernels`' CPU
#: rewrite).
_TRACED_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "volo_jax_traced_for", default=None
)


@contextlib.contextmanager
def _traced_for(kind: str) -> Iterator[None]:
    token = _TRACED_FOR.set(kind)
    try:
        yield
    finally:
        _TRACED_FOR.reset(token)


def tracing_for_cpu() -> bool:
    """Whether the code being traced is for the CPU (`cpu_kernels`' CPU branch, or inside
    `for_platform(fn, "cpu")`). Trace-time choices such as outlook attention's
    `impl="auto"` read this, never the default backend."""
    return _TRACED_FOR.get() in ("cpu", "rewriting")


#: The device kind ('TPU v5 lite', 'NVIDIA H100 80GB HBM3') `for_platform` was given.
_DEVICE_KIND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "volo_jax_device_kind", default=None
)


def traced_device_kind() -> str | None:
    """The `jax.Device.device_kind` the code being traced is for, where the jit boundary
    gave a device (`for_platform(fn, device)`), else None."""
    return _DEVICE_KIND.get()


def traced_accelerator() -> str | None:
    """The accelerator platform ('tpu', 'cuda', 'rocm') the code being traced is for,
    where a jit boundary said so (`for_platform`); None where it is the CPU or not known
    at trace time (then `jax.lax.platform_dependent` decides when lowering)."""
    kind = _TRACED_FOR.get()
    return None if kind in (None, "other", "cpu", "rewriting") else kind


def _unset_precision(precision: Any) -> Any:
    """None for a precision a trace records when none was asked for (DEFAULT, under
    `jax.default_matmul_precision` too), which the rules read as 'unset'."""
    values = precision if isinstance(precision, tuple) else (precision,)
    return None if all(p in (None, lax.Precision.DEFAULT) for p in values) else precision


def _cpu_dot_general(lhs, rhs, *, dimension_numbers, precision, preferred_element_type, **kw):
    precision = _unset_precision(precision)
    return dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw)


def _cpu_conv(lhs, rhs, **params):
    if params.get("preferred_element_type") not in (None, lhs.dtype):
        return None
    params = {**params, "precision": _unset_precision(params["precision"])}
    return conv_general_dilated(
        lhs,
        rhs,
        params["window_strides"],
        params["padding"],
        params["lhs_dilation"],
        params["rhs_dilation"],
        params["dimension_numbers"],
        params["feature_group_count"],
        params["batch_group_count"],
        params["precision"],
    )


def _evaluate(jaxpr: jex.Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
    """Evaluates `jaxpr` on `args` (tracers of the enclosing trace), with this module's
    products for its `dot_general`s and convolutions, inside nested jits and remat blocks
    too; every other equation is bound as it is (custom derivatives, control flow)."""
    env: dict[Any, Any] = {}

    def read(var: Any) -> Any:
        return var.val if isinstance(var, jex.Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
        with (
            source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack),
            eqn.ctx.manager,
        ):
            outs = _rewrite(eqn, invals)
            if outs is None:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for var, value in zip(eqn.outvars, outs, strict=True):
            if not isinstance(var, jex.DropVar):
                env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _rewrite(eqn: jex.JaxprEqn, invals: list[Any]) -> Any:
    """The CPU version of one equation, or None to bind it unchanged."""
    name, params = eqn.primitive.name, eqn.params
    if name == "dot_general":
        return _cpu_dot_general(*invals, **params)
    if name == "conv_general_dilated":
        return _cpu_conv(*invals, **params)
    if name in ("jit", "pjit", "closed_call", "core_call"):
        inner = params.get("jaxpr", params.get("call_jaxpr"))
        if isinstance(inner, jex.ClosedJaxpr):
            return _evaluate(inner.jaxpr, inner.consts, *invals)
        return None
    if name in ("remat2", "checkpoint"):
        body = functools.partial(_evaluate, params["jaxpr"], ())
        remat = jax.checkpoint(body, prevent_cse=params["prevent_cse"], policy=params["policy"])
        return remat(*invals)
    return None


def cpu_kernels(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` that, lowered for the CPU, runs this module's products and outlook choice,
    and lowered for any other platform is `fn` itself.

    Array arguments (leaves of the positional and keyword arguments that are arrays) are
    traced; every other leaf (flags, names, `mutable=[...]`) is passed as it is. Use it
    where a model is applied, before any differentiation (the rewrite keeps the custom
    gradients of the rules): `cpu_kernels(model.apply)(variables, images, train=True)`.
    Inside `for_platform` the branch is taken at trace time; otherwise both are traced
    and `jax.lax.platform_dependent` keeps the one of the platform being lowered for.
    """

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        traced = [isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves]
        operands = [x for x, t in zip(leaves, traced, strict=True) if t]

        def call(*ops: Any) -> Any:
            it = iter(ops)
            full = [next(it) if t else x for x, t in zip(leaves, traced, strict=True)]
            a, kw = jax.tree_util.tree_unflatten(treedef, full)
            return fn(*a, **kw)

        def on_cpu(*ops: Any) -> Any:
            with _traced_for("rewriting"):
                closed, shapes = jax.make_jaxpr(call, return_shape=True)(*ops)
            with jax.named_scope("cpu_branch"):
                outs = _evaluate(closed.jaxpr, closed.consts, *ops)
            return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), outs)

        def elsewhere(*ops: Any) -> Any:
            with _traced_for("other"):
                return call(*ops)

        decided = _TRACED_FOR.get()
        if decided == "rewriting":  # already inside a CPU rewrite
            return call(*operands)
        if decided == "cpu":
            return on_cpu(*operands)
        if decided is not None:  # an accelerator
            return call(*operands)
        return lax.platform_dependent(*operands, cpu=on_cpu, default=elsewhere)

    return run


def for_platform(fn: Callable[..., Any], platform: str | jax.Device) -> Callable[..., Any]:
    """`fn` traced for `platform` alone ('cpu', 'gpu', 'cuda', 'rocm' or 'tpu', or a device
    of it, whose kind then reaches the trace-time choices too: `traced_device_kind`):
    every `cpu_kernels` inside it takes that platform's branch while tracing, one trace
    instead of one per branch (AD through `jax.lax.platform_dependent` retraces each
    branch, a train step's trace took about 3x as long). For jit boundaries whose devices
    are known, e.g. `for_platform(step, mesh.devices.flat[0])`; such a function must be
    lowered for that platform only."""
    device_kind = None
    if not isinstance(platform, str):
        platform, device_kind = platform.platform, platform.device_kind
    kind = {"cpu": "cpu", "gpu": "cuda"}.get(platform, platform)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        token = _DEVICE_KIND.set(device_kind)
        try:
            with _traced_for(kind):
                return fn(*args, **kwargs)
        finally:
            _DEVICE_KIND.reset(token)

    return run
