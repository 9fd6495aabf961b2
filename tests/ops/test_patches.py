"""unfold / fold against plain NumPy loops, their adjointness and their gradients."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from jax import test_util as jtu

from volo_jax.ops import fold, unfold

GEOMETRIES = [
    # (H, W, kernel, stride, padding, dilation)
    (7, 6, 3, 2, 1, 1),  # VOLO's outlook geometry on an odd-sized grid
    (8, 8, 3, 2, 1, 1),
    (6, 9, (2, 3), (1, 2), (0, 1), 1),
    (9, 9, 3, 1, 2, 2),  # dilated
    (5, 5, 1, 1, 0, 1),
    (10, 7, 4, 3, 1, 1),
]


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def unfold_loop(x, kernel, stride, padding, dilation):
    """NumPy reference: (B, H, W, C) -> (B, h, w, kh*kw, C)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel, stride, padding, dilation))
    b, height, width, c = x.shape
    padded = np.zeros((b, height + 2 * ph, width + 2 * pw, c), x.dtype)
    padded[:, ph : ph + height, pw : pw + width] = x
    h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((b, h, w, kh * kw, c), x.dtype)
    for i, j, ki, kj in itertools.product(range(h), range(w), range(kh), range(kw)):
        out[:, i, j, ki * kw + kj] = padded[:, i * sh + ki * dh, j * sw + kj * dw]
    return out


def fold_loop(cols, size, kernel, stride, padding, dilation):
    """NumPy reference: (B, h, w, kh*kw, C) -> (B, H, W, C), overlaps summed."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel, stride, padding, dilation))
    b, h, w, _, c = cols.shape
    height, width = size
    padded = np.zeros((b, height + 2 * ph + sh + dh * kh, width + 2 * pw + sw + dw * kw, c))
    for i, j, ki, kj in itertools.product(range(h), range(w), range(kh), range(kw)):
        padded[:, i * sh + ki * dh, j * sw + kj * dw] += cols[:, i, j, ki * kw + kj]
    return padded[:, ph : ph + height, pw : pw + width].astype(cols.dtype)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_unfold_and_fold_match_loops(geometry):
    height, width, *geo = geometry
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, height, width, 3)).astype(np.float32)
    expected = unfold_loop(x, *geo)
    np.testing.assert_allclose(np.asarray(unfold(x, *geo)), expected, rtol=0, atol=1e-6)
    cols = rng.standard_normal(expected.shape).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(fold(cols, (height, width), *geo)),
        fold_loop(cols, (height, width), *geo),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_fold_is_the_adjoint_of_unfold(geometry):
    height, width, *geo = geometry
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, height, width, 3))
    cols = rng.standard_normal(unfold_loop(x, *geo).shape)
    lhs = np.vdot(np.asarray(unfold(x.astype(np.float32), *geo), np.float64), cols)
    rhs = np.vdot(x, np.asarray(fold(cols.astype(np.float32), (height, width), *geo), np.float64))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


@pytest.mark.parametrize("geometry", GEOMETRIES[:4])
def test_gradients_match_finite_differences(geometry):
    height, width, *geo = geometry
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, height, width, 2)).astype(np.float32)
    cols = rng.standard_normal(unfold_loop(x, *geo).shape).astype(np.float32)
    tol = dict(atol=2e-2, rtol=2e-2, eps=1e-2)
    jtu.check_grads(lambda a: unfold(a, *geo), (x,), order=2, modes=["rev"], **tol)
    jtu.check_grads(
        lambda c: fold(c, (height, width), *geo), (cols,), order=2, modes=["rev"], **tol
    )


def test_bad_geometry_is_a_clear_error():
    x = np.zeros((1, 4, 4, 2), np.float32)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        unfold(x, 7)
    with pytest.raises(ValueError, match="expects"):
        fold(np.zeros((1, 3, 3, 9, 2), np.float32), (4, 4), 3, 2, 1)
    with pytest.raises(ValueError, match="kernel_size"):
        unfold(x, (3, 3, 3))
