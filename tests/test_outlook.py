"""Outlook attention: every implementation equals the unfold + scatter-add reference,
and the layer equals timm's OutlookAttention."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from volo_jax.ops.outlook import IMPLEMENTATIONS, OutlookAttention, outlook_aggregate

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
            marks = [pytest.mark.slow] if impl == "pallas" and i >= 2 else []
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


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("size", [(28, 28), (7, 9)])
def test_layer_matches_timm(impl, size):
    torch = pytest.importorskip("torch")
    from timm.models.volo import OutlookAttention as TimmOutlookAttention

    from tests.timm_pairs import randomize_, state_dict_numpy
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
