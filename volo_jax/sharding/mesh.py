"""The one place that builds the device mesh and the shardings used with it.

The mesh has three axes, ('data', 'fsdp', 'model'), sized by `config.mesh` (-1 takes
the devices the others leave). Batches are split over ('data', 'fsdp'); how the
parameters are laid out on the mesh is decided by `volo_jax.sharding.rules`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from volo_jax.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, MODEL_AXIS)
#: Mesh axes the batch dimension is split over (those the mesh has).
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def mesh_shape(sizes: Mapping[str, int] | None, num_devices: int) -> tuple[int, ...]:
    """Sizes of ('data', 'fsdp', 'model') from a {axis: size} mapping (missing axes
    are 1; at most one -1, which takes the remaining devices).

    Raises ConfigError if the sizes are unknown axes, non-positive, or do not multiply
    to `num_devices`.
    """
    sizes = {DATA_AXIS: -1} if sizes is None else dict(sizes)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"config.mesh: unknown axes {unknown}; the axes are {list(MESH_AXES)}")
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape, strict=True))
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(
            f"config.mesh: {described}: sizes must be positive, with at most "
            "one -1 (the remaining devices)"
        )
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(
                f"config.mesh: {described}: the fixed axes ({known} devices) do "
                f"not divide the {num_devices} devices"
            )
        shape[shape.index(-1)] = num_devices // known
    elif known != num_devices:
        raise ConfigError(
            f"config.mesh: {described} is {known} devices, but there are {num_devices} devices"
        )
    return tuple(shape)


def create_mesh(
    sizes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """The ('data', 'fsdp', 'model') mesh over `devices` (default: all devices of all
    processes), sized by `sizes` (e.g. `config.mesh`; default: all devices on 'data').

    The axes are `AxisType.Auto` (GSPMD style): shardings come from the jit's
    in/out shardings and XLA propagates them through the model.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def axis_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
    """Devices along one mesh axis or the product over several (1 for None)."""
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[name] for name in names)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The axes of `mesh` that split the batch (('data', 'fsdp') on the standard mesh)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ('data', 'fsdp'), the other dims whole."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (scalars, metrics, small state)."""
    return NamedSharding(mesh, P())


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's part of a global batch (NumPy arrays, leading dim = local batch)
    -> global `jax.Array`s split over ('data', 'fsdp').

    Raises ConfigError if the global batch does not divide over the batch axes.
    """
    sharding = batch_sharding(mesh)
    shards = axis_size(mesh, batch_axes(mesh))

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        if (x.shape[0] * jax.process_count()) % shards:
            raise ConfigError(
                f"a batch of {x.shape[0] * jax.process_count()} examples does not split over "
                f"the {shards} devices of the mesh axes {batch_axes(mesh)}; use a multiple"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map(put, batch)


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Makes `mesh` the current mesh inside the block (`jax.set_mesh`, or the older
    `jax.sharding.use_mesh`)."""
    setter = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
    if setter is None:  # pragma: no cover - very old jax
        with mesh:
            yield mesh
        return
    with setter(mesh):
        yield mesh
