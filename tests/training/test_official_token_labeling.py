"""The token-labeling data path against the official code: `tlt` (TokenLabeling, the
package sail-sg/volo trains with), run in its own process by
tests/support/official_token_labeling_worker.py on inputs made here. Exact: the score-map ops of
RandAugment, the flip, the crop coordinates, the roi_align targets (`p * on + off`), the
loss with and without --ground-truth. Distributions over seeded draws (the random number
generators differ): the crop box, and how often RandAugment moves the score map
(MixToken's box against sail-sg/volo's `rand_bbox`: tests/models/test_mix_token.py). The order
of the augmentation and that the map moves with its image are checked here without the
official code.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support import REPO
from volo_jax.data import augment
from volo_jax.models.volo import mix_box_lam
from volo_jax.training.losses import mix_class_targets, token_label_loss
from volo_jax.training.token_labels import targets_from_score_maps
from volo_jax.training.train import StepOptions, compute_targets

tf = pytest.importorskip("tensorflow")

WORKER = str(REPO / "tests" / "support" / "official_token_labeling_worker.py")
NUM_CLASSES, GRID, SMOOTHING = 12, 3, 0.1
CROP_IMAGE_HW = (300, 400)
# (top, left, height, width) crops of a 300 x 400 image: off-diagonal ones tell the
# official transposed box from the geometric one.
CROP_PARAMS = np.array(
    [[10, 50, 200, 150], [0, 0, 300, 400], [120, 20, 90, 300], [37, 211, 150, 120]], np.int64
)
MAP_OPS = {
    "Rotate": augment.rotate_label_map,
    "ShearX": augment.shear_x_label_map,
    "ShearY": augment.shear_y_label_map,
    "TranslateXRel": augment.translate_x_label_map,
    "TranslateYRel": augment.translate_y_label_map,
}
OP_CASES = [
    ("Rotate", 27.3),
    ("Rotate", -13.9),
    ("Rotate", 90.0),
    ("ShearX", 0.27),
    ("ShearX", -0.19),
    ("ShearY", 0.23),
    ("ShearY", -0.3),
    ("TranslateXRel", 0.405),
    ("TranslateXRel", -0.17),
    ("TranslateYRel", 0.31),
    ("TranslateYRel", -0.44),
]
RA_SPEC, RA_DRAWS = "rand-m9-mstd0.5-inc1", 1000
CROP_DRAWS = 4000


def _score_map(rng: np.random.Generator, h: int, w: int, classes: int) -> np.ndarray:
    """A random [2, 5, h, w] score map: 5 distinct class indices per location, and their
    scores (NFNet logits in the released maps)."""
    values = rng.normal(size=(5, h, w)) * 3
    indices = np.argsort(rng.random((classes, h, w)), axis=0)[:5]
    return np.stack([values, indices]).astype(np.float32)


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    batch = len(CROP_PARAMS)
    return {
        "op_maps": np.stack([_score_map(rng, 6, 9, NUM_CLASSES) for _ in OP_CASES]),
        "op_names": np.array([name for name, _ in OP_CASES]),
        "op_args": np.array([arg for _, arg in OP_CASES], np.float32),
        "flip_map": _score_map(rng, 5, 7, NUM_CLASSES),
        "crop_maps": np.stack([_score_map(rng, 14, 14, NUM_CLASSES) for _ in range(batch)]),
        "crop_params": CROP_PARAMS,
        "crop_image_hw": np.array(CROP_IMAGE_HW),
        "crop_draws": np.array(CROP_DRAWS),
        "labels": np.array([3, 0, 11, 5]),
        "num_classes": np.array(NUM_CLASSES),
        "grid": np.array(GRID),
        "smoothing": np.array(SMOOTHING),
        "logits": rng.normal(size=(batch, NUM_CLASSES)).astype(np.float32),
        "aux": rng.normal(size=(batch, GRID * GRID, NUM_CLASSES)).astype(np.float32),
        "mix_box": np.array([0, 1, 2, 3]),  # (bbx1, bby1, bbx2, bby2): 2 x 2 of 9 tokens
        "ra_image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
        "ra_map": _score_map(rng, 8, 8, NUM_CLASSES),
        "ra_draws": np.array(RA_DRAWS),
        "ra_spec": np.array(RA_SPEC),
    }


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[dict, dict]:
    """(inputs, the official code's outputs for them)."""
    directory = tmp_path_factory.mktemp("official")
    inputs = _inputs()
    np.savez(directory / "in.npz", **inputs)
    done = subprocess.run(
        [sys.executable, WORKER, str(directory / "in.npz"), str(directory / "out.npz")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode == 3:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(directory / "out.npz") as out:
        return inputs, dict(out)


def _ours_boxes() -> np.ndarray:
    """Our crop_box for CROP_PARAMS: (y0, x0, y1, x1) fractions of the image."""
    top, left, height, width = CROP_PARAMS.T
    img_h, img_w = CROP_IMAGE_HW
    return np.stack(
        [top / img_h, left / img_w, (top + height) / img_h, (left + width) / img_w], -1
    ).astype(np.float32)


def test_score_map_ops_are_the_official_ones(official):
    inputs, out = official
    for i, (name, arg) in enumerate(OP_CASES):
        ours = MAP_OPS[name](tf.constant(inputs["op_maps"][i]), tf.constant(arg)).numpy()
        np.testing.assert_array_equal(ours, out["op_out"][i], err_msg=f"{name}({arg})")
        assert not np.array_equal(ours, inputs["op_maps"][i]), name  # each case moves it


def test_flip_with_a_score_map_is_the_official_one(official):
    inputs, out = official
    aug = augment.TrainAugment(size=8, hflip=1.0, randaugment="", erase_prob=0.0)
    image = tf.zeros((20, 28, 3), tf.uint8)
    result = aug(image, tf.constant([0, 0], tf.int64), tf.constant(inputs["flip_map"]))
    np.testing.assert_array_equal(result["label_map"], out["flip_out"])


def test_crop_coordinates_are_the_official_ones(official):
    _, out = official
    np.testing.assert_allclose(out["crop_coords"], _ours_boxes(), rtol=1e-6)


def test_crop_boxes_are_distributed_as_the_official_ones(official):
    """Over seeded draws of the crop box on a 300 x 400 image, two-sample Kolmogorov-Smirnov
    tests do not tell ours from the official crop's (its area, aspect and position)."""
    from scipy import stats

    _, out = official
    img_h, img_w = CROP_IMAGE_HW

    @tf.function(autograph=False)
    def draw(seeds: tf.Tensor) -> tf.Tensor:
        return tf.map_fn(
            lambda seed: augment.random_resized_crop_box(
                seed, img_h, img_w, (0.08, 1.0), (3 / 4, 4 / 3)
            ),
            seeds,
            fn_output_signature=tf.int32,
        )

    seeds = tf.stack(
        [tf.fill([CROP_DRAWS], tf.constant(3, tf.int64)), tf.range(CROP_DRAWS, dtype=tf.int64)], 1
    )
    ours, theirs = draw(seeds).numpy().astype(np.float64), out["crop_draws"].astype(np.float64)

    def features(boxes: np.ndarray) -> dict[str, np.ndarray]:
        top, left, height, width = boxes.T
        return {
            "area": height * width / (img_h * img_w),
            "log aspect": np.log(width / height),
            "centre y": (top + height / 2) / img_h,
            "centre x": (left + width / 2) / img_w,
        }

    mine, official_features = features(ours), features(theirs)
    for name in mine:
        p_value = stats.ks_2samp(mine[name], official_features[name]).pvalue
        assert p_value > 1e-3, (name, p_value)


@pytest.mark.parametrize("ground_truth", [False, True])
def test_targets_and_loss_are_the_official_ones(official, ground_truth):
    """The official roi_align of the map (its transposed box, ceil(roi / bins) samples per
    bin), softmax, `p * on + off`; the --ground-truth mix; MixToken's lam on the class
    target; the loss. Through `compute_targets`, as the train step runs it."""
    inputs, out = official
    opts = StepOptions(
        num_classes=NUM_CLASSES, grid=GRID, label_smoothing=SMOOTHING, ground_truth=ground_truth
    )
    batch = {
        "label": jnp.asarray(inputs["labels"]),
        "label_map": jnp.asarray(inputs["crop_maps"]),
        "crop_box": jnp.asarray(_ours_boxes()),
    }
    cls, dense = jax.jit(compute_targets, static_argnums=1)(batch, opts)
    targets = out["targets"]  # (B, K, 2 + N): ground truth, class, tokens
    np.testing.assert_allclose(dense, targets[:, :, 2:].transpose(0, 2, 1), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(dense.sum(-1), 1 + SMOOTHING / NUM_CLASSES, rtol=1e-5)
    if not ground_truth:
        np.testing.assert_allclose(cls, targets[:, :, 1], rtol=2e-5, atol=1e-7)
    bbx1, bby1, bbx2, bby2 = inputs["mix_box"]
    lam = mix_box_lam(jnp.array([bbx1, bby1, bbx2, bby2]), (GRID, GRID))
    loss, _ = token_label_loss(
        jnp.asarray(inputs["logits"]),
        jnp.asarray(inputs["aux"]),
        mix_class_targets(cls, lam),
        dense,
        cls_weight=1.0,
        dense_weight=0.5,
    )
    expected = out["loss_gt" if ground_truth else "loss_plain"]
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_geometric_box_order_crops_where_the_image_was_cropped():
    """official_box_order=False crops the map at (y0, x0, y1, x1); the official order crops
    it at the box mirrored about the diagonal, so on a square map the two agree when
    the box given to the official order is transposed."""
    rng = np.random.default_rng(1)
    maps = jnp.asarray(np.stack([_score_map(rng, 14, 14, NUM_CLASSES) for _ in range(4)]))
    boxes = jnp.asarray(_ours_boxes())

    @jax.jit
    def both_orders(boxes: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
        return tuple(
            targets_from_score_maps(
                maps, boxes, NUM_CLASSES, GRID, SMOOTHING, official_box_order=official
            )
            for official in (False, True)
        )

    geometric, as_given = both_orders(boxes)
    _, transposed = both_orders(boxes[:, [1, 0, 3, 2]])
    for a, b in zip(geometric, transposed, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(as_given[1], geometric[1], atol=1e-3)  # off-diagonal boxes differ


def test_randaugment_moves_the_map_as_often_as_the_official(official):
    """`tlt`'s RandAugment moves the score map when one of its 2 ops is applied (p 0.5) and
    geometric (5 of 15): 1 - (1 - 1/6)^2 = 30.6% of images. Ours over as many seeded draws
    is within 4.5 standard errors of the official frequency."""
    inputs, out = official
    spec = augment.parse_randaugment(RA_SPEC)
    image = tf.constant(inputs["ra_image"], tf.float32)
    label_map = tf.constant(inputs["ra_map"])

    @tf.function(autograph=False)
    def moved(seeds: tf.Tensor) -> tf.Tensor:
        def one(seed: tf.Tensor) -> tf.Tensor:
            _, result = augment.rand_augment(image, seed, spec, label_map)
            return tf.reduce_any(result != label_map)

        return tf.map_fn(one, seeds, fn_output_signature=tf.bool)

    seeds = tf.stack(
        [tf.fill([RA_DRAWS], tf.constant(7, tf.int64)), tf.range(RA_DRAWS, dtype=tf.int64)], 1
    )
    ours = moved(seeds).numpy().mean()
    theirs = out["ra_moved"].mean()
    expected = 1 - (5 / 6) ** 2
    error = np.sqrt(2 * expected * (1 - expected) / RA_DRAWS)
    assert abs(theirs - expected) < 4.5 * error / np.sqrt(2), theirs
    assert abs(ours - theirs) < 4.5 * error, (ours, theirs)


# ---------------------------------------------------------------------------------------------
# The order of the token-labeling augmentation, and the map moving with its image
# ---------------------------------------------------------------------------------------------

_yy, _xx = np.mgrid[0:40, 0:56]
SMOOTH = np.stack([_yy * 6, _xx * 4, (_yy + _xx) * 2], -1).clip(0, 255).astype(np.uint8)


def test_randaugment_runs_on_the_whole_image_before_the_crop():
    """With a crop that is the whole image, the official order's output is RandAugment of
    the full image, resized; timm's order (crop first) would give RandAugment of the
    resized image."""
    h, w = SMOOTH.shape[:2]
    aug = augment.TrainAugment(
        size=16,
        crop_scale=(1.0, 1.0),
        crop_ratio=(w / h, w / h),
        interpolation="bilinear",
        hflip=0.0,
        randaugment="rand-m9-n2-p1.0",
        erase_prob=0.0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    label_map = tf.constant(_score_map(np.random.default_rng(2), 5, 7, NUM_CLASSES))
    spec = augment.parse_randaugment("rand-m9-n2-p1.0")
    checked = 0
    for i in range(6):
        seed = tf.constant([5, i], tf.int64)
        out = aug(tf.constant(SMOOTH), seed, label_map)
        _, _, s_ra, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
        image, moved = augment.rand_augment(tf.constant(SMOOTH, tf.float32), s_ra, spec, label_map)
        np.testing.assert_array_equal(out["label_map"], moved)
        expected = tf.cast(augment.resize(image, 16, "bilinear"), tf.float32) / 255.0
        np.testing.assert_allclose(out["image"], expected, atol=1e-6)
        np.testing.assert_allclose(out["crop_box"], [0, 0, 1, 1])
        timm_order = augment.rand_augment(augment.resize(SMOOTH, 16, "bilinear"), s_ra, spec)
        timm_order = tf.cast(timm_order, tf.float32) / 255.0
        checked += not np.allclose(out["image"], timm_order, atol=2 / 255)
    assert checked >= 3


def test_the_flip_comes_before_the_crop():
    """The crop box is a box of the flipped image (the official order)."""
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :20] = 255  # bright left third
    aug = augment.TrainAugment(
        size=8,
        hflip=1.0,
        randaugment="",
        erase_prob=0.0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    label_map = tf.zeros((2, 5, 4, 6))
    for i in range(10):
        out = aug(tf.constant(image), tf.constant([1, i], tf.int64), label_map)
        y0, x0, y1, x1 = (out["crop_box"].numpy() * [40, 60, 40, 60]).round().astype(int)
        flipped_region = image[y0:y1, ::-1][:, x0:x1]
        assert abs(out["image"].numpy().mean() - flipped_region.mean() / 255) < 0.05


@pytest.mark.parametrize(
    ("image_op", "map_op", "arg"),
    [
        (augment.rotate, augment.rotate_label_map, 25.0),
        (augment.rotate, augment.rotate_label_map, -25.0),
        (augment.shear_x, augment.shear_x_label_map, 0.3),
        (augment.shear_y, augment.shear_y_label_map, -0.3),
        (augment.translate_x, augment.translate_x_label_map, 0.3),
        (augment.translate_y, augment.translate_y_label_map, -0.3),
    ],
)
def test_the_map_moves_with_its_image(image_op, map_op, arg):
    """An image painted from a map's top class (8 x 8 pixels per location) and the map, each
    moved by the same op, still agree at most locations (the official map ops sample at
    other sub-location offsets than PIL, and nearest)."""
    rng = np.random.default_rng(3)
    classes = rng.integers(0, 6, (6, 6))
    label_map = np.zeros((2, 5, 6, 6), np.float32)
    label_map[0, 0], label_map[1, 0] = 5.0, classes  # top-1 value 5, index = class
    label_map[1, 1:] = (classes + 1 + np.arange(4)[:, None, None]) % 6
    palette = np.linspace(0, 250, 6)
    image = np.repeat(np.repeat(palette[classes], 8, 0), 8, 1)[..., None].repeat(3, -1)
    moved_image = image_op(tf.constant(image, tf.float32), tf.constant(arg)).numpy()
    centres = moved_image[4::8, 4::8, 0]  # the image at each location's centre
    nearest = np.abs(centres[..., None] - palette).argmin(-1)

    def agreement(map_arg: float) -> float:
        moved_map = map_op(tf.constant(label_map), tf.constant(map_arg)).numpy()
        inside = moved_map[0, 0] > 0
        assert inside.sum() >= 12
        return (nearest == moved_map[1, 0])[inside].mean()

    # The official rotation centre is half a location off the image's: on this 6 x 6 map
    # a third of the locations disagree at worst; the opposite move agrees far less.
    same, opposite = agreement(arg), agreement(-arg)
    assert same > 0.6 and same > opposite + 0.2, (same, opposite)
