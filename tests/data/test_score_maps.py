"""Score-map files: the official `.pt` files read without PyTorch (against `torch.load` in
a separate process), their checks, the `.pt` -> `.npy` converter and the training
pipeline reading either."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.support import REPO
from volo_jax.data import score_maps
from volo_jax.data.score_maps import ScoreMapError, read_torch_tensor

# Written by PyTorch in a subprocess (PyTorch and TensorFlow must not share a process):
# <name>.pt and <name>.ref.npy (torch.load(...).numpy()) for each file.
_WRITE_WITH_TORCH = textwrap.dedent(
    """
    import sys, numpy as np, torch
    out = sys.argv[1]
    g = torch.Generator().manual_seed(0)

    def official(h, w, k=5):
        # generate_label.py of TokenLabeling: topk of (H, W, K) logits, stacked, permuted.
        logits = torch.randn(h, w, 1000, generator=g) * 4
        value, index = logits.topk(k)
        return torch.stack([value.half(), index.half()]).permute(0, 3, 1, 2)

    files = {
        "official": official(14, 14),
        "official_small": official(3, 4),
        "float32": official(5, 5).float().contiguous(),
        # A view into a larger storage, at an offset (torch.save writes the whole storage).
        "view": torch.stack([official(4, 4) for _ in range(3)])[1],
        "not_a_map": torch.zeros(5, 14, 14, dtype=torch.float16),
        "index_too_large": torch.stack([torch.zeros(5, 2, 2), torch.full((5, 2, 2), 1000.0)]),
        "nan": torch.full((2, 5, 2, 2), float("nan")),
        "integers": torch.zeros(2, 5, 2, 2, dtype=torch.int64),
        # One stored element that claims 10^9 (stride 0): refused before any allocation.
        "huge": torch.zeros(1, dtype=torch.float16).expand(2, 5, 10**4, 10**4),
    }
    for name, tensor in files.items():
        torch.save(tensor, f"{out}/{name}.pt")
        if name != "huge":
            np.save(f"{out}/{name}.ref.npy", tensor.numpy())
    legacy = official(14, 14)
    torch.save(legacy, f"{out}/legacy.pt", _use_new_zipfile_serialization=False)
    np.save(f"{out}/legacy.ref.npy", legacy.numpy())
    torch.save({"map": legacy}, f"{out}/dict.pt")
    """
)
GOOD = ("official", "official_small", "float32", "view", "legacy")


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory) -> Path:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is needed to write the reference .pt files")
    out = tmp_path_factory.mktemp("pt")
    subprocess.run([sys.executable, "-c", _WRITE_WITH_TORCH, str(out)], check=True, timeout=300)
    return out


@pytest.mark.parametrize("name", GOOD)
def test_reads_torch_save_files_as_torch_load_does(torch_files, name):
    expected = np.load(torch_files / f"{name}.ref.npy")
    array = read_torch_tensor((torch_files / f"{name}.pt").read_bytes())
    assert array.dtype == expected.dtype and array.shape == expected.shape
    np.testing.assert_array_equal(array, expected)
    assert array.flags.c_contiguous


def test_official_layout_and_float32_loading(torch_files):
    path = str(torch_files / "official.pt")
    array = score_maps.load_score_map(path, num_classes=1000)
    assert array.dtype == np.float32 and array.shape == (2, 5, 14, 14)
    expected = np.load(torch_files / "official.ref.npy").astype(np.float32)
    np.testing.assert_array_equal(array, expected)
    # Top-5 scores in decreasing order at every cell, then their class indices.
    assert (np.diff(array[0], axis=0) <= 0).all()
    assert ((array[1] >= 0) & (array[1] < 1000)).all()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("not_a_map", r"shape \(5, 14, 14\) is not a score map's \[2, K, H, W\]"),
        ("index_too_large", "class index 1000 is out of range for 1000 classes"),
        ("nan", "NaN or infinite"),
        ("integers", "dtype int64"),
        ("dict", "holds a dict, not one tensor"),
        ("huge", r"size \(2, 5, 10000, 10000\), far larger than a score map"),
    ],
)
def test_bad_files_are_named_with_what_is_wrong(torch_files, name, message):
    path = str(torch_files / f"{name}.pt")
    with pytest.raises(ScoreMapError, match=message) as info:
        score_maps.load_score_map(path, num_classes=1000)
    assert path in str(info.value)


def test_truncated_and_foreign_files(torch_files, tmp_path):
    data = (torch_files / "official.pt").read_bytes()
    for name, payload in [("cut.pt", data[: len(data) // 2]), ("text.pt", b"not a tensor")]:
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ScoreMapError, match=r"not a .*torch\.save file"):
            score_maps.load_score_map(str(tmp_path / name))
    with pytest.raises(ScoreMapError, match="Cannot read the score map"):
        score_maps.load_score_map(str(tmp_path / "missing.pt"))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(_Payload(marker), protocol=2))
    (tmp_path / "evil.pt").write_bytes(buffer.getvalue())
    with pytest.raises(ScoreMapError, match=r"posix\.system|os\.system"):
        score_maps.load_score_map(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def _class_tree(torch_files: Path, root: Path, names: dict[str, list[str]]) -> None:
    """root/<class>/<stem>.pt, copies of the named reference files."""
    for folder, files in names.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(files):
            shutil.copy(torch_files / f"{name}.pt", root / folder / f"{folder}_{i}.pt")


def test_convert_checks_each_file_and_resumes(torch_files, tmp_path):
    src, dst = tmp_path / "pt", tmp_path / "npy"
    _class_tree(
        torch_files,
        src,
        {"n01440764": ["official", "legacy", "official"], "n01443537": ["official", "nan"]},
    )
    argv = ["convert", "--src", str(src), "--dst", str(dst), "--workers", "1"]
    with pytest.raises(ScoreMapError, match="1 of 5 files could not be converted") as info:
        score_maps.main(argv)
    # The bad file is named with its reason; every other file is converted.
    assert "n01443537/n01443537_1.pt: holds NaN or infinite values" in str(info.value)
    converted = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.npy"))
    assert converted == [
        "n01440764/n01440764_0.npy",
        "n01440764/n01440764_1.npy",
        "n01440764/n01440764_2.npy",
        "n01443537/n01443537_0.npy",
    ]
    for relative in converted:
        name = "legacy" if relative.endswith("_1.npy") else "official"
        array = np.load(dst / relative)
        assert array.dtype == np.float16
        np.testing.assert_array_equal(array, np.load(torch_files / f"{name}.ref.npy"))
    assert "n01443537/n01443537_1.pt" in (dst / "convert_failures.txt").read_text()

    # Fixed source, one output deleted, one truncated: those two and the fixed one are
    # written again, the others kept.
    shutil.copy(torch_files / "official.pt", src / "n01443537" / "n01443537_1.pt")
    (dst / "n01440764" / "n01440764_0.npy").unlink()
    truncated = dst / "n01440764" / "n01440764_2.npy"
    truncated.write_bytes(truncated.read_bytes()[:100])
    report = score_maps.convert_directory(str(src), str(dst))
    assert (report.converted, report.kept, report.failed) == (3, 2, {})
    np.testing.assert_array_equal(np.load(truncated), np.load(torch_files / "official.ref.npy"))
    assert not list(dst.rglob("*.partial-*"))


def test_convert_refuses_maps_of_another_shape(torch_files, tmp_path):
    src = tmp_path / "pt"
    _class_tree(torch_files, src, {"n01440764": ["official", "official_small"]})
    report = score_maps.convert_directory(str(src), str(tmp_path / "npy"))
    assert report.converted == 1
    assert report.failed == {
        "n01440764/n01440764_1.pt": "shape (2, 5, 3, 4) differs from the other files' "
        "(2, 5, 14, 14)"
    }


def test_convert_command_line(torch_files, tmp_path, capsys):
    src, dst = tmp_path / "pt", tmp_path / "npy"
    _class_tree(torch_files, src, {"n01440764": ["official"] * 3, "n01443537": ["official"]})
    command = ["convert", "--src", str(src), "--dst", str(dst), "--workers", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "volo_jax.data.score_maps", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "4 converted, 0 already converted (kept), 0 failed" in result.stderr
    assert "convert 4/4 file done" in result.stderr  # the progress summary (not a tty)
    assert len(list(dst.rglob("*.npy"))) == 4
    assert score_maps.main(["convert", "--src", str(src), "--dst", str(dst)]) == 0
    assert "0 converted, 4 already converted (kept)" in capsys.readouterr().err
    with pytest.raises(score_maps.DatasetError, match=r"--src .*nowhere is not a directory"):
        score_maps.main(["convert", "--src", str(tmp_path / "nowhere"), "--dst", str(dst)])
    with pytest.raises(score_maps.DatasetError, match=r"No \.pt files under"):
        score_maps.main(["convert", "--src", str(dst), "--dst", str(tmp_path / "other")])


def test_score_map_suffix(tmp_path):
    with pytest.raises(score_maps.DatasetError, match="does not exist"):
        score_maps.score_map_suffix(str(tmp_path / "none"))
    (tmp_path / "n01440764").mkdir()
    with pytest.raises(score_maps.DatasetError, match="No score maps under"):
        score_maps.score_map_suffix(str(tmp_path))
    (tmp_path / "n01440764" / "a.pt").write_bytes(b"")
    assert score_maps.score_map_suffix(str(tmp_path)) == ".pt"
    (tmp_path / "n01440764" / "a.npy").write_bytes(b"")
    assert score_maps.score_map_suffix(str(tmp_path)) == ".npy"


def test_training_pipeline_reads_pt_as_npy(torch_files, tmp_path):
    """The same batches from the official .pt files and from their .npy conversion."""
    pytest.importorskip("tensorflow")
    from PIL import Image

    from volo_jax.data.augment import TrainAugment
    from volo_jax.data.input_pipeline import create_train_dataset

    rng = np.random.default_rng(0)
    classes = {"n01440764": ["official", "legacy"], "n01443537": ["legacy", "official"]}
    _class_tree(torch_files, tmp_path / "pt", classes)
    for folder, files in classes.items():
        (tmp_path / "images" / "train" / folder).mkdir(parents=True)
        for i in range(len(files)):
            image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(image).save(
                tmp_path / "images" / "train" / folder / f"{folder}_{i}.png"
            )
    score_maps.convert_directory(str(tmp_path / "pt"), str(tmp_path / "npy"))

    def first_batch(label_dir: str) -> dict[str, np.ndarray]:
        data = create_train_dataset(
            str(tmp_path / "images"),
            "train",
            batch_size=4,
            seed=3,
            augment=TrainAugment(size=32, hflip=0.0, randaugment="", erase_prob=0.0),
            token_label_dir=label_dir,
        )
        return next(data.batches(0))

    from_pt, from_npy = first_batch(str(tmp_path / "pt")), first_batch(str(tmp_path / "npy"))
    assert from_pt["label_map"].shape == (4, 2, 5, 14, 14)
    assert from_pt["label_map"].dtype == np.float32
    for key in from_npy:
        np.testing.assert_array_equal(from_pt[key], from_npy[key], err_msg=key)
    # Without flips and RandAugment, each image's map is its file's, as PyTorch reads it.
    references = [
        np.load(torch_files / f"{n}.ref.npy").astype(np.float32) for n in ("official", "legacy")
    ]
    for label_map in from_pt["label_map"]:
        assert any(np.array_equal(label_map, ref) for ref in references)
