"""XLA:CPU's numerics: the matrix products, convolutions and scheduling a model built for
the CPU (`create_model(..., platform="cpu")`, `volo_jax.platforms`) runs.

`dot_general` and `conv_general_dilated` go into flax's own injection points
(`nn.Dense(dot_general=...)`, `nn.Conv(conv_general_dilated=...)`, which
`layers.dense` / `layers.conv2d` fill for the CPU), `einsum` into the operators' own
products. A model built for a TPU or a GPU holds none of them.

The product rules. XLA:CPU runs a bf16 x bf16 -> f32 product on its matrix-unit library
(AMX where the CPU has it; AVX-512 BF16 on AMD Zen 4/5), but a bf16 -> bf16 product on a
generic path slower than float32. So:
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
weight gradient as shifted products (`_shifted_weight_grad`). Every rule runs under the
name scope `SCOPE`, so a program shows where they are. The measurements behind each
rule are in docs/performance.md.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

#: The name scope of every rule here (op names read `.../cpu_rules/...`).
SCOPE = "cpu_rules"

F = TypeVar("F", bound=Callable[..., Any])


def _scoped(fn: F) -> F:
    """`fn` run under the name scope `SCOPE`."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with jax.named_scope(SCOPE):
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


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


@_scoped
def einsum(
    spec: str,
    a: jax.Array,
    b: jax.Array,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`jnp.einsum` of two operands with an explicit `->`, with the CPU precision rule of
    the module docstring; the result has `preferred_element_type` (default: a's dtype)."""
    dtype = _operand_dtype(a, b, precision)
    if dtype is None:
        return jnp.einsum(
            spec, a, b, precision=precision, preferred_element_type=preferred_element_type
        )
    out_dtype = a.dtype if preferred_element_type is None else preferred_element_type
    return _product(_explicit_spec(spec, a, b), a, b, precision, dtype, out_dtype)


@_scoped
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
    this module's precision rule. XLA:CPU's convolution gradients are slower at VOLO's
    patch projections (112 x 112 x 64 -> 28 x 28 x 192, 28 x 28 x 192 -> 14 x 14 x 384),
    in float32 as in bfloat16 (docs/performance.md, the patch-convolution row)."""
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


@_scoped
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
