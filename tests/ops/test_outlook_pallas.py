"""The Pallas outlook-attention kernels (`volo_jax.ops.outlook_pallas`).

On this CPU-only CI the kernels run in Pallas' interpret modes (the generic one, and the
TPU interpreter for the Mosaic kernel's strided accesses) and are checked against
`softmax(logits)` + `outlook._aggregate_reference`. The real compilers' checks (Mosaic,
Triton) are in test_outlook_pallas_compile.py; nothing here runs on an accelerator.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import pytest

from volo_jax.ops import outlook_pallas as op
from volo_jax.ops.outlook import _aggregate_reference

# (B, H, W, heads, head_dim, K, stride, padding)
VOLO_D1 = (2, 8, 8, 6, 32, 3, 2, 1)  # VOLO's geometry, D1's channels (192 / 6)
ODD_D2 = (1, 7, 9, 8, 32, 3, 2, 1)  # odd sizes, partial windows, D2/D3's 256 / 8
STRIDE1_D5 = (1, 6, 5, 12, 32, 3, 1, 1)  # stride 1, D4/D5's 384 / 12
PAD0 = (1, 9, 8, 2, 4, 3, 2, 0)  # no padding, tiny heads
BIG_K = (1, 9, 9, 2, 2, 5, 2, 2)  # K = 5


def _inputs(shape, dtype=jnp.float32, seed=0):
    b, height, width, heads, hd, k, s, p = shape
    h = (height + 2 * p - k) // s + 1
    w = (width + 2 * p - k) // s + 1
    kv, kl, kg = jax.random.split(jax.random.key(seed), 3)
    v = jax.random.normal(kv, (b, height, width, heads * hd), dtype)
    logits = 2 * jax.random.normal(kl, (b, h, w, heads, k * k, k * k), dtype)
    g = jax.random.normal(kg, v.shape, dtype)
    return v, logits, g, (k, s, p)


def _reference(v, logits, k, s, p):
    attn = jax.nn.softmax(logits.astype(jnp.float32), -1).astype(v.dtype)
    return _aggregate_reference(v, attn, k, s, p)


def _value_and_vjp(fn, v, logits, g):
    """One jit (one compile of the forward and backward kernels): out, (dv, dlogits)."""

    @jax.jit
    def run(v, logits, g):
        out, vjp = jax.vjp(fn, v, logits)
        return out, vjp(g)

    return run(v, logits, g)


def _check(fn, shape, dtype=jnp.float32, tol=1e-5):
    v, logits, g, geometry = _inputs(shape, dtype)
    out, grads = _value_and_vjp(lambda v, x: fn(v, x, *geometry), v, logits, g)
    ref_out, ref_grads = _value_and_vjp(lambda v, x: _reference(v, x, *geometry), v, logits, g)
    assert out.dtype == v.dtype and [x.dtype for x in grads] == [dtype, dtype]
    f32 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.float32))
    chex.assert_trees_all_close(f32(out), f32(ref_out), atol=tol, rtol=tol)
    chex.assert_trees_all_close(f32(grads), f32(ref_grads), atol=tol, rtol=tol)


# ------------------------------------------------------- interpret mode (CPU default)


@pytest.mark.parametrize(
    "shape",
    [
        VOLO_D1,
        ODD_D2,
        STRIDE1_D5,
        pytest.param(PAD0, marks=pytest.mark.slow),  # in the fast suite: the band test
        pytest.param(BIG_K, marks=pytest.mark.slow),
    ],
    ids=["volo-d1", "odd-d2", "stride1-d5", "pad0", "k5"],
)
def test_attention_equals_softmax_then_reference(shape):
    """The public entry (on the CPU: the Mosaic kernel, interpreted): output and the
    gradients of v and of the logits, float32. Each case compiles the interpreted
    kernels (~5-10 s on 2 cores), hence few cases in the fast suite."""
    _check(op.outlook_attention_pallas, shape)


def test_attention_bfloat16():
    """bf16 in, bf16 out; within bf16 rounding of the bf16 reference."""
    _check(op.outlook_attention_pallas, VOLO_D1, jnp.bfloat16, tol=5e-2)


def test_aggregate_with_weights_given():
    """`outlook_aggregate_pallas`: the same kernels without the softmax (weights in)."""
    v, logits, g, _ = _inputs(ODD_D2)
    attn = jax.nn.softmax(logits, -1)
    fn = functools.partial(op.outlook_aggregate_pallas, kernel_size=3, stride=2, padding=1)
    out, grads = _value_and_vjp(lambda v, a: fn(v, a), v, attn, g)
    ref = functools.partial(_aggregate_reference, kernel_size=3, stride=2, padding=1)
    ref_out, ref_grads = _value_and_vjp(lambda v, a: ref(v, a), v, attn, g)
    chex.assert_trees_all_close((out, grads), (ref_out, ref_grads), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("shape", "rows"),
    [
        ((1, 12, 9, 2, 4, 3, 2, 0), 2),
        pytest.param((1, 9, 7, 2, 4, 3, 1, 1), 4, marks=pytest.mark.slow),
    ],
    ids=["stride2-pad0-3bands", "stride1-3bands"],
)
def test_tpu_kernel_row_bands(shape, rows):
    """Several row bands per image: halo blocks above and below, windows recomputed by
    the neighbouring band, partial last band."""
    b, height, width, heads, hd, k, s, p = shape
    plan = op.tpu_plan((b, height, width, heads * hd), heads, k, s, p, jnp.float32, rows)
    assert plan.bands == 3

    def fn(v, logits, k, s, p):
        return _tpu_vjp(v, logits, k, s, p, rows)

    _check(fn, shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _tpu_vjp(v, logits, k, s, p, rows):
    return op.tpu_forward(v, logits, k, s, p, interpret="generic", rows=rows)


def _tpu_vjp_fwd(v, logits, k, s, p, rows):
    return _tpu_vjp(v, logits, k, s, p, rows), (v, logits)


def _tpu_vjp_bwd(k, s, p, rows, res, g):
    return op.tpu_backward(*res, g, k, s, p, interpret="generic", rows=rows)


_tpu_vjp.defvjp(_tpu_vjp_fwd, _tpu_vjp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _triton_vjp(v, logits, k, s, p):
    return op.triton_forward(v, logits, k, s, p, interpret=True)


def _triton_vjp_fwd(v, logits, k, s, p):
    return _triton_vjp(v, logits, k, s, p), (v, logits)


def _triton_vjp_bwd(k, s, p, res, g):
    return op.triton_backward(*res, g, k, s, p, interpret=True)


_triton_vjp.defvjp(_triton_vjp_fwd, _triton_vjp_bwd)


@pytest.mark.parametrize(
    "shape",
    [
        VOLO_D1,
        pytest.param(ODD_D2, marks=pytest.mark.slow),
        pytest.param(STRIDE1_D5, marks=pytest.mark.slow),
        pytest.param(PAD0, marks=pytest.mark.slow),
    ],
    ids=["volo-d1", "odd-d2", "stride1-d5", "pad0"],
)
def test_triton_kernels_interpreted(shape):
    """The CUDA (Triton) kernels, run by Pallas' interpreter."""
    _check(_triton_vjp, shape)


@pytest.mark.slow
def test_triton_kernels_bfloat16():
    _check(_triton_vjp, ODD_D2, jnp.bfloat16, tol=5e-2)


@pytest.mark.parametrize(
    ("shape", "dtype", "tol"),
    [
        ((1, 7, 9, 6, 32, 3, 2, 1), jnp.float32, 1e-5),  # C=192: a full and a half lane tile
        ((1, 8, 8, 8, 32, 3, 2, 1), jnp.bfloat16, 5e-2),  # C=256, bf16 blocks
    ],
    ids=["c192-f32", "c256-bf16"],
)
def test_tpu_kernel_strided_accesses_interpreted(shape, dtype, tol):
    """The Mosaic kernel with its real strided loads and stores (`pl.ds(.., stride=s)`)
    on the (groups, rows, 128) lane tiles, run by Pallas' TPU interpreter (TPU memory
    spaces and semantics; the CPU default uses contiguous spans instead)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
    def fn(v, logits, k, s, p):
        return op.tpu_forward(v, logits, k, s, p, interpret="tpu")

    def fwd(v, logits, k, s, p):
        return fn(v, logits, k, s, p), (v, logits)

    def bwd(k, s, p, res, g):
        return op.tpu_backward(*res, g, k, s, p, interpret="tpu")

    fn.defvjp(fwd, bwd)
    _check(fn, shape, dtype, tol)


def test_bad_logits_shape_is_a_clear_error():
    v, logits = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 3, 4, 2, 9, 9))
    with pytest.raises(ValueError, match="expected weights of shape"):
        op.outlook_attention_pallas(v, logits, 3, 2, 1)


# --------------------------------------------------- lowering for TPU and CUDA

# VOLO outlooker stage: (channels, heads) per model, window grid per resolution.
MODELS = {"d1": (192, 6), "d2": (256, 8), "d3": (256, 8), "d4": (384, 12), "d5": (384, 12)}
GRIDS = {224: 28, 384: 48, 448: 56, 512: 64}
_TRITON = "__gpu$xla.gpu.triton"


def _export(fn, platform, *args):
    checks = [jax.export.DisabledSafetyCheck.custom_call(_TRITON)] if platform == "cuda" else []
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize(("model", "resolution"), [("d1", 224), ("d5", 512)])
def test_lowers_to_a_kernel(platform, model, resolution):
    """Forward and gradient, bf16, batch 8: a Mosaic (`tpu_custom_call`) or Triton
    custom call, and no interpreter loop (a CPU host lowering for an accelerator)."""
    channels, heads = MODELS[model]
    size = GRIDS[resolution]
    h = (size + 2 - 3) // 2 + 1
    v = jax.ShapeDtypeStruct((8, size, size, channels), jnp.bfloat16)
    logits = jax.ShapeDtypeStruct((8, h, h, heads, 9, 9), jnp.bfloat16)

    def forward(v, logits):
        return op.outlook_attention_pallas(v, logits, 3, 2, 1)

    def loss(v, logits):
        return jnp.sum(forward(v, logits).astype(jnp.float32) ** 2)

    grad = jax.grad(loss, argnums=(0, 1))
    # TPU: one forward and one backward kernel; CUDA: the forward, d_v and d_logits.
    for fn, calls in [(forward, 1), (grad, 2 if platform == "tpu" else 3)]:
        module = _export(fn, platform, v, logits).mlir_module()
        if platform == "tpu":
            assert module.count("tpu_custom_call") == calls
            assert _TRITON not in module
        else:
            assert module.count(_TRITON) == calls
            assert "tpu_custom_call" not in module
        assert "stablehlo.while" not in module  # Pallas' interpreter: a loop over the grid


# ------------------------------------------------------------------ block budgets


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("resolution", sorted(GRIDS))
def test_blocks_fit_vmem_and_registers(model, resolution):
    """Every VOLO outlooker shape: the TPU band's VMEM footprint (double-buffered blocks
    + f32 scratch, forward and backward) is under the budget and the scoped limit; the
    Triton programs' live tiles fit the register budget."""
    channels, heads = MODELS[model]
    size = GRIDS[resolution]
    shape = (128, size, size, channels)
    for dtype in (jnp.bfloat16, jnp.float32):
        plan = op.tpu_plan(shape, heads, 3, 2, 1, dtype)
        for backward in (False, True):
            footprint = op.tpu_vmem_bytes(plan, backward)
            assert footprint <= op.TPU_VMEM_BUDGET < op.TPU_VMEM_LIMIT
        assert plan.band * plan.bands >= size and plan.rows >= 1
    assert op.triton_tile_bytes(shape, heads, 3, 2) <= op.TRITON_TILE_BUDGET


def test_large_images_are_banded():
    """D5 at 512 does not fit whole-image blocks: it is split into row bands."""
    plan = op.tpu_plan((8, 64, 64, 384), 12, 3, 2, 1, jnp.bfloat16)
    whole = op.tpu_plan((8, 64, 64, 384), 12, 3, 2, 1, jnp.bfloat16, rows=32)
    assert plan.bands > 1 and whole.bands == 1
    assert op.tpu_vmem_bytes(whole, backward=True) > op.TPU_VMEM_BUDGET
