"""Shared test setup: JAX on one CPU device, float32 at full matmul precision; with
VOLO_JAX_REQUIRE_REFERENCE=1 (set by scripts/test.sh, which CI runs) a missing optional
package (torch, timm, scikit-image, the compile-only TPU and GPU toolchains, ...) fails the
tests that need it instead of skipping them (`tests/support/accelerators.py`).

The CPU: the numerical and compiled-program assertions are about XLA:CPU; on a GPU host
they would otherwise run on the GPU or skip (set JAX_PLATFORMS yourself to choose another
platform). One device: tests that need several start a subprocess with its own
`--xla_force_host_platform_device_count` (added to this process's XLA_FLAGS), so an inherited
device count is removed here.

Compile time: most tests run small shapes, so XLA's compilation, not the run, is their
time. `--xla_backend_optimization_level=0` skips LLVM's optimization of the code XLA
generates (its fused loops; the matrix products and convolutions are library calls either
way): about 2.4x less CPU time for the model tests on an AMD EPYC Zen 3, same results
(LLVM does not reorder floating-point sums at any level without fast math).
`--xla_cpu_use_fusion_emitters=false` emits XLA's fused loops with its elemental emitter
instead of the MLIR fusion emitters: a tiny VOLO's gradient compiles in about 3.0 s instead
of 4.7 s on the same machine (the fusions, the HLO and the arithmetic are the same).
`--xla_cpu_parallel_codegen_split_count=1` compiles the generated LLVM module whole instead
of splitting (cloning) it into parts for parallel compilation: the smoke config's train step
then compiles in about 6.7 instead of 8.6 CPU-seconds (the machine code is the same).

Garbage collection: the imported modules (TensorFlow, torch, JAX, timm: ~700,000 objects)
and the collected tests live until the process ends, so they are frozen out of the
collector's view once collection is done, and everything is at the end; otherwise each full
collection walks them all (about 7% of test_volo's time on the same machine, and seconds
at exit).
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import re
import shutil
import tempfile
from typing import Any

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
TEST_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    " --xla_cpu_parallel_codegen_split_count=1"
    # The deviceless GPU compiles' (volo_jax.sharding.deviceless.GPU_XLA_FLAGS).
    " --xla_gpu_enable_triton_gemm=false"
)
_inherited = re.sub(
    r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", "")
).strip()
os.environ["XLA_FLAGS"] = f"{_inherited} {TEST_XLA_FLAGS}".strip()

# One XLA compilation cache for the whole run, shared by its processes (pytest-xdist's
# workers, the training runs of main.py, the multi-device workers): a program the suite
# compiles again (the same train step in several tests and processes) is read back.
# Made by the first process (xdist's controller), inherited by the others, removed at the
# end. Its key covers the program, the XLA flags and the versions.
_CACHE_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _CACHE_OWNER:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="volo_jax_tests_xla_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402  (after the environment above: JAX reads it when it starts)

# torch._dynamo (which timm imports) crashes the process when it loads after TensorFlow
# (triton's native module, on this project's Linux machines); the suite imports both in one
# process, so it is loaded first, whatever order the test files are collected in.
if importlib.util.find_spec("torch") is not None:
    import torch._dynamo  # noqa: F401

jax.config.update("jax_default_matmul_precision", "highest")

REQUIRE_REFERENCE = os.environ.get("VOLO_JAX_REQUIRE_REFERENCE", "") == "1"
#: What the reference tests import (the test extra), and the compile-only TPU and GPU
#: toolchains of the compile tests (the accel-compile extra).
REFERENCE_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "skimage",
    "nbclient",
    "nbformat",
    "libtpu",
    "jax_plugins.xla_cuda12",
)


def _import_or_fail(
    modname: str, minversion: str | None = None, reason: str | None = None, **_: Any
) -> Any:
    """`pytest.importorskip` that raises instead of skipping (the reference must run)."""
    try:
        module = importlib.import_module(modname)
    except ImportError as err:
        raise ImportError(
            f"{modname} is needed by this test and VOLO_JAX_REQUIRE_REFERENCE=1 forbids "
            f"skipping it ({reason or err}); install requirements-test.txt"
        ) from err
    if minversion is not None:
        from packaging.version import Version

        if Version(getattr(module, "__version__", "0")) < Version(minversion):
            raise ImportError(f"{modname} {module.__version__} is older than {minversion}")
    return module


if REQUIRE_REFERENCE:
    pytest.importorskip = _import_or_fail


def pytest_configure(config: pytest.Config) -> None:
    if REQUIRE_REFERENCE:
        missing = [m for m in REFERENCE_PACKAGES if importlib.util.find_spec(m) is None]
        if missing:
            raise pytest.UsageError(
                f"VOLO_JAX_REQUIRE_REFERENCE=1 but {', '.join(missing)} not installed: "
                "pip install -c constraints.txt -e '.[train,torch,test,accel-compile]' "
                "(or unset it to skip their tests)"
            )


#: The files that take longest (training runs in subprocesses, the 8-device worker, full-size
#: models), run first: with `--dist loadfile` a file is one unit of work, and a long one
#: drawn last keeps one worker busy after the other is done.
LONGEST_FIRST = (
    "tests/training/test_resume.py",
    "tests/sharding/test_sharding.py",
    "tests/sharding/test_multiprocess.py",
    "tests/test_paths.py",
    "tests/models/test_volo.py",
    "tests/models/test_volo_parity.py",
    "tests/training/test_train.py",
    "tests/test_logs.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


def pytest_collection_finish(session: pytest.Session) -> None:
    gc.freeze()


def pytest_unconfigure(config: pytest.Config) -> None:
    gc.freeze()
    if _CACHE_OWNER:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
