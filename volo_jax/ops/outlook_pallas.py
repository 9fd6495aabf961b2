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
from jax.sharding import PartitionSpec as P

from volo_jax.ops.gpu.outlook import (
    TRITON_CHANNEL_BLOCK,
    TRITON_TILE_BUDGET,
    triton_backward,
    triton_forward,
    triton_tile_bytes,
)
from volo_jax.ops.pallas_common import window_grid
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
from volo_jax.sharding.mesh import BATCH_AXES, MODEL_AXIS

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
