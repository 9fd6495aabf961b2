"""eval_transform must equal timm's own eval transform (torch) bit for bit."""

import numpy as np
import pytest
from PIL import Image

from volo_jax.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    eval_transform,
    imagenet_class_names,
    load_image,
)
from volo_jax.errors import ImageReadError

timm_data = pytest.importorskip("timm.data")
skimage_data = pytest.importorskip("skimage.data")


def _photos() -> dict[str, np.ndarray]:
    """Real photographs of varied sizes / aspect ratios, uint8 (H, W, 3)."""
    rocket = skimage_data.rocket()  # 427 x 640, landscape
    return {
        "astronaut": skimage_data.astronaut(),  # 512 x 512, square
        "chelsea": skimage_data.chelsea(),  # 300 x 451
        "coffee": skimage_data.coffee(),  # 400 x 600
        "rocket_portrait": np.ascontiguousarray(rocket.transpose(1, 0, 2)),  # 640 x 427
        "colorwheel": skimage_data.colorwheel(),  # 370 x 371, odd size
    }


PHOTOS = _photos()


def _timm_eval(
    image: np.ndarray,
    input_size: int,
    crop_pct: float,
    interpolation: str,
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
) -> np.ndarray:
    """timm's transform on a PIL RGB image, returned as (input_size, input_size, 3)."""
    transform = timm_data.create_transform(
        input_size=(3, input_size, input_size),
        is_training=False,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=mean,
        std=std,
    )
    return transform(Image.fromarray(image)).numpy().transpose(1, 2, 0)


def _assert_same(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == np.float32
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("crop_pct", [0.96, 1.0, 1.15])
@pytest.mark.parametrize("input_size", [224, 384, 448])
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_eval_transform_matches_timm(name, input_size, crop_pct, interpolation):
    image = PHOTOS[name]
    _assert_same(
        eval_transform(image, input_size, crop_pct, interpolation),
        _timm_eval(image, input_size, crop_pct, interpolation),
    )


@pytest.mark.parametrize("interpolation", ["nearest", "lanczos"])
def test_other_interpolations_match_timm(interpolation):
    image = PHOTOS["chelsea"]
    _assert_same(
        eval_transform(image, 224, 0.875, interpolation),
        _timm_eval(image, 224, 0.875, interpolation),
    )


@pytest.mark.parametrize("model_name", ["volo_d1_224.sail_in1k", "volo_d5_512.sail_in1k"])
def test_matches_resolved_volo_config(model_name):
    """The full resolve_data_config -> create_transform path timm uses for VOLO checkpoints."""
    timm_models = pytest.importorskip("timm.models")
    config = timm_data.resolve_data_config(
        pretrained_cfg=timm_models.get_pretrained_cfg(model_name).to_dict()
    )
    transform = timm_data.create_transform(**config, is_training=False)
    image = PHOTOS["coffee"]
    theirs = transform(Image.fromarray(image)).numpy().transpose(1, 2, 0)
    ours = eval_transform(
        image,
        config["input_size"][-1],
        config["crop_pct"],
        config["interpolation"],
        config["mean"],
        config["std"],
    )
    _assert_same(ours, theirs)


def test_padding_is_zero_before_normalization():
    """crop_pct > 1 shrinks the image below the crop; the border is black, then normalized."""
    out = eval_transform(PHOTOS["astronaut"], 224, 1.15)  # 194 x 194 inside a 224 crop
    black = -np.asarray(IMAGENET_DEFAULT_MEAN, np.float32) / np.asarray(
        IMAGENET_DEFAULT_STD, np.float32
    )
    np.testing.assert_array_equal(out[:15], np.broadcast_to(black, (15, 224, 3)))
    np.testing.assert_array_equal(out[:, -15:], np.broadcast_to(black, (224, 15, 3)))
    assert not np.allclose(out[15:-15, 15:-15], black)


def test_small_and_grayscale_inputs():
    """Upsampling a small image, and gray / RGBA inputs converted like PIL's convert('RGB')."""
    gray = skimage_data.page()  # 191 x 384, uint8 (H, W)
    rgb = np.asarray(Image.fromarray(gray).convert("RGB"))
    _assert_same(eval_transform(gray, 224, 0.9), _timm_eval(rgb, 224, 0.9, "bicubic"))
    np.testing.assert_array_equal(
        eval_transform(gray[..., None], 224, 0.9), eval_transform(rgb, 224, 0.9)
    )
    logo = skimage_data.logo()  # 500 x 500 x 4, RGBA
    np.testing.assert_array_equal(
        eval_transform(logo, 224, 0.9), eval_transform(logo[..., :3], 224, 0.9)
    )


def test_pil_input_equals_array_input():
    image = PHOTOS["chelsea"]
    np.testing.assert_array_equal(
        eval_transform(Image.fromarray(image), 384, 1.0), eval_transform(image, 384, 1.0)
    )
    gray_pil = Image.fromarray(image).convert("L")
    np.testing.assert_array_equal(
        eval_transform(gray_pil, 224, 0.96), eval_transform(np.asarray(gray_pil), 224, 0.96)
    )


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="interpolation"):
        eval_transform(PHOTOS["chelsea"], 224, 0.96, "area")
    with pytest.raises(TypeError, match="uint8"):
        eval_transform(PHOTOS["chelsea"].astype(np.float32), 224, 0.96)
    with pytest.raises(ValueError, match="shape"):
        eval_transform(np.zeros((8, 8, 2), np.uint8), 224, 0.96)


def test_load_image_roundtrip(tmp_path):
    path = tmp_path / "chelsea.png"
    Image.fromarray(PHOTOS["chelsea"]).save(path)
    image = load_image(path)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, PHOTOS["chelsea"])
    gray_path = tmp_path / "page.png"
    Image.fromarray(skimage_data.page()).save(gray_path)
    assert load_image(gray_path).shape == (191, 384, 3)


def test_load_image_missing_file(tmp_path):
    path = tmp_path / "missing.jpg"
    with pytest.raises(ImageReadError, match="not found") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_load_image_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a JPEG")
    with pytest.raises(ImageReadError, match="not a recognised image") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_load_image_truncated(tmp_path):
    path = tmp_path / "truncated.jpg"
    Image.fromarray(PHOTOS["coffee"]).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ImageReadError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_imagenet_class_names():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[0] == "tench"
    assert names[1] == "goldfish"
    assert names[999] == "toilet tissue"
    assert all(name and name == name.strip() for name in names)
