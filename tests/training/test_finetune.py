"""configs/finetune.py end to end: weights of another task (10 classes) fine-tuned on an
image folder made from real photos (the ones scikit-learn and matplotlib ship), with the
classifier started afresh, the classes learned on held-out crops, and their names in the
final weights, which volo-jax-predict prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from tests.support import REPO
from tests.support.small import smoke_config
from volo_jax.models import create_model
from volo_jax.training.config import weights_overrides
from volo_jax.weights import read_metadata, save_weights

#: configs/smoke.py's tiny VOLO as weights trained by it on the 32 x 32 digits (10
#: classes) record it.
TINY = weights_overrides(smoke_config(**{"dataset.num_classes": 10}))
TRAIN_CROPS, HELD_OUT_CROPS = 40, 15


def _photos() -> dict[str, np.ndarray]:
    """Three photos that installed packages ship, as (H, W, 3) uint8."""
    import matplotlib
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    hopper = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return {"china": china, "flower": flower, "grace_hopper": np.asarray(Image.open(hopper))}


def _crops(photo: np.ndarray, rows: tuple[float, float], count: int, rng) -> list[Image.Image]:
    """`count` random square crops (a fifth to a third of the photo's height) whose tops
    lie in the `rows` fraction of the photo, as 48 x 48 images."""
    height, width, _ = photo.shape
    crops = []
    for _ in range(count):
        side = int(rng.uniform(0.2, 0.33) * height)
        top = int(rng.uniform(rows[0] * height, rows[1] * height - side))
        left = int(rng.uniform(0, width - side))
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        crops.append(crop.resize((48, 48), Image.BICUBIC))
    return crops


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """photos/{train,validation}/<photo>/<crop>.jpg: training crops from the top 60% of
    each photo, held-out crops from its bottom 35%."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name, photo in _photos().items():
        for split, rows, count in (
            ("train", (0.0, 0.6), TRAIN_CROPS),
            ("validation", (0.65, 1.0), HELD_OUT_CROPS),
        ):
            os.makedirs(root / split / name)
            for i, crop in enumerate(_crops(photo, rows, count, rng)):
                crop.save(root / split / name / f"{i:03d}.jpg", quality=90)
    return str(root)


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory) -> str:
    """Weights of a tiny VOLO for 10 classes (freshly initialised), saved as training
    writes them: the model name and its overrides in the metadata."""
    path = tmp_path_factory.mktemp("weights") / "digits.safetensors"
    model = create_model("volo_d1_224", **TINY)
    variables = model.init(jax.random.key(1), np.zeros((1, 32, 32, 3), np.float32))
    variables = jax.device_get(nn.unbox(variables))
    save_weights(path, variables, "volo_d1_224", TINY, source="digits")
    return str(path)


def test_finetune_learns_the_new_classes_and_predict_names_them(folder, digits_weights, tmp_path):
    workdir = tmp_path / "run"
    argv = [
        "main.py",
        "--config=configs/finetune.py",
        f"--workdir={workdir}",
        f"--config.init_from={digits_weights}",
        f"--config.dataset.name={folder}",
        "--config.train.batch_size=30",
        "--config.train.num_steps=60",
        "--config.optim.warmup_steps=5",
        "--config.optim.base_lr=1e-3",  # a random backbone: more than a pretrained one takes
        "--config.optim.lr_batch_base=30",
        "--config.eval.batch_size=45",
        "--config.log_every_steps=20",
        "--config.eval_every_steps=60",
        "--config.checkpoint_every_steps=60",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-5000:]
    assert (
        f"{digits_weights} has a classifier for 10 classes, the model 3: the classifier "
        "(^params/(head|aux_head)/) starts afresh"
    ) in done.stderr, done.stderr[-5000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "eval/top1" in r][-1]
    assert final["step"] == 60, final
    # 45 held-out crops of 3 photos: chance is 1/3.
    assert final["eval/top1"] >= 0.7, final

    weights = workdir / "weights"
    meta = read_metadata(weights)
    assert meta["class_names"] == ["china", "flower", "grace_hopper"], meta
    assert meta["overrides"]["num_classes"] == 3 and meta["overrides"]["img_size"] == 32
    image = os.path.join(folder, "validation", "flower", "000.jpg")
    predict = subprocess.run(
        [sys.executable, "-m", "volo_jax.predict", "--weights", str(weights), "--top", "3", image],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    lines = predict.stdout.splitlines()
    assert lines[0] == image
    assert sorted(line.split()[-1] for line in lines[1:]) == ["china", "flower", "grace_hopper"]
