"""Position-embedding resizing, numerically as PyTorch's `F.interpolate(mode='bicubic')`.

A checkpoint made at one resolution is loaded at another by resampling its
(1, h, w, C) position grid. timm (`resample_abs_pos_embed_nhwc`) uses
`antialias=True`; the official VOLO code (`resize_pos_embed_4d`) uses
`antialias=False`. Both are written here as separable weight matrices in NumPy,
so no torch is needed.
"""

from __future__ import annotations

import math

import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's bicubic, align_corners=False, no antialias."""
    scale = n_in / n_out
    out = np.zeros((n_out, n_in), np.float64)
    for o in range(n_out):
        src = (o + 0.5) * scale - 0.5
        i0 = math.floor(src)
        t = src - i0
        for tap in range(-1, 3):
            idx = min(max(i0 + tap, 0), n_in - 1)
            out[o, idx] += _cubic(np.array(t - tap), -0.75)
    return out


def _bicubic_aa_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's antialiased bicubic (PIL's filter, a = -0.5)."""
    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    out = np.zeros((n_out, n_in), np.float64)
    for o in range(n_out):
        center = scale * (o + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = np.arange(lo, hi)
        w = _cubic((taps - center + 0.5) * inv, -0.5)
        out[o, lo:hi] = w / w.sum()
    return out


def resize_pos_embed(
    pos_embed: np.ndarray, new_grid: tuple[int, int], antialias: bool = True
) -> np.ndarray:
    """Bicubic resampling of a position grid.

    Args:
      pos_embed: (1, h, w, C).
      new_grid: (H, W).
      antialias: timm's choice (True) or the official VOLO code's (False).
    Returns:
      (1, H, W, C), in pos_embed's dtype (computed in float64).
    """
    if pos_embed.ndim != 4 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, h, w, C), got {pos_embed.shape}")
    _, h, w, _ = pos_embed.shape
    if (h, w) == tuple(new_grid):
        return pos_embed
    matrix = _bicubic_aa_matrix if antialias else _bicubic_matrix
    rows, cols = matrix(h, new_grid[0]), matrix(w, new_grid[1])
    out = np.einsum("Hh,hwc,Ww->HWc", rows, pos_embed[0].astype(np.float64), cols)
    return out[None].astype(pos_embed.dtype)
