"""Outlook attention as Pallas kernels: the softmax over the K*K logits of every
window fused with the aggregation and the fold, one kernel for TPU (Mosaic) and one
for GPU (Triton), forward and backward (custom VJP).

Public entries:

- `outlook_attention_pallas(v, logits, kernel_size, stride, padding)`: v (B, H, W, C),
  logits (B, h, w, heads, K*K, K*K) (output offset i, input offset j, softmax over j)
  -> (B, H, W, C); equal to `softmax(logits.astype(f32), -1).astype(v.dtype)` followed
  by `outlook._aggregate_reference`. Gradients for v and for the logits.
- `outlook_aggregate_pallas(v, attn, kernel_size, stride, padding)`: the same kernels
  with the weights given (no softmax): the contract of `outlook.outlook_aggregate`.

The kernel is chosen with `jax.lax.platform_dependent` when the code is lowered, never
from `jax.default_backend()`: 'tpu' runs the Mosaic kernels, 'cuda' the Triton kernels,
every other platform (the CPU; also ROCm, untried) the Mosaic kernels in Pallas'
generic interpret mode, which is what the CPU tests check.

TPU (Mosaic)
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
  the MXU (exact: the one-hot matrix, bf16 or float32 at HIGHEST), multiplies and adds
  in float32, and adds the (w, C) result into a float32 VMEM fold accumulator with a
  stride-s store; the band is cast and written once at the end. The backward kernel
  has the same grid, reads v, the cotangent and the logits, recomputes the softmax,
  folds d_v the same way (transposed weights), reduces dP[.., n, i, j] over the head's
  channels with a one-hot product on the MXU, applies the softmax VJP, and writes each
  window's d_logits from the band that owns the window.
  VMEM per program (double-buffered blocks, 2-3 float32 band images, logits and weight
  scratch, tiles padded to (8, 128)): T is the largest band whose backward footprint
  fits 12 MiB (`tpu_plan`, `tpu_vmem_bytes`); vmem_limit_bytes = 32 MiB. VOLO D1-D5,
  batch any, bf16: 6.4-7.9 MiB forward, 9.5-11.9 MiB backward; one band per image for
  C = 192/256 at 224, 2-7 bands (5-12 window rows each) otherwise (tested).
  Cost: per window 81 * C VPU multiply-adds and 81 one-hot products of
  (w, K*K*heads) x (K*K*heads, C) on the MXU; `pl.CostEstimate` counts both.

GPU (Triton): Mosaic GPU rejects these >5-D strided copies and Triton needs
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

Status: both kernels are lowered (`jax.export` for 'tpu' and 'cuda' from a CPU host,
forward and gradient, VOLO-D1 at 224 and D5 at 512) and checked in interpret mode on
the CPU. Neither has been compiled by Mosaic or Triton's backends nor run on a TPU or a
GPU here: whether Mosaic's layout passes accept the stride-s sublane accesses and the
small (w, 54)-(54, C) products, Triton's register use, and the speed are unverified.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jax.sharding import PartitionSpec as P

from volo_jax.ops.geometry import PatchGeometry
from volo_jax.sharding.mesh import BATCH_AXES, MODEL_AXIS

#: Backward VMEM footprint a TPU band may use, and the scoped VMEM limit requested.
TPU_VMEM_BUDGET = 12 * 2**20
TPU_VMEM_LIMIT = 32 * 2**20
#: Live register tiles a Triton program may hold (an H100 SM has 256 KiB of registers
#: and ~227 KiB of shared memory per block).
TRITON_TILE_BUDGET = 64 * 2**10
TRITON_CHANNEL_BLOCK = 64
#: Lanes of a TPU vector register. Mosaic's strided loads and stores need a VMEM array
#: whose last dimension is exactly this, so the float32 band images keep the channels
#: as (groups, ..., 128) with the last group zero-padded.
LANES = 128


def _window_grid(
    height: int, width: int, kernel: int, stride: int, padding: int
) -> tuple[int, int]:
    """(h, w): the windows on an (height, width) input (`ops.geometry`)."""
    return PatchGeometry(kernel, stride, padding).out_size(height, width)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _divmod(a, b: int):
    """divmod of a non-negative int or traced scalar (lax.div/rem: no sign handling,
    which Mosaic lowers only on a TPU host)."""
    if isinstance(a, int):
        return divmod(a, b)
    return jax.lax.div(a, b), jax.lax.rem(a, b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


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
        return _window_grid(self.height, self.width, self.kernel, self.stride, self.padding)[0]

    @property
    def w(self) -> int:
        return _window_grid(self.height, self.width, self.kernel, self.stride, self.padding)[1]

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
        return _round_up(self.w, 8)

    @property
    def stacked(self) -> int:  # rows of the K*K offsets' (w, ...) arrays stacked
        return self.kk * self.wp

    @property
    def groups(self) -> int:  # 128-lane channel groups of the f32 band images
        return -(-self.channels // LANES)

    @property
    def col0(self) -> int:  # column of image column 0 in the f32 band images
        return _round_up(self.padding, 8)

    @property
    def image_width(self) -> int:
        return _round_up(self.col0 + self.width + self.padding, 8)

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
    sub = _round_up(sub, 8 * max(1, 4 // itemsize))
    return math.prod(lead) * sub * _round_up(lane, 128) * itemsize


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
    h, _ = _window_grid(height, width, kernel, stride, padding)
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


def _softmax(logits: list[jax.Array]) -> list[jax.Array]:
    top = functools.reduce(jnp.maximum, logits)
    e = [jnp.exp(x - top) for x in logits]
    inv = 1.0 / functools.reduce(jnp.add, e)
    return [x * inv for x in e]


def _softmax_vjp(p: list[jax.Array], dp: list[jax.Array]) -> list[jax.Array]:
    """d_logits_j = P_j * (dP_j - sum_j' P_j' dP_j')."""
    total = functools.reduce(jnp.add, [a * b for a, b in zip(p, dp, strict=True)])
    return [a * (b - total) for a, b in zip(p, dp, strict=True)]


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
    kr, kc = _divmod(k, plan.kernel)
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
    p = _softmax(rows) if softmax else rows
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
                dp = _softmax_vjp(p, dp)

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


#: interpret= values of the Mosaic kernels: False (compile), "generic" (Pallas'
#: interpreter, strided accesses as slices of contiguous spans: the CPU default) or
#: "tpu" (Pallas' TPU interpreter, which runs the strided accesses themselves; slow).
_INTERPRETERS = {False: False, "generic": True, "tpu": pltpu.InterpretParams()}


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
            interpret=_INTERPRETERS[interpret],
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
    h, w = _window_grid(height, width, k, s, p)
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
            ko, lo = _divmod(o, k)
            y_num = row + p - ko
            y, y_rem = _divmod(jnp.maximum(y_num, 0), s)
            x_div, x_rem = _divmod(r + p - lo + s * k, s)  # kept non-negative
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
                qr, qc = _divmod(q, k)
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
    _, w = _window_grid(height, width, k, s, p)
    kk, hd = k * k, channels // heads
    b, y, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    x = jax.lax.broadcasted_iota(jnp.int32, (tile, 1), 0)
    d = jax.lax.broadcasted_iota(jnp.int32, (1, hd_tile), 1)
    ok = (x < w) & (d < hd)
    c = n * hd + jnp.minimum(d, hd - 1)
    xw = x[:, 0]
    xw_c = jnp.minimum(xw, w - 1)

    def window(ref, k_):
        kr, kc = _divmod(k_, k)
        src_r, src_c = s * y + kr - p, s * x + kc - p
        m = ok & (src_r >= 0) & (src_r < height) & (src_c >= 0) & (src_c < width)
        idx = (b, jnp.clip(src_r, 0, height - 1), jnp.clip(src_c, 0, width - 1), c)
        return pltriton.load(ref.at[idx], mask=m, other=0).astype(jnp.float32)

    values = [window(v_ref, j) for j in range(kk)]

    def output_offset(i, carry):
        g_i = window(g_ref, i)
        dp = [jnp.sum(g_i * values[j], axis=1) for j in range(kk)]  # (tile,)
        if softmax:
            pr = _softmax([l_ref[b, y, xw_c, n, i, j].astype(jnp.float32) for j in range(kk)])
            dp = _softmax_vjp(pr, dp)
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
    return min(TRITON_CHANNEL_BLOCK, _next_pow2(channels), max(16, 1024 // tile))


def triton_tile_bytes(shape, heads: int, kernel: int, stride: int) -> int:
    """Estimated live register bytes of one Triton program: the gather kernel holds
    about 6 float32 tiles (accumulator, softmax max and sum, weight, source, mask) and
    2 int64 pointer tiles of (tile, block); the d_logits kernel the K*K value windows,
    the cotangent window and a product (float32) and 2 pointer tiles of (w, hd)."""
    _, _, width, channels = shape
    hd = channels // heads
    tile = _next_pow2(-(-width // stride))
    gather = tile * _triton_block(channels, tile) * (6 * 4 + 2 * 8)
    w = (width - 1) // stride + 1
    logits = _next_pow2(w) * _next_pow2(hd) * ((kernel * kernel + 2) * 4 + 2 * 8)
    return max(gather, logits)


def _gather_call(weights, x, out_dtype, geometry, *, softmax, transpose, interpret):
    b, height, width, channels = x.shape
    k, s, _ = geometry
    tile = _next_pow2(-(-width // s))
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
        tile=_next_pow2(w),
        hd_tile=_next_pow2(channels // heads),
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


# ------------------------------------------------------------------------ dispatch


def _on_platform(args, geometry, softmax: bool, mosaic_fn, triton_fn):
    """`mosaic_fn(*args, *geometry)` lowered for TPU, `triton_fn` for CUDA, and the Mosaic
    kernels in Pallas' generic interpreter on every other platform."""

    def tpu(*a):
        return mosaic_fn(*a, *geometry, softmax=softmax)

    def cuda(*a):
        return triton_fn(*a, *geometry, softmax=softmax)

    def default(*a):
        return mosaic_fn(*a, *geometry, softmax=softmax, interpret="generic")

    return jax.lax.platform_dependent(*args, tpu=tpu, cuda=cuda, default=default)


def _forward(v, logits, geometry, softmax):
    return _on_platform((v, logits), geometry, softmax, tpu_forward, triton_forward)


def _backward(v, logits, g, geometry, softmax):
    return _on_platform((v, logits, g), geometry, softmax, tpu_backward, triton_backward)


def _check(v: jax.Array, weights: jax.Array, kernel: int, stride: int, padding: int) -> None:
    b, height, width, channels = v.shape
    h, w = _window_grid(height, width, kernel, stride, padding)
    kk = kernel * kernel
    if weights.ndim != 6 or weights.shape[:3] != (b, h, w) or weights.shape[4:] != (kk, kk):
        raise ValueError(
            f"expected weights of shape ({b}, {h}, {w}, heads, {kk}, {kk}) for v {v.shape}, "
            f"K={kernel}, stride={stride}, padding={padding}; got {weights.shape}"
        )
    if channels % weights.shape[3]:
        raise ValueError(f"{weights.shape[3]} heads do not divide {channels} channels")


def _make(softmax: bool):
    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
    def fn(v, weights, kernel_size, stride, padding):
        _check(v, weights, kernel_size, stride, padding)
        return _forward(v, weights, (kernel_size, stride, padding), softmax)

    def fwd(v, weights, kernel_size, stride, padding):
        return fn(v, weights, kernel_size, stride, padding), (v, weights)

    def bwd(kernel_size, stride, padding, residuals, g):
        v, weights = residuals
        return _backward(v, weights, g, (kernel_size, stride, padding), softmax)

    fn.defvjp(fwd, bwd)
    return fn


_attention = _make(softmax=True)
_aggregate = _make(softmax=False)


def _per_device(fn, v: jax.Array, weights: jax.Array, geometry: tuple[int, int, int]):
    """`fn(v, weights, *geometry)` on each device's own images.

    Mosaic and Triton calls cannot be partitioned by XLA: on a mesh, GSPMD would gather
    the global batch onto every device (or, on TPU, refuse to compile). Under the
    current mesh (`jax.set_mesh`, as the trainer and `volo_jax.sharding` lower steps) the
    call is a `shard_map` over the batch axes that divide the batch, and over the
    'model' axis on the heads when it divides them (tensor parallelism), so every
    device runs the kernel on its own (B / n, H, W, C) block and nothing is gathered.
    With no mesh, or inside a `shard_map` over those axes already, it is a plain call.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(v, weights, *geometry)
    free_all = [a for a in mesh.axis_names if a not in mesh.manual_axes]
    free = [a for a in free_all if mesh.shape[a] > 1]
    batch, size = [], 1
    for axis in BATCH_AXES:
        if axis in free and v.shape[0] % (size * mesh.shape[axis]) == 0:
            batch.append(axis)
            size *= mesh.shape[axis]
    heads = weights.shape[3]
    model = MODEL_AXIS if MODEL_AXIS in free and heads % mesh.shape[MODEL_AXIS] == 0 else None
    if not batch and model is None:
        return fn(v, weights, *geometry)
    batch_spec = tuple(batch) or None
    image = P(batch_spec, None, None, model)
    return jax.shard_map(
        lambda v, w: fn(v, w, *geometry),
        mesh=mesh,
        in_specs=(image, P(batch_spec, None, None, model, None, None)),
        out_specs=image,
        # Every free axis manual, those of size 1 too: a custom call left in a partly
        # automatic region is one Mosaic refuses.
        axis_names=frozenset(free_all),
        check_vma=False,
    )(v, weights)


def outlook_attention_pallas(
    v: jax.Array, logits: jax.Array, kernel_size: int, stride: int, padding: int
) -> jax.Array:
    """Fused outlook attention: softmax over the last axis of the scaled logits, the
    per-window aggregation and the fold, in one kernel (per device, `_per_device`).

    Args:
      v: values (B, H, W, C), C = heads * head_dim.
      logits: (B, h, w, heads, K*K, K*K) (output offset i, input offset j), h, w the
        window grid (H + 2 * padding - K) // stride + 1.
    Returns:
      (B, H, W, C) in v's dtype: `_aggregate_reference(v, softmax(logits), ...)`.
    """
    return _per_device(_attention, v, logits, (kernel_size, stride, padding))


def outlook_aggregate_pallas(
    v: jax.Array, attn: jax.Array, kernel_size: int, stride: int, padding: int
) -> jax.Array:
    """The same kernels with the weights given: the contract of `outlook_aggregate`,
    v (B, H, W, C), attn (B, h, w, heads, K*K, K*K) -> (B, H, W, C)."""
    return _per_device(_aggregate, v, attn, (kernel_size, stride, padding))
