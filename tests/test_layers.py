"""What a train step keeps for its backward: `layers.gelu` and `layers.TorchLayerNorm`
keep only their input, `layers.softmax` only its output, the CPU convolution's weight
gradient makes its copies of the input after the cotangent exists, and
`platforms.cpu.compiler_options` picks XLA:CPU's scheduler. Each memory check compares XLA:CPU's
plan (`memory_analysis().temp_size_in_bytes`) of a small gradient with the plan the plain
JAX or flax version gets."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from volo_jax.layers import TorchLayerNorm, gelu, softmax
from volo_jax.models import create_model
from volo_jax.platforms import cpu

LAYERS = 8


def _temp_bytes(fn, *args, **jit_kwargs) -> int:
    """XLA:CPU's temporary memory for the gradient of `fn` with respect to its first argument."""
    compiled = jax.jit(jax.grad(fn), **jit_kwargs).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _weights(n: int, width: int) -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(0), n)
    return [jax.random.normal(k, (width, width)) / np.sqrt(width) for k in keys]


def cpu_gelu(x):
    """GELU as a model built for the CPU has it (the custom VJP keeping only x)."""
    return gelu(x, "cpu")


def cpu_softmax(x, axis=-1):
    """Softmax as a model built for the CPU has it (the custom VJP keeping only y)."""
    return softmax(x, axis, "cpu")


@pytest.mark.parametrize("platform", [None, "gpu", "tpu", "cpu"])
def test_the_cpu_and_gpus_take_the_custom_vjps(platform):
    """GELU, softmax and LayerNorm have their input-keeping backward passes in a model
    built for the CPU or a GPU; for a TPU or no platform they are flax's and jax's own
    (autodiff)."""
    x = jnp.ones((4, 8))
    norm = TorchLayerNorm(platform=platform)
    variables = nn.unbox(norm.init(jax.random.key(0), x))
    for fn in (
        lambda x: gelu(x, platform),
        lambda x: softmax(x, -1, platform),
        lambda x: norm.apply(variables, x),
    ):
        jaxpr = str(jax.make_jaxpr(fn)(x))
        assert ("custom_vjp_call" in jaxpr) == (platform in ("cpu", "gpu")), jaxpr


def test_gelu_is_exact_gelu_with_the_same_gradient():
    x = 3.0 * jax.random.normal(jax.random.key(1), (64, 300))
    g = jax.random.normal(jax.random.key(2), x.shape)

    def exact(x):
        return nn.gelu(x, approximate=False)

    np.testing.assert_array_equal(cpu_gelu(x), exact(x))
    got = jax.jit(lambda x, g: jax.vjp(cpu_gelu, x)[1](g)[0])(x, g)
    want = jax.jit(lambda x, g: jax.vjp(exact, x)[1](g)[0])(x, g)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_softmax_is_jax_softmax_with_a_gradient_as_accurate():
    x = 4.0 * jax.random.normal(jax.random.key(3), (6, 50, 81))
    g = jax.random.normal(jax.random.key(4), x.shape)
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    for axis in (-1, 1):
        np.testing.assert_array_equal(cpu_softmax(x, axis), jax.nn.softmax(x, axis=axis))
        e = np.exp(x64 - x64.max(axis, keepdims=True))
        y = e / e.sum(axis, keepdims=True)
        exact = y * (g64 - (g64 * y).sum(axis, keepdims=True))
        ours = jax.vjp(lambda x, axis=axis: cpu_softmax(x, axis), x)[1](g)[0]
        plain = jax.vjp(lambda x, axis=axis: jax.nn.softmax(x, axis=axis), x)[1](g)[0]
        error = np.abs(np.asarray(ours, np.float64) - exact).max()
        plain_error = np.abs(np.asarray(plain, np.float64) - exact).max()
        assert error <= max(1.5 * plain_error, 1e-7), (error, plain_error)


def _mlp_chain(act, x, weights):
    for w in weights:
        x = act(x @ w)
    return jnp.sum(x)


def test_gelu_backward_keeps_only_the_input():
    x = jax.random.normal(jax.random.key(5), (512, 256))
    weights = _weights(LAYERS, 256)
    buffer = x.size * 4
    ours = _temp_bytes(lambda x: _mlp_chain(cpu_gelu, x, weights), x)
    plain = _temp_bytes(
        lambda x: _mlp_chain(lambda h: nn.gelu(h, approximate=False), x, weights), x
    )
    # Autodiff keeps erfc and exp of every GELU input besides what the products keep.
    assert ours <= plain - LAYERS * buffer, (ours / buffer, plain / buffer)


def test_layer_norm_is_flax_layer_norm_with_the_same_gradient():
    x = 2.0 * jax.random.normal(jax.random.key(10), (4, 10, 48)) + 1.0
    g = jax.random.normal(jax.random.key(11), x.shape)
    ours, plain = TorchLayerNorm(platform="cpu"), nn.LayerNorm(epsilon=1e-5)
    variables = nn.unbox(ours.init(jax.random.key(12), x))
    variables = jax.tree_util.tree_map(lambda p: p + 0.1 * jnp.arange(p.size), variables)
    np.testing.assert_array_equal(ours.apply(variables, x), plain.apply(variables, x))
    got = jax.vjp(ours.apply, variables, x)[1](g)
    want = jax.vjp(plain.apply, variables, x)[1](g)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)


def test_layer_norm_backward_keeps_only_the_input():
    x = jax.random.normal(jax.random.key(13), (512, 256))
    weights = _weights(LAYERS, 256)
    buffer = x.size * 4

    def chain(norm):
        variables = nn.unbox(norm.init(jax.random.key(0), x))
        return lambda x: _mlp_chain(lambda h: norm.apply(variables, jnp.tanh(h)), x, weights)

    ours = _temp_bytes(chain(TorchLayerNorm(platform="cpu")), x)
    plain = _temp_bytes(chain(nn.LayerNorm(epsilon=1e-5)), x)
    # flax's keeps about one more tensor of x's size per norm (the centred input).
    assert ours <= plain - LAYERS // 2 * buffer, (ours / buffer, plain / buffer)


def _attention_chain(normalize, q, weights):
    for w in weights:
        q = normalize(q @ q.T) @ (q @ w)
    return jnp.sum(q)


def test_softmax_backward_keeps_only_the_output():
    q = jax.random.normal(jax.random.key(6), (512, 256)) / 16
    weights = _weights(LAYERS, 256)
    weights_bytes = 512 * 512 * 4  # one layer's attention weights
    ours = _temp_bytes(lambda q: _attention_chain(cpu_softmax, q, weights), q)
    plain = _temp_bytes(lambda q: _attention_chain(jax.nn.softmax, q, weights), q)
    # Autodiff keeps the unnormalised exponentials besides the weights themselves.
    assert ours <= plain - LAYERS // 2 * weights_bytes, (
        ours / weights_bytes,
        plain / weights_bytes,
    )


def test_stem_weight_gradient_copies_wait_for_the_cotangent():
    """The CPU weight gradient of VOLO's 3 x 3 stem convolutions copies their input nine
    times (`platforms.cpu._shifted_weight_grad`). Made as soon as the input exists, as XLA:CPU's
    default scheduler did, the copies stayed alive with the whole network's residuals:
    37 stem activations of temporaries for this small VOLO, 16 with the copies made
    after the cotangent (`platforms.cpu.after`)."""
    size, batch = 64, 2
    model = create_model(
        "volo_d1_224", platform="cpu", img_size=size, layers=(1, 1, 1, 1), num_classes=10
    )
    images = jnp.zeros((batch, size, size, 3))
    variables = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1])))

    def loss(params, batch_stats):
        (logits, aux), _ = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            return_dense=True,
            mutable=["batch_stats"],
        )
        return logits.sum() + aux.sum()

    step = jax.jit(jax.grad(loss))
    compiled = step.lower(variables["params"], variables["batch_stats"]).compile()
    stem_activation = batch * (size // 2) ** 2 * 64 * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 24 * stem_activation, temp / stem_activation


def test_compiler_options_pick_the_cpu_scheduler():
    assert cpu.compiler_options("cpu") is None
    assert cpu.compiler_options("tpu", "memory") is None
    options = cpu.compiler_options("cpu", "memory")
    assert options == {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    with pytest.raises(ValueError, match=r"unknown CPU scheduler 'fast'.*memory"):
        cpu.compiler_options("cpu", "fast")
    # XLA takes the option, and the memory-optimized plan of a gradient with parallel
    # branches is no larger than the concurrency-optimized one.
    x = jax.random.normal(jax.random.key(9), (512, 256))
    weights = _weights(LAYERS, 256)
    plans = {
        name: _temp_bytes(
            lambda x: _mlp_chain(cpu_gelu, x, weights),
            x,
            compiler_options=cpu.compiler_options("cpu", name),
        )
        for name in ("memory", "concurrency")
    }
    assert plans["memory"] <= plans["concurrency"], plans
