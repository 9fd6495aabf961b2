"""What the TPU (Mosaic) and GPU (Triton) outlook kernels share: the window grid,
integer helpers that lower on both, and the softmax over a list of K*K arrays."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from volo_jax.ops.geometry import PatchGeometry


def window_grid(height: int, width: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """(h, w): the windows on an (height, width) input (`ops.geometry`)."""
    return PatchGeometry(kernel, stride, padding).out_size(height, width)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def divmod_(a, b: int):
    """divmod of a non-negative int or traced scalar (lax.div/rem: no sign handling,
    which Mosaic lowers only on a TPU host)."""
    if isinstance(a, int):
        return divmod(a, b)
    return jax.lax.div(a, b), jax.lax.rem(a, b)


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def softmax(logits: list[jax.Array]) -> list[jax.Array]:
    """Softmax over the list (the K*K input offsets), elementwise over the arrays."""
    top = functools.reduce(jnp.maximum, logits)
    e = [jnp.exp(x - top) for x in logits]
    inv = 1.0 / functools.reduce(jnp.add, e)
    return [x * inv for x in e]


def softmax_vjp(p: list[jax.Array], dp: list[jax.Array]) -> list[jax.Array]:
    """d_logits_j = P_j * (dP_j - sum_j' P_j' dP_j')."""
    total = functools.reduce(jnp.add, [a * b for a, b in zip(p, dp, strict=True)])
    return [a * (b - total) for a, b in zip(p, dp, strict=True)]
