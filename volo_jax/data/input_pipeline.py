"""tf.data input pipelines.

Evaluation (:func:`create_eval_dataset`) reads either

* a TFDS dataset by name (e.g. ``imagenet2012``, split ``validation``), or
* an image folder: if ``dataset`` is an existing directory, images are read from
  ``<dataset>/<split>/<class_name>/**/<file>`` (extensions in ``IMAGE_EXTENSIONS``, any case).
  Class indices follow the sorted class-folder names, so an ImageNet folder with one
  ``nXXXXXXXX`` synset folder per class gets the standard ImageNet-1k indices.

Images are decoded, resized and cropped with PIL
(:func:`~volo_jax.data.transforms.eval_resize_crop`) inside ``tf.numpy_function``, in
parallel over the cores, and normalised in TensorFlow with the same float32 operations, so
pixels are bit-identical to timm's eval pipeline on the same encoded files. TensorFlow only
runs on the CPU here; JAX owns the accelerators.

Training (:func:`create_train_dataset`) reads the same two kinds of sources, reshuffles them
every epoch and augments them in TensorFlow (:mod:`volo_jax.data.augment`; of a JPEG only the
random crop's window is decoded), deterministically given the seed and the step, so that a
resumed run sees the data an uninterrupted one would.
"""

import functools
import logging
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import numpy as np

from volo_jax.data.augment import TrainAugment
from volo_jax.data.prepare import PREPARED_BY_COMMAND
from volo_jax.data.score_maps import load_score_map, score_map_suffix
from volo_jax.data.tf_quiet import tf, tfds
from volo_jax.data.transforms import INTERPOLATIONS, decode_image, eval_resize_crop
from volo_jax.errors import ConfigError, DatasetError

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)


@functools.cache
def configure_tensorflow() -> None:
    """Hides GPUs from TensorFlow (JAX owns them) and silences its Python logging. Idempotent."""
    tf.get_logger().setLevel(logging.ERROR)
    tfds.disable_progress_bar()
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # TensorFlow's runtime was initialised before this call.
        logging.getLogger(__name__).warning("Could not hide GPUs from TensorFlow: %s", e)


def _process_shard(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of this process's examples; the first ``num_examples % process_count``
    processes get one extra example (the same split as ``tfds.even_splits``)."""
    base, extra = divmod(num_examples, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (process_index < extra)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


class _Records(NamedTuple):
    """Encoded examples of one process, before decoding.

    ``dataset`` elements: {'data': string (encoded image), 'source': string (path or record
    id, for error messages), 'label': int32}.
    """

    dataset: tf.data.Dataset
    num_local: int  # Examples this process reads.
    num_per_process_max: int  # Examples the busiest process reads.
    num_total: int  # Examples over all processes.


def _not_prepared_message(builder: tfds.core.DatasetBuilder) -> str:
    """How to prepare a TFDS dataset, for a DatasetError."""
    data_dir = builder.data_dir_root
    missing = (
        f"TFDS dataset {builder.name!r} is not prepared in data_dir {data_dir} "
        f"(looked for {builder.data_dir})."
    )
    if builder.name in PREPARED_BY_COMMAND:
        instructions = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
        return (
            f"{missing} It needs a manual download: {instructions} Put those files in "
            f"{data_dir}/downloads/manual/ and run `python -m volo_jax.data.prepare "
            f"{builder.name} --data_dir={data_dir}` (it reads the archives; no internet "
            "needed; --manual_dir=DIR reads them from elsewhere)."
        )
    prepare = (
        f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{builder.name}', "
        f"data_dir='{data_dir}').download_and_prepare()\""
    )
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        instructions = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
        return (
            f"{missing} It needs a manual download: {instructions} Put those files in "
            f"{data_dir}/downloads/manual/ and run `{prepare}`."
        )
    return (
        f"{missing} Run `{prepare}` on a machine with internet access and copy "
        f"{data_dir}/{builder.name} here, or pass the data_dir that holds it."
    )


def _tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """A prepared TFDS builder; never downloads anything."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except ValueError as e:  # Includes tfds' DatasetNotFoundError.
        raise DatasetError(
            f"Dataset {name!r} is not an existing directory, and TFDS cannot "
            f"load it: {str(e).splitlines()[0]}"
        ) from e
    if not builder.is_prepared():
        raise DatasetError(_not_prepared_message(builder))
    return builder


def _check_features(builder: tfds.core.DatasetBuilder, image_key: str, label_key: str) -> None:
    """Raises DatasetError unless ``image_key`` is an image and ``label_key`` exists."""
    features = builder.info.features
    if image_key not in features or not isinstance(features[image_key], tfds.features.Image):
        raise DatasetError(
            f"Dataset {builder.name!r} has no image feature {image_key!r}; "
            f"its features are {sorted(features)}."
        )
    if label_key not in features:
        raise DatasetError(
            f"Dataset {builder.name!r} has no label feature {label_key!r}; "
            f"its features are {sorted(features)}."
        )


def _split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
    """Number of examples in a (possibly sliced) split of a prepared TFDS dataset."""
    try:
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
        raise DatasetError(
            f"Dataset {builder.name!r} cannot read split {split!r} (its splits "
            f"are {sorted(builder.info.splits)}): {e}"
        ) from e


def _limited_split(builder: tfds.core.DatasetBuilder, split: str, num_examples: int | None) -> str:
    """Returns ``split`` restricted to its first ``num_examples`` examples (TFDS slicing)."""
    if num_examples is None:
        return split
    if not re.fullmatch(r"\w+", split):
        raise ConfigError(
            f"num_examples needs a plain split name, got {split!r}; "
            'slice the split instead (e.g. "validation[:1000]").'
        )
    return f"{split}[:{min(num_examples, _split_size(builder, split))}]"


def _tfds_records(
    name: str,
    split: str,
    data_dir: str | None,
    image_key: str,
    label_key: str,
    num_examples: int | None,
    process_index: int,
    process_count: int,
) -> _Records:
    """Encoded images and labels of this process's shard of a prepared TFDS split."""
    builder = _tfds_builder(name, data_dir)
    _check_features(builder, image_key, label_key)
    split = _limited_split(builder, split, num_examples)
    num_total = _split_size(builder, split)
    shards = tfds.even_splits(split, n=process_count)
    dataset = builder.as_dataset(
        split=shards[process_index],
        shuffle_files=False,
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True),
    )
    dataset = dataset.map(
        lambda ex: {
            "data": ex[image_key],
            "source": ex["tfds_id"],
            "label": tf.cast(ex[label_key], tf.int32),
        }
    )
    counts = [builder.info.splits[shard].num_examples for shard in shards]
    return _Records(dataset, counts[process_index], max(counts), num_total)


def class_names(
    dataset: str, split: str, data_dir: str | None = None, label_key: str = "label"
) -> list[str]:
    """The classes of `dataset` in label order: an image folder's class folders under
    `split` (sorted), or a TFDS dataset's label names (its info, no data read).
    DatasetError if there are none."""
    if os.path.isdir(dataset):
        split_dir = pathlib.Path(dataset) / split
        if not split_dir.is_dir():
            _folder_split(pathlib.Path(dataset), split)  # raises, naming what is there
        names = _class_folders(split_dir)
    else:
        feature = _tfds_builder(dataset, data_dir).info.features[label_key]
        names = list(getattr(feature, "names", None) or [])
    if not names:
        raise DatasetError(
            f"{dataset} ({split}) names no classes: give --config.dataset.num_classes"
        )
    return names


def _class_folders(split_dir: pathlib.Path) -> list[str]:
    """The class folders of ``split_dir``, sorted: their order is the labels'."""
    return sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir())


def _list_image_folder(split_dir: pathlib.Path) -> tuple[list[str], list[int]]:
    """Image paths under ``split_dir/<class>/`` and their labels, classes in sorted order."""
    classes = _class_folders(split_dir)
    paths, labels = [], []
    for label, class_name in enumerate(classes):
        files = sorted(
            path
            for path in (split_dir / class_name).rglob("*")
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        )
        paths += [str(path) for path in files]
        labels += [label] * len(files)
    return paths, labels


def _folder_split(root: pathlib.Path, split: str) -> tuple[pathlib.Path, list[str], list[int]]:
    """``root/split`` and its image paths and labels; DatasetError if it has none."""
    split_dir = root / split
    if not split_dir.is_dir():
        available = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        raise DatasetError(
            f"Image folder {root} has no split folder {split!r} "
            f"(found {available}); expected {split_dir}/<class_name>/<image>."
        )
    paths, labels = _list_image_folder(split_dir)
    if not paths:
        raise DatasetError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {split_dir}/<class_name>/."
        )
    return split_dir, paths, labels


def _folder_records(
    root: pathlib.Path, split: str, num_examples: int | None, process_index: int, process_count: int
) -> _Records:
    """Encoded images and labels of this process's shard of ``root/split/<class>/*``."""
    _, paths, labels = _folder_split(root, split)
    if num_examples is not None:
        paths, labels = paths[:num_examples], labels[:num_examples]
    start, stop = _process_shard(len(paths), process_index, process_count)
    dataset = tf.data.Dataset.from_tensor_slices(
        {
            "source": tf.constant(paths[start:stop], tf.string),
            "label": tf.constant(labels[start:stop], tf.int32),
        }
    )
    dataset = dataset.map(lambda ex: {"data": tf.io.read_file(ex["source"]), **ex})
    num_max = _process_shard(len(paths), 0, process_count)[1]  # Process 0 is never smaller.
    return _Records(dataset, stop - start, num_max, len(paths))


def _pad_batch(batch: dict[str, tf.Tensor], batch_size: int) -> dict[str, tf.Tensor]:
    """Zero-pads a (possibly partial) batch to ``batch_size`` rows and adds a bool ``mask``."""
    size = tf.shape(batch["label"])[0]
    padded = {}
    for key, value in batch.items():
        paddings = [[0, batch_size - size]] + [[0, 0]] * (value.shape.rank - 1)
        padded[key] = tf.ensure_shape(tf.pad(value, paddings), [batch_size, *value.shape[1:]])
    padded["mask"] = tf.sequence_mask(size, batch_size)
    return padded


def _empty_batches(num_batches: int, batch_size: int, input_size: int) -> tf.data.Dataset:
    """``num_batches`` fully masked batches (for processes with fewer examples)."""
    batch = {
        "image": np.zeros((batch_size, input_size, input_size, 3), np.float32),
        "label": np.zeros((batch_size,), np.int32),
        "mask": np.zeros((batch_size,), bool),
    }
    return tf.data.Dataset.from_tensors(batch).repeat(num_batches)


def _decode_resize_crop(data: bytes, source: bytes, **transform_kwargs) -> np.ndarray:
    """Encoded image -> ``eval_resize_crop`` output, uint8 (S, S, 3). Runs in
    tf.numpy_function (PIL's resampling is the reference; it releases the GIL)."""
    return eval_resize_crop(decode_image(data, source.decode()), **transform_kwargs)


def _normalize(pixels: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """uint8 (S, S, 3) (a static shape) -> float32 (pixels / 255 - mean) / std: the same
    float32 operations as ``transforms.normalize``, so the same bits. The mean and std are
    constants of the image's shape: broadcasting a (3,) vector over an image costs about
    10 times as much in TensorFlow's CPU kernels."""
    shape = tuple(pixels.shape)
    scaled = tf.cast(pixels, tf.float32) / tf.constant(255.0, tf.float32)
    mean_image = tf.constant(np.broadcast_to(np.asarray(mean, np.float32), shape))
    std_image = tf.constant(np.broadcast_to(np.asarray(std, np.float32), shape))
    return (scaled - mean_image) / std_image


def create_eval_dataset(
    dataset: str,
    split: str,
    batch_size: int,
    input_size: int,
    crop_pct: float,
    interpolation: str,
    mean: Sequence[float],
    std: Sequence[float],
    data_dir: str | None = None,
    image_key: str = "image",
    label_key: str = "label",
    num_examples: int | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tuple[tf.data.Dataset, int]:
    """Batched, padded evaluation data for this JAX process, preprocessed exactly like timm.

    Every example of the split appears exactly once over all processes with ``mask`` True;
    the last batch is padded (zeros, label 0, ``mask`` False), and processes with fewer
    examples get extra fully masked batches, so every process yields the same number of
    batches: ``ceil(ceil(num_examples / process_count) / batch_size)`` (``len(ds)`` works).

    Args:
        dataset: a TFDS dataset name (e.g. 'imagenet2012') or an image-folder directory.
        split: a TFDS split ('validation', 'test[:10%]') or the folder's split sub-directory.
        batch_size: examples per batch yielded by this process.
        input_size, crop_pct, interpolation, mean, std: see ``eval_transform``.
        data_dir: TFDS data directory (default: TFDS's own, e.g. ~/tensorflow_datasets).
        image_key, label_key: TFDS feature names of the encoded image and the class label.
        num_examples: use only the first ``num_examples`` examples of the split.
        process_index, process_count: shard to read; default ``jax.process_index()`` and
            ``jax.process_count()``.

    Returns:
        (dataset, num_examples): elements {'image': float32 (B, S, S, 3), 'label': int32 (B,),
        'mask': bool (B,)} with B = batch_size and S = input_size; ``num_examples`` is the
        number of real examples summed over all processes.

    Raises:
        DatasetError: unknown, unprepared or unreadable dataset / split / features.
        ConfigError: invalid batch size, input size, interpolation or num_examples.
    """
    if batch_size <= 0 or input_size <= 0 or (num_examples is not None and num_examples <= 0):
        raise ConfigError(
            f"batch_size, input_size and num_examples must be positive, "
            f"got {batch_size}, {input_size} and {num_examples}."
        )
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(
            f"Unknown interpolation {interpolation!r}; expected one of {INTERPOLATIONS}."
        )
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not in [0, {process_count}).")
    configure_tensorflow()

    if os.path.isdir(dataset):
        records = _folder_records(
            pathlib.Path(dataset), split, num_examples, process_index, process_count
        )
    else:
        records = _tfds_records(
            dataset,
            split,
            data_dir,
            image_key,
            label_key,
            num_examples,
            process_index,
            process_count,
        )

    resize_crop = functools.partial(
        _decode_resize_crop, input_size=input_size, crop_pct=crop_pct, interpolation=interpolation
    )

    def transform(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        pixels = tf.numpy_function(
            resize_crop, [example["data"], example["source"]], tf.uint8, stateful=False
        )
        pixels = tf.ensure_shape(pixels, (input_size, input_size, 3))
        return {"image": _normalize(pixels, mean, std), "label": example["label"]}

    ds = records.dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size).map(functools.partial(_pad_batch, batch_size=batch_size))
    missing = math.ceil(records.num_per_process_max / batch_size) - math.ceil(
        records.num_local / batch_size
    )
    if missing:
        ds = ds.concatenate(_empty_batches(missing, batch_size, input_size))
    return ds.prefetch(tf.data.AUTOTUNE), records.num_total


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class _TrainRecords(NamedTuple):
    """This process's encoded training examples, in a new order every epoch.

    ``for_epoch(epoch)`` (epoch: an int64 scalar tensor) gives the epoch's examples
    {'data': string (the encoded image) or 'path': string (its file), 'label': int32,
    'label_path': string (token-label map, or '')}.
    """

    for_epoch: Callable[[tf.Tensor], tf.data.Dataset]
    num_total: int  # Examples over all processes.


def _epoch_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """A stateless seed pair (seed, epoch), int64 (2,)."""
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])


def _token_label_path(token_label_dir: str | None, relative: str, suffix: str) -> str:
    """<token_label_dir>/<relative path of the image without extension><suffix>, or ''."""
    if not token_label_dir:
        return ""
    return os.path.join(token_label_dir, os.path.splitext(relative)[0] + suffix)


def _folder_train_records(
    root: pathlib.Path,
    split: str,
    seed: int,
    token_label_dir: str | None,
    process_index: int,
    process_count: int,
) -> _TrainRecords:
    """A fresh permutation of the folder's images per (seed, epoch), split over processes."""
    split_dir, paths, labels = _folder_split(root, split)
    suffix = score_map_suffix(token_label_dir) if token_label_dir else ""
    table = {
        "path": tf.constant(paths),
        "label": tf.constant(labels, tf.int32),
        "label_path": tf.constant(
            [
                _token_label_path(token_label_dir, os.path.relpath(p, split_dir), suffix)
                for p in paths
            ]
        ),
    }
    start, stop = _process_shard(len(paths), process_index, process_count)

    def for_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(paths)), _epoch_seed(seed, epoch)
        )[start:stop]
        # Files are read in TrainData's parallel map, with their decoding.
        return tf.data.Dataset.from_tensor_slices(order).map(
            lambda i: {
                "path": table["path"][i],
                "label": table["label"][i],
                "label_path": table["label_path"][i],
            }
        )

    return _TrainRecords(for_epoch, len(paths))


def _tfds_train_records(
    name: str,
    split: str,
    data_dir: str | None,
    image_key: str,
    label_key: str,
    seed: int,
    shuffle_buffer: int,
    token_label_dir: str | None,
    process_index: int,
    process_count: int,
) -> _TrainRecords:
    """The split's files in their fixed order (TFDS shuffles examples when it prepares a
    dataset) through a shuffle buffer seeded by (seed, epoch), split over processes.

    Token-label files are found by the dataset's 'file_name' feature (imagenet2012:
    <dir>/n01440764/n01440764_10026.npy, or .pt).
    """
    builder = _tfds_builder(name, data_dir)
    _check_features(builder, image_key, label_key)
    if token_label_dir and "file_name" not in builder.info.features:
        raise DatasetError(
            f"Dataset {name!r} has no file_name feature to find token-label "
            "maps by; use an image folder instead."
        )
    num_total = _split_size(builder, split)
    shard = tfds.even_splits(split, n=process_count)[process_index]
    records = builder.as_dataset(
        split=shard, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()}
    )
    label_root = tf.constant(token_label_dir or "")
    suffix = score_map_suffix(token_label_dir) if token_label_dir else ""

    def label_path(file_name: tf.Tensor) -> tf.Tensor:
        stem = tf.strings.regex_replace(file_name, r"\.[^.]*$", "")
        synset = tf.strings.split(stem, "_")[0]
        return tf.strings.join([label_root, synset, stem + suffix], "/")

    def for_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        shuffle_seed = tf.constant(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)
        return records.shuffle(shuffle_buffer, seed=shuffle_seed).map(
            lambda ex: {
                "data": ex[image_key],
                "label": tf.cast(ex[label_key], tf.int32),
                "label_path": label_path(ex["file_name"]) if token_label_dir else tf.constant(""),
            }
        )

    return _TrainRecords(for_epoch, num_total)


def _load_token_label(path: bytes) -> np.ndarray:
    """A [2, 5, H, W] score map file (.npy or the official .pt; local or gs://) -> float32.
    Runs in tf.numpy_function."""
    return load_score_map(path.decode())


def _train_options() -> tf.data.Options:
    """tf.data options of the training pipeline: the order is part of the exact resume
    (deterministic); images are processed in parallel, each op on one thread (an op's own
    threads would compete with the other images' for the same cores)."""
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    return options


class TrainData:
    """Augmented training batches of this JAX process, a deterministic function of
    (seed, step): epoch e is ordered by (seed, e) and its example i is augmented with
    the stateless seed (seed, process, e, i), so ``batches(step)`` resumes exactly.
    """

    def __init__(
        self,
        records: _TrainRecords,
        batch_size: int,
        process_count: int,
        augment: TrainAugment,
        seed: int,
        process_index: int,
        token_labels: bool,
    ) -> None:
        self.num_examples = records.num_total
        self.steps_per_epoch = records.num_total // (batch_size * process_count)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"batch_size {batch_size * process_count} is larger than the "
                f"{records.num_total} training examples."
            )
        self._records, self._batch_size, self._augment = records, batch_size, augment
        self._seed, self._process_index = seed, process_index
        self._token_labels = token_labels

    def _epoch(self, epoch: tf.Tensor) -> tf.data.Dataset:
        """The epoch's first steps_per_epoch * batch_size examples, with (epoch, index)."""
        per_epoch = self.steps_per_epoch * self._batch_size
        examples = self._records.for_epoch(epoch).take(per_epoch)
        return tf.data.Dataset.zip(tf.data.Dataset.range(per_epoch), examples).map(
            lambda index, example: {**example, "epoch": epoch, "index": index}
        )

    def _preprocess(self, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        counter = (self._process_index * 2**20 + example["epoch"]) * 2**32 + example["index"]
        seed = tf.stack([tf.constant(self._seed, tf.int64), counter])
        data = tf.io.read_file(example["path"]) if "path" in example else example["data"]
        if not self._token_labels:
            image = self._augment.from_file(data, seed)["image"]
            return {"image": image, "label": example["label"]}
        label_map = tf.numpy_function(
            _load_token_label, [example["label_path"]], tf.float32, stateful=False
        )
        # The score map goes through the flip and RandAugment with its image (the official
        # token-labeling order); the crop is applied to it on the accelerator.
        out = self._augment.from_file(data, seed, tf.ensure_shape(label_map, [2, None, None, None]))
        return {
            "image": out["image"],
            "label": example["label"],
            "label_map": out["label_map"],
            "crop_box": out["crop_box"],
        }

    def dataset(self, start_step: int = 0) -> tf.data.Dataset:
        """The batches from `start_step` on, epoch after epoch, without end."""
        epoch, offset = divmod(start_step, self.steps_per_epoch)
        ds = tf.data.Dataset.range(epoch, 2**31).flat_map(self._epoch)
        ds = ds.skip(offset * self._batch_size)
        ds = ds.map(self._preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self._batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        return ds.with_options(_train_options())

    def batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """NumPy batches {'image' float32 (b, S, S, 3), 'label' int32 (b,), and with token
        labels 'label_map' (b, 2, 5, H, W) (flipped and moved by RandAugment with its image)
        and 'crop_box' (b, 4)} from
        `start_step` on (b = the per-process batch size)."""
        op_error = tf.errors.OpError  # bound now: module globals may be gone at exit
        try:
            yield from self.dataset(start_step).as_numpy_iterator()
        except op_error as e:
            raise DatasetError(f"Reading the training data failed: {e.message}") from e


def create_train_dataset(
    dataset: str,
    split: str,
    batch_size: int,
    augment: TrainAugment,
    seed: int,
    data_dir: str | None = None,
    image_key: str = "image",
    label_key: str = "label",
    shuffle_buffer: int = 16_384,
    token_label_dir: str | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainData:
    """Training data of this JAX process: shuffled, augmented, batched, prefetched.

    Args:
        dataset: a TFDS dataset name or an image-folder directory (as create_eval_dataset).
        split: the training split ('train').
        batch_size: examples per batch of this process.
        augment: the augmentation (``TrainAugment.from_file`` of each encoded image with
            its seed; the token-labeling order with a map).
        seed: the run's seed; shuffling and augmentation derive from it and the step.
        shuffle_buffer: TFDS only (folders are fully permuted every epoch).
        token_label_dir: precomputed token-label maps, one .npy or official .pt per image
            (``volo_jax.data.score_maps``), mirroring the images' relative paths.
    Raises:
        DatasetError: unknown, unprepared or unreadable dataset / split / features.
    """
    configure_tensorflow()
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if os.path.isdir(dataset):
        records = _folder_train_records(
            pathlib.Path(dataset), split, seed, token_label_dir, process_index, process_count
        )
    else:
        records = _tfds_train_records(
            dataset,
            split,
            data_dir,
            image_key,
            label_key,
            seed,
            shuffle_buffer,
            token_label_dir,
            process_index,
            process_count,
        )
    return TrainData(
        records, batch_size, process_count, augment, seed, process_index, bool(token_label_dir)
    )
