"""Multi-head self-attention as one Pallas kernel on TPU, forward and backward (custom
VJP), straight from the qkv projection's output:

- `self_attention_pallas(qkv, heads)`: qkv (B, N, 3C) as timm's `qkv` layer makes it
  ([q | k | v], heads contiguous) -> (B, N, C), equal to `dot_product_attention` on the
  split heads. Gradient for qkv.
- `pallas_supported(tokens, channels, heads, dtype)`: whether the kernel takes that shape
  (C a multiple of 128, one image's keys within its VMEM budget).

The Mosaic kernels are platform code, in `volo_jax/ops/tpu/attention.py` (why a kernel
of its own, layout, VMEM plan). Here: the custom VJP, the choice by the platform being
lowered for (`lax.platform_dependent`: the Mosaic kernels on TPU, Pallas' interpreter of
them elsewhere, which is what the CPU tests check), and the call per device under a
mesh. Under tensor parallelism (a 'model' axis over the heads) XLA's attention runs
instead: qkv's lanes interleave q, k and v, so a device's heads are not one block.
"""

from __future__ import annotations

import functools

import jax

from volo_jax.ops.pallas_common import per_device
from volo_jax.ops.tpu.attention import (
    attention_plan,
    check_qkv,
    tpu_attention_backward,
    tpu_attention_forward,
)
from volo_jax.sharding.mesh import MODEL_AXIS


def pallas_supported(tokens: int, channels: int, heads: int, dtype) -> bool:
    """Whether `self_attention_pallas` takes qkv of (B, tokens, 3 * channels) in `dtype`."""
    try:
        attention_plan(1, tokens, channels, heads, dtype)
    except ValueError:
        return False
    return True


def tensor_parallel() -> bool:
    """Whether the current mesh splits the heads over a 'model' axis of more than one
    device (outside a `shard_map` over it)."""
    mesh = jax.sharding.get_abstract_mesh()
    return (
        not mesh.empty
        and MODEL_AXIS in mesh.axis_names
        and MODEL_AXIS not in mesh.manual_axes
        and mesh.shape[MODEL_AXIS] > 1
    )


def _forward(qkv: jax.Array, heads: int) -> jax.Array:
    return jax.lax.platform_dependent(
        qkv,
        tpu=functools.partial(tpu_attention_forward, heads=heads),
        default=functools.partial(tpu_attention_forward, heads=heads, interpret=True),
    )


def _backward(qkv: jax.Array, g: jax.Array, heads: int) -> jax.Array:
    return jax.lax.platform_dependent(
        qkv,
        g,
        tpu=functools.partial(tpu_attention_backward, heads=heads),
        default=functools.partial(tpu_attention_backward, heads=heads, interpret=True),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _attention(qkv: jax.Array, heads: int) -> jax.Array:
    return _forward(qkv, heads)


def _attention_fwd(qkv: jax.Array, heads: int):
    return _forward(qkv, heads), qkv


def _attention_bwd(heads: int, qkv: jax.Array, g: jax.Array):
    return (_backward(qkv, g, heads),)


_attention.defvjp(_attention_fwd, _attention_bwd)


def self_attention_pallas(qkv: jax.Array, heads: int) -> jax.Array:
    """softmax(q k^T / sqrt(hd)) v per head, the softmax in float32, on each device's own
    images (`pallas_common.per_device`).

    Args:
      qkv: (B, N, 3C), C = heads * hd: q, k and v side by side on the last axis, each
        head's hd channels contiguous (timm's `qkv(x).reshape(B, N, 3, heads, hd)`).
    Returns:
      (B, N, C) in qkv's dtype, heads side by side (timm's `transpose(1, 2).reshape`).
    """
    check_qkv(qkv)
    return per_device(lambda x: _attention(x, heads), (qkv,), (None,), None, None)


__all__ = ["pallas_supported", "self_attention_pallas", "tensor_parallel"]
