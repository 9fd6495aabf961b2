"""Unfold and fold: the two primitives every local operator here is built from.

`unfold` gathers the K x K neighbourhood of every output position (PyTorch's
`nn.Unfold`), `fold` scatter-adds such windows back onto the image, summing where
they overlap (PyTorch's `F.fold`). Each is the linear adjoint (transpose) of the
other, and each one's gradient is computed with the other: the automatic
gradient of `lax.conv_general_dilated_patches` is a transposed one-hot convolution
that is an order of magnitude slower than the scatter-add.

Layout is NHWC throughout; windows are laid out as (B, h, w, K*K, C) with the
K*K offsets row-major (kh, kw), which is PyTorch's order once its channel-major
(C, kh, kw) rows are split.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IntOrPair = int | Sequence[int]


def _pair(value: IntOrPair, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


class PatchGeometry:
    """Kernel, stride, padding and dilation of an unfold/fold pair, as (h, w) pairs."""

    def __init__(
        self,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
    ) -> None:
        self.kernel = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        if min(self.kernel + self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(
                f"kernel {self.kernel}, stride {self.stride} and dilation {self.dilation} must "
                f"be >= 1 and padding {self.padding} >= 0"
            )

    def key(self) -> tuple[tuple[int, int], ...]:
        return (self.kernel, self.stride, self.padding, self.dilation)

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        """Number of window positions (h, w) on an (height, width) input."""
        sizes = []
        for n, k, s, p, d in zip(
            (height, width), self.kernel, self.stride, self.padding, self.dilation, strict=True
        ):
            span = d * (k - 1) + 1
            if n + 2 * p < span:
                raise ValueError(
                    f"input of size {(height, width)} with padding {self.padding} is smaller "
                    f"than the dilated kernel {self.kernel} (dilation {self.dilation})"
                )
            sizes.append((n + 2 * p - span) // s + 1)
        return sizes[0], sizes[1]


def _unfold_impl(x: jax.Array, key: tuple) -> jax.Array:
    (kh, kw), stride, (ph, pw), dilation = key
    b, _, _, c = x.shape
    patches = lax.conv_general_dilated_patches(
        x,
        filter_shape=(kh, kw),
        window_strides=stride,
        padding=((ph, ph), (pw, pw)),
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "OIHW", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )  # (B, h, w, C*kh*kw), channel-major
    h, w = patches.shape[1:3]
    return patches.reshape(b, h, w, c, kh * kw).swapaxes(-1, -2)


def _fold_impl(cols: jax.Array, output_size: tuple[int, int], key: tuple) -> jax.Array:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = key
    b, h, w, _, c = cols.shape
    height, width = output_size
    # Room for every window, also those a floor division in `out_size` left partial.
    rows = max(height + 2 * ph, (kh - 1) * dh + sh * (h - 1) + 1)
    cols_ = max(width + 2 * pw, (kw - 1) * dw + sw * (w - 1) + 1)
    out = jnp.zeros((b, rows, cols_, c), cols.dtype)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw
            out = out.at[:, r0 : r0 + sh * (h - 1) + 1 : sh, c0 : c0 + sw * (w - 1) + 1 : sw].add(
                cols[:, :, :, i * kw + j]
            )
    return out[:, ph : ph + height, pw : pw + width]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _unfold(x: jax.Array, key: tuple) -> jax.Array:
    return _unfold_impl(x, key)


def _unfold_fwd(x: jax.Array, key: tuple) -> tuple[jax.Array, tuple[int, int]]:
    return _unfold_impl(x, key), x.shape[1:3]


def _unfold_bwd(key: tuple, size: tuple[int, int], g: jax.Array) -> tuple[jax.Array]:
    return (_fold(g, size, key),)


_unfold.defvjp(_unfold_fwd, _unfold_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _fold(cols: jax.Array, output_size: tuple[int, int], key: tuple) -> jax.Array:
    return _fold_impl(cols, output_size, key)


def _fold_fwd(cols: jax.Array, output_size: tuple[int, int], key: tuple) -> tuple[jax.Array, None]:
    return _fold_impl(cols, output_size, key), None


def _fold_bwd(output_size: tuple[int, int], key: tuple, _: None, g: jax.Array) -> tuple[jax.Array]:
    return (_unfold(g, key),)


_fold.defvjp(_fold_fwd, _fold_bwd)


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


def _check_parts(
    parts: Sequence[jax.Array],
    caller: str,
    output_size: tuple[int, int],
    grid: tuple[int, int],
    count: int,
) -> None:
    """Raises ValueError unless `parts` are `count` arrays (B, *grid, ...)."""
    if len(parts) != count or any(tuple(p.shape[1:3]) != grid for p in parts):
        raise ValueError(
            f"{caller} to {output_size} expects {count} parts (B, {grid[0]}, {grid[1]}, ...), "
            f"got {[tuple(p.shape) for p in parts]}"
        )


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
    height, width = _pair(output_size, "output_size")
    h, w = geometry.out_size(height, width)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry.key()
    _check_parts(parts, "fold_slices", (height, width), (h, w), kh * kw)
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


def unfold(
    x: jax.Array,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
) -> jax.Array:
    """Extracts the K x K window around every output position (zero padded).

    Args:
      x: (B, H, W, C).
    Returns:
      (B, h, w, kh*kw, C) with h, w as for a convolution of the same geometry.
    """
    if x.ndim != 4:
        raise ValueError(f"unfold expects (B, H, W, C), got shape {x.shape}")
    geometry = PatchGeometry(kernel_size, stride, padding, dilation)
    geometry.out_size(x.shape[1], x.shape[2])  # validates the geometry against the input
    return _unfold(x, geometry.key())


def fold(
    cols: jax.Array,
    output_size: IntOrPair,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
) -> jax.Array:
    """Scatter-adds windows back onto an image, summing where they overlap.

    The adjoint of `unfold` with the same geometry; no normalisation by the number
    of overlapping windows (as PyTorch's `F.fold`).

    Args:
      cols: (B, h, w, kh*kw, C), h and w as `unfold` gives for `output_size`.
      output_size: (H, W) of the image.
    Returns:
      (B, H, W, C).
    """
    geometry = PatchGeometry(kernel_size, stride, padding, dilation)
    size = _pair(output_size, "output_size")
    expected = (*geometry.out_size(*size), geometry.kernel[0] * geometry.kernel[1])
    if cols.ndim != 5 or tuple(cols.shape[1:4]) != expected:
        raise ValueError(
            f"fold to {size} with kernel {geometry.kernel}, stride {geometry.stride}, padding "
            f"{geometry.padding} expects (B, {expected[0]}, {expected[1]}, {expected[2]}, C) "
            f"windows, got shape {cols.shape}"
        )
    return _fold(cols, size, geometry.key())


# --------------------------------------------------------------------------- planes
#
# With stride s, window (y, x) reads the padded image at rows s*y + i*d. Viewing the
# padded image (B, s*Hq, s*Wq, ...) as planes (B, Hq, s, Wq, s, ...) (a reshape, no
# copy), that row is plane (i*d) % s, position y + (i*d) // s: every window offset is a
# unit-stride slice of one plane, and fold is, plane by plane, a sum of unit-stride
# placements. XLA:CPU fuses such slices and placements into single loops where the
# strided slices and interior-padded placements of `window_slices` / `fold_slices`
# become strided, branchy loops or separate copies.


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
    height, width = _pair(input_size, "input_size")
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
    height, width = _pair(output_size, "output_size")
    h, w, hq, wq = _plane_extent(geometry, height, width)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry.key()
    _check_parts(parts, "fold_planes", (height, width), (h, w), kh * kw)
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
