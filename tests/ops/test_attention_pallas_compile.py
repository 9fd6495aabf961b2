"""The Pallas self-attention kernels compiled by Mosaic (XLA:TPU, libtpu) for TPU v5e,
v6e, v5p and v4 on compile-only chips (`volo_jax.sharding.deviceless`): every lane
window, masked product and VMEM plan of VOLO D1-D5's transformer stages, at 224
(14 x 14 tokens) and 448 (28 x 28, the query tiles of the fine-tuning resolutions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from tests.support.accelerators import call_shapes, kernel_calls, one_device
from volo_jax.ops.attention_pallas import self_attention_pallas

ATTENTION_STAGES = ((384, 12), (512, 16), (768, 16))  # D1; D2 and D3; D4 and D5
TOKENS = {224: 196, 448: 784}  # the transformer stages' tokens: (image / 16)^2
BATCH = 4
TPUS = ("v5e-1", "v6e-1", "v5p-8", "v4-8")


def _compile(accelerator: str, tokens: int, dtype) -> str:
    sharding = one_device(accelerator)
    args = [
        jax.ShapeDtypeStruct((BATCH, tokens, 3 * c), dtype, sharding=sharding)
        for c, _ in ATTENTION_STAGES
    ]

    def forward_and_grad(*qkvs):
        results = []
        for qkv, (_, heads) in zip(qkvs, ATTENTION_STAGES, strict=True):
            out, vjp = jax.vjp(lambda x, heads=heads: self_attention_pallas(x, heads), qkv)
            results.append((out, vjp(out)))
        return results

    return jax.jit(forward_and_grad).lower(*args).compile().as_text()


@pytest.mark.parametrize("resolution", sorted(TOKENS))
@pytest.mark.parametrize("accelerator", TPUS)
def test_mosaic_compiles_forward_and_gradient(accelerator, resolution):
    """A forward and a backward custom call a stage, reading the stage's (B, N, 3C) qkv
    and cotangent (B, N, C) as they are: no copy pads or transposes them."""
    tokens = TOKENS[resolution]
    calls = kernel_calls(_compile(accelerator, tokens, jnp.bfloat16))
    assert len(calls) == 2 * len(ATTENTION_STAGES), calls
    shapes = {s for line in calls for s in call_shapes(line) if len(s) == 3}
    for c, _ in ATTENTION_STAGES:
        assert {(BATCH, tokens, 3 * c), (BATCH, tokens, c)} <= shapes


def test_float32_kernels_compile():
    """float32 activations (the configs' default dtype): products at HIGHEST precision."""
    calls = kernel_calls(_compile("v5e-1", TOKENS[224], jnp.float32))
    assert len(calls) == 2 * len(ATTENTION_STAGES)
