"""Outlook attention: every implementation equals the unfold + scatter-add reference,
and the layer equals timm's OutlookAttention."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from volo_jax import platforms
from volo_jax.errors import ConfigError
from volo_jax.models import create_model
from volo_jax.ops.outlook import (
    IMPLEMENTATIONS,
    TPU_FALLBACK,
    OutlookAttention,
    outlook_aggregate,
    resolve_implementation,
)
from volo_jax.ops.patches import fold, unfold
from volo_jax.ops.planes import fold_planes, planes_unfold, planes_window_slices, to_planes
from volo_jax.ops.slices import fold_slices, window_slices

SHAPES = [
    # (B, H, W, heads, head_dim, K, stride, padding)
    (2, 8, 8, 2, 4, 3, 2, 1),  # VOLO's geometry
    (1, 7, 9, 3, 2, 3, 2, 1),  # odd sizes: ceil-mode pooling, partial windows
    (2, 6, 6, 1, 3, 3, 1, 1),
    (1, 9, 9, 2, 2, 5, 2, 2),
]


def _inputs(shape, seed=0):
    b, height, width, heads, hd, k, s, p = shape
    h = (height + 2 * p - k) // s + 1
    w = (width + 2 * p - k) // s + 1
    kv, ka = jax.random.split(jax.random.key(seed))
    v = jax.random.normal(kv, (b, height, width, heads * hd))
    attn = jax.nn.softmax(jax.random.normal(ka, (b, h, w, heads, k * k, k * k)), axis=-1)
    return v, attn, (k, s, p)


def _cases():
    """Every implementation on every shape; the Pallas kernel (interpret mode on the
    CPU, compile-heavy) on two shapes in the fast suite, the rest marked slow."""
    for impl in sorted(set(IMPLEMENTATIONS) - {"reference"}):
        for i, shape in enumerate(SHAPES):
            # The kernel's own tests (test_outlook_pallas.py) cover it in the fast suite.
            marks = [pytest.mark.slow] if impl == "pallas" else []
            yield pytest.param(impl, shape, marks=marks, id=f"{impl}-{i}")


@pytest.mark.parametrize(("impl", "shape"), list(_cases()))
def test_implementations_equal_the_reference(impl, shape):
    v, attn, geometry = _inputs(shape)

    def loss(fn_impl):
        def f(v, attn):
            out = outlook_aggregate(v, attn, *geometry, impl=fn_impl)
            return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

        return f

    ref_out = outlook_aggregate(v, attn, *geometry, impl="reference")
    out = jax.jit(lambda v, a: outlook_aggregate(v, a, *geometry, impl=impl))(v, attn)
    chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=1e-5)
    ref_grads = jax.grad(loss("reference"), argnums=(0, 1))(v, attn)
    grads = jax.jit(jax.grad(loss(impl), argnums=(0, 1)))(v, attn)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-5)


def test_unknown_implementation_is_a_clear_error():
    v, attn, geometry = _inputs(SHAPES[0])
    with pytest.raises(ValueError, match="reference"):
        outlook_aggregate(v, attn, *geometry, impl="fast")


def _timm_cases():
    """Every implementation at VOLO's 28 x 28 and an odd grid; the Pallas kernel (interpret
    mode on the CPU, compile-heavy) on the odd grid in the fast suite."""
    for impl in sorted(IMPLEMENTATIONS):
        for size in [(28, 28), (7, 9)]:
            marks = [pytest.mark.slow] if impl == "pallas" and size == (28, 28) else []
            yield pytest.param(impl, size, marks=marks, id=f"{impl}-{size[0]}x{size[1]}")


@pytest.mark.parametrize(("impl", "size"), list(_timm_cases()))
def test_layer_matches_timm(impl, size):
    torch = pytest.importorskip("torch")
    from timm.models.volo import OutlookAttention as TimmOutlookAttention

    from tests.support.timm_pairs import randomize_, state_dict_numpy
    from volo_jax.convert import torch_to_flax

    dim, heads = 24, 3
    ref = TimmOutlookAttention(dim, heads, kernel_size=3, padding=1, stride=2).eval()
    randomize_(ref)
    layer = OutlookAttention(dim, heads, 3, 1, 2, impl=impl)
    x = np.random.default_rng(0).standard_normal((2, *size, dim)).astype(np.float32)
    variables = torch_to_flax(state_dict_numpy(ref), layer, inputs=x)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    assert np.abs(np.asarray(layer.apply(variables, x)) - expected).max() <= 1e-5


@pytest.mark.parametrize(
    "impl",
    [pytest.param(i, marks=[pytest.mark.slow] if i == "pallas" else []) for i in IMPLEMENTATIONS],
)
def test_bfloat16_inputs_stay_bfloat16_and_close(impl):
    """bf16 values and weights: bf16 output and gradients, within bf16 rounding of the
    float32 reference."""
    v, attn, geometry = _inputs(SHAPES[1])
    vb, ab = v.astype(jnp.bfloat16), attn.astype(jnp.bfloat16)

    def loss(v, attn, impl):
        out = outlook_aggregate(v, attn, *geometry, impl=impl)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    out = jax.jit(lambda v, a: outlook_aggregate(v, a, *geometry, impl=impl))(vb, ab)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(vb, ab, impl)
    assert out.dtype == jnp.bfloat16
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
    ref = outlook_aggregate(v, attn, *geometry, impl="reference")
    ref_grads = jax.grad(loss, argnums=(0, 1))(v, attn, "reference")
    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    chex.assert_trees_all_close(f32(out), ref, atol=5e-2, rtol=5e-2)
    chex.assert_trees_all_close(f32(grads), ref_grads, atol=5e-2, rtol=5e-2)


def _layer_cases():
    for impl in sorted(set(IMPLEMENTATIONS) - {"reference"}):
        marks = [pytest.mark.slow] if impl == "pallas" else []
        yield pytest.param(impl, marks=marks, id=impl)


@pytest.mark.parametrize("impl", list(_layer_cases()))
def test_layer_gradients_equal_the_reference(impl):
    """The whole layer's parameter and input gradients, as in training."""
    x = jax.random.normal(jax.random.key(1), (2, 7, 9, 24))
    layers = {i: OutlookAttention(24, 3, 3, 1, 2, impl=i) for i in ("reference", impl)}
    params = nn.unbox(layers["reference"].init(jax.random.key(0), x))
    cot = jnp.cos(jnp.arange(x.size).reshape(x.shape))

    def grads(layer):
        return jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) * cot), argnums=(0, 1)))

    chex.assert_trees_all_close(
        grads(layers[impl])(params, x), grads(layers["reference"])(params, x), atol=1e-5, rtol=1e-5
    )


def test_auto_is_the_choice_of_the_platform_a_model_is_built_for():
    """`impl="auto"` is the platform's entry of `platforms.RULES` (a model built for no
    platform: the implementation that is plain XLA everywhere); `create_model` resolves
    it for the platform it builds for."""
    assert resolve_implementation("auto", None) == "slices"
    assert resolve_implementation("auto", "cpu") == "planes"
    for platform in ("gpu", "tpu"):
        assert resolve_implementation("auto", platform) == "pallas"
    assert {r.outlook_impl for r in platforms.RULES.values()} <= set(IMPLEMENTATIONS)
    for where, expected in [("cpu", "planes"), ("tpu", "pallas"), ("cuda", "pallas")]:
        model = create_model("volo_d1_224", platform=where)
        assert (model.outlook_impl, model.platform) == (expected, platforms.platform_of(where))
    assert create_model("volo_d1_224", platform="tpu", outlook_impl="slices").outlook_impl == (
        "slices"
    )
    with pytest.raises(ValueError, match="unknown outlook attention implementation"):
        resolve_implementation("fast", "cpu")


def test_tpus_without_the_kernels_products_take_the_fallback():
    """Mosaic on TPU v2 / v3 has no bf16 matrix products (compile-tested): there 'auto'
    is the fallback and an explicit 'pallas' a config error naming the chip."""
    assert resolve_implementation("auto", "tpu", "TPU v2") == TPU_FALLBACK
    assert resolve_implementation("auto", "tpu", "TPU v5 lite") == "pallas"
    with pytest.raises(ConfigError, match="needs TPU v4 or newer: Mosaic on TPU v3"):
        resolve_implementation("pallas", "tpu", "TPU v3")


PLANE_GEOMETRIES = [
    # (H, W, kernel, stride, padding, dilation)
    (7, 6, 3, 2, 1, 1),  # VOLO's outlook geometry on an odd-sized grid
    (28, 28, 3, 2, 1, 1),
    (6, 9, (2, 3), (1, 2), (0, 1), 1),
    (9, 9, 3, 1, 2, 2),  # dilated
    (10, 7, 4, 3, 1, 1),
    (8, 9, 2, 3, 0, 1),  # stride > kernel: some planes get no window
    (5, 5, 1, 1, 0, 1),
]


@pytest.mark.parametrize("geometry", PLANE_GEOMETRIES, ids=str)
def test_plane_helpers_equal_unfold_and_fold(geometry):
    """`patches`' plane helpers against window_slices / unfold / fold_slices / fold."""
    height, width, *kspd = geometry
    x = jax.random.normal(jax.random.key(0), (2, height, width, 3, 2))
    flat = x.reshape(2, height, width, 6)
    planes = to_planes(x, *kspd)
    slices = window_slices(x, *kspd)
    for got, want in zip(planes_window_slices(planes, (height, width), *kspd), slices, strict=True):
        np.testing.assert_array_equal(got, want)
    windows = planes_unfold(planes, (height, width), *kspd, axis=-2)  # (B, h, w, 3, KK, 2)
    np.testing.assert_array_equal(windows, jnp.stack(slices, axis=-2))
    np.testing.assert_array_equal(
        planes_unfold(to_planes(flat, *kspd), (height, width), *kspd), unfold(flat, *kspd)
    )
    cols = jax.random.normal(jax.random.key(1), windows.shape)
    parts = [cols[..., k, :] for k in range(cols.shape[-2])]
    folded = fold_planes(parts, (height, width), *kspd)
    np.testing.assert_allclose(folded, fold_slices(parts, (height, width), *kspd), atol=1e-6)
    flat_cols = jnp.moveaxis(cols, -2, 3).reshape(*cols.shape[:3], -1, 6)
    np.testing.assert_allclose(
        folded.reshape(2, height, width, 6), fold(flat_cols, (height, width), *kspd), atol=1e-6
    )


def test_plane_helpers_check_shapes():
    planes = to_planes(jnp.zeros((1, 8, 8, 4)), 3, 2, 1)
    with pytest.raises(ValueError, match="planes"):
        planes_window_slices(planes, (9, 9), 3, 2, 1)
    with pytest.raises(ValueError, match="fold_planes"):
        fold_planes([jnp.zeros((1, 4, 4, 4))] * 8, (8, 8), 3, 2, 1)
