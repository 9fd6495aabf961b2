"""The train step: it learns, accumulates, runs in bfloat16, and takes teacher targets."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.support import programs
from tests.support.small import smoke_config
from tests.support.trees import worst_leaf
from volo_jax.models import create_model
from volo_jax.sharding import create_mesh
from volo_jax.training import train
from volo_jax.training.config import matmul_precision, model_overrides
from volo_jax.training.losses import smooth_targets
from volo_jax.weights import save_weights


def tiny_config(**changes):
    """configs/smoke.py, 4 classes, no drop path (steps compare exactly), then `changes`."""
    return smoke_config(**{"model_overrides.drop_path_rate": 0.0, **changes})


def fixed_batch(size: int = 8) -> dict[str, jnp.ndarray]:
    images = jax.random.normal(jax.random.PRNGKey(0), (size, 32, 32, 3))
    return {"image": images, "label": jnp.arange(size, dtype=jnp.int32) % 4}


def make_step(config, teacher=None, tx=None):
    model = create_model(config.model, **model_overrides(config))
    mesh = create_mesh(config.mesh)
    state, shardings = train.create_train_state(config, model, 10, mesh, tx=tx)
    return model, state, train.jit_train_step(config, model, mesh, shardings, teacher, donate=False)


def test_steps_lower_the_loss_on_a_fixed_batch():
    config = tiny_config(**{"token_label.mix_token": False, "optim.warmup_epochs": 0})
    _, state, step = make_step(config)
    batch = fixed_batch()
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch, None)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 8
    assert losses[-1] < 0.8 * losses[0], losses


def test_bfloat16_matmul_precision_learns_with_float32_state():
    """config.matmul_precision='bfloat16': a float32 model whose products take bf16
    operands on the CPU (platforms/cpu.py); the state stays float32 and it still learns."""
    config = tiny_config(
        matmul_precision="bfloat16", **{"token_label.mix_token": False, "optim.warmup_epochs": 0}
    )
    _, state, step = make_step(config)
    batch = fixed_batch()
    with matmul_precision(config):
        products = [
            eqn
            for eqn in programs.equations(step, state, batch, None)
            if eqn.primitive.name == "dot_general"
        ]
        losses = []
        for _ in range(8):
            state, metrics = step(state, batch, None)
            losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses
    leaves = jax.tree_util.tree_leaves(state.params)
    assert {x.dtype for x in leaves} == {np.dtype(np.float32)}
    # The products (the CPU's rules, traced for the CPU) take bf16 operands.
    assert products and any(
        {v.aval.dtype for v in eqn.invars} == {jnp.dtype(jnp.bfloat16)} for eqn in products
    )


def test_accumulation_bfloat16_and_ema():
    config = tiny_config(dtype="bfloat16", **{"train.grad_accum_steps": 2, "train.ema_decay": 0.9})
    _, state, step = make_step(config)
    before = state.params
    before_stats = jax.tree_util.tree_map(np.asarray, state.batch_stats)  # the step donates
    new, metrics = step(state, fixed_batch(), None)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    leaves = jax.tree_util.tree_leaves(new.params) + jax.tree_util.tree_leaves(new.opt_state)
    floats = {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {np.dtype(np.float32)}
    # EMA: 0.9 * old + 0.1 * new, of the params and (timm's ModelEmaV2) the BN statistics.
    expected = jax.tree_util.tree_map(lambda o, n: 0.9 * o + 0.1 * n, before, new.params)
    for a, b in zip(
        jax.tree_util.tree_leaves(new.ema_params), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    expected = jax.tree_util.tree_map(lambda o, n: 0.9 * o + 0.1 * n, before_stats, new.batch_stats)
    ema_stats = jax.tree_util.tree_leaves(new.ema_batch_stats)
    assert ema_stats and not np.allclose(
        ema_stats[0], jax.tree_util.tree_leaves(new.batch_stats)[0]
    )
    for a, b in zip(ema_stats, jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def gradient_recorder() -> optax.GradientTransformation:
    """An optimizer that leaves the parameters where they are and keeps the gradient it
    was given as its state: a train step's gradient, read exactly."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree_util.tree_map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (
            jax.tree_util.tree_map(jnp.zeros_like, grads),
            grads,
        ),
    )


def step_gradient(config, batch):
    """(gradient, initial and new batch_stats) of one train step of `config` from its
    initial state."""
    _, state, step = make_step(config, tx=gradient_recorder())
    new, _ = step(state, batch, None)
    return new.opt_state, state.batch_stats, new.batch_stats


def assert_trees_close(got, want, rtol: float) -> None:
    """Every leaf within `rtol` of its own largest value (so a small leaf is held to its own
    size, not to the largest one's)."""
    ratio, path = worst_leaf(got, want, rtol)
    assert ratio <= 1.0, (path, ratio)


def test_accumulated_gradient_is_the_whole_batch_gradient():
    """train.grad_accum_steps=2 gives the gradient of the whole batch, and updates BatchNorm's
    running statistics once per micro-batch.

    BatchNorm normalises each micro-batch with its own statistics, so the two halves hold
    the same 4 images (with other labels): each micro-batch is then normalised as the whole
    batch, and the gradients agree to float32 rounding (summation order). Keeping one
    micro-batch's gradient instead of their mean fails (the labels differ)."""
    config = tiny_config(**{"token_label.mix_token": False})
    images = fixed_batch(4)["image"]
    batch = {
        "image": jnp.concatenate([images, images]),
        "label": jnp.array([0, 1, 2, 3, 2, 3, 0, 1], jnp.int32),
    }
    whole, start, once = step_gradient(config, batch)
    config.train.grad_accum_steps = 2
    accumulated, _, twice = step_gradient(config, batch)
    assert_trees_close(accumulated, whole, rtol=1e-5)
    # Both micro-batches have the whole batch's statistics s: one update gives
    # 0.9 r + 0.1 s, two give 0.81 r + 0.19 s.
    batch_means = jax.tree_util.tree_map(lambda r, new: (new - 0.9 * r) / 0.1, start, once)
    expected = jax.tree_util.tree_map(lambda r, s: 0.81 * r + 0.19 * s, start, batch_means)
    assert_trees_close(twice, expected, rtol=1e-5)


def test_teacher_targets_and_init_from(tmp_path):
    config = tiny_config()
    model = create_model(config.model, **model_overrides(config))
    variables = train.initial_variables(model, 32, jax.random.PRNGKey(7))
    save_weights(
        tmp_path / "teacher",
        variables,
        config.model,
        {k: v for k, v in model_overrides(config).items() if k != "dtype"},
    )
    config.teacher.model = config.model  # its architecture comes from the weights' model.json
    config.teacher.init_from = str(tmp_path / "teacher")
    teacher, teacher_vars = train.load_teacher(config, create_mesh(config.mesh))
    batch = fixed_batch()
    opts = dataclasses.replace(train.StepOptions.from_config(config), label_smoothing=0.1)
    cls, dense = jax.jit(lambda b, v: train.compute_targets(b, opts, teacher, v))(
        batch, teacher_vars
    )
    logits, aux = jax.jit(lambda v, x: model.apply(v, x, return_dense=True))(
        variables, batch["image"]
    )
    np.testing.assert_allclose(
        cls, smooth_targets(jax.nn.softmax(logits + 0.5 * aux.max(1)), 0.1), rtol=1e-5
    )
    np.testing.assert_allclose(dense, smooth_targets(jax.nn.softmax(aux), 0.1), rtol=1e-5)

    # init_from loads the same weights into the student, except skipped paths.
    config.init_from = str(tmp_path / "teacher")
    config.init_skip = (r"^params/(head|aux_head)/",)
    state, _ = train.create_train_state(config, model, steps_per_epoch=10)
    np.testing.assert_array_equal(state.params["pos_embed"], variables["params"]["pos_embed"])
    assert not np.array_equal(state.params["head"]["kernel"], variables["params"]["head"]["kernel"])


def test_init_from_resizes_the_position_embedding_as_the_official_finetuning(tmp_path):
    """Weights of another resolution: the position grid resized bicubically without
    antialias (tlt's load_pretrained_weights) by default, with it (timm's) on request."""
    from volo_jax.convert import resize_pos_embed

    config = tiny_config()
    model = create_model(config.model, **model_overrides(config))
    variables = train.initial_variables(model, 32, jax.random.PRNGKey(7))
    overrides = {k: v for k, v in model_overrides(config).items() if k != "dtype"}
    save_weights(tmp_path / "w", variables, config.model, overrides)
    config.img_size, config.init_from = 64, str(tmp_path / "w")
    big = create_model(config.model, **model_overrides(config))
    source = np.asarray(variables["params"]["pos_embed"])
    assert config.init_antialias is False
    official = resize_pos_embed(source, (4, 4), antialias=False)
    loaded = train.load_init_weights(config, big)["params"]["pos_embed"]
    np.testing.assert_allclose(loaded, official, rtol=1e-6, atol=1e-7)
    config.init_antialias = True
    timm_way = resize_pos_embed(source, (4, 4), antialias=True)
    loaded = train.load_init_weights(config, big)["params"]["pos_embed"]
    np.testing.assert_allclose(loaded, timm_way, rtol=1e-6, atol=1e-7)
    assert not np.allclose(timm_way, official, atol=1e-4)


@pytest.mark.parametrize("ground_truth", [False, True])
def test_label_targets_without_annotator(ground_truth):
    config = tiny_config(**{"token_label.ground_truth": ground_truth})
    opts = train.StepOptions.from_config(config)
    cls, dense = train.compute_targets(fixed_batch(), opts)
    assert cls.shape == (8, 4) and dense.shape == (8, opts.grid**2, 4)
    np.testing.assert_allclose(dense, jnp.broadcast_to(cls[:, None], dense.shape))
    np.testing.assert_allclose(cls[0], [0.925, 0.025, 0.025, 0.025], rtol=1e-6)
