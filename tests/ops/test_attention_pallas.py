"""The Pallas self-attention kernel (`volo_jax.ops.attention_pallas`, Mosaic kernels in
`volo_jax.ops.tpu.attention`).

On this CPU-only CI the kernels run in Pallas' interpreters (the generic one, and once
the TPU interpreter) and are checked against softmax(q k^T / sqrt(hd)) v on the split
heads, forward and gradient, float32 and bf16. Whether Mosaic compiles them for TPU v5e,
v6e, v5p and v4 is tested in test_attention_pallas_compile.py.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from volo_jax.ops import attention as attention_ops
from volo_jax.ops.attention_pallas import pallas_supported, self_attention_pallas
from volo_jax.ops.tpu import attention as tpu_attention


def _reference(qkv: jax.Array, heads: int) -> jax.Array:
    b, n, c3 = qkv.shape
    c = c3 // 3
    x = qkv.reshape(b, n, 3, heads, c // heads)
    q, k, v = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32, precision="highest")
    p = jax.nn.softmax(s * (c // heads) ** -0.5, -1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v, precision="highest")
    return out.reshape(b, n, c)


def _inputs(b: int, n: int, c: int, dtype, seed: int = 0):
    kq, kg = jax.random.split(jax.random.key(seed))
    qkv = (2 * jax.random.normal(kq, (b, n, 3 * c), jnp.float32)).astype(dtype)
    g = jax.random.normal(kg, (b, n, c), jnp.float32).astype(dtype)
    return qkv, g


def _value_and_vjp(fn, qkv, g):
    @jax.jit
    def run(qkv, g):
        out, vjp = jax.vjp(fn, qkv)
        return out, vjp(g)[0]

    return run(qkv, g)


def _check(fn, b, n, c, heads, dtype=jnp.float32, tol=1e-4):
    qkv, g = _inputs(b, n, c, dtype)
    out, grad = _value_and_vjp(fn, qkv, g)
    ref_out, ref_grad = _value_and_vjp(lambda x: _reference(x, heads), qkv, g)
    assert out.dtype == dtype and grad.dtype == dtype
    assert out.shape == (b, n, c) and grad.shape == qkv.shape
    f32 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.float32))
    chex.assert_trees_all_close(f32(out), f32(ref_out), atol=tol, rtol=tol)
    chex.assert_trees_all_close(f32(grad), f32(ref_grad), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "b, n, c, heads",
    [
        (2, 49, 384, 12),  # D1's heads (32 channels, four to a lane tile), odd token count
        (1, 16, 768, 16),  # D4/D5's 48-channel heads: windows of two lane tiles
        (3, 20, 256, 8),  # D2/D3's heads, three images in a program
    ],
    ids=["d1-heads", "d5-heads", "d3-heads"],
)
def test_kernel_equals_reference(b, n, c, heads):
    _check(lambda x: self_attention_pallas(x, heads), b, n, c, heads)


def test_query_tiles_accumulate_key_gradients():
    """Several query tiles (fine-tuning resolutions): d_k and d_v summed over them."""

    @jax.custom_vjp
    def _tiled(x):
        return tpu_attention.tpu_attention_forward(x, 4, interpret=True, tile=8)

    _tiled.defvjp(
        lambda x: (_tiled(x), x),
        lambda x, g: (tpu_attention.tpu_attention_backward(x, g, 4, interpret=True, tile=8),),
    )
    _check(_tiled, 2, 32, 128, 4)


def test_bfloat16_within_rounding():
    _check(lambda x: self_attention_pallas(x, 12), 2, 49, 384, 12, jnp.bfloat16, tol=3e-2)


def test_tpu_interpreter():
    """Pallas' TPU interpreter: VMEM scratch, block DMAs and the grid as on the chip."""
    qkv, g = _inputs(2, 24, 128, jnp.float32)
    out = tpu_attention.tpu_attention_forward(qkv, 4, interpret="tpu", images=1)
    grad = tpu_attention.tpu_attention_backward(qkv, g, 4, interpret="tpu", images=1)
    ref_out, vjp = jax.vjp(lambda x: _reference(x, 4), qkv)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(grad, vjp(g)[0], atol=1e-5, rtol=1e-5)


def test_plan_fills_vmem_within_budget():
    plan = tpu_attention.attention_plan(128, 196, 384, 12, jnp.bfloat16)
    assert (plan.images, plan.tile, plan.group, plan.groups) == (8, 196, 128, 3)
    d5 = tpu_attention.attention_plan(128, 784, 768, 16, jnp.bfloat16)
    assert (d5.group, d5.group_heads, d5.window(2)) == (384, 8, (0, 256))
    assert d5.tile % 8 == 0 and 784 % d5.tile == 0
    for p in (plan, d5):
        bytes_ = tpu_attention.attention_vmem_bytes(p, backward=True)
        assert bytes_ <= tpu_attention.TPU_VMEM_BUDGET
    assert tpu_attention.attention_plan(6, 196, 384, 12, jnp.bfloat16).images == 6
    assert tpu_attention.attention_plan(7, 196, 384, 12, jnp.bfloat16).images == 7


def test_unsupported_shapes_are_named():
    assert pallas_supported(196, 384, 12, jnp.bfloat16)
    assert not pallas_supported(196, 192, 6, jnp.bfloat16)  # C not a multiple of 128
    assert not pallas_supported(4096, 768, 16, jnp.float32)  # one image over the budget
    with pytest.raises(ValueError, match="multiple of 128"):
        tpu_attention.attention_plan(1, 196, 192, 6, jnp.float32)
    with pytest.raises(ValueError, match="MiB of VMEM"):
        tpu_attention.attention_plan(1, 4096, 768, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"\(B, N, 3C\)"):
        self_attention_pallas(jnp.zeros((1, 4, 128)), 4)


def _attention_apply(platform, rate=0.0, train=False):
    module = attention_ops.Attention(384, 12, attn_drop=rate, platform=platform)
    x = jax.random.normal(jax.random.key(1), (2, 7, 7, 384))
    params = module.init(jax.random.key(2), x)
    apply = functools.partial(module.apply, train=train, rngs={"dropout": jax.random.key(3)})
    return apply, params, x


def test_tpu_model_runs_the_kernel_and_equals_xla():
    """A model built for TPU takes the kernel; its output and parameter gradients equal
    the model built for no platform (XLA's attention)."""
    tpu, params, x = _attention_apply("tpu")
    xla, _, _ = _attention_apply(None)
    assert "self_attention_fwd" in str(jax.make_jaxpr(tpu)(params, x))
    assert "self_attention_fwd" not in str(jax.make_jaxpr(xla)(params, x))

    def loss(apply):
        return jax.grad(lambda p: jnp.sum(apply(p, x) ** 2))(params)

    chex.assert_trees_all_close(tpu(params, x), xla(params, x), atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(loss(tpu), loss(xla), atol=1e-4, rtol=1e-5)


def test_attention_dropout_keeps_xla_attention():
    """Dropout on the attention weights (training with attn_drop > 0) needs the weights
    formed, so the kernel is not used there."""
    apply, params, x = _attention_apply("tpu", rate=0.1, train=True)
    assert "self_attention_fwd" not in str(jax.make_jaxpr(apply)(params, x))
    apply, params, x = _attention_apply("tpu", rate=0.1, train=False)
    assert "self_attention_fwd" in str(jax.make_jaxpr(apply)(params, x))


def test_auto_is_the_platforms_attention_and_old_tpus_keep_xla():
    """'auto' is the platform's entry of `platforms.RULES`, resolved by `create_model`;
    Mosaic on TPU v2 / v3 has no bf16 products, so there 'auto' is XLA's attention and
    an explicit 'pallas' a config error naming the chip."""
    from volo_jax import platforms
    from volo_jax.errors import ConfigError
    from volo_jax.models import create_model

    resolve = attention_ops.resolve_attention
    assert {r.attention for r in platforms.RULES.values()} <= set(attention_ops.ATTENTION)
    expected = {None: "xla", "cpu": "explicit", "gpu": "cudnn", "tpu": "pallas"}
    assert {p: resolve("auto", p) for p in expected} == expected
    for where in ("cpu", "tpu", "cuda"):
        model = create_model("volo_d1_224", platform=where)
        assert model.attention_impl == expected[platforms.platform_of(where)]
    assert create_model("volo_d1_224", platform="tpu", attention_impl="xla").attention_impl == "xla"
    assert resolve("auto", "tpu", "TPU v3") == "xla"
    assert resolve("auto", "tpu", "TPU v5 lite") == "pallas"
    with pytest.raises(ConfigError, match="needs TPU v4 or newer: Mosaic on TPU v2"):
        resolve("pallas", "tpu", "TPU v2")
    with pytest.raises(ValueError, match="unknown self-attention implementation"):
        resolve("flash", "tpu")
    # GPUs before Ampere have no cuDNN flash attention; the TPU kernel is for TPUs.
    assert resolve("auto", "gpu", "Tesla T4", (7, 5)) == "xla"
    assert resolve("auto", "gpu", "NVIDIA H100 80GB HBM3", (9, 0)) == "cudnn"
    with pytest.raises(ConfigError, match=r"compute capability 8\.0 or newer"):
        resolve("cudnn", "gpu", "Tesla V100", (7, 0))
    with pytest.raises(ConfigError, match=r"compute capability 8\.0 or newer, not tpu"):
        resolve("cudnn", "tpu")
    with pytest.raises(ConfigError, match="a TPU kernel"):
        resolve("pallas", "gpu")


def test_explicit_xla_on_a_tpu_model_skips_the_kernel():
    module = attention_ops.Attention(384, 12, impl="xla", platform="tpu")
    x = jnp.zeros((1, 4, 4, 384))
    params = module.init(jax.random.key(0), x)
    assert "self_attention_fwd" not in str(jax.make_jaxpr(module.apply)(params, x))
