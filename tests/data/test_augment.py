"""Train augmentation: RandAugment ops against PIL (timm's implementation applies PIL),
crop boxes, determinism, and the training pipeline's resumability."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from volo_jax.data import augment

tf = pytest.importorskip("tensorflow")

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (24, 30, 3), dtype=np.uint8)
# A smooth image, for the resampling ops (which differ from PIL by sub-pixel offsets).
# Smooth regions, not every level present (as a photograph): coarse noise, upsampled.
PHOTO = np.asarray(
    Image.fromarray(RNG.integers(40, 220, (5, 7, 3), dtype=np.uint8)).resize(
        (45, 30), Image.Resampling.BILINEAR
    )
)
_yy, _xx = np.mgrid[0:48, 0:64]
SMOOTH = np.stack([_yy * 5, _xx * 4, (_yy + _xx) * 2], -1).clip(0, 255).astype(np.uint8)


def ours(op, image: np.ndarray, arg) -> np.ndarray:
    """The op on a uint8 image (as the pipeline runs it), as float32."""
    out = op(tf.constant(image), tf.constant(arg, tf.float32))
    assert out.dtype == tf.uint8
    return out.numpy().astype(np.float32)


def _solarize_add_pil(image: Image.Image, add: int) -> Image.Image:
    """timm's `solarize_add`: a lookup table adding `add` below 128, saturating."""
    return image.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)


@pytest.mark.parametrize(
    ("op", "arg", "pil"),
    [
        (augment.invert, 0.0, ImageOps.invert),
        (augment.auto_contrast, 0.0, ImageOps.autocontrast),
        (augment.equalize, 0.0, ImageOps.equalize),
        (augment.posterize, 2.0, lambda im: ImageOps.posterize(im, 2)),
        (augment.posterize, 1.0, lambda im: ImageOps.posterize(im, 1)),
        (augment.posterize, 0.0, lambda im: im.point(lambda _: 0)),  # older PIL's 0 bits
        (augment.solarize, 100.0, lambda im: ImageOps.solarize(im, 100)),
        (augment.solarize, 256.0, lambda im: ImageOps.solarize(im, 256)),
        (augment.solarize_add, 110.0, lambda im: _solarize_add_pil(im, 110)),
        (augment.solarize_add, 37.0, lambda im: _solarize_add_pil(im, 37)),
        (augment.brightness, 1.7, lambda im: ImageEnhance.Brightness(im).enhance(1.7)),
        (augment.brightness, 0.35, lambda im: ImageEnhance.Brightness(im).enhance(0.35)),
    ],
)
@pytest.mark.parametrize("image", [IMAGE, PHOTO], ids=["noise", "photo"])
def test_pointwise_ops_match_pil(op, arg, pil, image):
    expected = np.asarray(pil(Image.fromarray(image)), np.float32)
    np.testing.assert_array_equal(ours(op, image, arg), expected)


@pytest.mark.parametrize(
    ("op", "pil"),
    [
        (augment.color, ImageEnhance.Color),
        (augment.contrast, ImageEnhance.Contrast),
        (augment.sharpness, ImageEnhance.Sharpness),
    ],
)
@pytest.mark.parametrize("factor", [0.1, 0.3, 0.55, 1.0, 1.37, 1.8])
@pytest.mark.parametrize("image", [IMAGE, PHOTO], ids=["noise", "photo"])
def test_enhance_ops_match_pil(op, pil, factor, image):
    """PIL's grey conversion, blend and SMOOTH filter, bit for bit."""
    expected = np.asarray(pil(Image.fromarray(image)).enhance(factor), np.float32)
    np.testing.assert_array_equal(ours(op, image, factor), expected)


def test_ops_keep_a_float_image_float():
    """An image of another dtype (integer values) goes through the uint8 op and back."""
    for op, arg in [(augment.sharpness, 1.6), (augment.rotate, 12.0), (augment.equalize, 0.0)]:
        got = op(tf.constant(IMAGE, tf.float32), tf.constant(arg))
        assert got.dtype == tf.float32
        np.testing.assert_array_equal(got, ours(op, IMAGE, arg))


def _rotation(degrees: float, width: int, height: int) -> tuple[float, ...]:
    """PIL's `Image.rotate` coefficients: input = A output + t, about (width / 2, height / 2)."""
    angle = -np.deg2rad(degrees)
    cos, sin = np.cos(angle), np.sin(angle)
    cx, cy = width / 2, height / 2
    return (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


@pytest.mark.parametrize(
    ("op", "arg", "coefficients"),
    [
        (augment.rotate, 20.0, _rotation(20.0, 64, 48)),
        (augment.rotate, -27.0, _rotation(-27.0, 64, 48)),
        (augment.shear_x, 0.2, (1, 0.2, 0, 0, 1, 0)),
        (augment.shear_x, -0.3, (1, -0.3, 0, 0, 1, 0)),
        (augment.shear_y, 0.27, (1, 0, 0, 0.27, 1, 0)),
        (augment.shear_y, -0.13, (1, 0, 0, -0.13, 1, 0)),
        (augment.translate_x, 0.3, (1, 0, 19.2, 0, 1, 0)),
        (augment.translate_x, -0.111, (1, 0, -0.111 * 64, 0, 1, 0)),
        (augment.translate_y, -0.25, (1, 0, 0, 0, 1, -12)),
        (augment.translate_y, 0.4, (1, 0, 0, 0, 1, 0.4 * 48)),
    ],
)
def test_geometric_ops_follow_pil(op, arg, coefficients):
    """PIL's affine map (PIL's own coefficients for the op, as timm calls it), sampled at
    pixel corners: output pixel p reads input A p + t, where PIL reads A (p + 1/2) + t - 1/2
    (pixel centres). PIL is given t - (A - I) / 2 to sample where we do; then the two agree
    to 1 grey level away from the borders (bilinear rounding), on a ramp where a pixel
    of displacement is 4 to 10 levels."""
    a, b, c, d, e, f = coefficients
    shifted = (a, b, c - (a - 1 + b) / 2, d, e, f - (d + e - 1) / 2)
    expected = np.asarray(
        Image.fromarray(SMOOTH).transform(
            (64, 48),
            Image.Transform.AFFINE,
            shifted,
            Image.Resampling.BILINEAR,
            fillcolor=tuple(int(v) for v in augment.FILL),
        ),
        np.float32,
    )
    got = ours(op, SMOOTH, arg)
    # Pixels that read at least one pixel inside the image (no fill in either result).
    y, x = np.mgrid[0:48, 0:64]
    source_x, source_y = a * x + b * y + c, d * x + e * y + f
    inside = (source_x >= 1) & (source_x <= 62) & (source_y >= 1) & (source_y <= 46)
    assert inside.mean() > 0.5
    assert np.abs(got - expected)[inside].max() <= 1, np.abs(got - expected)[inside].max()
    # Pixels whose source is over a pixel outside the image are the fill colour.
    outside = (source_x < -1) | (source_x > 64) | (source_y < -1) | (source_y > 48)
    np.testing.assert_array_equal(got[outside], np.broadcast_to(augment.FILL, got[outside].shape))
    # The same comparison sees a shift of one pixel (green rises 4 levels a column).
    moved = ours(op, np.roll(SMOOTH, 1, axis=1), arg)
    assert np.median(np.abs(moved - expected)[inside][:, 1]) >= 3


def test_random_resized_crop_box_is_valid_and_deterministic():
    for i in range(50):
        seed = tf.constant([3, i], tf.int64)
        box = augment.random_resized_crop_box(seed, 100, 60, (0.08, 1.0), (3 / 4, 4 / 3))
        top, left, h, w = box.numpy()
        assert top >= 0 and top + h <= 100 and left >= 0 and left + w <= 60 and h > 0 and w > 0
        assert 0.08 * 6000 * 0.8 <= h * w <= 6000
        again = augment.random_resized_crop_box(seed, 100, 60, (0.08, 1.0), (3 / 4, 4 / 3))
        np.testing.assert_array_equal(box, again)
    # Impossible ratios: the whole image, aspect clamped, centred (timm's fallback).
    box = augment.random_resized_crop_box(
        tf.constant([0, 0], tf.int64), 100, 20, (0.9, 1.0), (3.0, 4.0)
    )
    np.testing.assert_array_equal(box, [46, 0, 7, 20])


def test_train_augment_output_and_erasing():
    aug = augment.TrainAugment(size=32, erase_prob=1.0)
    image = tf.constant(SMOOTH)
    out = aug(image, tf.constant([1, 2], tf.int64))
    again = aug(image, tf.constant([1, 2], tf.int64))
    other = aug(image, tf.constant([1, 3], tf.int64))
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == tf.float32
    np.testing.assert_array_equal(out["image"], again["image"])
    assert not np.array_equal(out["image"], other["image"])
    y0, x0, y1, x1 = out["crop_box"].numpy()
    assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1


def test_parse_randaugment():
    spec = augment.parse_randaugment("rand-m9-mstd0.5-inc1")
    assert spec == augment.RandAugmentSpec(9.0, 2, 0.5, True, 0.5)
    assert augment.parse_randaugment("rand-n3-m5-p0.7").num_layers == 3


def test_train_batches_resume_exactly(tmp_path):
    from volo_jax.data.digits import prepare_digits_folder
    from volo_jax.data.input_pipeline import create_train_dataset

    root = prepare_digits_folder(str(tmp_path / "digits"))
    data = create_train_dataset(
        root,
        "train",
        batch_size=100,
        seed=0,
        augment=augment.TrainAugment(size=16, randaugment="", erase_prob=0.0),
    )
    assert (data.num_examples, data.steps_per_epoch) == (1437, 14)
    straight = [b for _, b in zip(range(18), data.batches(0), strict=False)]
    resumed = [b for _, b in zip(range(6), data.batches(12), strict=False)]
    for a, b in zip(straight[12:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # A new epoch is a new order.
    assert not np.array_equal(straight[0]["label"], straight[14]["label"])


def test_token_label_maps_travel_with_their_images(tmp_path):
    from volo_jax.data.input_pipeline import create_train_dataset
    from volo_jax.training.train import StepOptions, compute_targets

    rng = np.random.default_rng(0)
    maps = {}
    for c in range(2):
        for i in range(2):
            (tmp_path / "data" / "train" / f"c{c}").mkdir(parents=True, exist_ok=True)
            (tmp_path / "labels" / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(SMOOTH).save(tmp_path / "data" / "train" / f"c{c}" / f"{i}.png")
            score_map = np.stack([rng.random((5, 3, 3)) * 4, rng.integers(0, 4, (5, 3, 3))])
            np.save(tmp_path / "labels" / f"c{c}" / f"{i}.npy", score_map.astype(np.float16))
            maps[(c, i)] = score_map.astype(np.float16).astype(np.float32)

    def batch_of(aug: augment.TrainAugment) -> dict[str, np.ndarray]:
        data = create_train_dataset(
            str(tmp_path / "data"),
            "train",
            batch_size=4,
            seed=1,
            augment=aug,
            token_label_dir=str(tmp_path / "labels"),
        )
        return next(data.batches(0))

    # Without flip and RandAugment each image's own map arrives as it was saved.
    plain = batch_of(augment.TrainAugment(size=32, hflip=0.0, randaugment=""))
    for label_map, label in zip(plain["label_map"], plain["label"], strict=True):
        assert any(np.array_equal(label_map, maps[(label, i)]) for i in range(2))
    batch = batch_of(augment.TrainAugment(size=32, hflip=1.0, randaugment=""))
    assert batch["label_map"].shape == (4, 2, 5, 3, 3)
    assert batch["crop_box"].shape == (4, 4) and "flip" not in batch
    for label_map, label in zip(batch["label_map"], batch["label"], strict=True):
        assert any(np.array_equal(label_map, maps[(label, i)][..., ::-1]) for i in range(2))
    opts = StepOptions(num_classes=4, grid=2)
    cls, dense = compute_targets({k: np.asarray(v) for k, v in batch.items()}, opts)
    assert cls.shape == (4, 4) and dense.shape == (4, 4, 4)
    # The official soft targets: softmax * (1 - s + s / K) + s / K, summing to 1 + s / K.
    np.testing.assert_allclose(np.asarray(dense).sum(-1), 1.0 + 0.1 / 4, rtol=1e-5)


def _encoded(fmt: str) -> bytes:
    """A 75 x 100 photograph crop as a JPEG (4:2:0, progressive, grey, 4:4:4, 4:2:2) or a
    PNG."""
    import io

    from skimage import data

    photo = Image.fromarray(data.chelsea()[40:190:2, 60:260:2])
    if fmt == "grey":
        photo = photo.convert("L")
    buffer = io.BytesIO()
    if fmt == "PNG":
        photo.save(buffer, "PNG")
    else:
        subsampling = {"444": 0, "422": 1}.get(fmt, 2)
        options = {"progressive": fmt == "progressive", "subsampling": subsampling}
        photo.save(buffer, "JPEG", quality=85, **options)
    return buffer.getvalue()


# Traced once for all formats (RandAugment acts after the crop, the same in both paths).
_CROP_ONLY = augment.TrainAugment(size=24, randaugment="")
_FROM_FILE = tf.function(_CROP_ONLY.from_file)
_ON_IMAGE = tf.function(_CROP_ONLY.__call__)
_DECODE_CROP = tf.function(
    lambda data, seed: augment.decode_random_crop(data, seed, (0.08, 1.0), (0.75, 1.33))
)


@pytest.mark.parametrize("fmt", ["JPEG", "progressive", "grey", "444", "422", "PNG"])
def test_from_file_decodes_only_the_crop_and_gives_the_same_pixels(fmt):
    """TrainAugment.from_file (a JPEG's crop window decoded alone, the box drawn from the
    header's size) is TrainAugment on the whole decoded image, bit for bit."""
    data = tf.constant(_encoded(fmt))
    whole = tf.io.decode_image(data, channels=3, expand_animations=False)
    for i in range(16):
        seed = tf.constant([7, i], tf.int64)
        ours, reference = _FROM_FILE(data, seed), _ON_IMAGE(whole, seed)
        assert set(ours) == set(reference) == {"image", "crop_box", "flip"}
        for key in ours:
            np.testing.assert_array_equal(ours[key], reference[key], err_msg=f"{key}, seed {i}")
        crop, box, shape = _DECODE_CROP(data, seed)
        top, left, h, w = box.numpy()
        np.testing.assert_array_equal(crop, whole[top : top + h, left : left + w])
        np.testing.assert_array_equal(shape, tf.shape(whole)[:2])
