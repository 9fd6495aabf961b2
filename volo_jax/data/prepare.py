"""Prepares ImageNet-1k (ILSVRC2012) for training and evaluation, from the archives,
with the training install alone:

  python -m volo_jax.data.prepare imagenet2012 --manual_dir DIR --data_dir DIR

`--manual_dir` holds the two archives of image-net.org (downloaded after registering):
`ILSVRC2012_img_train.tar` (one `<synset>.tar` per class, of `<synset>_<n>.JPEG`) and
`ILSVRC2012_img_val.tar` (`ILSVRC2012_val_00000001.JPEG` ...); `ILSVRC2012_img_test.tar`
is read too if present (unlabelled). The records go to `<data_dir>/imagenet2012/5.1.0`,
where `--config.dataset.data_dir=DIR` finds them: TFDS's own `imagenet2012` builder does
the work (its validation labels, its fixes of the CMYK and PNG files), run from Python.
`tfds build` needs apache_beam, which the training install does not have.

Before anything is written the archives are checked: each a readable tar, the train
archive's members known synsets, the validation files numbered from 1 without a gap
(TFDS labels them by their sorted position), and room on the disk for the records.
Progress shows per archive member (a class's tar of the train archive, an image of the
others): a bar on a terminal, lines in a log. A run that is stopped leaves no partial
dataset (TFDS writes to a temporary folder) and starts over when run again; a prepared
dataset is left as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shutil
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from volo_jax.errors import DatasetError

#: TFDS datasets this module prepares.
PREPARED_BY_COMMAND = ("imagenet2012",)

TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VALIDATION_ARCHIVE = "ILSVRC2012_img_val.tar"
TEST_ARCHIVE = "ILSVRC2012_img_test.tar"
#: Images of the ILSVRC2012 validation set (TFDS's validation labels are for these).
NUM_VALIDATION_IMAGES = 50_000
_SYNSET_TAR = re.compile(r"n\d{8}\.tar")
_VALIDATION_IMAGE = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")


@dataclass(frozen=True)
class Archive:
    """One split's archive and what its progress counts."""

    split: str  # 'train', 'validation' or 'test'
    path: str
    members: int  # files in the archive: class tars (train) or images
    unit: str  # 'class' or 'image'


def _tar_members(path: str) -> list[str]:
    """Names of the files in an uncompressed tar (headers only: the data is skipped)."""
    try:
        with tarfile.open(path, "r:") as tar:
            return [member.name for member in tar if member.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"{path} is not a readable tar archive ({e}); is it complete?") from e


def check_imagenet_archives(manual_dir: str, synsets: Iterable[str]) -> dict[str, Archive]:
    """The archives in `manual_dir` by split, checked (see the module docstring).

    Args:
      synsets: the 1000 class names ('n01440764', ...), as TFDS orders them.
    Raises:
      DatasetError: a missing directory or archive, or an archive that TFDS would fail
        on or label wrongly, named with what is wrong.
    """
    if not os.path.isdir(manual_dir):
        raise DatasetError(
            f"--manual_dir {manual_dir} is not a directory; it should hold {TRAIN_ARCHIVE} "
            f"and {VALIDATION_ARCHIVE} (from https://image-net.org/download-images)."
        )
    paths = {
        split: os.path.join(manual_dir, name)
        for split, name in (
            ("train", TRAIN_ARCHIVE),
            ("validation", VALIDATION_ARCHIVE),
            ("test", TEST_ARCHIVE),
        )
    }
    if not (os.path.isfile(paths["train"]) or os.path.isfile(paths["validation"])):
        raise DatasetError(
            f"Neither {TRAIN_ARCHIVE} nor {VALIDATION_ARCHIVE} is in {manual_dir} (it holds "
            f"{sorted(os.listdir(manual_dir))[:10]}); put them there or pass --manual_dir."
        )
    archives = {}
    if os.path.isfile(paths["train"]):
        names = _tar_members(paths["train"])
        known = set(synsets)
        wrong = [n for n in names if not _SYNSET_TAR.fullmatch(n) or n[:-4] not in known]
        if wrong or not names:
            raise DatasetError(
                f"{paths['train']} should hold one <synset>.tar per ImageNet class "
                f"(n01440764.tar, ...); {'it is empty' if not names else f'it holds {wrong[:5]}'}."
            )
        archives["train"] = Archive("train", paths["train"], len(names), "class")
    if os.path.isfile(paths["validation"]):
        names = _tar_members(paths["validation"])
        numbers = sorted(
            int(match.group(1)) for match in map(_VALIDATION_IMAGE.fullmatch, names) if match
        )
        if len(numbers) != len(names) or not names:
            odd = [n for n in names if not _VALIDATION_IMAGE.fullmatch(n)][:5]
            raise DatasetError(
                f"{paths['validation']} should hold ILSVRC2012_val_00000001.JPEG ... "
                f"ILSVRC2012_val_00050000.JPEG; {f'it holds {odd}' if odd else 'it is empty'}."
            )
        if numbers != list(range(1, len(numbers) + 1)) or len(numbers) > NUM_VALIDATION_IMAGES:
            raise DatasetError(
                f"{paths['validation']} holds {len(numbers)} images numbered "
                f"{numbers[0]}..{numbers[-1]}, not 1..{len(numbers)}: TFDS gives the validation "
                "images their labels by sorted position, so a set with gaps would be mislabelled."
            )
        archives["validation"] = Archive("validation", paths["validation"], len(names), "image")
    if os.path.isfile(paths["test"]):
        names = _tar_members(paths["test"])
        archives["test"] = Archive("test", paths["test"], len(names), "image")
    return archives


def _existing_parent(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_disk_space(data_dir: str, archives: Iterable[Archive]) -> None:
    """Raises DatasetError unless `data_dir`'s disk has room for at least the records (as
    large as the archives: TFDS keeps the JPEG files as they are)."""
    needed = sum(os.path.getsize(archive.path) for archive in archives)
    free = shutil.disk_usage(_existing_parent(os.path.abspath(data_dir))).free
    if free < needed:
        gib = 2**30
        raise DatasetError(
            f"{data_dir} has {free / gib:.1f} GiB free; the prepared records take about as "
            f"much as the archives, {needed / gib:.1f} GiB (and TFDS needs room for its "
            "temporary files on top): free some space or pass another --data_dir."
        )


def _require_importlib_resources() -> None:
    """TFDS's builders import importlib_resources, which it declares only for Python < 3.9."""
    if importlib.util.find_spec("importlib_resources") is None:
        raise DatasetError(
            "tensorflow-datasets needs the package importlib_resources to prepare a dataset "
            "(it imports it but does not declare it on this Python): "
            "pip install 'volo-jax[train]' (or pip install importlib_resources)."
        )


def _counted(
    members: Iterable[Any], archive: Archive, stream: Any, bar: bool | None
) -> Iterator[Any]:
    """`members`, with progress shown as each is consumed."""
    from volo_jax.progress import Progress

    progress = Progress(
        archive.members,
        unit=archive.unit,
        desc=archive.split,
        every=max(1, archive.members // 100),
        stream=stream,
        bar=bar,
    )
    for member in members:
        yield member
        progress.update()
    progress.close()
    progress.write(f"{archive.split}: all read; TFDS shuffles and writes its records")


def _show_progress(
    builder: Any, archives: dict[str, Archive], stream: Any, bar: bool | None
) -> None:
    """Makes the imagenet2012 builder count the archive members it reads, per split
    (its `_generate_examples(archive, validation_labels=None, labels_exist=True)`)."""
    generate = builder._generate_examples

    def counted_generate(archive: Iterable[Any], **kwargs: Any) -> Iterator[Any]:
        if kwargs.get("validation_labels"):
            split = "validation"
        else:
            split = "train" if kwargs.get("labels_exist", True) else "test"
        if split in archives:
            archive = _counted(archive, archives[split], stream, bar)
        yield from generate(archive=archive, **kwargs)

    builder._generate_examples = counted_generate


def prepare(
    name: str,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    *,
    stream: Any = None,
    bar: bool | None = None,
) -> Any:
    """Prepares the TFDS dataset `name` ('imagenet2012') in `data_dir` (TFDS's default
    when None) from the archives in `manual_dir` (default `<data_dir>/downloads/manual`).

    Progress goes to `stream` (stderr): a bar when it is a terminal (or `bar`), else lines.
    Returns the builder (prepared). Raises DatasetError for what the user can fix.
    """
    if name not in PREPARED_BY_COMMAND:
        raise DatasetError(
            f"Unknown dataset {name!r}; this command prepares {PREPARED_BY_COMMAND}."
        )
    stream = sys.stderr if stream is None else stream
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    manual_dir = os.path.expanduser(manual_dir) if manual_dir else None
    _require_importlib_resources()
    from volo_jax.data.tf_quiet import tfds

    tfds.disable_progress_bar()  # ours instead
    with _quiet_tfds():
        builder = tfds.builder(name, data_dir=data_dir)
        is_prepared = builder.is_prepared()
    data_dir = os.fspath(builder.data_dir_root)
    manual_dir = os.path.abspath(manual_dir or os.path.join(data_dir, "downloads", "manual"))
    if is_prepared:
        print(f"{name} is already prepared in {builder.data_dir}; nothing to do.", file=stream)
        return builder
    archives = check_imagenet_archives(manual_dir, builder.info.features["label"].names)
    check_disk_space(data_dir, archives.values())
    for archive in archives.values():
        print(
            f"{archive.split}: {archive.path} ({archive.members:,} {archive.unit} files)",
            file=stream,
        )
    if "test" not in archives:
        print(f"test: no {TEST_ARCHIVE} (the unlabelled test split is left out)", file=stream)
    if "train" not in archives or "validation" not in archives:
        missing = TRAIN_ARCHIVE if "train" not in archives else VALIDATION_ARCHIVE
        print(
            f"warning: no {missing}: its split will be missing, and adding it later means "
            f"deleting {builder.data_dir} and preparing again.",
            file=stream,
        )
    print(f"writing {builder.data_dir}", file=stream, flush=True)
    _show_progress(builder, archives, stream, bar)
    with _quiet_tfds():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir, try_download_gcs=False
            )
        )
    return builder


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Keeps TFDS's own messages out (its 'Downloading and preparing dataset Unknown size'
    on stdout, its warnings about the folder it is about to write and the split this
    command already reports missing); errors still show, and raise."""
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logging.set_verbosity(verbosity)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m volo_jax.data.prepare",
        description="Prepare ImageNet (TFDS imagenet2012) from the ILSVRC2012 archives.",
    )
    parser.add_argument("dataset", choices=PREPARED_BY_COMMAND)
    parser.add_argument(
        "--data_dir",
        default=None,
        help="where the records go (what --config.dataset.data_dir then names); "
        "default: TFDS's (~/tensorflow_datasets, or $TFDS_DATA_DIR)",
    )
    parser.add_argument(
        "--manual_dir",
        default=None,
        help=f"the folder of {TRAIN_ARCHIVE} and {VALIDATION_ARCHIVE}; "
        "default: <data_dir>/downloads/manual",
    )
    args = parser.parse_args(argv)
    builder = prepare(args.dataset, args.data_dir, args.manual_dir)
    splits = ", ".join(f"{s} {info.num_examples:,}" for s, info in builder.info.splits.items())
    print(f"{args.dataset} prepared in {builder.data_dir}: {splits} examples")
    print(
        "next: python main.py --config=configs/volo_d1.py --workdir=runs/d1 "
        f"--config.dataset.data_dir={os.fspath(builder.data_dir_root)}"
    )
    return 0


if __name__ == "__main__":
    from volo_jax.logs import quiet_native_logs

    quiet_native_logs()  # before TensorFlow is imported
    from volo_jax.cli import run_cli

    run_cli(main)
