"""Outlook attention's Pallas kernels for CUDA GPUs (Triton), forward and backward:
`triton_forward(v, logits, K, stride, padding)` and `triton_backward(v, logits, g, ...)`.
`volo_jax.ops.outlook_pallas` dispatches to them.

Mosaic GPU rejects these >5-D strided copies and Triton needs
power-of-two tensors, so a separate, output-stationary formulation that needs no
fold scratch: one program per (image, output row, channel block) holds a
(next_pow2(ceil(W / s)), block) float32 tile per output column parity in registers,
loops over the K*K offsets landing on the row (rolled), gathers the covering windows'
logits and values (indices clamped, masked), computes the softmax (an online max
and sum over j, float32) and accumulates, then stores the tile once (masked). block
is 64 channels, or fewer so a tile stays at 1024 elements. Backward: d_v is the same
kernel on the cotangent with the transposed weights (P = softmax computed once by
XLA); d_logits one program per (image, window row, head) on a (next_pow2(w),
next_pow2(hd)) tile, the softmax recomputed in the kernel. No shared memory is
requested; estimated live registers per program 40-60 KiB for D1-D5 at 224-512
(`triton_tile_bytes`, tested under 64 KiB).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from volo_jax.ops.pallas_common import divmod_, next_pow2, softmax_vjp, window_grid
from volo_jax.ops.pallas_common import softmax as softmax_list

#: Live register tiles a Triton program may hold (an H100 SM has 256 KiB of registers
#: and ~227 KiB of shared memory per block).
TRITON_TILE_BUDGET = 64 * 2**10
TRITON_CHANNEL_BLOCK = 64


# --------------------------------------------------------------------- Triton kernels


def _triton_gather_kernel(
    w_ref, x_ref, o_ref, *, geometry, shape, heads, softmax, transpose, tile, block
):
    """Output-stationary fold: program (b, Y, channel block) computes the output row Y,
    one column parity at a time: out[Y, X] = sum over windows (y, x) and offsets o
    landing on (Y, X) of sum_q weight[y, x, n, o, q] * x[window (y, x) offset q]
    (transpose: weight[y, x, n, q, o]); with `softmax` the weights are the softmax over q
    of the logits (forward only)."""
    k, s, p = geometry
    height, width, channels = shape
    h, w = window_grid(height, width, k, s, p)
    kk, hd = k * k, channels // heads
    b, row, cb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    c = cb * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
    c_ok = c < channels
    cc = jnp.minimum(c, channels - 1)
    n = jax.lax.div(cc, hd)
    xp = jax.lax.broadcasted_iota(jnp.int32, (tile, 1), 0)

    def weight(idx_o, q):
        yc, xc, o = idx_o
        idx = (b, yc, xc, n, q, o) if transpose else (b, yc, xc, n, o, q)
        return pltriton.load(w_ref.at[idx]).astype(jnp.float32)

    for r in range(s):  # output columns X = s * xp + r

        def offset(o, acc, r=r):
            ko, lo = divmod_(o, k)
            y_num = row + p - ko
            y, y_rem = divmod_(jnp.maximum(y_num, 0), s)
            x_div, x_rem = divmod_(r + p - lo + s * k, s)  # kept non-negative
            x = xp + (x_div - k)
            ok = (y_num >= 0) & (y_rem == 0) & (y < h) & (x_rem == 0)
            ok = ok & (x >= 0) & (x < w) & c_ok
            idx_o = (jnp.minimum(y, h - 1), jnp.clip(x, 0, w - 1), o)
            if softmax:  # online max and sum over q, then normalised weights below

                def stats(q, ms):
                    top, total = ms
                    logit = weight(idx_o, q)
                    new_top = jnp.maximum(top, logit)
                    total = total * jnp.exp(top - new_top) + jnp.exp(logit - new_top)
                    return new_top, total

                init = (
                    jnp.full((tile, block), -jnp.inf, jnp.float32),
                    jnp.zeros((tile, block), jnp.float32),
                )
                top, total = jax.lax.fori_loop(0, kk, stats, init)
                inv = 1.0 / total

            def source(q, acc):
                a = weight(idx_o, q)
                if softmax:
                    a = (jnp.exp(a - top) * inv).astype(x_ref.dtype).astype(jnp.float32)
                qr, qc = divmod_(q, k)
                src_r = s * y + qr - p
                src_c = s * x + qc - p
                m = ok & (src_r >= 0) & (src_r < height) & (src_c >= 0) & (src_c < width)
                src_idx = (
                    b,
                    jnp.clip(src_r, 0, height - 1),
                    jnp.clip(src_c, 0, width - 1),
                    cc,
                )
                src = pltriton.load(x_ref.at[src_idx], mask=m, other=0)
                return acc + jnp.where(m, a, 0.0) * src.astype(jnp.float32)

            return jax.lax.fori_loop(0, kk, source, acc)

        acc = jax.lax.fori_loop(0, kk, offset, jnp.zeros((tile, block), jnp.float32))
        col = s * xp + r
        pltriton.store(o_ref.at[b, row, col, c], acc.astype(o_ref.dtype), mask=(col < width) & c_ok)


def _triton_logits_kernel(
    l_ref, v_ref, g_ref, d_ref, *, geometry, shape, heads, softmax, tile, hd_tile
):
    """d_logits of one window row and head: dP[i, j] = sum_d g[offset i] v[offset j]
    over the head's channels, then the softmax VJP (P recomputed)."""
    k, s, p = geometry
    height, width, channels = shape
    _, w = window_grid(height, width, k, s, p)
    kk, hd = k * k, channels // heads
    b, y, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    x = jax.lax.broadcasted_iota(jnp.int32, (tile, 1), 0)
    d = jax.lax.broadcasted_iota(jnp.int32, (1, hd_tile), 1)
    ok = (x < w) & (d < hd)
    c = n * hd + jnp.minimum(d, hd - 1)
    xw = x[:, 0]
    xw_c = jnp.minimum(xw, w - 1)

    def window(ref, k_):
        kr, kc = divmod_(k_, k)
        src_r, src_c = s * y + kr - p, s * x + kc - p
        m = ok & (src_r >= 0) & (src_r < height) & (src_c >= 0) & (src_c < width)
        idx = (b, jnp.clip(src_r, 0, height - 1), jnp.clip(src_c, 0, width - 1), c)
        return pltriton.load(ref.at[idx], mask=m, other=0).astype(jnp.float32)

    values = [window(v_ref, j) for j in range(kk)]

    def output_offset(i, carry):
        g_i = window(g_ref, i)
        dp = [jnp.sum(g_i * values[j], axis=1) for j in range(kk)]  # (tile,)
        if softmax:
            pr = softmax_list([l_ref[b, y, xw_c, n, i, j].astype(jnp.float32) for j in range(kk)])
            dp = softmax_vjp(pr, dp)
        for j in range(kk):
            pltriton.store(d_ref.at[b, y, xw, n, i, j], dp[j].astype(d_ref.dtype), mask=xw < w)
        return carry

    jax.lax.fori_loop(0, kk, output_offset, 0)


def _triton_call(
    body,
    image_shape: tuple[int, ...],
    heads: int,
    geometry: tuple[int, int, int],
    softmax: bool,
    *,
    out_shape: jax.ShapeDtypeStruct,
    grid: tuple[int, ...],
    cost: pl.CostEstimate,
    interpret: bool,
    name: str,
    **tiles: int | bool,
):
    """The `pallas_call` of a Triton kernel `body` on an image of `image_shape` (B, H, W, C)
    with `heads` heads: the geometry (K, stride, padding), softmax flag and `tiles` bound
    as its static arguments; 4 warps, one pipeline stage (no shared memory requested)."""
    _, height, width, channels = image_shape
    kernel = functools.partial(
        body,
        geometry=geometry,
        shape=(height, width, channels),
        heads=heads,
        softmax=softmax,
        **tiles,
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        cost_estimate=cost,
        interpret=interpret,
        name=name,
    )


def _triton_block(channels: int, tile: int) -> int:
    """Channels per program: up to 64, and at most 1024 elements per (tile, block) tile
    (8 per thread at 4 warps)."""
    return min(TRITON_CHANNEL_BLOCK, next_pow2(channels), max(16, 1024 // tile))


def triton_tile_bytes(shape, heads: int, kernel: int, stride: int) -> int:
    """Estimated live register bytes of one Triton program: the gather kernel holds
    about 6 float32 tiles (accumulator, softmax max and sum, weight, source, mask) and
    2 int64 pointer tiles of (tile, block); the d_logits kernel the K*K value windows,
    the cotangent window and a product (float32) and 2 pointer tiles of (w, hd)."""
    _, _, width, channels = shape
    hd = channels // heads
    tile = next_pow2(-(-width // stride))
    gather = tile * _triton_block(channels, tile) * (6 * 4 + 2 * 8)
    w = (width - 1) // stride + 1
    logits = next_pow2(w) * next_pow2(hd) * ((kernel * kernel + 2) * 4 + 2 * 8)
    return max(gather, logits)


def _gather_call(weights, x, out_dtype, geometry, *, softmax, transpose, interpret):
    b, height, width, channels = x.shape
    k, s, _ = geometry
    tile = next_pow2(-(-width // s))
    block = _triton_block(channels, tile)
    windows = weights.shape[1] * weights.shape[2]
    return _triton_call(
        _triton_gather_kernel,
        x.shape,
        weights.shape[3],
        geometry,
        softmax,
        transpose=transpose,
        tile=tile,
        block=block,
        out_shape=jax.ShapeDtypeStruct(x.shape, out_dtype),
        grid=(b, height, -(-channels // block)),
        cost=pl.CostEstimate(
            flops=2 * b * windows * k**4 * channels,
            transcendentals=b * windows * k**4 * channels if softmax else 0,
            bytes_accessed=2 * x.size * x.dtype.itemsize + weights.size * weights.dtype.itemsize,
        ),
        interpret=interpret,
        name="outlook_attention_triton_fold",
    )(weights, x)


def triton_forward(v, logits, kernel, stride, padding, *, softmax=True, interpret=False):
    return _gather_call(
        logits,
        v,
        v.dtype,
        (kernel, stride, padding),
        softmax=softmax,
        transpose=False,
        interpret=interpret,
    )


def triton_backward(v, logits, g, kernel, stride, padding, *, softmax=True, interpret=False):
    geometry = (kernel, stride, padding)
    g = g.astype(v.dtype)
    attn = jax.nn.softmax(logits.astype(jnp.float32), -1) if softmax else logits
    attn = attn.astype(v.dtype)
    dv = _gather_call(
        attn, g, v.dtype, geometry, softmax=False, transpose=True, interpret=interpret
    )
    b, _, _, channels = v.shape
    _, h, w, heads = logits.shape[:4]
    dl = _triton_call(
        _triton_logits_kernel,
        v.shape,
        heads,
        geometry,
        softmax,
        tile=next_pow2(w),
        hd_tile=next_pow2(channels // heads),
        out_shape=jax.ShapeDtypeStruct(logits.shape, jnp.float32),
        grid=(b, h, heads),
        cost=pl.CostEstimate(
            flops=2 * b * h * w * kernel**4 * channels,
            transcendentals=b * h * w * kernel**4 * heads if softmax else 0,
            bytes_accessed=2 * v.size * v.dtype.itemsize + 2 * logits.size * 4,
        ),
        interpret=interpret,
        name="outlook_attention_triton_dlogits",
    )(logits, v, g)
    return dv, dl.astype(logits.dtype)
