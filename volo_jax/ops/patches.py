"""Unfold and fold, with each one's gradient computed by the other.

`unfold` gathers the K x K neighbourhood of every output position (PyTorch's
`nn.Unfold`), `fold` scatter-adds such windows back onto the image, summing where
they overlap (PyTorch's `F.fold`). Each is the linear adjoint (transpose) of the
other, and each one's gradient is computed with the other: the automatic
gradient of `lax.conv_general_dilated_patches` is a transposed one-hot convolution
that is an order of magnitude slower than the scatter-add.

Layout is NHWC throughout; windows are laid out as (B, h, w, K*K, C) with the
K*K offsets row-major (kh, kw), which is PyTorch's order once its channel-major
(C, kh, kw) rows are split. The same windows as K*K strided slices: `slices.py`;
as unit-stride slices of stride planes: `planes.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from volo_jax.ops.geometry import IntOrPair, PatchGeometry, pair


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
    size = pair(output_size, "output_size")
    expected = (*geometry.out_size(*size), geometry.kernel[0] * geometry.kernel[1])
    if cols.ndim != 5 or tuple(cols.shape[1:4]) != expected:
        raise ValueError(
            f"fold to {size} with kernel {geometry.kernel}, stride {geometry.stride}, padding "
            f"{geometry.padding} expects (B, {expected[0]}, {expected[1]}, {expected[2]}, C) "
            f"windows, got shape {cols.shape}"
        )
    return _fold(cols, size, geometry.key())
