"""MixToken within groups of the batch, as the official code, which pairs within each GPU's
batch: mirror pairing per group, one box and one lam per group, the aux logits un-mixed back
into batch order, and the group size's config checks. The 8-device checks (the same step on
every mesh, no collective-permute when the groups stay on their device) are in
tests/support/sharding_worker.py."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from tests.support.small import tiny_volo
from volo_jax.errors import ConfigError
from volo_jax.models.volo import (
    MIX_GROUP_SIZE,
    mix_box_lam,
    mix_token_groups,
    mix_token_mask,
    mix_tokens,
    sample_mix_box,
)
from volo_jax.training.config import validate_config
from volo_jax.training.losses import mix_class_targets


def _batch_index_map(batch: int, size: int = 2) -> jnp.ndarray:
    """(batch, size, size, 1) map whose every token holds its image's batch index."""
    return jnp.broadcast_to(
        jnp.arange(batch, dtype=jnp.float32)[:, None, None, None], (batch, size, size, 1)
    )


def test_images_mix_with_the_mirror_image_of_their_group():
    x = _batch_index_map(6)
    boxes = jnp.array([[0, 0, 2, 2], [0, 0, 0, 0], [0, 0, 1, 1]], jnp.int32)  # all, none, (0, 0)
    mixed = np.asarray(mix_tokens(x, boxes))[..., 0]
    np.testing.assert_array_equal(mixed[:2], [np.full((2, 2), 1), np.full((2, 2), 0)])
    np.testing.assert_array_equal(mixed[2:4], [np.full((2, 2), 2), np.full((2, 2), 3)])
    np.testing.assert_array_equal(mixed[4], [[5, 4], [4, 4]])
    np.testing.assert_array_equal(mixed[5], [[4, 5], [5, 5]])
    # One box (4,) is one group: the whole batch, image b with image B - 1 - b.
    whole = np.asarray(mix_tokens(x, jnp.array([0, 0, 2, 2], jnp.int32)))[:, 0, 0, 0]
    np.testing.assert_array_equal(whole, [5, 4, 3, 2, 1, 0])
    # Mirror pairing is its own inverse: mixing twice gives the batch back.
    np.testing.assert_array_equal(mix_tokens(mix_tokens(x, boxes), boxes), x)
    # Boxes on a coarser grid (scale 2): group 2's box covers the top-left 2x2 tokens.
    fine = np.asarray(mix_tokens(_batch_index_map(6, 4), boxes, scale=2))[..., 0]
    np.testing.assert_array_equal(fine[4, :2, :2], np.full((2, 2), 5))
    assert (fine[4] == 5).sum() == 4
    with pytest.raises(ValueError, match="equal groups"):
        mix_tokens(x, boxes[:2].repeat(2, axis=0))  # 4 boxes for 6 images


def test_each_group_draws_its_own_box():
    boxes = np.asarray(sample_mix_box(jax.random.key(3), (14, 14), 1.0, 16))
    assert boxes.shape == (16, 4) and boxes.dtype == np.int32
    assert len({tuple(b) for b in boxes}) > 8  # independent draws, not one box repeated
    y0, x0, y1, x1 = boxes.T
    assert (boxes >= 0).all() and (y0 <= y1).all() and (x0 <= x1).all() and (boxes <= 14).all()
    areas = (y1 - y0) * (x1 - x0)
    np.testing.assert_allclose(mix_box_lam(jnp.asarray(boxes), (14, 14)), 1 - areas / 196)
    masks = np.asarray(mix_token_mask(28, 28, jnp.asarray(boxes), scale=2))
    assert masks.shape == (16, 28, 28)
    np.testing.assert_array_equal(masks.sum(axis=(1, 2)), 4 * areas)
    assert sample_mix_box(jax.random.key(3), (14, 14)).shape == (4,)  # one box, one group


def _official_box_statistics(side: int) -> tuple[float, float]:
    """Exact mean mixed fraction and P(no mix) of the official MixToken box on a side x side
    grid, from its definition (the `rand_bbox` of sail-sg/volo's MixToken):
    lam ~ Beta(1, 1), cut = int(side * sqrt(1 - lam)), centre uniform in [0, side), box
    c - cut // 2 .. c + cut // 2 clipped to the grid."""
    mean, no_mix = 0.0, 0.0
    for cut in range(side + 1):
        # P(cut) = P(cut <= side * sqrt(u) < cut + 1) for u = 1 - lam ~ U(0, 1).
        p = min(((cut + 1) / side) ** 2, 1.0) - (cut / side) ** 2
        centres = np.arange(side)
        extent = np.clip(centres + cut // 2, 0, side) - np.clip(centres - cut // 2, 0, side)
        mean += p * (extent.mean() / side) ** 2  # y and x independent given cut
        no_mix += p * (1 - (1 - (extent == 0).mean()) ** 2)
    return mean, no_mix


def test_box_distribution_is_the_official_one():
    """On the 14x14 grid (224 px) the official box mixes 27.0% of the tokens on average and
    nothing 2.0% of the time; 20,000 draws (one per group) estimate both within about 5
    standard errors. A box of exactly `cut` tokens per side would mix 29.7% and skip 0.5%."""
    mean, no_mix = _official_box_statistics(14)
    assert mean == pytest.approx(0.270, abs=1e-3) and no_mix == pytest.approx(0.0204, abs=1e-4)
    boxes = np.asarray(sample_mix_box(jax.random.key(0), (14, 14), 1.0, 20_000))
    fraction = 1.0 - np.asarray(mix_box_lam(jnp.asarray(boxes), (14, 14)))
    assert abs(fraction.mean() - mean) < 0.01, (fraction.mean(), mean)
    assert abs((fraction == 0).mean() - no_mix) < 0.005, ((fraction == 0).mean(), no_mix)
    sides = np.concatenate([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    inside = np.concatenate(
        [(boxes[:, 0] > 0) & (boxes[:, 2] < 14), (boxes[:, 1] > 0) & (boxes[:, 3] < 14)]
    )
    assert inside.sum() > 1000 and (sides[inside] % 2 == 0).all()  # unclipped sides are even
    # Against as many draws of sail-sg/volo's own `rand_bbox` (NumPy's RNG): a two-sample
    # chi-square test over the joint histogram of the box extents does not tell them apart,
    # and tells a box of exactly `cut` tokens per side from the official one.
    official = _official_rand_bbox_extents(np.random.RandomState(0), 14, 20_000)
    ours = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1)
    assert _same_distribution_p_value(ours, official, 14) > 1e-3
    exact = np.minimum(official + official % 2, 14)  # the side before the official // 2
    assert _same_distribution_p_value(exact, official, 14) < 1e-6


def _official_rand_bbox_extents(rng: np.random.RandomState, side: int, draws: int) -> np.ndarray:
    """(draws, 2) box extents (rows, columns) of sail-sg/volo models/volo.py `rand_bbox`
    with lam ~ Beta(1, 1) as its `forward_tokens` draws it (restated: that repository is
    not an installable package)."""
    extents = np.zeros((draws, 2), np.int64)
    for i in range(draws):
        lam = rng.beta(1.0, 1.0)
        cut_rat = np.sqrt(1.0 - lam)
        cut_w = int(side * cut_rat)
        cut_h = int(side * cut_rat)
        cx = rng.randint(side)
        cy = rng.randint(side)
        bbx1 = np.clip(cx - cut_w // 2, 0, side)
        bby1 = np.clip(cy - cut_h // 2, 0, side)
        bbx2 = np.clip(cx + cut_w // 2, 0, side)
        bby2 = np.clip(cy + cut_h // 2, 0, side)
        extents[i] = bbx2 - bbx1, bby2 - bby1
    return extents


def _same_distribution_p_value(a: np.ndarray, b: np.ndarray, side: int) -> float:
    """Two-sample chi-square p-value of (n, 2) integer extents in [0, side]."""
    from scipy import stats

    cells = (side + 1) ** 2
    count_a = np.bincount(a[:, 0] * (side + 1) + a[:, 1], minlength=cells)
    count_b = np.bincount(b[:, 0] * (side + 1) + b[:, 1], minlength=cells)
    used = (count_a + count_b) >= 10
    return stats.chi2_contingency(np.stack([count_a[used], count_b[used]]))[1]


def test_class_targets_mix_with_their_group_lam():
    labels = jnp.arange(6)
    targets = jax.nn.one_hot(labels, 6)
    lam = jnp.array([0.25, 0.5, 1.0])
    mixed = np.asarray(mix_class_targets(targets, lam))
    for b in range(6):
        group, first = b // 2, b - b % 2
        mirror = first + 1 - (b - first)
        assert mixed[b, b] == pytest.approx(float(lam[group]) if mirror != b else 1.0)
        assert mixed[b, mirror] == pytest.approx(1 - float(lam[group]))
    np.testing.assert_allclose(mixed.sum(-1), 1.0, rtol=1e-6)
    # A scalar lam is one group: the whole batch mirrored.
    whole = mix_class_targets(targets, jnp.float32(0.75))
    np.testing.assert_allclose(whole, 0.75 * targets + 0.25 * targets[::-1])
    with pytest.raises(ValueError, match="equal groups"):
        mix_class_targets(targets, jnp.ones(4))


def test_group_count_of_a_batch():
    assert MIX_GROUP_SIZE == 128  # the official per-GPU batch
    assert mix_token_groups(64) == 1  # a smaller batch is one group
    assert mix_token_groups(128) == 1
    assert mix_token_groups(1024) == 8
    assert mix_token_groups(8, 2) == 4
    with pytest.raises(ValueError, match="does not divide"):
        mix_token_groups(192)
    with pytest.raises(ValueError, match=">= 1"):
        mix_token_groups(8, 0)


def _tiny_volo():
    return tiny_volo(num_heads=(1, 2, 2, 2))


def test_model_mixes_per_group_and_unmixes_the_aux_logits():
    """Group 0 fully boxed, group 1 not: group 0's class logits come out mirrored within the
    group, group 1's unchanged; with every residual branch zeroed (a token's aux logits then
    depend only on its own stem output) the un-mixed aux logits equal the plain ones."""
    model = _tiny_volo()
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), x[:1]))

    def zero_branches(path, leaf):
        names = [getattr(p, "key", "") for p in path]
        branch = ("attn" in names and "proj" in names) or "fc2" in names
        return jnp.zeros_like(leaf) if names[1].startswith("network_") and branch else leaf

    identity = jax.tree_util.tree_map_with_path(zero_branches, variables)
    apply = jax.jit(lambda v, box: model.apply(v, x, return_dense=True, mix_box=box))
    boxes = jnp.array([[0, 0, 2, 2], [1, 1, 1, 1]], jnp.int32)  # the token grid is 2x2
    cls, aux = apply(variables, jnp.zeros((2, 4), jnp.int32))
    mixed_cls, mixed_aux = apply(variables, boxes)
    np.testing.assert_allclose(mixed_cls[:2], cls[1::-1], atol=1e-5)
    np.testing.assert_allclose(mixed_cls[2:], cls[2:], atol=1e-5)
    np.testing.assert_allclose(mixed_aux, aux, atol=1e-5)  # full box / no box: exact
    partial = jnp.array([[0, 0, 1, 2], [0, 1, 2, 2]], jnp.int32)  # top row, right column
    _, plain_aux = apply(identity, jnp.zeros((2, 4), jnp.int32))
    cls_p, aux_p = apply(identity, partial)
    np.testing.assert_allclose(aux_p, plain_aux, rtol=1e-5, atol=1e-5)
    assert not np.allclose(cls_p, apply(identity, jnp.zeros((2, 4), jnp.int32))[0])


def _config(**changes):
    config = get_config()  # batch_size 64
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        setattr(config[section] if section else config, name, value)
    return config


@pytest.mark.parametrize(
    "changes",
    [
        {"token_label.mix_group_size": 16},  # 4 groups
        {"token_label.mix_group_size": 128},  # the default: one group of the 64
        {"token_label.mix_group_size": 16, "train.grad_accum_steps": 4},  # micro-batches of 16
        {"token_label.mix_group_size": 24, "token_label.mix_token": False},  # unused
    ],
)
def test_group_sizes_that_fit_validate(changes):
    validate_config(_config(**changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"token_label.mix_group_size": 24}, "24 does not divide the \\(micro-\\)batch of 64"),
        (
            {"token_label.mix_group_size": 24, "train.grad_accum_steps": 2},
            "24 does not divide the \\(micro-\\)batch of 32",
        ),
        ({"token_label.mix_group_size": 0}, "must be positive, got 0"),
    ],
)
def test_bad_group_sizes_name_the_field(changes, message):
    with pytest.raises(ConfigError, match=r"config\.token_label\.mix_group_size: " + message):
        validate_config(_config(**changes))
