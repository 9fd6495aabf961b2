"""Compile-only accelerators on any host: TPU slices and GPU machines that exist only
for the compiler, so that `jax.jit(f, ...).lower(...).compile()` runs the real XLA:TPU +
Mosaic or XLA:GPU + Triton + ptxas compilers here, with the chip's memory limits and
XLA's cost model, and no chip present.

    devices = deviceless.devices("v5e-8")          # 8 compile-only TPU v5e chips
    mesh = create_mesh({"data": -1}, devices)
    compiled = jax.jit(step, in_shardings=...).lower(*abstract_args).compile()
    compiled.memory_analysis(), compiled.cost_analysis()

The toolchains are the install extra `accel-compile` (libtpu for TPUs, the CUDA plugin
and NVIDIA's ptxas for GPUs, at the pinned jax). The GPU machines are described by the
target configs in `gpu_targets/` (XLA's `GpuTargetConfigProto`). GPU compiles need
`JAX_PLATFORMS=cpu` set before JAX starts (the CUDA plugin's start-up check would
otherwise fail on a host without a GPU) and, since XLA cannot autotune without a GPU,
`GPU_XLA_FLAGS` in XLA_FLAGS (cuBLAS instead of Triton GEMM fusions).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from importlib import resources

import jax

from volo_jax.errors import ConfigError

#: XLA flags a deviceless GPU compile needs: without a GPU there is no autotuning, and
#: XLA's Triton GEMM fusion then fails to find tiles for some dots.
GPU_XLA_FLAGS = "--xla_gpu_enable_triton_gemm=false"


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A machine to compile for: `platform` 'tpu' (a libtpu topology name) or 'cuda'
    (a target config of `gpu_targets/` and a device count)."""

    name: str
    platform: str
    topology: str
    num_devices: int
    description: str
    hbm_gib: float  # memory of one device (a chip, or a core on v2 and v3)
    single_host: bool = False  # libtpu's one-chip hosts (Colab v5e-1 / v6e-1)
    # libtpu's chip configuration: 'megacore' makes a v4 chip's two TensorCores one device,
    # as a Cloud TPU v4 VM shows it to JAX (libtpu's compile-only default is a device per
    # TensorCore, which jax.make_mesh refuses for TPUs after v3).
    chip_config: str | None = None

    @property
    def hbm_bytes(self) -> int:
        return int(self.hbm_gib * 2**30)


#: The machines of the compile table (benchmarks/compile_table.py) and the compile tests.
#: TPU names are Cloud TPU's (`v5e-8` = 8 chips; v4 and v5p count TensorCores, 2 a chip).
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        # Colab's TPU v2-8 (v3-8 alike): 4 chips of 2 cores, 8 GiB a core.
        Accelerator("v2-8", "tpu", "v2:2x2", 8, "TPU v2-8 (Colab): 8 cores", 8),
        Accelerator("v3-8", "tpu", "v3:2x2", 8, "TPU v3-8: 8 cores", 16),
        Accelerator("v5e-1", "tpu", "v5e:1x1", 1, "Colab / Cloud TPU v5e, one chip", 16, True),
        Accelerator("v5e-4", "tpu", "v5e:2x2", 4, "TPU v5e, 4 chips", 16),
        Accelerator("v5e-8", "tpu", "v5e:2x4", 8, "TPU v5e, 8 chips (one host)", 16),
        Accelerator("v5e-256", "tpu", "v5e:16x16", 256, "TPU v5e pod, 256 chips", 16),
        Accelerator("v6e-1", "tpu", "v6e:1x1", 1, "Colab / Cloud TPU v6e, one chip", 32, True),
        Accelerator("v6e-8", "tpu", "v6e:2x4", 8, "TPU v6e (Trillium), 8 chips", 32),
        Accelerator(
            "v4-8", "tpu", "v4:2x2x1", 4, "TPU v4-8: 4 chips (megacore)", 32, False, "megacore"
        ),
        Accelerator("v5p-8", "tpu", "v5p:2x2x1", 4, "TPU v5p-8: 4 chips", 95),
        Accelerator("h100-1", "cuda", "h100_sxm", 1, "one NVIDIA H100 SXM 80 GB", 79.1),
        Accelerator("h100-8", "cuda", "h100_sxm", 8, "8 x NVIDIA H100 SXM 80 GB", 79.1),
        Accelerator("a100-1", "cuda", "a100_sxm_80", 1, "one NVIDIA A100 SXM 80 GB", 80),
        Accelerator("a100-8", "cuda", "a100_sxm_80", 8, "8 x NVIDIA A100 SXM 80 GB", 80),
    )
}

_MISSING = {
    "tpu": "libtpu",
    "cuda": "jax-cuda12-plugin, jax-cuda12-pjrt and nvidia-cuda-nvcc-cu12",
}


def accelerator(name: str) -> Accelerator:
    """The `ACCELERATORS` entry called `name`; a ConfigError lists the known names."""
    if name not in ACCELERATORS:
        raise ConfigError(
            f"unknown accelerator {name!r}; the compile-only machines are {sorted(ACCELERATORS)}"
        )
    return ACCELERATORS[name]


def gpu_target_config(name: str) -> str:
    """The text of `gpu_targets/<name>.txtpb` (a `GpuTargetConfigProto`)."""
    path = resources.files("volo_jax.sharding") / "gpu_targets" / f"{name}.txtpb"
    if not path.is_file():
        raise ConfigError(f"no GPU target config {name!r} in {path.parent}")
    return path.read_text()


@functools.cache
def devices(name: str) -> tuple[jax.Device, ...]:
    """The compile-only devices of accelerator `name` (see `ACCELERATORS`), in the
    topology's order. Raises ConfigError naming the install extra when the toolchain is
    missing."""
    acc = accelerator(name)
    from jax.experimental import topologies

    if acc.platform == "tpu":
        # libtpu takes a host-wide lock file when it starts, meant for the process that
        # owns the chips; compile-only topologies own none, so several processes (pytest
        # workers, a benchmark beside them) may load it at once.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    try:
        if acc.platform == "tpu":
            kwargs: dict = {"chips_per_host_bounds": (1, 1, 1)} if acc.single_host else {}
            if acc.chip_config:
                kwargs["chip_config_name"] = acc.chip_config
            topo = topologies.get_topology_desc(
                platform="tpu", topology_name=acc.topology, **kwargs
            )
        else:
            topo = topologies.get_topology_desc(
                platform="cuda",
                target_config=gpu_target_config(acc.topology),
                topology=f"1x1x{acc.num_devices}",
            )
    except (RuntimeError, NotImplementedError, ValueError) as e:
        raise ConfigError(
            f"cannot make compile-only {acc.description} ({name}): {str(e).splitlines()[0]}. "
            f"Install the compile toolchains ({_MISSING[acc.platform]}): "
            "pip install -c constraints.txt -e '.[accel-compile]'"
            + ("; run with JAX_PLATFORMS=cpu" if acc.platform == "cuda" else "")
        ) from e
    found = tuple(topo.devices)
    if len(found) != acc.num_devices:
        raise ConfigError(
            f"{name}: the topology {acc.topology!r} has {len(found)} devices, "
            f"expected {acc.num_devices}"
        )
    return found
