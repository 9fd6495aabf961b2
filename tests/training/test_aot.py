"""Reading compiled programs (`volo_jax.training.aot`) and naming compile-only machines
(`volo_jax.sharding.deviceless`); the compiles themselves are in
tests/sharding/test_compile_steps.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from volo_jax.errors import ConfigError
from volo_jax.sharding import deviceless
from volo_jax.training import aot


def test_hlo_bytes_count_each_top_level_instruction_once():
    """A fused elementwise program reads its two inputs and writes its output once; the
    instructions inside the fusion add nothing."""
    n = 1024
    compiled = jax.jit(lambda x, y: jnp.tanh(x * 2 + y) - x).lower(jnp.zeros(n), jnp.zeros(n))
    assert aot.hlo_bytes_accessed(compiled.compile().as_text()) == 3 * 4 * n


def test_hlo_bytes_of_a_loop_body_are_counted():
    """A while loop's body is control flow, not a fusion: its instructions count."""

    def body(i, x):
        return jnp.sin(x) * i

    fn = jax.jit(lambda x: jax.lax.fori_loop(0, 3, body, x))
    text = fn.lower(jnp.zeros(4096)).compile().as_text()
    assert aot.hlo_bytes_accessed(text) >= 2 * 4 * 4096  # the body's read and write


def test_hlo_bytes_read_tpu_layouts():
    """XLA:TPU writes tiled layouts with parentheses of their own (`T(8,128)(2,1)`): the
    operands are still found, bitcasts and parameters still move nothing, and an async
    copy to on-chip memory (`S(1)`) counts what it moves once."""
    tiled = "{3,0,2,1:T(8,128)(2,1)}"
    text = "\n".join(
        [
            "ENTRY %main (p0: bf16[2,4,8,128]) -> bf16[2,4,8,128] {",
            f"  %p0 = bf16[2,4,8,128]{tiled} parameter(0)",
            f"  %b = bf16[2,4,8,128]{tiled} bitcast(%p0)",
            f"  %t = (bf16[2,4,8,128]{tiled}, u32[1]{{0:T(128)}}) fusion(%b), kind=kLoop",
            f"  %s = (bf16[2,4,8,128]{tiled}, bf16[2,4,8,128]{tiled[:-1]}S(1)}}, u32[]) "
            "copy-start(%b)",
            f"  %d = bf16[2,4,8,128]{tiled[:-1]}S(1)}} copy-done(%s)",
            f"  ROOT %c = bf16[2,4,8,128]{tiled} copy(%d)",
            "}",
        ]
    )
    size = 2 * 4 * 8 * 128 * 2
    # The fusion reads b and writes its tuple; the async copy reads b and writes d (its
    # '-done' moves nothing more); the copy reads d and writes c.
    assert aot.hlo_bytes_accessed(text) == (size + size + 4) + 2 * (size + 4) + 2 * size


def test_unknown_machine_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"unknown accelerator 'v9-8'.*'h100-8'"):
        deviceless.accelerator("v9-8")


def test_gpu_target_configs_ship_with_the_package():
    for name in {a.topology for a in deviceless.ACCELERATORS.values() if a.platform == "cuda"}:
        text = deviceless.gpu_target_config(name)
        assert "gpu_device_info" in text and "cuda_compute_capability" in text
    with pytest.raises(ConfigError, match="no GPU target config"):
        deviceless.gpu_target_config("b200")


def test_images_per_device_counts_model_parallel_devices_once():
    # 2 x 2 TPU chips, data x model: each chip holds half the batch (its 'model' peer the
    # same half), not a quarter.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from tests.support.accelerators import require_accelerator

    mesh = Mesh(np.array(require_accelerator("v5e-4")).reshape(2, 2), ("data", "model"))
    whole, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    images = {"image": jax.ShapeDtypeStruct((16, 4, 4, 3), jnp.float32)}
    shardings = (whole, {"image": split}, whole)
    step = jax.jit(lambda s, b, t: s + b["image"].sum(), in_shardings=shardings)
    compiled = step.lower(scalar, images, scalar).compile()
    assert aot.images_per_device(compiled, 16) == 8


def test_the_gpu_flags_are_set_before_jax_starts_where_gpus_are_compiled_for():
    # XLA reads XLA_FLAGS once, when JAX starts its first backend: tests/conftest.py and
    # benchmarks/compile_table.py set deviceless.GPU_XLA_FLAGS before importing JAX.
    import os

    from tests.support import REPO

    assert deviceless.GPU_XLA_FLAGS in os.environ["XLA_FLAGS"]
    assert deviceless.GPU_XLA_FLAGS in (REPO / "benchmarks" / "compile_table.py").read_text()
