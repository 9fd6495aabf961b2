"""Matrix products for every layer: `dot_general` (for flax's `Dense`), `einsum`, and the
`Dense` and `Conv` built on them.

On GPU and TPU, and for float32 on the CPU by default, they are exactly `lax.dot_general`
/ `jnp.einsum`. On the CPU, products run with bfloat16 operands and float32 accumulation:
- when the operands are bfloat16 (or float16): the result is cast back to their dtype;
- when they are float32 and `jax_default_matmul_precision` is 'bfloat16' (what a TPU does
  with float32 by default; `jax.default_matmul_precision("bfloat16")`, or
  `--config.matmul_precision=bfloat16` in training): the operands are rounded to bfloat16
  and the result stays float32, so everything between the products stays float32.
Gradients follow the same rule (a custom VJP whose two gradient products are such
products too). The reason: XLA:CPU runs a bf16 x bf16 -> f32 product on its matrix-unit
library (AMX where the CPU has it: about 5x the float32 rate on this project's CPU), but a
bf16 -> bf16 product on a generic path slower than float32.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]
_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _low_precision_on_cpu(dtype: Any) -> bool:
    """Whether `dtype` is bfloat16 / float16 and the default backend is the CPU."""
    return jnp.dtype(dtype) in _LOW_PRECISION and jax.default_backend() == "cpu"


def _operand_dtype(a: jax.Array, b: jax.Array, precision: Any) -> Any:
    """The dtype a product's operands are rounded to on the CPU (module docstring), or
    None to leave the product to XLA as it is."""
    if jax.default_backend() != "cpu" or jnp.dtype(a.dtype) != jnp.dtype(b.dtype):
        return None
    dtype = jnp.dtype(a.dtype)
    if _low_precision_on_cpu(dtype):
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
            # Transposed through a unit axis: XLA folds a plain transpose of an operand
            # into the product's dimension numbers, and then runs it in float32.
            x = jnp.transpose(x[None], [0, *(i + 1 for i in perm)])[0]
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _product(spec: str, a: jax.Array, b: jax.Array, precision: Any, out_dtype: Any) -> jax.Array:
    """`_product_f32` cast to `out_dtype`; its gradients are such products too."""
    return _product_f32(spec, a, b, precision).astype(out_dtype)


def _product_fwd(spec: str, a: jax.Array, b: jax.Array, precision: Any, out_dtype: Any):
    return _product(spec, a, b, precision, out_dtype), (a, b)


def _product_bwd(spec: str, precision: Any, out_dtype: Any, residuals, g: jax.Array):
    a, b = residuals
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    g = g.astype(a.dtype)
    # Every index of one operand is in the output or in the other operand (no index is
    # summed within a single operand), so each gradient is one more product.
    da = _product(f"{out},{sb}->{sa}", g, b, precision, a.dtype)
    db = _product(f"{sa},{out}->{sb}", a, g, precision, b.dtype)
    return da, db


_product.defvjp(_product_fwd, _product_bwd)


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


def _low_precision_product(
    spec: str, a: jax.Array, b: jax.Array, precision: Any, dtype: Any
) -> jax.Array:
    """The product with operands rounded to `dtype`, returned in the operands' dtype."""
    return _product(spec, a.astype(dtype), b.astype(dtype), precision, a.dtype)


def einsum(spec: str, a: jax.Array, b: jax.Array, precision: Any = None) -> jax.Array:
    """`jnp.einsum` of two operands with an explicit `->`, with the CPU precision rule of
    the module docstring."""
    dtype = _operand_dtype(a, b, precision)
    if dtype is None:
        return jnp.einsum(spec, a, b, precision=precision)
    return _low_precision_product(_explicit_spec(spec, a, b), a, b, precision, dtype)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: DimensionNumbers,
    precision: Any = None,
    preferred_element_type: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """`lax.dot_general` with `einsum`'s precision rule; pass as `nn.Dense(dot_general=...)`."""
    dtype = _operand_dtype(lhs, rhs, precision)
    if preferred_element_type is not None or kwargs or dtype is None:
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
    return _low_precision_product(spec, lhs, rhs, precision, dtype)


def conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, *args: Any, preferred_element_type: Any = None, **kwargs: Any
) -> jax.Array:
    """`lax.conv_general_dilated`; low-precision operands on the CPU are convolved in float32
    (XLA:CPU's bf16 convolutions are slower than its float32 ones) and cast back, and a
    float32 convolution stays float32 under any matmul precision. Pass as
    `nn.Conv(conv_general_dilated=...)`."""
    low = _low_precision_on_cpu(lhs.dtype) and lhs.dtype == rhs.dtype
    if preferred_element_type is not None or not low:
        return lax.conv_general_dilated(
            lhs, rhs, *args, preferred_element_type=preferred_element_type, **kwargs
        )
    out = lax.conv_general_dilated(
        lhs.astype(jnp.float32), rhs.astype(jnp.float32), *args, **kwargs
    )
    return out.astype(lhs.dtype)


#: flax's Dense and Conv with these products: what every layer in the project uses.
Dense = functools.partial(nn.Dense, dot_general=dot_general)
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
