"""Compile-only TPU and GPU devices for the compile tests (`volo_jax.sharding.deviceless`),
and reading what the real compilers made of a program."""

from __future__ import annotations

import os
import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from volo_jax.errors import ConfigError
from volo_jax.sharding import deviceless

#: The kernels' custom calls in compiled HLO: Mosaic's, Triton's and cuDNN's attention.
KERNEL_CALL = re.compile(
    r'custom_call_target="(tpu_custom_call|__gpu\$xla\.gpu\.triton|__cudnn\$fmha\w*)"'
)


def require_accelerator(name: str) -> tuple[jax.Device, ...]:
    """The compile-only devices of accelerator `name`; without its toolchain the test
    skips, or fails under VOLO_JAX_REQUIRE_REFERENCE=1 (scripts/test.sh, CI)."""
    try:
        return deviceless.devices(name)
    except ConfigError as err:
        if os.environ.get("VOLO_JAX_REQUIRE_REFERENCE", "") == "1":
            pytest.fail(str(err))
        pytest.skip(str(err))


def one_device(name: str) -> NamedSharding:
    """A sharding on the first compile-only device of `name`."""
    devices = require_accelerator(name)
    return NamedSharding(Mesh(np.array(devices[:1]), ("x",)), P())


def kernel_calls(hlo: str) -> list[str]:
    """The lines of compiled HLO text that call a Mosaic, Triton or cuDNN attention kernel."""
    return [line for line in hlo.splitlines() if KERNEL_CALL.search(line)]


def call_shapes(line: str) -> list[tuple[int, ...]]:
    """Every array shape of one compiled HLO instruction: its result's and its operands'
    (compiled HLO names the operands; a custom call lists their shapes in
    `operand_layout_constraints`)."""
    text = line.split("metadata=")[0]
    return [
        tuple(int(d) for d in dims.split(",") if d)
        for dims in re.findall(r"\b(?:bf16|f16|f32|s32)\[([\d,]*)\]", text)
    ]
