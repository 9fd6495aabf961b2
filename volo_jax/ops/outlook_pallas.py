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

The kernels themselves are platform code, kept apart: `volo_jax/ops/tpu/outlook.py`
(Mosaic: layout, band plan, VMEM budget) and `volo_jax/ops/gpu/outlook.py` (Triton);
their names are re-exported here. Here: the custom VJP, the choice of kernel by the
platform being lowered for, and the per-device `shard_map` under a mesh.

Status: both kernels compile with the real compilers for D1-D5's outlook stages
(tests/ops/test_outlook_pallas_compile.py: Mosaic for TPU v5e, v6e, v5p, v4; Triton and
ptxas for H100, A100, on compile-only devices) and equal the reference in Pallas'
interpreters on the CPU; their speed on the chips is not measured yet.
"""

from __future__ import annotations

import functools

import jax

from volo_jax.ops.gpu.outlook import (
    TRITON_CHANNEL_BLOCK,
    TRITON_TILE_BUDGET,
    triton_backward,
    triton_forward,
    triton_tile_bytes,
)
from volo_jax.ops.pallas_common import per_device, window_grid
from volo_jax.ops.tpu.outlook import (
    LANES,
    TPU_VMEM_BUDGET,
    TPU_VMEM_LIMIT,
    TpuPlan,
    tpu_backward,
    tpu_forward,
    tpu_plan,
    tpu_vmem_bytes,
)

__all__ = [
    "LANES",
    "TPU_VMEM_BUDGET",
    "TPU_VMEM_LIMIT",
    "TRITON_CHANNEL_BLOCK",
    "TRITON_TILE_BUDGET",
    "TpuPlan",
    "outlook_aggregate_pallas",
    "outlook_attention_pallas",
    "tpu_backward",
    "tpu_forward",
    "tpu_plan",
    "tpu_vmem_bytes",
    "triton_backward",
    "triton_forward",
    "triton_tile_bytes",
]


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
    h, w = window_grid(height, width, kernel, stride, padding)
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
    """`fn(v, weights, *geometry)` on each device's own images, heads split over the
    'model' axis when it divides them (`pallas_common.per_device`)."""
    return per_device(lambda v, w: fn(v, w, *geometry), (v, weights), (3, 3), weights.shape[3], 3)


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
