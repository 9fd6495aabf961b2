"""`python -m volo_jax.data.prepare imagenet2012` on a small ILSVRC2012 in the official
layout, made of photographs that scikit-image and scikit-learn ship: the records TFDS
writes, their labels, the checks of the archives, and (slow) configs/volo_d1.py trained
and evaluated on the result through main.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import REPO
from volo_jax.data import prepare
from volo_jax.errors import DatasetError

tfds = pytest.importorskip("tensorflow_datasets")

# Train classes (tench, goldfish, great white shark: ImageNet indices 0, 1, 2).
SYNSETS = ("n01440764", "n01443537", "n01484850")
IMAGES_PER_CLASS = 3
# The official ground truth of ILSVRC2012_val_00000001 ... _00000006.
VALIDATION_SYNSETS = ("n01751748", "n09193705", "n02105855", "n04263257", "n03125729", "n01735189")


def _photographs() -> list[np.ndarray]:
    """Photographs shipped with scikit-image and scikit-learn (colour and grey)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    shipped = [data.astronaut(), data.chelsea(), data.coffee(), data.camera(), data.rocket()]
    shipped += [data.hubble_deep_field(), data.retina(), data.moon()]
    return shipped + list(load_sample_images().images)


def _jpeg(photo: np.ndarray, index: int) -> bytes:
    """A JPEG of a crop of `photo` (its own crop for each index), about 64 px wide."""
    h, w = photo.shape[:2]
    top, left = (index * 37) % (h // 4), (index * 53) % (w // 4)
    image = Image.fromarray(photo[top : top + 3 * h // 4, left : left + 3 * w // 4])
    image = image.resize((64 + 8 * (index % 3), 48 + 8 * (index % 2)), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_ilsvrc2012(manual_dir: Path) -> dict[str, bytes]:
    """ILSVRC2012_img_train.tar (a <synset>.tar per class) and ILSVRC2012_img_val.tar in
    `manual_dir`; returns {file name: JPEG bytes}."""
    photos = _photographs()
    files, index = {}, 0
    manual_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(manual_dir / prepare.TRAIN_ARCHIVE, "w") as train:
        for synset in SYNSETS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for k in range(IMAGES_PER_CLASS):
                    name = f"{synset}_{10026 + 7 * k}.JPEG"
                    files[name] = _jpeg(photos[index % len(photos)], index)
                    _add(class_tar, name, files[name])
                    index += 1
            _add(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(manual_dir / prepare.VALIDATION_ARCHIVE, "w") as val:
        for i in range(1, len(VALIDATION_SYNSETS) + 1):
            name = f"ILSVRC2012_val_{i:08d}.JPEG"
            files[name] = _jpeg(photos[index % len(photos)], index)
            _add(val, name, files[name])
            index += 1
    return files


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(data_dir, {file name: JPEG bytes}, progress output) of a prepared fake ImageNet."""
    root = tmp_path_factory.mktemp("imagenet")
    files = make_ilsvrc2012(root / "archives")
    output = io.StringIO()
    prepare.prepare(
        "imagenet2012", str(root / "data"), str(root / "archives"), stream=output, bar=False
    )
    return root / "data", files, output.getvalue()


def test_prepared_records_hold_the_archives_images_and_labels(prepared):
    data_dir, files, _ = prepared
    builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
    assert builder.is_prepared()
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
        "train": len(SYNSETS) * IMAGES_PER_CLASS,
        "validation": len(VALIDATION_SYNSETS),
    }
    names = builder.info.features["label"].names
    expected = {name: name.split("_")[0] for name in files if name.startswith("n")}
    expected.update(
        {f"ILSVRC2012_val_{i + 1:08d}.JPEG": s for i, s in enumerate(VALIDATION_SYNSETS)}
    )
    seen = {}
    for split in ("train", "validation"):
        records = builder.as_dataset(split, decoders={"image": tfds.decode.SkipDecoding()})
        for record in records.as_numpy_iterator():
            name = record["file_name"].decode()
            assert record["image"] == files[name], name  # the JPEG bytes, untouched
            seen[name] = names[record["label"]]
    assert seen == expected
    assert names[:3] == list(SYNSETS)


def test_progress_and_a_second_run(prepared):
    data_dir, _, output = prepared
    assert "train: " in output and "(3 class files)" in output
    assert "validation: " in output and "(6 image files)" in output
    assert "train 3/3 class done" in output and "validation 6/6 image done" in output
    again = io.StringIO()
    prepare.prepare("imagenet2012", str(data_dir), str(data_dir / "nowhere"), stream=again)
    assert "already prepared" in again.getvalue()


def test_eval_pipeline_reads_the_prepared_dataset(prepared):
    from volo_jax.data.input_pipeline import create_eval_dataset

    data_dir, _, _ = prepared
    dataset, count = create_eval_dataset(
        "imagenet2012",
        "validation",
        batch_size=4,
        input_size=32,
        crop_pct=0.875,
        interpolation="bicubic",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        data_dir=str(data_dir),
    )
    batches = list(dataset.as_numpy_iterator())
    assert count == 6 and len(batches) == 2
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    names = tfds.builder("imagenet2012", data_dir=str(data_dir)).info.features["label"].names
    assert sorted(names[i] for i in labels) == sorted(VALIDATION_SYNSETS)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            _add(tar, name, data)


def test_archives_that_would_fail_or_be_mislabelled_are_refused(tmp_path):
    synsets = ["n01440764", "n01443537"]
    with pytest.raises(DatasetError, match="is not a directory"):
        prepare.check_imagenet_archives(str(tmp_path / "none"), synsets)
    with pytest.raises(DatasetError, match=r"Neither ILSVRC2012_img_train\.tar nor"):
        prepare.check_imagenet_archives(str(tmp_path), synsets)
    val = tmp_path / prepare.VALIDATION_ARCHIVE
    _tar(val, {"ILSVRC2012_val_00000001.JPEG": b"x", "ILSVRC2012_val_00000003.JPEG": b"x"})
    with pytest.raises(DatasetError, match=r"numbered 1\.\.3, not 1\.\.2.*mislabelled"):
        prepare.check_imagenet_archives(str(tmp_path), synsets)
    _tar(val, {"ILSVRC2012_val_00000001.JPEG": b"x", "cat.jpg": b"x"})
    with pytest.raises(DatasetError, match=r"it holds \['cat.jpg'\]"):
        prepare.check_imagenet_archives(str(tmp_path), synsets)
    val.write_bytes(b"not a tar")
    with pytest.raises(DatasetError, match="not a readable tar archive"):
        prepare.check_imagenet_archives(str(tmp_path), synsets)
    val.unlink()
    train = tmp_path / prepare.TRAIN_ARCHIVE
    _tar(train, {"n01440764.tar": b"", "n99999999.tar": b""})
    with pytest.raises(DatasetError, match=r"one <synset>.tar per ImageNet class.*n99999999"):
        prepare.check_imagenet_archives(str(tmp_path), synsets)
    _tar(train, {"n01440764.tar": b"", "n01443537.tar": b""})
    archives = prepare.check_imagenet_archives(str(tmp_path), synsets)
    assert archives == {"train": prepare.Archive("train", str(train), 2, "class")}


def test_command_line_errors(tmp_path, capsys):
    with pytest.raises(DatasetError, match=r"--manual_dir .*archives is not a directory"):
        prepare.main(
            [
                "imagenet2012",
                f"--data_dir={tmp_path / 'data'}",
                f"--manual_dir={tmp_path / 'archives'}",
            ]
        )
    with pytest.raises(SystemExit):
        prepare.main(["imagenet2013"])
    assert "invalid choice: 'imagenet2013'" in capsys.readouterr().err


@pytest.mark.slow
def test_volo_d1_trains_and_evaluates_on_the_prepared_dataset(tmp_path):
    """The README's route end to end: prepare (the command line), train a few steps of
    configs/volo_d1.py (shrunk), then mode=eval of the weights it wrote."""
    make_ilsvrc2012(tmp_path / "archives")
    data_dir, workdir = tmp_path / "tensorflow_datasets", tmp_path / "run"
    run = lambda *args: subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    result = run(
        "-m",
        "volo_jax.data.prepare",
        "imagenet2012",
        f"--manual_dir={tmp_path / 'archives'}",
        f"--data_dir={data_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train 9, validation 6 examples" in result.stdout
    # configs/volo_d1.py as it is (the recipe, the augmentation, token labeling), with a
    # VOLO of one block per stage at 32 px: the config's model_overrides has no field
    # for the depths, and a command-line override cannot add one.
    config = tmp_path / "volo_d1_tiny.py"
    config.write_text(
        "from configs.volo_d1 import get_config as volo_d1\n\n\n"
        "def get_config():\n"
        "    config = volo_d1()\n"
        "    config.model_overrides.update(\n"
        "        {'layers': (1, 1, 1, 1), 'embed_dims': (32, 64, 64, 64),\n"
        "         'num_heads': (1, 2, 2, 2), 'stem_hidden_dim': 16}\n"
        "    )\n"
        "    return config\n"
    )
    shrink = [
        f"--config={config}",
        "--config.img_size=32",
        f"--config.dataset.data_dir={data_dir}",
        "--config.eval.batch_size=4",
    ]
    result = run(
        "main.py",
        f"--workdir={workdir}",
        *shrink,
        "--config.train.batch_size=4",
        "--config.train.num_epochs=2",
        "--config.optim.warmup_epochs=1",
        "--config.train.cooldown_epochs=0",
        "--config.max_steps=2",
        "--config.log_every_steps=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in metrics if "train/loss" in m) == 2
    assert any("eval/top1" in m for m in metrics)
    assert (workdir / "weights").is_dir()
    result = run(
        "main.py", *shrink, "--config.mode=eval", f"--config.init_from={workdir / 'weights'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "volo_d1_224 on imagenet2012/validation: top-1" in result.stdout
    assert "(6 images)" in result.stdout
