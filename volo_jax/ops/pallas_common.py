"""What the Pallas kernels share: the call on each device's own images under a mesh
(`per_device`), the outlook window grid, integer helpers that lower on TPU and GPU, and
the softmax over a list of K*K arrays."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from volo_jax.ops.geometry import PatchGeometry
from volo_jax.sharding.mesh import BATCH_AXES, MODEL_AXIS


def per_device(
    fn: Callable[..., jax.Array],
    args: Sequence[jax.Array],
    heads_axes: Sequence[int | None],
    heads: int | None,
    out_heads_axis: int | None,
) -> jax.Array:
    """`fn(*args)` on each device's own images: a `shard_map` under the current mesh.

    Mosaic and Triton calls cannot be partitioned by XLA: on a mesh, GSPMD would gather
    the global batch onto every device (or, on TPU, refuse to compile). Under the
    current mesh (`jax.set_mesh`, as the trainer and `volo_jax.sharding` lower steps) the
    call is a `shard_map` over the batch axes that divide the batch (axis 0 of every
    argument and of the result, which has the first argument's rank), and over the
    'model' axis on the heads when it divides `heads` (tensor parallelism): argument i's
    axis `heads_axes[i]` and the result's `out_heads_axis` (None: not split;
    `heads=None`: nothing is). So every device runs
    the kernel on its own block and nothing is gathered. With no mesh, or inside a
    `shard_map` over those axes already, it is a plain call.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*args)
    free_all = [a for a in mesh.axis_names if a not in mesh.manual_axes]
    free = [a for a in free_all if mesh.shape[a] > 1]
    batch, size = [], 1
    for axis in BATCH_AXES:
        if axis in free and args[0].shape[0] % (size * mesh.shape[axis]) == 0:
            batch.append(axis)
            size *= mesh.shape[axis]
    split = heads is not None and MODEL_AXIS in free and heads % mesh.shape[MODEL_AXIS] == 0
    model = MODEL_AXIS if split else None
    if not batch and model is None:
        return fn(*args)

    def spec(ndim: int, heads_axis: int | None) -> P:
        dims: list = [tuple(batch) or None] + [None] * (ndim - 1)
        if heads_axis is not None:
            dims[heads_axis] = model
        return P(*dims)

    in_specs = tuple(spec(a.ndim, h) for a, h in zip(args, heads_axes, strict=True))
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=spec(args[0].ndim, out_heads_axis),
        # Every free axis manual, those of size 1 too: a custom call left in a partly
        # automatic region is one Mosaic refuses.
        axis_names=frozenset(free_all),
        check_vma=False,
    )(*args)


def window_grid(height: int, width: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """(h, w): the windows on an (height, width) input (`ops.geometry`)."""
    return PatchGeometry(kernel, stride, padding).out_size(height, width)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def divmod_(a, b: int):
    """divmod of a non-negative int or traced scalar (lax.div/rem: no sign handling,
    which Mosaic lowers only on a TPU host)."""
    if isinstance(a, int):
        return divmod(a, b)
    return jax.lax.div(a, b), jax.lax.rem(a, b)


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def softmax(logits: list[jax.Array]) -> list[jax.Array]:
    """Softmax over the list (the K*K input offsets), elementwise over the arrays."""
    top = functools.reduce(jnp.maximum, logits)
    e = [jnp.exp(x - top) for x in logits]
    inv = 1.0 / functools.reduce(jnp.add, e)
    return [x * inv for x in e]


def softmax_vjp(p: list[jax.Array], dp: list[jax.Array]) -> list[jax.Array]:
    """d_logits_j = P_j * (dP_j - sum_j' P_j' dP_j')."""
    total = functools.reduce(jnp.add, [a * b for a, b in zip(p, dp, strict=True)])
    return [a * (b - total) for a, b in zip(p, dp, strict=True)]
