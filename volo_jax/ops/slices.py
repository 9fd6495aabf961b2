"""Windows as K*K shifted, strided views of the padded input (`window_slices`) and
fold as the sum of their strided placements (`fold_slices`, the transpose): the
unfold / fold of `patches.py` without materialising the (B, h, w, K*K, C) windows, so
an operator can run its product offset by offset and XLA fuses the slices into it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from volo_jax.ops.geometry import IntOrPair, PatchGeometry, check_parts, pair


def window_slices(
    x: jax.Array,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
) -> list[jax.Array]:
    """The K*K shifted, strided views of a zero-padded input, one per window offset.

    `jnp.stack(window_slices(x, ...), axis=3)` equals `unfold(x, ...)`; callers may
    stack at another axis for the layout their next op wants.

    Args:
      x: (B, H, W, ...), any trailing feature dims.
    Returns:
      kh*kw arrays (B, h, w, ...), offsets row-major (kh, kw).
    """
    geometry = PatchGeometry(kernel_size, stride, padding, dilation)
    h, w = geometry.out_size(x.shape[1], x.shape[2])
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry.key()
    pad = [(0, 0), (ph, ph), (pw, pw)] + [(0, 0)] * (x.ndim - 3)
    xp = jnp.pad(x, pad)
    return [
        xp[:, i * dh : i * dh + sh * (h - 1) + 1 : sh, j * dw : j * dw + sw * (w - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]


def fold_slices(
    parts: Sequence[jax.Array],
    output_size: IntOrPair,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
) -> jax.Array:
    """`fold` as a sum of K*K shifted, strided placements (`lax.pad` with interior
    padding), the transpose of `window_slices`.

    Args:
      parts: kh*kw arrays (B, h, w, ...), offsets row-major.
    Returns:
      (B, H, W, ...).
    """
    geometry = PatchGeometry(kernel_size, stride, padding, dilation)
    height, width = pair(output_size, "output_size")
    h, w = geometry.out_size(height, width)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry.key()
    check_parts(parts, "fold_slices", (height, width), (h, w), kh * kw)
    zero = jnp.zeros((), parts[0].dtype)
    total = None
    for k, part in enumerate(parts):
        r0, c0 = (k // kw) * dh, (k % kw) * dw
        # Place row y at r0 + y * sh of the padded image, then crop the padding.
        config = [
            (0, 0, 0),
            (r0 - ph, height + ph - (r0 + sh * (h - 1) + 1), sh - 1),
            (c0 - pw, width + pw - (c0 + sw * (w - 1) + 1), sw - 1),
        ] + [(0, 0, 0)] * (part.ndim - 3)
        placed = lax.pad(part, zero, config)
        total = placed if total is None else total + placed
    return total
