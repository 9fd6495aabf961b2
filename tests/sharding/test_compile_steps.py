"""A small VOLO's train step compiled for multi-chip machines by the real compilers, no
chip present: XLA:TPU + Mosaic for a 4-chip TPU v5e, XLA:GPU + Triton for 8 H100s
(`volo_jax.training.aot`, `volo_jax.sharding.deviceless`).

The step is the trainer's own (`train.jit_train_step`: the batch split over the mesh,
AdamW, MixToken, token labeling), with each outlook implementation. The Pallas kernels
must run under `shard_map` on each device's own images: XLA cannot partition a Mosaic
call (it refuses to compile) nor a Triton call (it gathers the global batch onto every
GPU).
"""

from __future__ import annotations

import pytest

from configs.default import get_config
from tests.support.accelerators import call_shapes, kernel_calls, require_accelerator
from volo_jax.training import aot

PER_DEVICE_BATCH = 4
#: The machines: a 4-chip TPU v5e (v5e-4) and one host of 8 H100s.
MACHINES = {"v5e-4": 4, "h100-8": 8}


def _config(impl: str, devices: int):
    config = get_config()  # the default: a 4-stage VOLO on 32 x 32 images
    config.dtype = "bfloat16"
    config.model_overrides.outlook_impl = impl
    config.train.batch_size = PER_DEVICE_BATCH * devices
    return config


_compiled: dict[tuple[str, str], object] = {}


def _compile(machine: str, impl: str):
    """The compiled step (one compile per machine and implementation in this file)."""
    if (machine, impl) not in _compiled:
        devices = require_accelerator(machine)
        _compiled[machine, impl] = aot.compile_train_step(_config(impl, len(devices)), devices)
    return _compiled[machine, impl]


@pytest.mark.parametrize(
    "impl",
    [
        "pallas",  # what impl='auto' runs on both (tests/ops/test_outlook.py)
        # The others compile too (benchmarks/compile_table.py compiles each for D1); about
        # 40 s a compile here, so in the slow tier.
        pytest.param("slices", marks=pytest.mark.slow),
        pytest.param("reference", marks=pytest.mark.slow),
        pytest.param("planes", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_train_step_compiles_and_fits(machine, impl):
    """Compiles, partitions over the batch (gradients all-reduced, nothing gathered) and
    fits the device's memory."""
    compiled = _compile(machine, impl)
    summary = aot.summary(compiled, PER_DEVICE_BATCH * MACHINES[machine])
    assert summary.collectives.get("all-reduce", 0) > 0  # the gradients' mean
    assert "all-gather" not in summary.collectives  # data parallel: nothing gathered
    device_memory = 16 * 2**30 if machine.startswith("v5e") else 80 * 2**30
    assert 0 < summary.peak_bytes < device_memory


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_pallas_kernels_run_on_each_devices_own_images(machine):
    """Every Mosaic / Triton call of the compiled step holds the per-device batch (the
    global batch / the devices), and no all-gather is in the program to feed one."""
    compiled = _compile(machine, "pallas")
    hlo = compiled.as_text()
    calls = kernel_calls(hlo)
    attention = [line for line in calls if "self_attention" in line or "__cudnn$fmha" in line]
    outlook = [line for line in calls if line not in attention]
    # The outlook stage's forward and backward: Mosaic 2 calls, Triton 3 (fold, d_v,
    # d_logits). Self-attention (the Mosaic kernel on TPU, cuDNN's flash attention on
    # GPUs): a forward and a backward for each of the three transformer blocks.
    tpu = machine.startswith("v")
    assert len(outlook) == (2 if tpu else 3), outlook
    assert len(attention) == 6, attention
    for line in calls:
        rank = 3 if "self_attention" in line else 4  # (B, N, 3C) qkv; 4-d images, heads
        batches = {shape[0] for shape in call_shapes(line) if len(shape) >= rank}
        assert batches == {PER_DEVICE_BATCH}, line[:400]
        assert "shard_map" in line or "__cudnn$fmha" in line  # cuDNN's: XLA partitions it
    assert "all-gather" not in hlo
