"""Swin window attention (Liu et al., "Swin Transformer", ICCV 2021), as timm's
`WindowAttention` inside `SwinTransformerBlock._attn`.

Multi-head self-attention within non-overlapping M x M windows, with a learned
relative position bias table ((2M - 1)^2, heads); with a shift, the map is rolled by
-shift before partitioning and the windows that straddle the roll's seam are masked
(-100) between regions, then rolled back. Names as timm: qkv, proj,
relative_position_bias_table.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from volo_jax import platforms
from volo_jax.layers import dense, with_axes

Dtype = Any


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/M, W/M, M*M, C), tokens of a window row-major.

    The same layout as `unfold(x, M, stride=M)`: non-overlapping windows are a reshape.
    """
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).swapaxes(2, 3)
    return x.reshape(b, h // window, w // window, window * window, c)


def window_reverse(windows: jax.Array, window: int) -> jax.Array:
    """The inverse of `window_partition`: (B, h, w, M*M, C) -> (B, h*M, w*M, C)."""
    b, h, w, _, c = windows.shape
    x = windows.reshape(b, h, w, window, window, c).swapaxes(2, 3)
    return x.reshape(b, h * window, w * window, c)


def relative_position_index(window: int) -> np.ndarray:
    """(M*M, M*M) index into the ((2M - 1)^2) bias table: (dy + M - 1)(2M - 1) + dx + M - 1."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + window - 1  # (2, N, N)
    return rel[0] * (2 * window - 1) + rel[1]


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """(nW, M*M, M*M) additive mask: 0 within a region, -100 across regions (timm)."""
    regions = np.zeros((height, width), np.float32)
    cuts = ((0, -window), (-window, -shift), (-shift, None))
    for n, (h0, h1) in enumerate(cuts):
        for m, (w0, w1) in enumerate(cuts):
            regions[h0:h1, w0:w1] = 3 * n + m
    nh, nw = height // window, width // window
    ids = regions.reshape(nh, window, nw, window).swapaxes(1, 2).reshape(-1, window * window)
    return np.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
    """(Shifted) window multi-head self-attention with relative position bias.

    Attributes:
      dim: channels C; num_heads heads of head_dim (default C / heads) each.
      window_size: M; the map is zero padded (bottom/right) to multiples of M.
      shift_size: cyclic shift (Swin's odd blocks: M // 2); 0 for none.
    Input (B, H, W, C) -> (B, H, W, C).
    """

    dim: int
    num_heads: int
    window_size: int = 7
    shift_size: int = 0
    head_dim: int | None = None
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, height, width, c = x.shape
        m, shift, heads = self.window_size, self.shift_size, self.num_heads
        if c != self.dim or not 0 <= shift < m:
            raise ValueError(
                f"WindowAttention(dim={self.dim}, window={m}, shift={shift}) got {c} channels"
            )
        head_dim = self.head_dim or self.dim // heads
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        table = self.param(
            "relative_position_bias_table",
            with_axes(nn.initializers.truncated_normal(0.02), "rel_pos", None),
            ((2 * m - 1) ** 2, heads),
            self.param_dtype,
        )
        if shift:
            x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
        pad_h, pad_w = -height % m, -width % m
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        windows = window_partition(x, m)  # (B, h, w, N, C)
        nh, nw, n = windows.shape[1:4]

        qkv = dense(
            3 * heads * head_dim, ("embed", "heads"), use_bias=self.qkv_bias, name="qkv", **dt
        )(windows)
        q, k, v = jnp.moveaxis(qkv.reshape(b, nh, nw, n, 3, heads, head_dim), 4, 0)
        logits = platforms.einsum("bijqhd,bijkhd->bijhqk", q * head_dim**-0.5, k, self.platform)
        bias = table[relative_position_index(m)].transpose(2, 0, 1)  # (heads, N, N)
        logits = logits + bias.astype(logits.dtype)
        if shift:
            mask = shifted_window_mask(height + pad_h, width + pad_w, m, shift)
            logits = logits + jnp.asarray(mask.reshape(nh, nw, 1, n, n), logits.dtype)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        attn = nn.Dropout(self.attn_drop, deterministic=not train)(attn)
        out = platforms.einsum("bijhqk,bijkhd->bijqhd", attn, v, self.platform)
        out = out.reshape(b, nh, nw, n, heads * head_dim)
        out = dense(self.dim, ("heads", "embed"), name="proj", **dt)(out)
        out = nn.Dropout(self.proj_drop, deterministic=not train)(out)
        x = window_reverse(out, m)[:, :height, :width]
        if shift:
            x = jnp.roll(x, (shift, shift), axis=(1, 2))
        return x
