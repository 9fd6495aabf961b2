"""The Pallas outlook kernels compiled by the real compilers, with no accelerator:
Mosaic (XLA:TPU, libtpu) for TPU v5e, v6e, v5p and v4, Triton + ptxas (XLA:GPU) for H100
and A100, on compile-only devices (`volo_jax.sharding.deviceless`).

`jax.export` only lowers; Mosaic's layout rules (what a vector load or store may be) and
Triton's are only checked here. Each program holds the forward and the gradient of the
three outlook stages of VOLO D1-D5 (C / heads = 192 / 6, 256 / 8, 384 / 12) at one
resolution: 28 x 28 tokens at 224, 56 x 56 at 448.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from tests.support.accelerators import call_shapes, kernel_calls, one_device
from volo_jax.ops.outlook_pallas import outlook_attention_pallas

OUTLOOK_STAGES = ((192, 6), (256, 8), (384, 12))  # D1; D2 and D3; D4 and D5
TOKENS = {224: 28, 448: 56}  # the outlook stage's grid: the image / 8
BATCH = 2
TPUS = ("v5e-1", "v6e-1", "v5p-8", "v4-8")
GPUS = ("h100-1", "a100-1")


def _compile(accelerator: str, size: int, dtype) -> str:
    sharding = one_device(accelerator)
    windows = (size - 1) // 2 + 1  # K=3, stride 2, padding 1
    args = []
    for channels, heads in OUTLOOK_STAGES:
        args.append(jax.ShapeDtypeStruct((BATCH, size, size, channels), dtype, sharding=sharding))
        args.append(
            jax.ShapeDtypeStruct((BATCH, windows, windows, heads, 9, 9), dtype, sharding=sharding)
        )

    def forward_and_grad(*args):
        results = []
        for v, logits in zip(args[::2], args[1::2], strict=True):
            out, vjp = jax.vjp(lambda v, x: outlook_attention_pallas(v, x, 3, 2, 1), v, logits)
            results.append((out, vjp(out)))
        return results

    return jax.jit(forward_and_grad).lower(*args).compile().as_text()


def _check_calls(hlo: str, size: int, per_stage: int) -> None:
    calls = kernel_calls(hlo)
    assert len(calls) == per_stage * len(OUTLOOK_STAGES), calls
    images = {
        shape
        for line in calls
        for shape in call_shapes(line)
        if len(shape) == 4 and shape[1:3] == (size, size)
    }
    assert images == {(BATCH, size, size, c) for c, _ in OUTLOOK_STAGES}


@pytest.mark.parametrize("resolution", sorted(TOKENS))
@pytest.mark.parametrize("accelerator", TPUS)
def test_mosaic_compiles_forward_and_gradient(accelerator, resolution):
    """Mosaic accepts every load, store and product of both kernels: a forward and a
    backward custom call a stage, on the images of the stage's shapes."""
    size = TOKENS[resolution]
    _check_calls(_compile(accelerator, size, jnp.bfloat16), size, per_stage=2)


@pytest.mark.parametrize("resolution", sorted(TOKENS))
@pytest.mark.parametrize("accelerator", GPUS)
def test_triton_compiles_forward_and_gradient(accelerator, resolution):
    """Triton and ptxas compile the forward, the d_v fold and the d_logits kernel."""
    size = TOKENS[resolution]
    _check_calls(_compile(accelerator, size, jnp.bfloat16), size, per_stage=3)


@pytest.mark.parametrize("accelerator", ["v5e-1", pytest.param("h100-1", marks=pytest.mark.slow)])
def test_float32_kernels_compile(accelerator):
    """float32 activations (the configs' default dtype): the one-hot products at full
    precision, the same structure."""
    per_stage = 2 if accelerator.startswith("v") else 3
    _check_calls(_compile(accelerator, TOKENS[224], jnp.float32), TOKENS[224], per_stage)
