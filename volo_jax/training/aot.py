"""Ahead-of-time compiles of the train step, for any mesh: real devices, or the
compile-only TPU slices and GPU machines of `volo_jax.sharding.deviceless`.

    compiled = aot.compile_train_step(config, "v5e-8")
    aot.summary(compiled, config.train.batch_size)   # memory, FLOPs, bytes, collectives

This is what the trainer runs (`train.jit_train_step`: the same shardings, donation and
platform branch), lowered from abstract inputs (`jax.ShapeDtypeStruct`s: nothing is
allocated) under the mesh, and compiled by the platform's own compiler, so it answers
"does it compile, partition and fit" for a pod from a laptop, as MaxText's
train_compile does.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from volo_jax.models import create_model
from volo_jax.sharding import (
    batch_sharding,
    create_mesh,
    deviceless,
    logical_axes,
    state_shardings,
    use_mesh,
    with_shardings,
)
from volo_jax.sharding.rules import rules_from_config
from volo_jax.training import train
from volo_jax.training.config import model_overrides

if TYPE_CHECKING:
    import ml_collections

#: Collective ops of a compiled program, as they are named in its HLO text.
COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)


def mesh_for(config: ml_collections.ConfigDict, accelerator: str | Sequence[jax.Device]):
    """`create_mesh(config.mesh)` over the compile-only devices of `accelerator` (a name
    of `deviceless.ACCELERATORS`) or over the given devices."""
    devices = deviceless.devices(accelerator) if isinstance(accelerator, str) else list(accelerator)
    return create_mesh(config.get("mesh"), devices)


def lower_train_step(
    config: ml_collections.ConfigDict,
    accelerator: str | Sequence[jax.Device],
    steps_per_epoch: int = 1000,
) -> jax.stages.Lowered:
    """The trainer's step for `config` on `accelerator`, lowered from abstract inputs:
    the state in its shardings, a global batch of config.train.batch_size images split
    over the batch axes, no teacher."""
    mesh = mesh_for(config, accelerator)
    model = create_model(config.model, platform=mesh, **model_overrides(config))
    abstract, _ = train.abstract_train_state(config, model, steps_per_epoch)
    shardings = state_shardings(abstract, logical_axes(model), mesh, rules_from_config(config))
    step = train.jit_train_step(config, model, mesh, shardings)
    size, batch = config.img_size, config.train.batch_size
    images = batch_sharding(mesh)
    inputs = {
        "image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=images),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=images),
    }
    with use_mesh(mesh):
        return step.lower(with_shardings(abstract, shardings), inputs, None)


def compile_train_step(
    config: ml_collections.ConfigDict,
    accelerator: str | Sequence[jax.Device],
    steps_per_epoch: int = 1000,
) -> jax.stages.Compiled:
    """`lower_train_step(...).compile()`: XLA:TPU + Mosaic or XLA:GPU + Triton on
    compile-only devices."""
    return lower_train_step(config, accelerator, steps_per_epoch).compile()


@dataclasses.dataclass(frozen=True)
class Summary:
    """What one compiled step costs a device. Bytes are per device; `flops` and
    `bytes_accessed` are XLA's cost model per image (None where the compiler has none,
    as XLA:GPU's deviceless client)."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops_per_image: float | None
    bytes_accessed_per_image: float | None
    collectives: dict[str, int]
    hlo_bytes_per_image: float  # `hlo_bytes_accessed`, for every platform

    @property
    def peak_bytes(self) -> int:
        """Live at once: arguments, outputs not written over a donated argument, and
        temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def flops_per_byte(self) -> float | None:
        if not self.flops_per_image or not self.bytes_accessed_per_image:
            return None
        return self.flops_per_image / self.bytes_accessed_per_image


def collectives(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Count of each collective op (`COLLECTIVES`) in the compiled program's HLO."""
    text = compiled.as_text()
    counts = {}
    for name in COLLECTIVES:
        n = len(re.findall(rf"= [^=\n]*? {name}(?:-start)?\(", text))
        if n:
            counts[name] = n
    return counts


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2}
_NO_TRAFFIC = (
    "parameter",
    "constant",
    "bitcast",
    "get-tuple-element",
    "tuple",
    "after-all",
    "partition-id",
    "replica-id",
)


#: Async copies and slices (XLA:TPU's moves between HBM and on-chip memory, `S(1)` in a
#: layout): their result is (source, destination, context), so what moves is the
#: destination, read and written once.
_ASYNC_MOVES = ("copy-start", "slice-start")
#: The opcode and its opening parenthesis: the first lower-case word after a space that
#: a '(' follows. Result shapes come before it, and TPU layouts carry parentheses of their
#: own (`{3,0,2,1:T(8,128)(2,1)}`), so the first '(' is not the operand list's.
_OPCODE = re.compile(r"\s([a-z][\w.-]*)\(")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _ITEMSIZE.get(dtype, 8 if dtype.endswith("64") else 4)
    return total


def _control_flow_computations(hlo: str) -> set[str]:
    """Names of the computations a compiled module runs as control flow (while bodies and
    conditions, conditional branches, calls): the ones whose instructions touch memory
    themselves, unlike fusions' and reductions' inner computations."""
    names: set[str] = set()
    for line in hlo.splitlines():
        for key in ("body", "condition", "true_computation", "false_computation"):
            names.update(re.findall(rf"\b{key}=(%[\w.\-]+)", line))
        for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
            names.update(n.strip() for n in group.split(","))
        if re.search(r" call\(", line):
            names.update(re.findall(r"\bto_apply=(%[\w.\-]+)", line))
    return names


def hlo_bytes_accessed(hlo: str) -> int:
    """Bytes every instruction of a compiled (fused) HLO module's entry and control-flow
    computations reads and writes: each fusion, library call, custom call and collective
    counted once with its operands and results, an async copy or slice as the bytes it
    moves (read and written), the insides of fusions not at all.

    XLA:TPU's `cost_analysis()` gives its own, larger figure (it also counts what fusions
    read inside); XLA:GPU's compile-only client has none, so this is the measure that
    compares programs on every platform (a count of memory traffic, not a time)."""
    return sum(hlo_bytes_by_scope(hlo, depth=0).values())


def hlo_bytes_by_scope(hlo: str, depth: int = 2) -> dict[str, int]:
    """`hlo_bytes_accessed` split by where each instruction came from: the first `depth`
    module names of its op_name after the transforms (e.g. 'network_0_0/attn' for
    depth 2), '' where it has none. depth=0 puts everything under ''."""
    counted = _control_flow_computations(hlo)
    shapes: dict[str, int] = {}
    totals: dict[str, int] = {}
    inside = False
    for line in hlo.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not line.startswith(" "):  # a computation's header, or the module's
            head = stripped.removeprefix("ENTRY ").split(" ", 1)[0]
            inside = stripped.startswith("ENTRY ") or head in counted
            continue
        if " = " not in stripped:
            continue
        name, rest = stripped.split(" = ", 1)
        name = name.removeprefix("ROOT ").strip()
        found = _OPCODE.search(rest)
        if not found:
            continue
        result = _shape_bytes(rest[: found.start()])  # the result shape(s)
        shapes[name] = result
        opcode = found.group(1)
        if not inside or opcode in _NO_TRAFFIC or opcode.endswith("-done"):
            continue  # an async op's '-done' hands over the buffer its '-start' wrote
        args = rest[found.end() :].split(")", 1)[0]
        operands = sum(shapes.get(tok.strip(), 0) for tok in args.split(","))
        # An async move's result holds its source too: what moves is read and written once.
        moved = 2 * max(result - operands, 0) if opcode in _ASYNC_MOVES else result + operands
        key = _scope(rest, depth)
        totals[key] = totals.get(key, 0) + moved
    return totals


def _scope(rest: str, depth: int) -> str:
    if depth <= 0:
        return ""
    found = re.search(r'op_name="([^"]*)"', rest)
    if not found:
        return ""
    # Drop the transforms (jit(...), jvp(...), transpose(...)) and the model class.
    parts = [p for p in found.group(1).split("/") if "(" not in p and not p[:1].isupper()]
    return "/".join(parts[:depth])


def images_per_device(compiled: jax.stages.Compiled, global_batch: int) -> int:
    """The images of `global_batch` one device holds in a compiled train step: read from
    the sharding of its batch's 'image' (split over the batch axes, whole over 'model',
    whose devices hold the same images)."""
    args, _ = compiled.input_shardings
    batch = args[1] if len(args) > 1 else None
    if isinstance(batch, dict) and "image" in batch:
        return int(batch["image"].shard_shape((global_batch, 1, 1, 1))[0])
    leaves = jax.tree_util.tree_leaves(compiled.input_shardings)
    devices = len(leaves[0].device_set) if leaves else 1
    return max(1, global_batch // max(1, devices))


def summary(compiled: jax.stages.Compiled, global_batch: int) -> Summary:
    """Per-device memory, XLA's cost per image, and the collectives of a compiled step.

    XLA's cost analysis describes one device's program, which holds its share of the
    batch (`images_per_device`)."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else None
    per_device_batch = images_per_device(compiled, global_batch)
    flops = bytes_accessed = None
    if cost:
        flops = cost.get("flops", 0.0) / per_device_batch
        bytes_accessed = cost.get("bytes accessed", 0.0) / per_device_batch
    return Summary(
        argument_bytes=mem.argument_size_in_bytes,
        output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes,
        flops_per_image=flops,
        bytes_accessed_per_image=bytes_accessed,
        collectives=collectives(compiled),
        hlo_bytes_per_image=hlo_bytes_accessed(compiled.as_text()) / per_device_batch,
    )


def timed_compile(
    config: ml_collections.ConfigDict, accelerator: str | Sequence[jax.Device]
) -> tuple[jax.stages.Compiled | None, float, str | None]:
    """(compiled or None, seconds, the error's first line or None)."""
    start = time.perf_counter()
    try:
        compiled = compile_train_step(config, accelerator)
    except Exception as e:  # the compilers' errors are the result being measured
        return None, time.perf_counter() - start, f"{type(e).__name__}: {_first_line(e)}"
    return compiled, time.perf_counter() - start, None


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] if lines else type(e).__name__
