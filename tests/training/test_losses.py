"""Token-labeling targets and losses: MixToken consistency, score-map ROI align."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from volo_jax.models import create_model
from volo_jax.models.volo import mix_box_lam, mix_token_mask, sample_mix_box
from volo_jax.training.losses import (
    ground_truth_mix,
    mix_class_targets,
    smooth_labels,
    soft_cross_entropy,
    token_label_loss,
)
from volo_jax.training.token_labels import dense_score_map, roi_align, targets_from_score_maps

GRID = 4  # token grid of a 64-pixel image


def tiny_volo(**overrides):
    kwargs = dict(
        layers=(1, 1, 1, 1),
        embed_dims=(16, 32, 32, 32),
        num_heads=(1, 2, 2, 2),
        stem_hidden_dim=8,
        img_size=16 * GRID,
        num_classes=5,
    )
    return create_model("volo_d1_224", **{**kwargs, **overrides})


def test_mixed_class_target_weights_are_the_kept_token_fraction():
    labels = jnp.array([0, 1, 2, 3])
    targets = jax.nn.one_hot(labels, 5)
    for seed in range(20):
        box = sample_mix_box(jax.random.PRNGKey(seed), (GRID, GRID))
        area = int((box[2] - box[0]) * (box[3] - box[1]))
        mixed = mix_class_targets(targets, mix_box_lam(box, (GRID, GRID)))
        mask = np.asarray(mix_token_mask(GRID, GRID, box))
        assert mask.sum() == area
        for b in range(4):
            # Image b keeps its own tokens outside the box, those of image 3 - b inside it.
            assert mixed[b, labels[b]] == pytest.approx(1 - area / GRID**2)
            assert mixed[b, labels[3 - b]] == pytest.approx(area / GRID**2)
        np.testing.assert_allclose(mixed.sum(-1), 1.0, rtol=1e-6)


def test_unmixed_aux_logits_match_with_identity_blocks():
    """With every residual branch zeroed, a token's aux logits depend only on its own
    stem output, so MixToken's un-mixing must give back the un-mixed logits exactly."""
    model = tiny_volo()
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 16 * GRID, 16 * GRID, 3))
    variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), images[:1]))

    def zero_branches(path, leaf):  # attention and MLP outputs of the outlooker/transformers
        names = [getattr(p, "key", "") for p in path]
        branch = ("attn" in names and "proj" in names) or "fc2" in names
        return jnp.zeros_like(leaf) if names[1].startswith("network_") and branch else leaf

    variables = jax.tree_util.tree_map_with_path(zero_branches, variables)
    apply = jax.jit(lambda v, x, box: model.apply(v, x, return_dense=True, mix_box=box))
    box = jnp.array([1, 0, 3, 3], jnp.int32)
    cls_plain, aux_plain = apply(variables, images, jnp.array([0, 0, 0, 0], jnp.int32))
    cls_mixed, aux_mixed = apply(variables, images, box)
    np.testing.assert_allclose(aux_mixed, aux_plain, rtol=1e-5, atol=1e-5)
    assert not np.allclose(cls_mixed, cls_plain)  # the class token sees the mixed tokens


def test_token_label_loss_weights():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5))
    aux = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 5))
    t = smooth_labels(jnp.array([1, 4]), 5, 0.1)
    dense = jnp.broadcast_to(t[:, None], (2, 3, 5))
    total, parts = token_label_loss(logits, aux, t, dense, 1.0, 0.5)
    assert float(total) == pytest.approx(float(parts["cls_loss"] + 0.5 * parts["dense_loss"]))
    manual = -np.mean(np.sum(np.asarray(dense) * np.asarray(jax.nn.log_softmax(aux)), -1))
    assert float(parts["dense_loss"]) == pytest.approx(manual, rel=1e-6)
    assert float(soft_cross_entropy(logits, t)) == pytest.approx(float(parts["cls_loss"]))


def test_smooth_labels_and_ground_truth_mix():
    t = smooth_labels(jnp.array([2]), 4, 0.1)
    np.testing.assert_allclose(t, [[0.025, 0.025, 0.925, 0.025]], rtol=1e-6)
    annotator = jnp.array([[0.1, 0.9], [0.8, 0.2]])
    gt = jnp.array([[0.0, 1.0], [0.0, 1.0]])
    mixed = ground_truth_mix(annotator, gt)  # agree -> 0.5/0.5, disagree -> 0.9/0.1
    np.testing.assert_allclose(mixed, [[0.05, 0.95], [0.72, 0.28]], rtol=1e-6)


def test_dense_score_map_scatters_top_k():
    rng = np.random.default_rng(0)
    values = rng.random((5, 3, 4)).astype(np.float32)
    indices = np.stack([rng.permutation(10)[:5] for _ in range(12)], -1).reshape(5, 3, 4)
    dense = np.asarray(dense_score_map(jnp.asarray(np.stack([values, indices])), 10))
    expected = np.zeros((3, 4, 10), np.float32)
    for t in range(5):
        for i in range(3):
            for j in range(4):
                expected[i, j, indices[t, i, j]] += values[t, i, j]
    np.testing.assert_allclose(dense, expected)


def _bilinear(data: np.ndarray, y: float, x: float) -> np.ndarray:
    """torchvision's roi_align bilinear sample (CPU kernel rules), data (H, W, K)."""
    h, w = data.shape[:2]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(data.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * data[y0, x0]
        + (1 - ly) * lx * data[y0, x1]
        + ly * (1 - lx) * data[y1, x0]
        + ly * lx * data[y1, x1]
    )


def roi_align_loops(data: np.ndarray, box, out: int, sampling_ratio: int) -> np.ndarray:
    """torchvision.ops.roi_align(aligned=False, sampling_ratio) of the box (y0, x0, y1, x1)
    in image fractions shifted by -0.5 pixel; sampling_ratio <= 0: ceil(bin) samples."""
    h, w = data.shape[:2]
    ys, xs = box[0] * h - 0.5, box[1] * w - 0.5
    bin_h = max(box[2] * h - 0.5 - ys, 1.0) / out
    bin_w = max(box[3] * w - 0.5 - xs, 1.0) / out
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_h)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_w)
    result = np.zeros((out, out, data.shape[-1]))
    for i in range(out):
        for j in range(out):
            for sy in range(grid_h):
                for sx in range(grid_w):
                    y = ys + i * bin_h + (sy + 0.5) * bin_h / grid_h
                    x = xs + j * bin_w + (sx + 0.5) * bin_w / grid_w
                    result[i, j] += _bilinear(data, y, x) / (grid_h * grid_w)
    return result


_roi_align = jax.jit(roi_align, static_argnums=(2, 3))  # one compile per (out, ratio)


@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize(
    "box", [(0.0, 0.0, 1.0, 1.0), (0.1, 0.25, 0.7, 0.9), (0.5, 0.0, 0.6, 0.3), (0.0, 0.6, 0.2, 1.0)]
)
def test_roi_align_matches_torchvision_loops(box, sampling_ratio):
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(14, 12, 6)).astype(np.float32)
    for out in (1, 7):
        ours = np.asarray(_roi_align(jnp.asarray(dense), jnp.asarray(box), out, sampling_ratio))
        expected = roi_align_loops(dense, box, out, sampling_ratio)
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_score_map_targets_are_official_soft_targets():
    rng = np.random.default_rng(2)
    values = rng.random((5, 8, 8)).astype(np.float32) * 5
    indices = rng.integers(0, 10, (5, 8, 8)).astype(np.float32)
    maps = jnp.asarray(np.stack([np.stack([values, indices])] * 2))
    boxes = jnp.asarray([[0.1, 0.2, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0]])
    cls, tokens = jax.jit(targets_from_score_maps, static_argnums=(2, 3, 4))(
        maps, boxes, 10, GRID, 0.1
    )
    assert cls.shape == (2, 10) and tokens.shape == (2, GRID * GRID, 10)
    # softmax * (1 - s + s / K) + s / K: sums to 1 + s / K, at least s / K everywhere.
    np.testing.assert_allclose(tokens.sum(-1), 1.0 + 0.1 / 10, rtol=1e-5)
    np.testing.assert_allclose(cls.sum(-1), 1.0 + 0.1 / 10, rtol=1e-5)
    assert float(tokens.min()) >= 0.1 / 10 - 1e-7
    # The whole-image box: the class target is the softmax of the map's mean score (each
    # of its ceil(8 / 1) x ceil(8 / 1) samples on a location centre).
    dense = np.asarray(dense_score_map(maps[1], 10))
    probs = np.asarray(jax.nn.softmax(dense.mean(axis=(0, 1))))
    np.testing.assert_allclose(cls[1], probs * (1 - 0.1 + 0.01) + 0.01, rtol=1e-5)
