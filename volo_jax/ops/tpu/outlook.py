"""Outlook attention's Pallas kernels for TPU (Mosaic), forward and backward:
`tpu_forward(v, logits, K, stride, padding)` -> (B, H, W, C) and `tpu_backward(v, logits,
g, ...)` -> (d_v, d_logits). `volo_jax.ops.outlook_pallas` dispatches to them.

Layout: v, the output and the cotangent stay NHWC, C = heads * hd (192, 256, 384) on
the lanes and W on the sublanes. The logits are viewed as (B, K*K_j, h, w,
K*K_i * heads) (lane i * heads + n): one XLA transpose outside the kernel (and one
back for d_logits; the logits projection could emit this order directly), so that
the softmax over j is elementwise over K*K arrays of (w, K*K * heads).
Grid: (B, bands), both 'parallel'. Band t owns the output rows [t*s*T, (t+1)*s*T)
(T window rows) and also computes the windows of its neighbours that reach into it
(VOLO: one window row more), so each output row is written once, by one program. The
image rows above and below that those windows read come in as small extra blocks of
the same array (halo blocks, index clamped at the image edges, zeroed there).
Kernel: the band and its halos are copied once into a zero-bordered float32 VMEM
image; a loop over window rows computes the softmax over j in float32 (P in a VMEM
scratch), then for each output offset i (rolled loops over i and j) reads each input
offset j as a stride-s sublane load (`pl.ds(start, w, stride=s)`), broadcasts head
n's weight P[.., n, i, j] to its hd channels with a one-hot (K*K*heads, C) product on
the MXU (exact: the one-hot matrix, bf16 at DEFAULT or float32 at HIGHEST precision,
asked for explicitly), multiplies and adds
in float32, and adds the (w, C) result into a float32 VMEM fold accumulator with a
stride-s store; the band is cast and written once at the end. The backward kernel
has the same grid, reads v, the cotangent and the logits, recomputes the softmax,
folds d_v the same way (transposed weights), reduces dP[.., n, i, j] over the head's
channels with a one-hot product on the MXU, applies the softmax VJP, and writes each
window's d_logits from the band that owns the window.
VMEM per program (double-buffered blocks, 2-3 float32 band images, logits and weight
scratch, tiles padded to (8, 128)): T is the largest band whose backward footprint
fits 12 MiB (`tpu_plan`, `tpu_vmem_bytes`); vmem_limit_bytes = 32 MiB. VOLO D1-D5,
batch any, bf16: 6.5-7.7 MiB forward, 10.0-11.9 MiB backward; one band per image for
C = 192/256 at 224, 2-8 bands (4-11 window rows each) otherwise (tested).
Cost: per window 81 * C VPU multiply-adds; per window row and output offset one
one-hot product of (K*K * w, K*K*heads) x (K*K*heads, C) on the MXU (the backward one
more, transposed); `pl.CostEstimate` counts both.

Mosaic's rules shape two choices (both found by compiling for TPU v5e with libtpu, the
test tier tests/ops/test_outlook_pallas_compile.py): its strided loads and stores need a
VMEM array whose last dimension is exactly 128 lanes, so the float32 band images and the
fold accumulator hold the channels as (groups, rows, 128) lane tiles, the last group
zero-padded (192 channels: a full and a half tile); and each output offset's one-hot
expansion is one MXU product over all K*K input offsets stacked (K*K x w rows, w padded
to 8), so the one-hot matrix is loaded into the MXU once per output offset, not once
per (i, j) pair of a handful of rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from volo_jax.ops.pallas_common import divmod_, round_up, softmax_vjp, window_grid
from volo_jax.ops.pallas_common import softmax as softmax_list
from volo_jax.ops.tpu import MOSAIC_INTERPRETERS

#: Backward VMEM footprint a TPU band may use, and the scoped VMEM limit requested.
TPU_VMEM_BUDGET = 12 * 2**20
TPU_VMEM_LIMIT = 32 * 2**20
#: Lanes of a TPU vector register. Mosaic's strided loads and stores need a VMEM array
#: whose last dimension is exactly this, so the float32 band images keep the channels
#: as (groups, ..., 128) with the last group zero-padded.
LANES = 128


# --------------------------------------------------------------------------- TPU plan


@dataclasses.dataclass(frozen=True)
class TpuPlan:
    """Static geometry of the Mosaic kernels (see the module docstring)."""

    height: int
    width: int
    channels: int
    heads: int
    kernel: int
    stride: int
    padding: int
    itemsize: int
    rows: int  # T: window rows per band
    bands: int

    @property
    def h(self) -> int:
        return window_grid(self.height, self.width, self.kernel, self.stride, self.padding)[0]

    @property
    def w(self) -> int:
        return window_grid(self.height, self.width, self.kernel, self.stride, self.padding)[1]

    @property
    def kk(self) -> int:
        return self.kernel * self.kernel

    @property
    def lanes(self) -> int:
        return self.kk * self.heads

    @property
    def band(self) -> int:  # output rows a band owns
        return self.stride * self.rows

    @property
    def first(self) -> int:  # first window row (relative to the band) reaching the band
        return -((self.kernel - 1 - self.padding) // self.stride)

    @property
    def last(self) -> int:  # last window row is rows - 1 + last
        return (self.stride - 1 + self.padding) // self.stride

    @property
    def window_rows(self) -> int:
        return self.rows + self.last - self.first

    @property
    def halo(self) -> int:  # image rows above / below a band that its windows read
        s, k, p = self.stride, self.kernel, self.padding
        return max(1, p - s * self.first, s * (self.last - 1) + k - p)

    @property
    def logit_halo(self) -> int:
        return max(1, -self.first, self.last)

    @property
    def wp(self) -> int:  # w padded to the 8-row sublane tile: row stride of stacked offsets
        return round_up(self.w, 8)

    @property
    def stacked(self) -> int:  # rows of the K*K offsets' (w, ...) arrays stacked
        return self.kk * self.wp

    @property
    def groups(self) -> int:  # 128-lane channel groups of the f32 band images
        return -(-self.channels // LANES)

    @property
    def col0(self) -> int:  # column of image column 0 in the f32 band images
        return round_up(self.padding, 8)

    @property
    def image_width(self) -> int:
        return round_up(self.col0 + self.width + self.padding, 8)

    @property
    def image_rows(self) -> int:
        return self.band + 2 * self.halo

    @property
    def v_rows(self) -> int:  # rows of the main v / output block
        return self.band if self.bands > 1 else self.height

    @property
    def l_rows(self) -> int:  # window rows of the main logits block
        return self.rows if self.bands > 1 else self.h


def _tile_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """VMEM bytes of an array, the last two dims padded to the (8 * 4/itemsize, 128) tile."""
    *lead, sub, lane = shape
    sub = round_up(sub, 8 * max(1, 4 // itemsize))
    return math.prod(lead) * sub * round_up(lane, 128) * itemsize


def tpu_vmem_bytes(plan: TpuPlan, backward: bool) -> int:
    """VMEM footprint of one program: double-buffered blocks plus scratch."""
    it, c, wd = plan.itemsize, plan.channels, plan.width
    image = _tile_bytes((plan.v_rows, wd, c), it)
    logits = _tile_bytes((plan.kk, plan.l_rows, plan.w, plan.lanes), it)
    image_halos = logit_halos = 0
    if plan.bands > 1:  # a block above and one below
        image_halos = 2 * _tile_bytes((plan.halo, wd, c), it)
        logit_halos = 2 * _tile_bytes((plan.kk, plan.logit_halo, plan.w, plan.lanes), it)
    f32_image = _tile_bytes((plan.image_rows, plan.groups, plan.image_width, LANES), 4)
    f32_logits = _tile_bytes((plan.kk, plan.window_rows, plan.w, plan.lanes), 4)
    f32_weights = _tile_bytes((plan.stacked, plan.lanes), 4)
    f32_channels = _tile_bytes((plan.stacked, plan.groups * LANES), 4)
    if backward:  # in: v, g, logits (and halos); out: dv, dlogits
        blocks = 2 * (3 * image + 2 * logits + 2 * image_halos + logit_halos)
        scratch = 3 * f32_image + f32_logits + 2 * f32_weights + 3 * f32_channels
    else:  # in: v, logits (and halos); out: o
        blocks = 2 * (2 * image + logits + image_halos + logit_halos)
        scratch = 2 * f32_image + f32_logits + f32_weights + f32_channels
    return blocks + scratch


def tpu_plan(
    shape: tuple[int, int, int, int],
    heads: int,
    kernel: int,
    stride: int,
    padding: int,
    dtype,
    rows: int | None = None,
) -> TpuPlan:
    """The band height: `rows` window rows if given, else the largest whose backward
    footprint fits `TPU_VMEM_BUDGET` (the whole image when it fits)."""
    _, height, width, channels = shape
    itemsize = jnp.dtype(dtype).itemsize
    geometry = (height, width, channels, heads, kernel, stride, padding, itemsize)
    h, _ = window_grid(height, width, kernel, stride, padding)
    whole = max(h, -(-height // stride))

    def make(t: int) -> TpuPlan:
        bands = -(-height // (stride * t))
        if bands == 1:
            t = whole
        return TpuPlan(*geometry, rows=t, bands=bands)

    def legal(p: TpuPlan) -> bool:  # halo blocks must tile the band
        return p.bands == 1 or (p.band % p.halo == 0 and p.rows % p.logit_halo == 0)

    if rows is not None:
        plan = make(rows)
        if not legal(plan):
            raise ValueError(f"rows={rows} is not a multiple of the halo for {plan}")
        return plan
    for t in range(whole, 0, -1):
        plan = make(t)
        if legal(plan) and tpu_vmem_bytes(plan, backward=True) <= TPU_VMEM_BUDGET:
            return plan
    raise ValueError(f"no band of {shape} fits {TPU_VMEM_BUDGET} bytes of VMEM")


# ------------------------------------------------------------------------ TPU kernels


def _onehot(plan: TpuPlan, i: int, dtype) -> jax.Array:
    """(K*K*heads, G * 128): lane i * heads + n -> head n's channels, for output offset i
    (the padded channels >= C get no weight)."""
    shape = (plan.lanes, plan.groups * LANES)
    lane = jax.lax.broadcasted_iota(jnp.int32, shape, 0) - i * plan.heads
    chan = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    hd = plan.channels // plan.heads
    hit = (chan >= lane * hd) & (chan < lane * hd + hd) & (chan < plan.channels)
    return hit.astype(dtype)


def _expand(p: jax.Array, onehot: jax.Array) -> jax.Array:
    """(rows, lanes) weights -> (rows, G * 128) float32 per-channel weights (a one-hot
    product)."""
    # Explicit either way: a bf16 product under jax_default_matmul_precision='highest'
    # would ask Mosaic for an fp32-precision product of bf16 operands, which it rejects.
    precision = jax.lax.Precision.HIGHEST if p.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    return jnp.dot(p, onehot, precision=precision, preferred_element_type=jnp.float32)


def _head_sums(x: jax.Array, onehot: jax.Array) -> jax.Array:
    """(rows, G * 128) float32 values -> (rows, lanes): each of output offset i's lanes
    gets its head's channels summed (the transposed one-hot product, on the MXU), the
    other lanes 0."""
    return jax.lax.dot_general(
        x,
        onehot,
        (((1,), (1,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


def _fill_image(plan: TpuPlan, image_ref, main_ref, up_ref, down_ref, band) -> None:
    """Zero-bordered float32 copy of the band's rows and its halos."""
    c0, wd, hv = plan.col0, plan.width, plan.halo
    image_ref[...] = jnp.zeros(image_ref.shape, jnp.float32)
    top = band * plan.band  # image row of the band's first row

    def put(dst_row: int, src_ref, first_row) -> None:
        rows = src_ref.shape[0]
        for g in range(plan.groups):  # lane-aligned channel slices
            lanes = min(LANES, plan.channels - g * LANES)
            x = src_ref[:, :, pl.ds(g * LANES, lanes)].astype(jnp.float32)
            row = first_row + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
            x = jnp.where((row >= 0) & (row < plan.height), x, 0.0)
            image_ref[pl.ds(dst_row, rows), g, pl.ds(c0, wd), pl.ds(0, lanes)] = x

    put(hv, main_ref, top)
    if up_ref is not None:
        put(0, up_ref, top - hv)
        put(hv + plan.band, down_ref, top + plan.band)


def _fill_logits(plan: TpuPlan, lsc_ref, main_ref, up_ref, down_ref) -> None:
    """Window rows [first, rows + last) of the band's logits, float32."""
    f = plan.first
    n_main = min(plan.rows, plan.l_rows)
    lsc_ref[:, pl.ds(-f, n_main)] = main_ref[:, pl.ds(0, n_main)].astype(jnp.float32)
    if up_ref is not None and f < 0:
        lsc_ref[:, pl.ds(0, -f)] = up_ref[:, pl.ds(plan.logit_halo + f, -f)].astype(jnp.float32)
    if down_ref is not None and plan.last > 0:
        lsc_ref[:, pl.ds(plan.rows - f, plan.last)] = down_ref[:, pl.ds(0, plan.last)].astype(
            jnp.float32
        )


def _window_ref(plan: TpuPlan, u, k, span: bool = False):
    """Row and column indexer of offset k (static or traced) of window row u
    (band-relative) in a band image: a (w, 128) stride-s sublane slice of each channel
    group (with `span`, the contiguous columns that contain it)."""
    kr, kc = divmod_(k, plan.kernel)
    s, p = plan.stride, plan.padding
    row = s * u + kr + (plan.halo - p)
    start = kc + (plan.col0 - p)
    if span:
        return row, pl.ds(start, s * (plan.w - 1) + 1)
    cols = pl.ds(start, plan.w, stride=s) if s > 1 else pl.ds(start, plan.w)
    return row, cols


# Pallas' generic interpreter (fast to compile, used on the CPU) has no strided
# loads and stores: `strided=False` reads the contiguous span and slices the value.
def _load_window(plan: TpuPlan, image_ref, u, k, strided: bool = True) -> list[jax.Array]:
    """Offset k of window row u: per channel group, (w, 128) float32."""
    row, cols = _window_ref(plan, u, k, span=not strided and plan.stride > 1)
    out = [image_ref[row, g, cols, :] for g in range(plan.groups)]
    return out if strided or plan.stride == 1 else [x[:: plan.stride] for x in out]


def _add_window(plan: TpuPlan, acc_ref, u, k, x: list[jax.Array], strided: bool = True) -> None:
    row, cols = _window_ref(plan, u, k, span=not strided and plan.stride > 1)
    for g, xg in enumerate(x):
        idx = (row, g, cols, slice(None))
        if strided or plan.stride == 1:
            acc_ref[idx] = acc_ref[idx] + xg
        else:
            acc_ref[idx] = acc_ref[idx].at[:: plan.stride].add(xg)


def _write_image(plan: TpuPlan, out_ref, acc_ref) -> None:
    """The band's rows of the float32 fold accumulator -> the (rows, W, C) output block."""
    rows, cols = pl.ds(plan.halo, plan.v_rows), pl.ds(plan.col0, plan.width)
    for g in range(plan.groups):
        lanes = min(LANES, plan.channels - g * LANES)
        x = acc_ref[rows, g, cols, pl.ds(0, lanes)]
        out_ref[:, :, pl.ds(g * LANES, lanes)] = x.astype(out_ref.dtype)


def _rows(plan: TpuPlan, j):
    """Rows of input offset j (static or traced) in a stacked (K*K * wp, ...) array."""
    start = j * plan.wp
    return pl.ds(start if isinstance(start, int) else pl.multiple_of(start, 8), plan.w)


def _store_weights(plan: TpuPlan, lsc_ref, p_ref, u, softmax: bool) -> list[jax.Array]:
    """Float32 weights P_j (w, lanes) of window row u into the stacked p_ref (rows
    j * wp ...); returns them."""
    rows = [lsc_ref[j, u - plan.first] for j in range(plan.kk)]
    p = softmax_list(rows) if softmax else rows
    for j in range(plan.kk):
        p_ref[_rows(plan, j), :] = p[j]
    return p


def _expand_all(plan: TpuPlan, p_ref, onehot: jax.Array, dtype) -> jax.Array:
    """Every input offset's weights for output offset i, per channel: the stacked
    (K*K * wp, lanes) weights times the (lanes, G * 128) one-hot of i, one MXU product of
    K*K * wp rows (not K*K products of w rows: the one-hot matrix is loaded into the MXU
    once per output offset)."""
    return _expand(p_ref[...].astype(dtype), onehot)


def _split(refs, plan: TpuPlan, n_images: int):
    """(main, up, down) triples of the kernel's inputs."""
    it = iter(refs)
    triples = []
    for _ in range(n_images + 1):  # images, then the logits
        main = next(it)
        up = down = None
        if plan.bands > 1:
            up, down = next(it), next(it)
        triples.append((main, up, down))
    return triples, list(it)


def _offsets(plan: TpuPlan, body, init):
    """fori_loop over the K*K window offsets (rolled: small Mosaic programs)."""
    return jax.lax.fori_loop(0, plan.kk, body, init)


def _tpu_forward_kernel(*refs, plan: TpuPlan, softmax: bool, strided: bool) -> None:
    (v, logits), (o_ref, image_ref, acc_ref, lsc_ref, p_ref, e_ref) = _split(refs, plan, 1)
    band = pl.program_id(1)
    _fill_image(plan, image_ref, *v, band)
    _fill_logits(plan, lsc_ref, *logits)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    p_ref[...] = jnp.zeros(p_ref.shape, jnp.float32)  # the pad rows of each offset
    dtype = v[0].dtype
    zeros = [jnp.zeros((plan.w, LANES), jnp.float32)] * plan.groups

    def window_row(u, carry):
        y = band * plan.rows + u

        @pl.when((y >= 0) & (y < plan.h))
        def _():
            _store_weights(plan, lsc_ref, p_ref, u, softmax)

            def output_offset(i, carry):
                e_ref[...] = _expand_all(plan, p_ref, _onehot(plan, i, dtype), dtype)

                def input_offset(j, acc):
                    window = _load_window(plan, image_ref, u, j, strided)
                    rows = _rows(plan, j)
                    return [
                        a + e_ref[rows, pl.ds(g * LANES, LANES)] * xg
                        for g, (a, xg) in enumerate(zip(acc, window, strict=True))
                    ]

                _add_window(plan, acc_ref, u, i, _offsets(plan, input_offset, zeros), strided)
                return carry

            _offsets(plan, output_offset, 0)

        return carry

    jax.lax.fori_loop(plan.first, plan.rows + plan.last, window_row, 0)
    _write_image(plan, o_ref, acc_ref)


def _tpu_backward_kernel(*refs, plan: TpuPlan, softmax: bool, strided: bool) -> None:
    (v, g, logits), rest = _split(refs, plan, 2)
    dv_ref, dl_ref, v_image, g_image, acc_ref, lsc_ref, p_ref, dp_ref, e_ref, d_ref, x_ref = rest
    band = pl.program_id(1)
    _fill_image(plan, v_image, *v, band)
    _fill_image(plan, g_image, *g, band)
    _fill_logits(plan, lsc_ref, *logits)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    p_ref[...] = jnp.zeros(p_ref.shape, jnp.float32)
    x_ref[...] = jnp.zeros(x_ref.shape, jnp.float32)  # pad rows stay 0
    dtype = v[0].dtype
    kk = plan.kk

    def window_row(u, carry):
        y = band * plan.rows + u

        @pl.when((y >= 0) & (y < plan.h))
        def _():
            p = _store_weights(plan, lsc_ref, p_ref, u, softmax)
            d_ref[...] = jnp.zeros(d_ref.shape, jnp.float32)  # d_v of each input offset
            dp_ref[...] = jnp.zeros(dp_ref.shape, jnp.float32)  # dP, stacked like P

            def output_offset(i, carry):
                g_i = _load_window(plan, g_image, u, i, strided)
                onehot = _onehot(plan, i, jnp.float32)
                e_ref[...] = _expand_all(plan, p_ref, onehot.astype(dtype), dtype)

                def input_offset(j, carry):
                    v_j = _load_window(plan, v_image, u, j, strided)
                    rows = _rows(plan, j)
                    for c, (gg, vg) in enumerate(zip(g_i, v_j, strict=True)):
                        cols = pl.ds(c * LANES, LANES)
                        d_ref[rows, cols] = d_ref[rows, cols] + e_ref[rows, cols] * gg
                        x_ref[rows, cols] = gg * vg  # g_i * v_j
                    return carry

                _offsets(plan, input_offset, 0)
                # dP[.., n, i, j] for every j: head n's channels of g_i * v_j summed, one
                # MXU product for all input offsets (the lanes of i, 0 elsewhere).
                dp_ref[...] = dp_ref[...] + _head_sums(x_ref[...], onehot)
                return carry

            _offsets(plan, output_offset, 0)

            def fold(j, carry):
                rows = _rows(plan, j)
                d_v = [d_ref[rows, pl.ds(c * LANES, LANES)] for c in range(plan.groups)]
                _add_window(plan, acc_ref, u, j, d_v, strided)
                return carry

            _offsets(plan, fold, 0)
            dp = [dp_ref[_rows(plan, j), :] for j in range(kk)]
            if softmax:
                dp = softmax_vjp(p, dp)

            @pl.when((u >= 0) & (u < plan.rows))
            def _():
                for j in range(kk):
                    dl_ref[j, u] = dp[j].astype(dl_ref.dtype)

        return carry

    jax.lax.fori_loop(plan.first, plan.rows + plan.last, window_row, 0)
    _write_image(plan, dv_ref, acc_ref)


def _image_specs(plan: TpuPlan) -> list[pl.BlockSpec]:
    """Main block and (banded) the halo blocks above and below, of a (B, H, W, C) array."""
    c, wd = plan.channels, plan.width
    specs = [pl.BlockSpec((None, plan.v_rows, wd, c), lambda b, t: (b, t, 0, 0))]
    if plan.bands > 1:
        hv, per = plan.halo, plan.band // plan.halo
        last = -(-plan.height // hv) - 1
        specs.append(
            pl.BlockSpec((None, hv, wd, c), lambda b, t: (b, jnp.maximum(t * per - 1, 0), 0, 0))
        )
        specs.append(
            pl.BlockSpec(
                (None, hv, wd, c), lambda b, t: (b, jnp.minimum((t + 1) * per, last), 0, 0)
            )
        )
    return specs


def _logit_specs(plan: TpuPlan) -> list[pl.BlockSpec]:
    kk, w, lanes = plan.kk, plan.w, plan.lanes
    specs = [pl.BlockSpec((None, kk, plan.l_rows, w, lanes), lambda b, t: (b, 0, t, 0, 0))]
    if plan.bands > 1:
        hl, per = plan.logit_halo, plan.rows // plan.logit_halo
        last = -(-plan.h // hl) - 1
        specs.append(
            pl.BlockSpec(
                (None, kk, hl, w, lanes), lambda b, t: (b, 0, jnp.maximum(t * per - 1, 0), 0, 0)
            )
        )
        specs.append(
            pl.BlockSpec(
                (None, kk, hl, w, lanes),
                lambda b, t: (b, 0, jnp.minimum((t + 1) * per, last), 0, 0),
            )
        )
    return specs


def _to_lanes(logits: jax.Array) -> jax.Array:
    """(B, h, w, heads, KK_i, KK_j) -> (B, KK_j, h, w, KK_i * heads)."""
    b, h, w, heads, kk, _ = logits.shape
    return logits.transpose(0, 5, 1, 2, 4, 3).reshape(b, kk, h, w, kk * heads)


def _from_lanes(x: jax.Array, heads: int) -> jax.Array:
    b, kk, h, w, _ = x.shape
    return x.reshape(b, kk, h, w, kk, heads).transpose(0, 2, 3, 5, 4, 1)


def _tpu_cost(plan: TpuPlan, batch: int, backward: bool) -> pl.CostEstimate:
    windows = batch * plan.h * plan.w * (plan.window_rows / plan.rows)
    kk, c = plan.kk, plan.channels
    macs = kk * kk * c * (1 + plan.lanes)  # VPU products + one-hot expansion
    image = batch * plan.height * plan.width * c * plan.itemsize
    logits = batch * plan.h * plan.w * kk * plan.lanes * plan.itemsize
    if backward:
        macs *= 3
        return pl.CostEstimate(
            flops=int(2 * windows * macs),
            transcendentals=int(windows * kk * plan.lanes),
            bytes_accessed=int(3 * image + 2 * logits),
        )
    return pl.CostEstimate(
        flops=int(2 * windows * macs),
        transcendentals=int(windows * kk * plan.lanes),
        bytes_accessed=int(2 * image + logits),
    )


# interpret= (`MOSAIC_INTERPRETERS`): under "generic" (the CPU default) the strided
# accesses run as slices of contiguous spans; "tpu" runs them as they are (slow).


def _tpu_call(plan: TpuPlan, batch: int, backward: bool, softmax: bool, interpret):
    interpret = "generic" if interpret is True else interpret
    kernel = _tpu_backward_kernel if backward else _tpu_forward_kernel
    images = 2 if backward else 1
    image_specs = _image_specs(plan)
    in_specs = image_specs * images + _logit_specs(plan)
    f32_image = pltpu.VMEM((plan.image_rows, plan.groups, plan.image_width, LANES), jnp.float32)
    lsc = pltpu.VMEM((plan.kk, plan.window_rows, plan.w, plan.lanes), jnp.float32)
    weights = pltpu.VMEM((plan.stacked, plan.lanes), jnp.float32)
    channels = pltpu.VMEM((plan.stacked, plan.groups * LANES), jnp.float32)
    scratch = [f32_image] * (images + 1) + [lsc] + [weights] * images
    scratch += [channels] * (3 if backward else 1)
    return (
        functools.partial(
            pl.pallas_call,
            functools.partial(kernel, plan=plan, softmax=softmax, strided=interpret != "generic"),
            grid=(batch, plan.bands),
            in_specs=in_specs,
            scratch_shapes=scratch,
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=TPU_VMEM_LIMIT
            ),
            cost_estimate=_tpu_cost(plan, batch, backward),
            interpret=MOSAIC_INTERPRETERS[interpret],
            name="outlook_attention_bwd" if backward else "outlook_attention_fwd",
        ),
        image_specs[0],
        _logit_specs(plan)[0],
    )


def _repeat_halos(plan: TpuPlan, x: jax.Array) -> list[jax.Array]:
    return [x] * (3 if plan.bands > 1 else 1)


def tpu_forward(v, logits, kernel, stride, padding, *, softmax=True, interpret=False, rows=None):
    """The Mosaic forward: v (B, H, W, C), logits (B, h, w, heads, KK, KK)."""
    heads = logits.shape[3]
    dtype = jnp.promote_types(v.dtype, logits.dtype)
    plan = tpu_plan(v.shape, heads, kernel, stride, padding, dtype, rows)
    call, image_spec, _ = _tpu_call(plan, v.shape[0], False, softmax, interpret)
    lanes = _to_lanes(logits)
    return call(out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype), out_specs=image_spec)(
        *_repeat_halos(plan, v), *_repeat_halos(plan, lanes)
    )


def tpu_backward(
    v, logits, g, kernel, stride, padding, *, softmax=True, interpret=False, rows=None
):
    """The Mosaic backward: (d_v, d_logits)."""
    heads = logits.shape[3]
    dtype = jnp.promote_types(v.dtype, logits.dtype)
    plan = tpu_plan(v.shape, heads, kernel, stride, padding, dtype, rows)
    call, image_spec, logit_spec = _tpu_call(plan, v.shape[0], True, softmax, interpret)
    lanes = _to_lanes(logits)
    g = g.astype(v.dtype)
    dv, dl = call(
        out_shape=(
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct(lanes.shape, logits.dtype),
        ),
        out_specs=(image_spec, logit_spec),
    )(*_repeat_halos(plan, v), *_repeat_halos(plan, g), *_repeat_halos(plan, lanes))
    return dv, _from_lanes(dl, heads).astype(logits.dtype)
