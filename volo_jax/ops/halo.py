"""Halo attention (Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient
Visual Backbones", CVPR 2021), equal to timm's `timm.layers.HaloAttn`.

The map is cut into non-overlapping b x b query blocks; each block attends to its
(b + 2h) x (b + 2h) neighbourhood (the block and a halo of h pixels, zero padded at the
borders and not masked, as timm), i.e. the windows `unfold(kv, b + 2h, stride=b,
padding=h)`. Relative position logits come from separate height and width tables.
Parameter names as timm: q, kv (1x1 convs), pos_embed/height_rel, pos_embed/width_rel.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from volo_jax import platforms
from volo_jax.layers import conv2d, dense, with_axes
from volo_jax.ops.patches import unfold

Dtype = Any


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """timm's `make_divisible`: round to a multiple of `divisor`, never below 90%."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def relative_logits(
    q: jax.Array, height_rel: jax.Array, width_rel: jax.Array, platform: str | None = None
) -> jax.Array:
    """Relative position logits of queries in a block against keys in its window.

    For a query at (y, x) of the block and a key at (ky, kx) of the window:
    q . height_rel[ky - y + win - 1] + q . width_rel[kx - x + win - 1] (timm's
    `PosEmbedRel`).

    Args:
      q: (..., bq, bq, d), queries of one block laid out on their grid.
      height_rel, width_rel: (2 * win - 1, d).
      platform: the platform the products are for (`volo_jax.platforms`).
    Returns:
      (..., bq * bq, win * win).
    """
    bq = q.shape[-2]
    win = (height_rel.shape[0] + 1) // 2
    index = np.arange(win)[None, :] - np.arange(bq)[:, None] + win - 1  # (bq, win)
    rel_h = platforms.einsum("...yxd,ykd->...yxk", q, height_rel[index].astype(q.dtype), platform)
    rel_w = platforms.einsum("...yxd,xkd->...yxk", q, width_rel[index].astype(q.dtype), platform)
    rel = rel_h[..., :, None] + rel_w[..., None, :]  # (..., bq, bq, win, win)
    return rel.reshape(*q.shape[:-3], bq * bq, win * win)


class PosEmbedRel(nn.Module):
    """The two relative position tables (2 * win - 1, dim_head) of `HaloAttn`."""

    win_size: int
    dim_head: int
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, q: jax.Array) -> jax.Array:
        """q: (..., bq, bq, dim_head) -> (..., bq * bq, win * win)."""
        init = with_axes(nn.initializers.truncated_normal(self.dim_head**-0.5), "rel_pos", None)
        shape = (2 * self.win_size - 1, self.dim_head)
        height_rel = self.param("height_rel", init, shape, self.param_dtype)
        width_rel = self.param("width_rel", init, shape, self.param_dtype)
        return relative_logits(q, height_rel, width_rel, self.platform)


class HaloAttn(nn.Module):
    """Multi-head halo attention, timm's `HaloAttn` in NHWC.

    Attributes:
      dim: input channels; dim_out: output channels (dim if None), = heads * dim_head_v.
      stride: 1 or 2; 2 subsamples the queries in each block (block_size_ds = b / 2),
        or, with avg_down or an odd block, average-pools the stride-1 output.
      num_heads, dim_head: heads and q/k channels a head (default
        make_divisible(dim_out * qk_ratio) // heads).
      block_size, halo_size: b and h; H and W must be multiples of b.
      scale_pos_embed: scale the relative logits with q.k (else added after scaling).
      proj: add a Dense `proj` on the output (token-mixer use; not in timm).
    Input (B, H, W, dim) -> (B, H / stride, W / stride, dim_out).
    """

    dim: int
    dim_out: int | None = None
    stride: int = 1
    num_heads: int = 8
    dim_head: int | None = None
    block_size: int = 8
    halo_size: int = 3
    qk_ratio: float = 1.0
    qkv_bias: bool = False
    avg_down: bool = False
    scale_pos_embed: bool = False
    proj: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, height, width, c = x.shape
        dim_out = self.dim_out or self.dim
        heads, bs, halo = self.num_heads, self.block_size, self.halo_size
        if c != self.dim or dim_out % heads or self.stride not in (1, 2):
            raise ValueError(
                f"HaloAttn(dim={self.dim}, dim_out={dim_out}, num_heads={heads}, "
                f"stride={self.stride}) got {c} channels"
            )
        if height % bs or width % bs:
            raise ValueError(f"HaloAttn: H, W must be multiples of block_size {bs}, got {x.shape}")
        dqk = self.dim_head or make_divisible(dim_out * self.qk_ratio) // heads
        dv = dim_out // heads
        win = bs + 2 * halo
        use_pool = self.stride > 1 and (self.avg_down or bs % self.stride != 0)
        q_stride = self.stride if self.stride > 1 and not use_pool else 1
        bq = bs // q_stride  # queries a block side
        nh, nw = height // bs, width // bs

        conv = dict(
            padding=0,
            use_bias=self.qkv_bias,
            kernel_init=nn.initializers.truncated_normal(self.dim**-0.5),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            platform=self.platform,
        )
        q = conv2d(heads * dqk, 1, q_stride, name="q", **conv)(x)
        kv = conv2d(heads * (dqk + dv), 1, name="kv", **conv)(x)

        # Queries: (B, nh, nw, heads, bq, bq, dqk); channels are head-major.
        q = q.reshape(b, nh, bq, nw, bq, heads, dqk).transpose(0, 1, 3, 5, 2, 4, 6)
        # Keys and values: the (win x win) window of every block, keys row-major.
        windows = unfold(kv, win, stride=bs, padding=halo)  # (B, nh, nw, win*win, heads*(dqk+dv))
        windows = windows.reshape(b, nh, nw, win * win, heads, dqk + dv)
        k, v = windows[..., :dqk], windows[..., dqk:]

        scale = dqk**-0.5
        logits = platforms.einsum("bijnyxd,bijknd->bijnyxk", q, k, self.platform).reshape(
            b, nh, nw, heads, bq * bq, win * win
        )
        rel = PosEmbedRel(win, dqk, self.param_dtype, self.platform, name="pos_embed")(q)
        logits = (logits + rel) * scale if self.scale_pos_embed else logits * scale + rel
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = platforms.einsum("bijnqk,bijknd->bijqnd", attn, v, self.platform)
        # out: (B, nh, nw, bq*bq, heads, dv)
        out = out.reshape(b, nh, nw, bq, bq, heads * dv).transpose(0, 1, 3, 2, 4, 5)
        out = out.reshape(b, nh * bq, nw * bq, heads * dv)
        if use_pool:
            out = nn.avg_pool(out, (2, 2), (2, 2))
        if self.proj:
            dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
            out = dense(dim_out, ("heads", "embed"), name="proj", **dt)(out)
        return out
