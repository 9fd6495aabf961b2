"""tf.data input pipelines.

Evaluation (:func:`create_eval_dataset`) reads either

* a TFDS dataset by name (e.g. ``imagenet2012``, split ``validation``), or
* an image folder: if ``dataset`` is an existing directory, images are read from
  ``<dataset>/<split>/<class_name>/**/<file>`` (extensions in ``IMAGE_EXTENSIONS``, any case).
  Class indices follow the sorted class-folder names, so an ImageNet folder with one
  ``nXXXXXXXX`` synset folder per class gets the standard ImageNet-1k indices.

Images are decoded with PIL and preprocessed with :func:`~volo_jax.data.transforms.eval_transform`
inside ``tf.numpy_function``, so pixels are bit-identical to timm's eval pipeline on the same
encoded files. TensorFlow only runs on the CPU here; JAX owns the accelerators.
"""

import functools
import logging
import math
import os
import pathlib
import re
from collections.abc import Sequence
from typing import NamedTuple

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Must precede the TensorFlow import.

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from volo_jax.data.transforms import INTERPOLATIONS, decode_image, eval_transform
from volo_jax.errors import ConfigError, DatasetError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.ppm', '.pgm', '.tif', '.tiff',
                    '.webp')


@functools.cache
def configure_tensorflow() -> None:
    """Hides GPUs from TensorFlow (JAX owns them) and silences its Python logging. Idempotent."""
    tf.get_logger().setLevel(logging.ERROR)
    tfds.disable_progress_bar()
    try:
        tf.config.set_visible_devices([], 'GPU')
    except RuntimeError as e:  # TensorFlow's runtime was initialised before this call.
        logging.getLogger(__name__).warning('Could not hide GPUs from TensorFlow: %s', e)


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
    """How to prepare a TFDS dataset offline, for a DatasetError."""
    data_dir = builder.data_dir_root
    build = f'tfds build {builder.name} --data_dir={data_dir}'
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        instructions = ' '.join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
        return (f'TFDS dataset {builder.name!r} is not prepared in data_dir {data_dir} '
                f'(looked for {builder.data_dir}). It needs a manual download: '
                f'{instructions} Put those files in {data_dir}/downloads/manual/ and run '
                f'`{build}` (this reads the archives; no internet needed).')
    return (f'TFDS dataset {builder.name!r} is not prepared in data_dir {data_dir} '
            f'(looked for {builder.data_dir}). Run `{build}` on a machine with internet access '
            f'and copy {data_dir}/{builder.name} here, or pass the data_dir that holds it.')


def _tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """A prepared TFDS builder; never downloads anything."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except ValueError as e:  # Includes tfds' DatasetNotFoundError.
        raise DatasetError(f'Dataset {name!r} is not an existing directory, and TFDS cannot '
                           f'load it: {str(e).splitlines()[0]}') from e
    if not builder.is_prepared():
        raise DatasetError(_not_prepared_message(builder))
    return builder


def _check_features(builder: tfds.core.DatasetBuilder, image_key: str, label_key: str) -> None:
    """Raises DatasetError unless ``image_key`` is an image and ``label_key`` exists."""
    features = builder.info.features
    if image_key not in features or not isinstance(features[image_key], tfds.features.Image):
        raise DatasetError(f'Dataset {builder.name!r} has no image feature {image_key!r}; '
                           f'its features are {sorted(features)}.')
    if label_key not in features:
        raise DatasetError(f'Dataset {builder.name!r} has no label feature {label_key!r}; '
                           f'its features are {sorted(features)}.')


def _split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
    """Number of examples in a (possibly sliced) split of a prepared TFDS dataset."""
    try:
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
        raise DatasetError(f'Dataset {builder.name!r} cannot read split {split!r} (its splits '
                           f'are {sorted(builder.info.splits)}): {e}') from e


def _limited_split(builder: tfds.core.DatasetBuilder, split: str, num_examples: int | None) -> str:
    """Returns ``split`` restricted to its first ``num_examples`` examples (TFDS slicing)."""
    if num_examples is None:
        return split
    if not re.fullmatch(r'\w+', split):
        raise ConfigError(f'num_examples needs a plain split name, got {split!r}; '
                          'slice the split instead (e.g. "validation[:1000]").')
    return f'{split}[:{min(num_examples, _split_size(builder, split))}]'


def _tfds_records(name: str, split: str, data_dir: str | None, image_key: str, label_key: str,
                  num_examples: int | None, process_index: int, process_count: int) -> _Records:
    """Encoded images and labels of this process's shard of a prepared TFDS split."""
    builder = _tfds_builder(name, data_dir)
    _check_features(builder, image_key, label_key)
    split = _limited_split(builder, split, num_examples)
    num_total = _split_size(builder, split)
    shards = tfds.even_splits(split, n=process_count)
    dataset = builder.as_dataset(
        split=shards[process_index], shuffle_files=False,
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True))
    dataset = dataset.map(lambda ex: {'data': ex[image_key], 'source': ex['tfds_id'],
                                      'label': tf.cast(ex[label_key], tf.int32)})
    counts = [builder.info.splits[shard].num_examples for shard in shards]
    return _Records(dataset, counts[process_index], max(counts), num_total)


def _list_image_folder(split_dir: pathlib.Path) -> tuple[list[str], list[int]]:
    """Image paths under ``split_dir/<class>/`` and their labels, classes in sorted order."""
    classes = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir())
    paths, labels = [], []
    for label, class_name in enumerate(classes):
        files = sorted(path for path in (split_dir / class_name).rglob('*')
                       if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())
        paths += [str(path) for path in files]
        labels += [label] * len(files)
    return paths, labels


def _folder_records(root: pathlib.Path, split: str, num_examples: int | None,
                    process_index: int, process_count: int) -> _Records:
    """Encoded images and labels of this process's shard of ``root/split/<class>/*``."""
    split_dir = root / split
    if not split_dir.is_dir():
        available = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        raise DatasetError(f'Image folder {root} has no split folder {split!r} '
                           f'(found {available}); expected {split_dir}/<class_name>/<image>.')
    paths, labels = _list_image_folder(split_dir)
    if not paths:
        raise DatasetError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) found in '
                           f'{split_dir}/<class_name>/.')
    if num_examples is not None:
        paths, labels = paths[:num_examples], labels[:num_examples]
    start, stop = _process_shard(len(paths), process_index, process_count)
    dataset = tf.data.Dataset.from_tensor_slices({
        'source': tf.constant(paths[start:stop], tf.string),
        'label': tf.constant(labels[start:stop], tf.int32),
    })
    dataset = dataset.map(lambda ex: {'data': tf.io.read_file(ex['source']), **ex})
    num_max = _process_shard(len(paths), 0, process_count)[1]  # Process 0 is never smaller.
    return _Records(dataset, stop - start, num_max, len(paths))


def _pad_batch(batch: dict[str, tf.Tensor], batch_size: int) -> dict[str, tf.Tensor]:
    """Zero-pads a (possibly partial) batch to ``batch_size`` rows and adds a bool ``mask``."""
    size = tf.shape(batch['label'])[0]
    padded = {}
    for key, value in batch.items():
        paddings = [[0, batch_size - size]] + [[0, 0]] * (value.shape.rank - 1)
        padded[key] = tf.ensure_shape(tf.pad(value, paddings), [batch_size, *value.shape[1:]])
    padded['mask'] = tf.sequence_mask(size, batch_size)
    return padded


def _empty_batches(num_batches: int, batch_size: int, input_size: int) -> tf.data.Dataset:
    """``num_batches`` fully masked batches (for processes with fewer examples)."""
    batch = {
        'image': np.zeros((batch_size, input_size, input_size, 3), np.float32),
        'label': np.zeros((batch_size,), np.int32),
        'mask': np.zeros((batch_size,), bool),
    }
    return tf.data.Dataset.from_tensors(batch).repeat(num_batches)


def _decode_and_transform(data: bytes, source: bytes, **transform_kwargs) -> np.ndarray:
    """Encoded image -> ``eval_transform`` output, float32 (S, S, 3). Runs in tf.numpy_function."""
    return eval_transform(decode_image(data, source.decode()), **transform_kwargs)


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
    image_key: str = 'image',
    label_key: str = 'label',
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
        raise ConfigError(f'batch_size, input_size and num_examples must be positive, '
                          f'got {batch_size}, {input_size} and {num_examples}.')
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f'Unknown interpolation {interpolation!r}; expected one of '
                          f'{INTERPOLATIONS}.')
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ConfigError(f'process_index {process_index} is not in [0, {process_count}).')
    configure_tensorflow()

    if os.path.isdir(dataset):
        records = _folder_records(pathlib.Path(dataset), split, num_examples,
                                  process_index, process_count)
    else:
        records = _tfds_records(dataset, split, data_dir, image_key, label_key, num_examples,
                                process_index, process_count)

    preprocess = functools.partial(_decode_and_transform, input_size=input_size,
                                   crop_pct=crop_pct, interpolation=interpolation,
                                   mean=tuple(mean), std=tuple(std))

    def transform(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = tf.numpy_function(preprocess, [example['data'], example['source']], tf.float32,
                                  stateful=False)
        return {'image': tf.ensure_shape(image, (input_size, input_size, 3)),
                'label': example['label']}

    ds = records.dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size).map(functools.partial(_pad_batch, batch_size=batch_size))
    missing = (math.ceil(records.num_per_process_max / batch_size)
               - math.ceil(records.num_local / batch_size))
    if missing:
        ds = ds.concatenate(_empty_batches(missing, batch_size, input_size))
    return ds.prefetch(tf.data.AUTOTUNE), records.num_total

