"""The VOLO module itself: registry, dtypes, train-mode behaviour (its blocks and parameter
counts against timm's registered models: test_volo_parity.py)."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import volo_jax
from tests.support.small import random_variables, tiny_volo
from tests.support.timm_pairs import TIMM_PARAM_COUNTS
from volo_jax.convert.mapping import abstract_variables
from volo_jax.errors import ConfigError, UnknownModelError
from volo_jax.models.volo import MIXER_NAMES, mix_box_lam, mix_token_mask, sample_mix_box
from volo_jax.training.train import initial_variables

#: bf16 logits' largest error relative to the float32 logits' largest value (0.0086
#: measured for the tiny VOLO: 0.0017 on logits up to 0.20; one bf16 rounding is up to 2**-9).
BF16_LOGIT_ERROR = 0.03


def _variables(model) -> dict:
    """Fresh variables of `model` (compiled once per model and reused: run op by op,
    initializing takes several seconds)."""
    return initial_variables(model, model.img_size, jax.random.key(0))


def test_registry_has_timms_names_and_configs():
    assert volo_jax.list_models("volo_*") == sorted(TIMM_PARAM_COUNTS)
    cfg = volo_jax.pretrained_cfg("volo_d4_448")
    assert cfg.input_size == (3, 448, 448) and cfg.crop_pct == 1.15
    assert cfg.interpolation == "bicubic" and cfg.mean == (0.485, 0.456, 0.406)
    assert volo_jax.pretrained_cfg("volo_d1_224.sail_in1k").crop_pct == 0.96
    assert volo_jax.pretrained_cfg("volo_d1_384").crop_pct == 1.0


def test_unknown_names_and_arguments_are_clear_errors():
    with pytest.raises(UnknownModelError, match="volo_d1_224"):
        volo_jax.create_model("volo_d9_224")
    with pytest.raises(ConfigError, match="num_clases"):
        volo_jax.create_model("volo_d1_224", num_clases=10)


def test_wrong_input_size_is_a_clear_error():
    model = tiny_volo()
    variables = _variables(model)
    with pytest.raises(ValueError, match="img_size 32"):
        model.apply(variables, jnp.zeros((1, 3, 32, 32)))


def test_bf16_compute_keeps_float32_params():
    """dtype=bfloat16: float32 parameters and gradients, bf16 activations, and logits
    within bf16 rounding of the float32 model's, relative to their scale (the logits of
    this model are at most 0.2: an absolute tolerance of 0.1 would take anything)."""
    model = tiny_volo(dtype=jnp.bfloat16)
    reference_model = tiny_volo()
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(shapes["params"]))
    variables = _variables(reference_model)
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, shapes)
    logits = jax.jit(model.apply)(variables, x)
    assert logits.dtype == jnp.bfloat16
    reference = jax.jit(reference_model.apply)(variables, x)
    scale = float(jnp.abs(reference).max())
    error = float(jnp.abs(logits.astype(jnp.float32) - reference).max())
    assert 0 < error <= BF16_LOGIT_ERROR * scale, (error, scale)
    grads = jax.jit(jax.grad(lambda p: model.apply({**variables, "params": p}, x).sum()))(
        variables["params"]
    )
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))


def test_stochastic_depth_and_batchnorm_in_train_mode():
    model = tiny_volo(drop_path_rate=0.5)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = _variables(model)

    @jax.jit
    def train_logits(key):
        (cls, _), state = model.apply(
            variables,
            x,
            train=True,
            return_dense=True,
            rngs={"dropout": key},
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, _: mdl.name == "conv_0",
        )
        return cls, state

    a, state = train_logits(jax.random.key(0))
    b, _ = train_logits(jax.random.key(1))
    assert not np.allclose(a, b)  # different blocks dropped
    chex.assert_trees_all_close(train_logits(jax.random.key(0))[0], a)  # same rng, same result
    # The first BatchNorm's running statistics take 0.1 of the batch's (PyTorch's momentum
    # 0.1; Flax keeps the biased variance, PyTorch the unbiased: test_volo_parity.py).
    (conv_0,) = state["intermediates"]["patch_embed"]["conv_0"]["__call__"]
    old = variables["batch_stats"]["patch_embed"]["conv_1"]
    new = state["batch_stats"]["patch_embed"]["conv_1"]
    mean, var = conv_0.mean(axis=(0, 1, 2)), conv_0.var(axis=(0, 1, 2))
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * var, rtol=1e-5)


def test_eval_mode_uses_the_running_statistics():
    """In eval mode an image's logits do not depend on the rest of the batch (BatchNorm
    uses its running statistics); in train mode they do (the batch's)."""
    model = tiny_volo()
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = _variables(model)
    forward = jax.jit(model.apply)
    np.testing.assert_allclose(forward(variables, x[:2]), forward(variables, x)[:2], atol=1e-6)

    @jax.jit
    def train(images):
        return model.apply(variables, images, train=True, mutable=["batch_stats"])[0]

    assert np.abs(train(x[:2]) - train(x)[:2]).max() > 1e-3


def test_mix_box_sampling_and_mask():
    for seed in range(20):
        box = np.asarray(sample_mix_box(jax.random.key(seed), (14, 14)))
        y0, x0, y1, x1 = box
        assert 0 <= y0 <= y1 <= 14 and 0 <= x0 <= x1 <= 14
        mask = np.asarray(mix_token_mask(28, 28, jnp.asarray(box), scale=2))
        assert mask.sum() == 4 * (y1 - y0) * (x1 - x0)
        lam = float(mix_box_lam(jnp.asarray(box), (14, 14)))
        assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 196)


def test_mix_token_mixes_tokens_and_unmixes_the_aux_map():
    """With a box covering everything, every image becomes its batch mirror: class
    logits come out mirrored, and the un-mixed aux map is back in batch order."""
    model = tiny_volo()
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    variables = _variables(model)
    cls, aux = jax.jit(lambda x: model.apply(variables, x, return_dense=True))(x)
    mixed = jax.jit(lambda x, box: model.apply(variables, x, return_dense=True, mix_box=box))
    full = jnp.array([0, 0, 2, 2], jnp.int32)  # the token grid is 2x2 at 32 px
    mixed_cls, mixed_aux = mixed(x, full)
    np.testing.assert_allclose(mixed_cls, cls[::-1], atol=1e-5)
    np.testing.assert_allclose(mixed_aux, aux, atol=1e-5)
    empty = jnp.array([1, 1, 1, 1], jnp.int32)
    same_cls, _ = mixed(x, empty)
    np.testing.assert_allclose(same_cls, cls, atol=1e-6)
    with pytest.raises(ValueError, match="return_dense"):
        model.apply(variables, x, mix_box=full)


def test_remat_gives_the_same_gradients():
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    plain = tiny_volo()
    variables = _variables(plain)
    remat = tiny_volo(remat=True)

    def grads(model):
        return jax.jit(jax.grad(lambda p: model.apply({**variables, "params": p}, x).sum()))(
            variables["params"]
        )

    chex.assert_trees_all_close(grads(plain), grads(remat), atol=1e-6)


@pytest.mark.parametrize("mixer", MIXER_NAMES)
def test_every_token_mixer_runs_in_the_outlooker_stage(mixer):
    """The ablation switch: each mixer builds, runs forward and backward, and leaves
    the rest of the network (names and shapes) unchanged."""
    kwargs = {
        "halo": {"block_size": 2, "halo_size": 1},
        "window": {"window_size": 2},
        "involution": {"kernel_size": 3},
        "dwconv": {"kernel_size": 3},
        "dynamic_dwconv": {"kernel_size": 3},
    }.get(mixer, {})
    model = tiny_volo(token_mixer=mixer, token_mixer_kwargs=kwargs)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = random_variables(model)
    baseline = abstract_variables(tiny_volo())
    outside = lambda v: {
        k: jax.tree_util.tree_map(jnp.shape, t)
        for k, t in v["params"].items()
        if not k.startswith("network_0_")
    }
    assert outside(variables) == outside(baseline)
    assert "attn" in variables["params"]["network_0_0"]

    def loss(params):
        (cls, _), _ = model.apply(
            {**variables, "params": params},
            x,
            train=True,
            return_dense=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(2)},
        )
        return jnp.mean(cls**2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))
    mixer_grads = jax.tree_util.tree_leaves(grads["network_0_0"]["attn"])
    assert max(float(jnp.abs(g).max()) for g in mixer_grads) > 0


def test_unknown_token_mixer_lists_the_choices():
    with pytest.raises(ValueError, match="self_attention"):
        tiny_volo(token_mixer="conv").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
