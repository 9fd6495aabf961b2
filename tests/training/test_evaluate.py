"""Evaluation on a folder dataset against a direct NumPy computation, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs.smoke import get_config
from tests.support import REPO
from volo_jax.data import eval_transform, load_image
from volo_jax.errors import CheckpointError, DatasetError
from volo_jax.models import create_model
from volo_jax.training import evaluate, train
from volo_jax.training.config import model_overrides
from volo_jax.weights import save_weights

NUM_CLASSES, PER_CLASS = 6, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A folder dataset (val/<class>/<image>, mixed sizes), a tiny model's weights (a
    directory, the config's init_from, and the same as weights.safetensors) and the eval
    config that reads them."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for c in range(NUM_CLASSES):
        os.makedirs(root / "data" / "val" / f"class_{c}")
        for i in range(PER_CLASS):
            h, w = rng.integers(24, 60, 2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "data" / "val" / f"class_{c}" / f"{i}.png")
    config = get_config()
    config.mode = "eval"
    config.dataset.name = str(root / "data")
    config.dataset.eval_split = "val"
    config.dataset.num_classes = NUM_CLASSES
    config.eval.batch_size = 5  # 12 images: the last batch is padded and masked
    config.eval.crop_pct = 0.9
    model = create_model(config.model, **model_overrides(config))
    variables = train.initial_variables(model, 32, jax.random.PRNGKey(3))
    save_weights(root / "weights", variables, config.model, model_overrides(config))
    save_weights(root / "weights.safetensors", variables, config.model, model_overrides(config))
    config.init_from = str(root / "weights")
    return config, model, variables, root


def test_eval_matches_numpy(setup):
    config, model, variables, root = setup
    result = evaluate.evaluate(config)
    images, labels = [], []
    for c in range(NUM_CLASSES):
        for i in range(PER_CLASS):
            image = load_image(root / "data" / "val" / f"class_{c}" / f"{i}.png")
            images.append(eval_transform(image, 32, 0.9, "bicubic", config.mean, config.std))
            labels.append(c)
    logits = np.asarray(jax.jit(model.apply)(variables, np.stack(images)))
    order = np.argsort(-logits, axis=-1)
    top1 = np.sum(order[:, 0] == labels)
    top5 = np.sum(np.any(order[:, :5] == np.array(labels)[:, None], axis=-1))
    total = NUM_CLASSES * PER_CLASS
    assert result["count"] == total
    assert result["top1"] == pytest.approx(top1 / total)
    assert result["top5"] == pytest.approx(top5 / total)
    assert 0 < result["top5"] < 1  # top-5 of 6 classes: a meaningful check


def test_eval_reads_a_safetensors_file_the_same(setup):
    config, *_, root = setup
    from_file = config.copy_and_resolve_references()
    from_file.init_from = str(root / "weights.safetensors")
    assert evaluate.evaluate(from_file) == evaluate.evaluate(config)


def test_missing_and_foreign_weights(setup, tmp_path):
    config, *_ = setup
    config = config.copy_and_resolve_references()
    config.init_from = str(tmp_path)  # exists, but no model.json
    with pytest.raises(CheckpointError, match="not a volo-jax weights directory"):
        evaluate.evaluate(config)


def test_unprepared_tfds_dataset_says_how_to_prepare(setup, tmp_path):
    config, *_ = setup
    result = subprocess.run(
        [
            sys.executable,
            "main.py",
            "--config=configs/smoke.py",
            "--config.mode=eval",
            f"--config.init_from={config.init_from}",
            "--config.dataset.name=imagenet2012",
            f"--config.dataset.data_dir={tmp_path}",
            f"--config.dataset.num_classes={NUM_CLASSES}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: " in result.stderr and "Traceback" not in result.stderr
    assert (
        "manual" in result.stderr
        and "python -m volo_jax.data.prepare imagenet2012" in result.stderr
    )


def test_missing_folder_split(setup):
    config, *_ = setup
    config = config.copy_and_resolve_references()
    config.dataset.eval_split = "test"
    with pytest.raises(DatasetError, match="no split folder 'test'"):
        evaluate.evaluate(config)
