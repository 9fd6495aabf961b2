"""Multi-head self-attention as Pallas kernels for TPU (Mosaic), for VOLO's heads of 32 and
48 channels over a few hundred tokens: `tpu_attention_forward(qkv, heads)` -> (B, N, C)
and `tpu_attention_backward(qkv, g, heads)` -> d_qkv (B, N, 3C).
`volo_jax.ops.attention_pallas` holds the custom VJP and the per-device call.

Why a kernel of its own: XLA's attention writes each head's float32 logits and
softmax, (heads, N, N) per image, to HBM and reads them back in the backward. For VOLO's
transformer stages that was most of the train step's memory traffic (docs/performance.md,
"A self-attention kernel for VOLO's heads"). Here every key of an image stays in VMEM
(N is 196 at 224, 1024 at 512), so the logits never leave the chip: HBM sees qkv, the
output and, in the backward, the output's cotangent and d_qkv. jax's flash attention
kernels are built for heads of 128+ channels and token blocks of 128; VOLO's 32-channel
heads and 196 tokens would be padded 4x on the lanes and to 256 tokens.

Layout: qkv is the qkv projection's output as timm lays it out, (B, N, 3C) with
C = heads * hd on the lanes ([q | k | v], each [head 0 | head 1 | ...]). The heads are
taken in groups of `group` lanes, the fewest whole heads that fill whole 128-lane tiles
(4 heads of 32 in 128 lanes, 8 of 48 in 384); a program's q, k and v are lane blocks of
that one array (block g, G + g and 2G + g for G = C / group). The backward returns
d_q, d_k and d_v as (B, N, C) each. No transposes, no lane padding of the heads.
Per head, the kernel works on the 128-lane-aligned window of channels that holds the
head (one tile for 32-channel heads, one or two for 48), with the other heads' lanes
zeroed: q k^T over the window is the head's own product, and a product over a tile
costs the MXU the same pass as one over 32 channels padded to it.
Grid: (B / images, C / group), both 'parallel'; a program loops over its images and
over query tiles of `tile` rows (all N rows up to 512 tokens), keys whole. The
backward recomputes the softmax from q and k (nothing but qkv is saved for it), takes
rowsum(P * dP) from the recomputed P, and accumulates d_k and d_v of the whole image in
float32 VMEM over the query tiles.
Products take bf16 operands with float32 accumulation (float32 operands at HIGHEST
precision); the softmax is float32, as in `volo_jax.ops.attention`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from volo_jax.ops.pallas_common import round_up
from volo_jax.ops.tpu import MOSAIC_INTERPRETERS

#: Lanes of a TPU vector register: heads are read in windows of whole 128-lane tiles.
LANES = 128
#: Elements of one (tile, N) float32 score matrix; the query tile is the largest that
#: keeps it under this (1 MiB), so a few of them fit VMEM beside the blocks.
SCORE_ELEMENTS = 2**18
#: VMEM a program's blocks and scratch may use (estimated), and the limit requested:
#: within the 16 MiB that every TPU generation from v4 on gives a kernel.
TPU_VMEM_BUDGET = 15 * 2**20
TPU_VMEM_LIMIT = 16 * 2**20
#: Images a program takes at most.
MAX_IMAGES = 8


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Static geometry of the kernels (module docstring)."""

    tokens: int  # N
    channels: int  # C
    heads: int
    itemsize: int
    images: int  # images a program takes
    tile: int  # query rows at a time

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads

    @property
    def group(self) -> int:
        """Lanes of a program's heads: the fewest whole heads filling whole lane tiles."""
        lanes = math.lcm(self.head_dim, LANES)
        return lanes if self.channels % lanes == 0 else self.channels

    @property
    def groups(self) -> int:
        return self.channels // self.group

    @property
    def group_heads(self) -> int:
        return self.group // self.head_dim

    def window(self, head: int) -> tuple[int, int]:
        """[lo, hi): the 128-lane-aligned channels of the group that hold its `head`."""
        d = self.head_dim
        return head * d // LANES * LANES, round_up((head + 1) * d, LANES)


def _tile_bytes(rows: int, lanes: int, itemsize: int) -> int:
    sublanes = 8 * (4 // itemsize)  # a (8, 128) tile of 32-bit values, (16, 128) of bf16
    return round_up(rows, sublanes) * round_up(lanes, LANES) * itemsize


def attention_vmem_bytes(plan: AttentionPlan, backward: bool) -> int:
    """Estimated VMEM of one program: double-buffered blocks, float32 accumulators and
    the (tile, N) float32 score matrices live at once."""
    n, c, t = plan.tokens, plan.group, plan.tile
    block = plan.images * _tile_bytes(n, c, plan.itemsize)
    scores = 4 * _tile_bytes(t, n, 4)
    if backward:  # q, k, v, g in; d_q, d_k, d_v out; their float32 accumulators
        return 2 * 7 * block + _tile_bytes(t, c, 4) + 2 * _tile_bytes(n, c, 4) + scores
    return 2 * 4 * block + _tile_bytes(t, c, 4) + scores  # q, k, v in; out


def query_tiles(tokens: int) -> list[int]:
    """Query tiles to try, largest first: all N rows when the (N, N) scores fit
    SCORE_ELEMENTS, then the divisors of N that are multiples of 8 and keep (tile, N)
    within it, down to 64 rows."""
    tiles = [tokens] if tokens * tokens <= SCORE_ELEMENTS else []
    tiles += [
        t
        for t in range(tokens - 8, 63, -8)
        if tokens % t == 0 and t % 8 == 0 and t * tokens <= SCORE_ELEMENTS
    ]
    return tiles


def attention_plan(
    batch: int,
    tokens: int,
    channels: int,
    heads: int,
    dtype,
    images: int | None = None,
    tile: int | None = None,
) -> AttentionPlan:
    """The plan for (B, N, 3C) qkv: the largest query tile (`query_tiles`), then the most
    images a program (up to MAX_IMAGES, dividing the batch), whose backward fits
    TPU_VMEM_BUDGET; `images` and `tile` (a divisor of N) as given. A ValueError when no
    tile of one image fits (the caller runs XLA's attention instead)."""
    if channels % heads:
        raise ValueError(f"{heads} heads do not divide {channels} channels")
    if channels % LANES:
        raise ValueError(f"the attention kernel needs C a multiple of {LANES}; got C={channels}")
    if tile is not None and (tokens % tile or (tile % 8 and tile != tokens)):
        raise ValueError(f"a query tile of {tile} rows must divide {tokens} tokens in 8s")
    itemsize = jnp.dtype(dtype).itemsize
    for t in [tile] if tile is not None else query_tiles(tokens):
        if images is not None:
            return AttentionPlan(tokens, channels, heads, itemsize, images, t)
        for n in range(min(MAX_IMAGES, batch), 0, -1):
            plan = AttentionPlan(tokens, channels, heads, itemsize, n, t)
            if batch % n == 0 and attention_vmem_bytes(plan, backward=True) <= TPU_VMEM_BUDGET:
                return plan
    smallest = AttentionPlan(tokens, channels, heads, itemsize, 1, min(query_tiles(tokens) or [8]))
    need = attention_vmem_bytes(smallest, backward=True) / 2**20
    raise ValueError(
        f"self-attention over {tokens} tokens x {channels} channels needs {need:.1f} MiB of "
        f"VMEM for one image, over the kernel's {TPU_VMEM_BUDGET / 2**20:.0f} MiB budget"
    )


def _head_mask(plan: AttentionPlan, head: int) -> jax.Array:
    """(1, hi - lo) bool: the lanes of `head` within its window."""
    lo, hi = plan.window(head)
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, hi - lo), 1) + lo
    d = plan.head_dim
    return (lane >= head * d) & (lane < (head + 1) * d)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """a . b over a's dim contract[0] and b's dim contract[1], float32 result; float32
    operands at HIGHEST precision (Mosaic's default passes would round them to bf16).
    Explicit either way: a bf16 product under jax_default_matmul_precision='highest'
    would ask Mosaic for an fp32-precision product of bf16 operands, which it rejects."""
    f32 = a.dtype == jnp.float32
    precision = jax.lax.Precision.HIGHEST if f32 else jax.lax.Precision.DEFAULT
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _softmax_scores(plan: AttentionPlan, q: jax.Array, k: jax.Array) -> jax.Array:
    """softmax of one head's scaled q k^T, float32 (tile, N). q: the head's window with
    the other lanes zeroed; k: the window."""
    s = _dot(q, k, (1, 1)) * plan.head_dim**-0.5
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


def _rows(plan: AttentionPlan, r) -> pl.Slice:
    t = plan.tile
    return pl.ds(pl.multiple_of(r * t, 8) if t % 8 == 0 else r * t, t)


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, acc_ref, *, plan: AttentionPlan) -> None:
    tiles = plan.tokens // plan.tile

    def one_tile(step, carry):
        b, r = jax.lax.div(step, tiles), jax.lax.rem(step, tiles)
        rows = _rows(plan, r)
        q = q_ref[b, rows, :]
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        for head in range(plan.group_heads):
            lo, hi = plan.window(head)
            mask = _head_mask(plan, head)
            p = _softmax_scores(plan, jnp.where(mask, q[:, lo:hi], 0), k_ref[b, :, lo:hi])
            v = v_ref[b, :, lo:hi]
            pv = _dot(p.astype(v.dtype), v, (1, 0))  # (tile, window)
            acc_ref[:, lo:hi] = acc_ref[:, lo:hi] + jnp.where(mask, pv, 0.0)
        o_ref[b, rows, :] = acc_ref[...].astype(o_ref.dtype)
        return carry

    jax.lax.fori_loop(0, plan.images * tiles, one_tile, 0)


def _backward_kernel(
    q_ref, k_ref, v_ref, g_ref, dq_ref, dk_ref, dv_ref, dq_acc, dk_acc, dv_acc, *, plan
) -> None:
    scale = plan.head_dim**-0.5

    def image(b, carry):
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

        def one_tile(r, carry):
            rows = _rows(plan, r)
            q, g = q_ref[b, rows, :], g_ref[b, rows, :]
            dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
            for head in range(plan.group_heads):
                lo, hi = plan.window(head)
                mask = _head_mask(plan, head)
                qh = jnp.where(mask, q[:, lo:hi], 0)
                gh = jnp.where(mask, g[:, lo:hi], 0)
                k, v = k_ref[b, :, lo:hi], v_ref[b, :, lo:hi]
                p = _softmax_scores(plan, qh, k)
                dp = _dot(gh, v, (1, 1))  # (tile, N): dO . v
                ds = (p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * scale).astype(k.dtype)
                dq = _dot(ds, k, (1, 0))  # (tile, window)
                dq_acc[:, lo:hi] = dq_acc[:, lo:hi] + jnp.where(mask, dq, 0.0)
                # qh and gh are zero off the head's lanes, so these products are too.
                dk_acc[:, lo:hi] = dk_acc[:, lo:hi] + _dot(ds, qh, (0, 0))
                dv_acc[:, lo:hi] = dv_acc[:, lo:hi] + _dot(p.astype(g.dtype), gh, (0, 0))
            dq_ref[b, rows, :] = dq_acc[...].astype(dq_ref.dtype)
            return carry

        jax.lax.fori_loop(0, plan.tokens // plan.tile, one_tile, 0)
        dk_ref[b] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[b] = dv_acc[...].astype(dv_ref.dtype)
        return carry

    jax.lax.fori_loop(0, plan.images, image, 0)


def _cost(plan: AttentionPlan, batch: int, backward: bool) -> pl.CostEstimate:
    """The heads' products (q k^T and P v; the backward recomputes q k^T and adds dO v^T,
    dS k, dS^T q, P^T dO), the exponentials, and qkv / output / cotangent traffic."""
    n, c = plan.tokens, plan.channels
    per_product = 2 * n * n * c  # all heads: 2 N N hd each
    qkv = batch * n * 3 * c * plan.itemsize
    out = batch * n * c * plan.itemsize
    products, traffic = (5, 2 * qkv + out) if backward else (2, qkv + out)
    return pl.CostEstimate(
        flops=batch * products * per_product,
        transcendentals=batch * plan.heads * n * n,
        bytes_accessed=traffic,
    )


def check_qkv(qkv: jax.Array) -> tuple[int, int, int]:
    """(B, N, C) of qkv (B, N, 3C); a ValueError naming the shape otherwise."""
    if qkv.ndim != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"expected qkv of shape (B, N, 3C); got {qkv.shape}")
    b, n, c3 = qkv.shape
    return b, n, c3 // 3


def _call(plan: AttentionPlan, batch: int, backward: bool, interpret, out_shape):
    n, width, groups = plan.tokens, plan.group, plan.groups

    def block(part: int) -> pl.BlockSpec:  # lane block `part * groups + g` of a program
        return pl.BlockSpec(
            (plan.images, n, width), lambda i, g, part=part: (i, 0, part * groups + g)
        )

    if backward:
        kernel = _backward_kernel
        in_specs = [block(0), block(1), block(2), block(0)]
        out_specs = [block(0)] * 3
        scratch = [pltpu.VMEM((plan.tile, width), jnp.float32)]
        scratch += [pltpu.VMEM((n, width), jnp.float32)] * 2
    else:
        kernel = _forward_kernel
        in_specs = [block(0), block(1), block(2)]
        out_specs = block(0)
        scratch = [pltpu.VMEM((plan.tile, width), jnp.float32)]
    return pl.pallas_call(
        functools.partial(kernel, plan=plan),
        grid=(batch // plan.images, groups),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=TPU_VMEM_LIMIT
        ),
        cost_estimate=_cost(plan, batch, backward),
        interpret=MOSAIC_INTERPRETERS[interpret],
        name="self_attention_bwd" if backward else "self_attention_fwd",
    )


def tpu_attention_forward(
    qkv: jax.Array, heads: int, *, interpret=False, images: int | None = None, tile=None
) -> jax.Array:
    """qkv (B, N, 3C) -> softmax(q k^T / sqrt(hd)) v per head, (B, N, C) in qkv's dtype.
    `images` and `tile` override the plan's (`attention_plan`)."""
    b, n, c = check_qkv(qkv)
    plan = attention_plan(b, n, c, heads, qkv.dtype, images, tile)
    out_shape = jax.ShapeDtypeStruct((b, n, c), qkv.dtype)
    return _call(plan, b, False, interpret, out_shape)(qkv, qkv, qkv)


def tpu_attention_backward(
    qkv: jax.Array,
    g: jax.Array,
    heads: int,
    *,
    interpret=False,
    images: int | None = None,
    tile: int | None = None,
) -> jax.Array:
    """d_qkv (B, N, 3C) for the output cotangent g (B, N, C)."""
    b, n, c = check_qkv(qkv)
    plan = attention_plan(b, n, c, heads, qkv.dtype, images, tile)
    out_shape = [jax.ShapeDtypeStruct((b, n, c), qkv.dtype)] * 3
    dq, dk, dv = _call(plan, b, True, interpret, out_shape)(qkv, qkv, qkv, g.astype(qkv.dtype))
    return jnp.concatenate([dq, dk, dv], axis=-1)
