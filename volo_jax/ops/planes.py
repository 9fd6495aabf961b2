"""Windows as unit-stride slices of stride planes: the layout of the CPU's outlook
attention (`outlook._aggregate_planes`).

With stride s, window (y, x) reads the padded image at rows s*y + i*d. Viewing the
padded image (B, s*Hq, s*Wq, ...) as planes (B, Hq, s, Wq, s, ...) (a reshape, no
copy), that row is plane (i*d) % s, position y + (i*d) // s: every window offset is a
unit-stride slice of one plane, and fold is, plane by plane, a sum of unit-stride
placements. XLA:CPU fuses such slices and placements into single loops where the
strided slices and interior-padded placements of `window_slices` / `fold_slices`
become strided, branchy loops or separate copies.

`to_planes` pads and views an input as planes; `planes_window_slices` and
`planes_unfold` read its windows; `fold_planes` is their adjoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from volo_jax.ops.geometry import IntOrPair, PatchGeometry, check_parts, pair


def _plane_extent(geometry: PatchGeometry, height: int, width: int) -> tuple[int, ...]:
    """(h, w, Hq, Wq): the window grid and the plane lengths for an (height, width)
    input, Hq*s covering the padded input and every window."""
    h, w = geometry.out_size(height, width)
    lengths = [
        max(-(-(n + 2 * p) // s), o + (k - 1) * d // s)
        for n, o, k, s, p, d in zip(
            (height, width),
            (h, w),
            geometry.kernel,
            geometry.stride,
            geometry.padding,
            geometry.dilation,
            strict=True,
        )
    ]
    return h, w, lengths[0], lengths[1]


def _checked_planes(
    planes: jax.Array, input_size: IntOrPair, geometry: PatchGeometry
) -> tuple[int, ...]:
    height, width = pair(input_size, "input_size")
    h, w, hq, wq = _plane_extent(geometry, height, width)
    expected = (hq, geometry.stride[0], wq, geometry.stride[1])
    if planes.ndim < 5 or tuple(planes.shape[1:5]) != expected:
        raise ValueError(
            f"planes of a {(height, width)} input with stride {geometry.stride} should be "
            f"(B, {', '.join(map(str, expected))}, ...), got shape {planes.shape}"
        )
    return h, w, hq, wq


def to_planes(
    x: jax.Array,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
) -> jax.Array:
    """Zero-pads x and views it as stride planes, for `planes_window_slices`,
    `planes_unfold` and (their adjoint) `fold_planes`.

    Args:
      x: (B, H, W, ...), any trailing feature dims.
    Returns:
      (B, Hq, sh, Wq, sw, ...): padded row r is [r // sh, r % sh] (columns alike).
    """
    geometry = PatchGeometry(kernel_size, stride, padding, dilation)
    b, height, width = x.shape[:3]
    _, _, hq, wq = _plane_extent(geometry, height, width)
    (sh, sw), (ph, pw) = geometry.stride, geometry.padding
    pad = [(0, 0), (ph, sh * hq - height - ph), (pw, sw * wq - width - pw)]
    xp = jnp.pad(x, pad + [(0, 0)] * (x.ndim - 3))
    return xp.reshape(b, hq, sh, wq, sw, *x.shape[3:])


def planes_window_slices(
    planes: jax.Array,
    input_size: IntOrPair,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
) -> list[jax.Array]:
    """`window_slices` of the input of `to_planes`, each a unit-stride slice of a plane.

    Args:
      planes: `to_planes(x, ...)` (same geometry) of x (B, H, W, ...).
      input_size: (H, W).
    Returns:
      kh*kw arrays (B, h, w, ...), offsets row-major (kh, kw).
    """
    geometry = PatchGeometry(kernel_size, stride, padding, dilation)
    h, w, _, _ = _checked_planes(planes, input_size, geometry)
    (kh, kw), (sh, sw), _, (dh, dw) = geometry.key()
    parts = []
    for i in range(kh):
        for j in range(kw):
            (qr, r), (qc, c) = divmod(i * dh, sh), divmod(j * dw, sw)
            parts.append(planes[:, qr : qr + h, r, qc : qc + w, c])
    return parts


def planes_unfold(
    planes: jax.Array,
    input_size: IntOrPair,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    axis: int = 3,
) -> jax.Array:
    """The windows of the input of `to_planes`, stacked at `axis`: constant-index
    gathers that XLA fuses with the transpose into one loop (`unfold` is a
    convolution; stacking `window_slices` a K*K-operand concatenate).

    Args:
      planes: `to_planes(x, ...)` (same geometry) of x (B, H, W, ...).
      input_size: (H, W).
      axis: where the kh*kw offsets go in the output; 3 gives `unfold`'s layout.
    Returns:
      (B, h, w, ...) with a kh*kw axis (offsets row-major) inserted at `axis`.
    """
    geometry = PatchGeometry(kernel_size, stride, padding, dilation)
    h, w, _, _ = _checked_planes(planes, input_size, geometry)
    (kh, kw), (sh, sw), _, (dh, dw) = geometry.key()
    rows = np.arange(h)[:, None] * sh + np.arange(kh)[None, :] * dh  # padded rows (h, kh)
    cols = np.arange(w)[:, None] * sw + np.arange(kw)[None, :] * dw
    windows = planes[:, rows // sh, rows % sh]  # (B, h, kh, Wq, sw, ...)
    windows = windows[:, :, :, cols // sw, cols % sw]  # (B, h, kh, w, kw, ...)
    rest = list(range(5, windows.ndim))
    axis = axis % (len(rest) + 4)
    if axis < 3:
        raise ValueError(f"planes_unfold: the offsets axis must follow (B, h, w), got {axis}")
    # One transpose to (B, h, w, rest[:axis - 3], kh, kw, rest[axis - 3:]) and one reshape.
    order = [0, 1, 3, *rest[: axis - 3], 2, 4, *rest[axis - 3 :]]
    windows = jnp.transpose(windows, order)
    shape = windows.shape
    return windows.reshape(*shape[:axis], kh * kw, *shape[axis + 2 :])


def fold_planes(
    parts: Sequence[jax.Array],
    output_size: IntOrPair,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
) -> jax.Array:
    """`fold_slices` plane by plane: each plane a sum of the unit-stride placements
    (`lax.pad`, no interior padding) of the offsets that land in it, the planes
    interleaved by a reshape and cropped. The adjoint of `planes_window_slices`.

    Args:
      parts: kh*kw arrays (B, h, w, ...), offsets row-major.
      output_size: (H, W).
    Returns:
      (B, H, W, ...).
    """
    geometry = PatchGeometry(kernel_size, stride, padding, dilation)
    height, width = pair(output_size, "output_size")
    h, w, hq, wq = _plane_extent(geometry, height, width)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry.key()
    check_parts(parts, "fold_planes", (height, width), (h, w), kh * kw)
    b, rest, dtype = parts[0].shape[0], parts[0].shape[3:], parts[0].dtype
    zero = jnp.zeros((), dtype)
    plane_rows = []
    for plane_r in range(sh):
        plane_row = []
        for plane_c in range(sw):
            total = None
            for k, part in enumerate(parts):
                (qr, r), (qc, c) = divmod((k // kw) * dh, sh), divmod((k % kw) * dw, sw)
                if (r, c) != (plane_r, plane_c):
                    continue
                config = [(0, 0, 0), (qr, hq - h - qr, 0), (qc, wq - w - qc, 0)]
                placed = lax.pad(part, zero, config + [(0, 0, 0)] * len(rest))
                total = placed if total is None else total + placed
            plane_row.append(jnp.zeros((b, hq, wq, *rest), dtype) if total is None else total)
        plane_rows.append(jnp.stack(plane_row, axis=3))  # (B, Hq, Wq, sw, ...)
    image = jnp.stack(plane_rows, axis=2).reshape(b, hq * sh, wq * sw, *rest)
    return image[:, ph : ph + height, pw : pw + width]
