"""predict: from an image file to the same probabilities as timm's pipeline."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
skimage_data = pytest.importorskip("skimage.data")

from tests.support import timm_pairs  # noqa: E402
from volo_jax.predict import load_classifier, predict  # noqa: E402

NAME = "volo_d1_224"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A shrunk timm volo_d1_224 with 1000 classes, converted to a weights directory
    (returned) and to root/volo_d1_224.safetensors."""
    root = tmp_path_factory.mktemp("predict")
    overrides = dict(timm_pairs.shrunk_overrides(NAME, factor=8), num_classes=1000)
    torch_model = timm_pairs.timm_volo(NAME, **overrides)
    torch.save({"state_dict": torch_model.state_dict()}, root / "model.pth.tar")
    from volo_jax.convert import convert_checkpoint

    convert_checkpoint(NAME, root / "model.pth.tar", root / "weights", **overrides)
    convert_checkpoint(NAME, root / "model.pth.tar", root / "volo_d1_224.safetensors", **overrides)
    images = []
    for i, photo in enumerate([skimage_data.chelsea(), skimage_data.coffee()]):
        path = root / f"photo{i}.png"
        Image.fromarray(photo).save(path)
        images.append(path)
    return torch_model, root / "weights", images


@pytest.mark.parametrize("form", ["directory", "file"])
def test_probabilities_match_timms_transform_and_model(converted, form):
    torch_model, weights, images = converted
    if form == "file":
        weights = weights.parent / "volo_d1_224.safetensors"
    from timm.data import create_transform

    transform = create_transform(
        input_size=(3, 224, 224),
        crop_pct=0.96,
        interpolation="bicubic",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        is_training=False,
    )
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        expected = torch.softmax(torch_model(batch), dim=-1).numpy()
    model, variables, name = load_classifier(str(weights))
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    probabilities = predict(pixels, model, variables, name)
    # 1000 probabilities of about 1e-3 each: each within a relative tolerance of its own.
    np.testing.assert_allclose(probabilities, expected, rtol=1e-4, atol=0)


def _run_predict(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "volo_jax.predict", *argv],
        capture_output=True,
        text=True,
        check=False,
    )


def test_cli_prints_top5_imagenet_names(converted):
    from volo_jax.data import imagenet_class_names

    _, weights, images = converted
    weights = weights.parent / "volo_d1_224.safetensors"
    done = _run_predict("--model", NAME, "--weights", str(weights), *map(str, images))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == str(images[0]) and lines[6] == str(images[1]) and len(lines) == 12
    names = set(imagenet_class_names())
    for line in lines[1:6] + lines[7:]:
        percent, label = line.split(maxsplit=1)
        assert percent.endswith("%") and label in names


def test_cli_errors_are_one_clear_line(converted, tmp_path):
    _, weights, images = converted
    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("hello")
    cases = [
        (["--weights", str(weights), str(bad)], "Cannot read image"),
        (["--weights", str(tmp_path / "none"), str(images[0])], "weights directory not found"),
        (
            ["--weights", str(tmp_path / "none.safetensors"), str(images[0])],
            "weights file not found",
        ),
        (
            ["--weights", str(weights.parent / "model.pth.tar"), str(images[0])],
            "neither a .safetensors weights file nor a weights directory",
        ),
        (
            ["--weights", str(weights), "--model", "volo_d2_224", str(images[0])],
            "holds weights for volo_d1_224",
        ),
        (["--weights", str(weights), "--model", "volo_q", str(images[0])], "known models"),
        (["--weights", str(weights), "--batch-size", "0", str(images[0])], "must be positive"),
        (["--weights", str(weights), "--top", "-3", str(images[0])], "must be positive, got -3"),
    ]
    for argv, needle in cases:
        done = _run_predict(*argv)
        assert done.returncode == 2, done.stderr
        assert needle in done.stderr and "Traceback" not in done.stderr
