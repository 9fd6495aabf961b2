"""The learning-rate schedule and the weight-decay mask of the official recipe."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.volo_d1 import get_config
from tests.support.small import tiny_volo
from volo_jax.training.optim import create_learning_rate_fn, create_optimizer, weight_decay_mask

STEPS_PER_EPOCH = 1251  # ImageNet-1k at batch 1024


def expected_lr(epoch: float) -> float:
    """timm CosineLRScheduler(t_initial=300, warmup_t=20, warmup_lr_init=1e-6, lr_min=1e-5)
    for lr 1.6e-3, at a fractional epoch."""
    if epoch < 20:
        return 1e-6 + (1.6e-3 - 1e-6) * epoch / 20
    if epoch < 300:
        return 1e-5 + 0.5 * (1.6e-3 - 1e-5) * (1 + math.cos(math.pi * epoch / 300))
    return 1e-5


@pytest.mark.parametrize("epoch", [0, 0.5, 1, 10, 19.99, 20, 21, 100, 150, 299.5, 300, 305, 310])
def test_schedule_matches_formula(epoch):
    """timm 0.4.5 (t_in_epochs) holds each epoch's lr for the whole epoch; the smooth
    schedule evaluates the same curve at the fractional epoch."""
    config = get_config()
    step = round(epoch * STEPS_PER_EPOCH)
    lr_fn = create_learning_rate_fn(config, STEPS_PER_EPOCH)
    assert float(lr_fn(step)) == pytest.approx(expected_lr(step // STEPS_PER_EPOCH), rel=1e-5)
    config.optim.per_epoch_schedule = False
    lr_fn = create_learning_rate_fn(config, STEPS_PER_EPOCH)
    assert float(lr_fn(step)) == pytest.approx(expected_lr(step / STEPS_PER_EPOCH), rel=1e-5)


def test_per_epoch_schedule_changes_only_at_epoch_starts():
    lr_fn = create_learning_rate_fn(get_config(), STEPS_PER_EPOCH)
    steps = np.arange(0, 25 * STEPS_PER_EPOCH, 97)
    lrs = np.asarray(jax.vmap(lr_fn)(steps))
    epochs = steps // STEPS_PER_EPOCH
    for epoch in np.unique(epochs):
        assert np.ptp(lrs[epochs == epoch]) == 0
    assert float(lr_fn(STEPS_PER_EPOCH - 1)) == pytest.approx(1e-6)  # warmup_lr all epoch 0
    assert float(lr_fn(STEPS_PER_EPOCH)) == pytest.approx(1e-6 + (1.6e-3 - 1e-6) / 20)


def test_schedule_scales_with_batch():
    config = get_config()
    config.train.batch_size = 256
    lr_fn = create_learning_rate_fn(config, STEPS_PER_EPOCH)
    peak = float(lr_fn(20 * STEPS_PER_EPOCH))
    assert peak == pytest.approx(1e-5 + (4e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 15)))


def _small_params():
    model = tiny_volo(embed_dims=(32, 64, 64, 64), num_heads=(1, 2, 2, 2), num_classes=3)
    variables = nn.unbox(
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    )
    return variables["params"]


def test_weight_decay_mask():
    params = _small_params()
    mask = dict(jax.tree_util.tree_leaves_with_path(weight_decay_mask(params)))
    decayed = {jax.tree_util.keystr(path) for path, value in mask.items() if value}
    kept = {jax.tree_util.keystr(path) for path, value in mask.items() if not value}
    for name in [
        "['pos_embed']",
        "['cls_token']",
        "['head']['bias']",
        "['norm']['scale']",
        "['patch_embed']['conv_1']['scale']",
        "['network_0_0']['attn']['proj']['bias']",
    ]:
        assert name in kept, name
    for name in [
        "['head']['kernel']",
        "['aux_head']['kernel']",
        "['patch_embed']['conv_0']['kernel']",
        "['network_0_0']['attn']['v']['kernel']",
        "['network_2_0']['mlp']['fc1']['kernel']",
    ]:
        assert name in decayed, name
    # Exactly the parameters with two or more dimensions, minus the two embeddings.
    leaves = dict(jax.tree_util.tree_leaves_with_path(params))
    assert decayed == {jax.tree_util.keystr(p) for p, v in leaves.items() if v.ndim > 1} - {
        "['pos_embed']",
        "['cls_token']",
    }


def test_adamw_decays_only_masked_params():
    config = get_config()
    config.optim.warmup_epochs = 0
    tx = create_optimizer(config, steps_per_epoch=1)
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,)), "pos_embed": jnp.ones((1, 2, 2))}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    lr = 1.6e-3
    np.testing.assert_allclose(updates["kernel"], -lr * 0.05 * np.ones((2, 2)), rtol=1e-5)
    np.testing.assert_array_equal(updates["bias"], 0)
    np.testing.assert_array_equal(updates["pos_embed"], 0)


def test_schedule_in_steps_for_finetuning():
    from configs.finetune import get_config as finetune_config

    config = finetune_config()  # 1000 steps, 100 of warmup, AdamW 1e-4 for batch 64
    lr = create_learning_rate_fn(config, steps_per_epoch=7)  # epochs play no part
    np.testing.assert_allclose(float(lr(0)), 1e-6, rtol=1e-6)
    np.testing.assert_allclose(float(lr(50)), 1e-6 + (1e-4 - 1e-6) / 2, rtol=1e-5)
    np.testing.assert_allclose(
        float(lr(100)), 1e-6 + (1e-4 - 1e-6) * (1 + math.cos(0.1 * math.pi)) / 2, rtol=1e-5
    )
    np.testing.assert_allclose(float(lr(1000)), 1e-6, rtol=1e-5)


def test_sgd_takes_momentum_steps_with_weight_decay_on_masked_params():
    config = get_config()
    config.optim.name, config.optim.momentum, config.optim.weight_decay = "sgd", 0.9, 0.1
    config.train.num_steps, config.optim.warmup_steps = 10, 0
    config.optim.base_lr = config.optim.min_lr = 0.5
    config.optim.lr_batch_base = config.train.batch_size
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    tx = create_optimizer(config, steps_per_epoch=1)
    state = tx.init(params)
    grads = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    first, state = tx.update(grads, state, params)
    second, _ = tx.update(grads, state, params)
    # step 1: -lr * (g + wd * w) for w (decayed), -lr * g for the bias (not decayed)
    np.testing.assert_allclose(first["w"], -0.5 * 1.1, rtol=1e-6)
    np.testing.assert_allclose(first["b"], -0.5, rtol=1e-6)
    # step 2: the momentum buffer: 0.9 * previous + current
    np.testing.assert_allclose(second["b"], -0.5 * 1.9, rtol=1e-6)
