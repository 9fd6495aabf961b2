"""The platform a model is built for, and everything that choice changes, in one table.

A model is built for one platform, an ordinary module field resolved once:
`create_model(name, platform=None)` takes it from the default backend, or from the
device, devices or mesh it is given (`platform_of`); every module passes its
`platform` on to the modules and operators it makes, as it does `dtype`. `RULES` says
what each platform runs:

- products: the CPU's matrix products and convolutions (`platforms.cpu`) go into
  flax's own injection points (`nn.Dense(dot_general=...)`,
  `nn.Conv(conv_general_dilated=...)`) and the operators' einsums; TPUs and GPUs keep
  XLA's own;
- `outlook_impl`: what outlook attention's `impl="auto"` runs;
- `attention`: how self-attention runs (`ops.attention.ATTENTION`): 'xla'
  (`jax.nn.dot_product_attention`), 'explicit' (the weights formed by heads-major
  products), 'cudnn' (cuDNN's flash attention) or 'pallas' (one Mosaic kernel from qkv
  to the output, `ops.attention_pallas`): the last two keep the logits on the chip;
- `recompute_in_backward`: GELU, softmax and LayerNorm with custom VJPs that keep only
  their input (the softmax: its output) and recompute the rest (`volo_jax.layers`).

`None` is a model built for no platform in particular: XLA's products and autodiff,
and an outlook attention that is plain XLA everywhere. Why each entry is what it is,
with its measurements and machines: docs/performance.md ("The platform a model is
built for").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from volo_jax.platforms import cpu

#: The platforms a model can be built for (`jax.Device.platform`'s names).
PLATFORMS = ("cpu", "gpu", "tpu")
#: Other names of them: jax.export's and XLA's.
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}

#: What `platform_of` takes: a name, a device, devices, a mesh, or None (the default backend).
Where = str | jax.Device | Sequence[jax.Device] | Mesh | None


@dataclasses.dataclass(frozen=True)
class Rules:
    """What a model built for one platform runs (module docstring)."""

    dot_general: Callable[..., jax.Array] | None  # for nn.Dense; None: lax.dot_general
    conv_general_dilated: Callable[..., jax.Array] | None  # for nn.Conv; None: lax's
    einsum: Callable[..., jax.Array]  # (spec, a, b) -> the operators' two-operand products
    outlook_impl: str  # outlook attention's 'auto' (a key of ops.outlook.IMPLEMENTATIONS)
    attention: str  # 'xla', 'explicit', 'cudnn' or 'pallas' (ops.attention.ATTENTION)
    recompute_in_backward: bool


_XLA = Rules(
    dot_general=None,
    conv_general_dilated=None,
    einsum=jnp.einsum,
    outlook_impl="slices",
    attention="xla",
    recompute_in_backward=False,
)

#: platform -> `Rules`; None: built for no platform in particular.
RULES: dict[str | None, Rules] = {
    None: _XLA,
    # XLA:CPU: bf16 products accumulate in f32 on the matrix unit, patch convolutions
    # as products; outlook attention on stride planes; heads-major attention products
    # (`jax.nn.dot_product_attention`'s token-major einsums add layout copies); the
    # custom VJPs lower the train step's peak memory.
    "cpu": Rules(
        dot_general=cpu.dot_general,
        conv_general_dilated=cpu.conv_general_dilated,
        einsum=cpu.einsum,
        outlook_impl="planes",
        attention="explicit",
        recompute_in_backward=True,
    ),
    # The Pallas kernels. The custom VJPs of GELU, softmax and LayerNorm cost a TPU
    # memory and bytes (XLA:TPU's autodiff keeps less), and save a GPU memory for the
    # same bytes: on for GPUs, off for TPUs (compiled by benchmarks/compile_table.py
    # --custom-vjps; docs/performance.md). Self-attention: XLA's writes the float32
    # logits of every head to HBM and reads them back; GPUs run cuDNN's flash attention
    # (from Ampere on; `ops.attention.resolve_attention`), TPUs a Mosaic kernel.
    "gpu": dataclasses.replace(
        _XLA, outlook_impl="pallas", attention="cudnn", recompute_in_backward=True
    ),
    "tpu": dataclasses.replace(_XLA, outlook_impl="pallas", attention="pallas"),
}


def _first_device(where: Where) -> jax.Device | None:
    if isinstance(where, Mesh):
        return where.devices.flat[0]
    if isinstance(where, jax.Device):
        return where
    if isinstance(where, np.ndarray):  # e.g. mesh.devices
        where = list(where.flat)
    if isinstance(where, Sequence) and not isinstance(where, str):
        devices = list(where)
        if not devices:
            raise ValueError("platform_of: no devices given")
        kinds = {d.platform for d in devices}
        if len(kinds) > 1:
            raise ValueError(f"platform_of: devices of several platforms {sorted(kinds)}")
        return devices[0]
    return None


def platform_of(where: Where = None) -> str:
    """'cpu', 'gpu' or 'tpu': the platform of a device, devices or mesh; a name as given
    ('cuda' and 'rocm' are 'gpu'); None: the default backend's."""
    device = _first_device(where)
    if device is not None:
        name = device.platform
    elif where is None:
        name = jax.default_backend()
    else:
        name = str(where)
    name = _ALIASES.get(name.lower(), name.lower())
    if name not in PLATFORMS:
        raise ValueError(f"unknown platform {where!r}; choose one of {', '.join(PLATFORMS)}")
    return name


def device_kind_of(where: Where) -> str | None:
    """The `jax.Device.device_kind` ('TPU v5 lite') of a device, devices or mesh; None
    for a name or None."""
    device = _first_device(where)
    return None if device is None else device.device_kind


def compute_capability_of(where: Where) -> tuple[int, int] | None:
    """A CUDA GPU's compute capability ((9, 0) for an H100) of a device, devices or mesh;
    None for other devices, a name or None."""
    device = _first_device(where)
    capability = getattr(device, "compute_capability", None)
    if not capability:
        return None
    major, minor = str(capability).split(".")[:2]
    return int(major), int(minor)


@dataclasses.dataclass(frozen=True)
class CompilerCrash:
    """A train step that crashed a compiler when `benchmarks/compile_table.py` compiled it
    for a chip (results in docs/performance.md)."""

    model_prefix: str  # the models it holds for ('volo_d5': D5 at every resolution)
    device_kind: str  # `jax.Device.device_kind` of the chip compiled for
    compiler: str  # the distribution that crashed
    version: str  # its version then
    what: str


#: The train steps known to crash a compiler, each at the compiler's version that did.
COMPILER_CRASHES = (
    CompilerCrash(
        "volo_d5",
        "TPU v6 lite",
        "libtpu",
        "0.0.42.1",
        "a compiler thread overflows its stack (SIGSEGV STACK OVERFLOW in XLA:TPU's LLO) about "
        "20 minutes into compiling the train step for 64 and for 128 images a chip",
    ),
    CompilerCrash(
        "volo_d4_448",
        "TPU v6 lite",
        "libtpu",
        "0.0.42.1",
        "a compiler thread overflows its stack (SIGSEGV STACK OVERFLOW in XLA:TPU's LLO) about "
        "18 minutes into compiling the train step at 448 for 30 images a chip (D4 at 224 "
        "compiles)",
    ),
)


def known_compiler_crash(model: str, where: Where) -> CompilerCrash | None:
    """The entry of `COMPILER_CRASHES` for `model` on the devices of `where` with the
    compiler installed here, or None."""
    from importlib import metadata

    kind = device_kind_of(where)
    for crash in COMPILER_CRASHES:
        if model.startswith(crash.model_prefix) and kind == crash.device_kind:
            try:
                if metadata.version(crash.compiler) == crash.version:
                    return crash
            except metadata.PackageNotFoundError:
                continue
    return None


def rules(platform: str | None) -> Rules:
    """`RULES[platform]`, the platform checked (None: built for no platform)."""
    if platform not in RULES:
        raise ValueError(
            f"unknown platform {platform!r}; choose one of {', '.join(PLATFORMS)} or None"
        )
    return RULES[platform]


def einsum(spec: str, a: jax.Array, b: jax.Array, platform: str | None, **kw: Any) -> jax.Array:
    """The two-operand product `spec` (explicit '->') as `platform`'s rules compute it."""
    return rules(platform).einsum(spec, a, b, **kw)


__all__ = [
    "PLATFORMS",
    "RULES",
    "Rules",
    "Where",
    "compute_capability_of",
    "cpu",
    "device_kind_of",
    "einsum",
    "platform_of",
    "rules",
]
