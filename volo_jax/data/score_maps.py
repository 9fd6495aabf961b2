"""Token-labeling score maps on disk: reading them (`.npy`, or the official `.pt` files
without PyTorch), checking them, and converting a directory of `.pt` files to `.npy`.

A score map holds, for each cell of an (H, W) grid over the whole image, the annotator's
top-K scores (raw NFNet logits in the official release) and their class indices:
[2, K, H, W] (K = 5, H = W = 14 officially), stored as float16, the indices as floats.
The official release is one `torch.save` file per image, `<class>/<image stem>.pt`,
each a permuted view of a [2, H, W, K] tensor (`generate_label.py` of TokenLabeling).

`.pt` files are read here with `pickle` and `zipfile` only: no PyTorch, so a training
process, which runs TensorFlow (and PyTorch and TensorFlow in one process can crash),
reads them as they are. Only what a saved tensor needs is unpickled (the tensor-rebuild
function and the storage types): a file that holds anything else is refused, never run.
Both of `torch.save`'s formats are read: the zip archive (the default since PyTorch 1.6)
and the older pickle stream.

  python -m volo_jax.data.score_maps convert --src label_top5_train_nfnet --dst score_maps

writes `<dst>/<class>/<image stem>.npy` for every `.pt` under `--src` (same values, same
dtype), checking each file; it resumes where it stopped (outputs are written whole, and
an existing output that checks out is kept) and uses `--workers` processes.
"""

from __future__ import annotations

import argparse
import collections
import io
import math
import multiprocessing
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from volo_jax.errors import DatasetError

#: Score-map file suffixes, in the order they are preferred when a folder has both.
SUFFIXES = (".npy", ".pt")


class ScoreMapError(DatasetError):
    """A score-map file that cannot be read or is not a [2, K, H, W] score map."""


# --------------------------------------------------------------------------------------------
# torch.save files, read without PyTorch
# --------------------------------------------------------------------------------------------

#: `torch.<Name>Storage` -> the NumPy dtype of its elements.
_STORAGE_DTYPES = {
    "HalfStorage": np.float16,
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "ByteStorage": np.uint8,
    "CharStorage": np.int8,
    "ShortStorage": np.int16,
    "IntStorage": np.int32,
    "LongStorage": np.int64,
    "BoolStorage": np.bool_,
}
# No score map comes near this (the official ones hold 1960 elements); a file that claims
# more (a stride-0 tensor can claim any size) is refused before memory is allocated.
_MAX_ELEMENTS = 2**24
# The first pickle of the legacy (pre-zip) format: torch.serialization.MAGIC_NUMBER.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(frozen=True)
class _StorageType:
    name: str  # e.g. 'HalfStorage'


@dataclass
class _Storage:
    """A storage the pickle refers to; its bytes are read after the pickle."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None  # 1-D, `numel` elements, filled in by the reader


@dataclass
class _Tensor:
    """torch._utils._rebuild_tensor_v2's arguments, materialised once storages are read."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    del requires_grad, hooks, metadata
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not a saved storage")
    return _Tensor(storage, int(offset), tuple(size), tuple(stride))


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles what `torch.save(tensor)` writes, and nothing else."""

    def __init__(self, file: io.BytesIO, byteorder: str) -> None:
        super().__init__(file)
        self.byteorder = "<" if byteorder == "little" else ">"
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"{module}.{name} (a score-map file holds one tensor)")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"an unknown persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"a storage of type {storage_type!r:.80}")
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("a storage view (PyTorch < 1.0 files)")
        if key not in self.storages:
            dtype = np.dtype(_STORAGE_DTYPES[storage_type.name]).newbyteorder(self.byteorder)
            self.storages[key] = _Storage(key, dtype, numel)
        return self.storages[key]


def _materialise(tensor: _Tensor) -> np.ndarray:
    """The tensor's elements as a new C-contiguous array in native byte order."""
    storage = tensor.storage
    assert storage.data is not None
    size, stride = tensor.size, tensor.stride
    if len(size) != len(stride) or any(s < 0 for s in (*size, *stride)) or tensor.offset < 0:
        raise ValueError(f"an invalid tensor layout (size {size}, stride {stride})")
    if math.prod(size) > _MAX_ELEMENTS:
        raise ValueError(f"a tensor of size {size}, far larger than a score map")
    if 0 not in size:
        last = tensor.offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.numel:
            raise ValueError(
                f"the tensor (size {size}, stride {stride}, offset {tensor.offset}) reaches "
                f"past its storage of {storage.numel} elements"
            )
    flat = storage.data[tensor.offset :] if 0 not in size else storage.data[:0]
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat, shape=size, strides=[s * itemsize for s in stride], writeable=False
    )
    return np.ascontiguousarray(view).astype(storage.dtype.newbyteorder("="))


def _read_zip_tensor(data: bytes) -> np.ndarray:
    """torch.save's zip format: <root>/data.pkl, <root>/data/<key>, <root>/byteorder."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ValueError("a zip archive without one <name>/data.pkl (not a torch.save file)")
    root = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if root + "byteorder" in names:
        byteorder = archive.read(root + "byteorder").decode().strip()
    unpickler = _TensorUnpickler(io.BytesIO(archive.read(pickles[0])), byteorder)
    tensor = unpickler.load()
    for storage in unpickler.storages.values():
        raw = archive.read(f"{root}data/{storage.key}")
        if len(raw) < storage.numel * storage.dtype.itemsize:
            raise ValueError(f"storage {storage.key} is shorter than its {storage.numel} elements")
        storage.data = np.frombuffer(raw, storage.dtype, storage.numel)
    return _check_tensor(tensor)


def _read_legacy_tensor(data: bytes) -> np.ndarray:
    """torch.save's pre-1.6 format: pickles of the magic number, the protocol version and
    the system info, the object's pickle, the sorted storage keys, then each storage as an
    int64 element count and its elements (little-endian)."""
    stream = io.BytesIO(data)
    header = _TensorUnpickler(stream, "little")  # plain data only: no class is allowed
    if header.load() != _LEGACY_MAGIC:
        raise ValueError("not a torch.save file (no zip archive, no magic number)")
    header.load()  # protocol version
    sys_info = header.load()
    byteorder = "little" if sys_info.get("little_endian", True) else "big"
    unpickler = _TensorUnpickler(stream, byteorder)
    tensor = unpickler.load()
    keys = _TensorUnpickler(stream, byteorder).load()
    for key in keys:
        storage = unpickler.storages.get(str(key))
        (numel,) = struct.unpack("<q", stream.read(8))
        if storage is None:
            raise ValueError(f"storage {key} is not referenced by the tensor")
        raw = stream.read(numel * storage.dtype.itemsize)
        if numel < storage.numel or len(raw) < numel * storage.dtype.itemsize:
            raise ValueError(f"storage {key} is shorter than its {storage.numel} elements")
        storage.data = np.frombuffer(raw, storage.dtype.newbyteorder("<"), numel)[: storage.numel]
    return _check_tensor(tensor)


def _check_tensor(obj: Any) -> np.ndarray:
    if not isinstance(obj, _Tensor):
        raise ValueError(f"the file holds a {type(obj).__name__}, not one tensor")
    if obj.storage.data is None:
        raise ValueError(f"storage {obj.storage.key} is missing from the file")
    return _materialise(obj)


def read_torch_tensor(data: bytes) -> np.ndarray:
    """The tensor of a `torch.save(tensor)` file's bytes, as NumPy (its dtype kept).

    Raises:
      ValueError: the bytes are not a torch.save file of one tensor (the reason named).
    """
    try:
        if data[:4] == b"PK\x03\x04":
            return _read_zip_tensor(data)
        return _read_legacy_tensor(data)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, struct.error) as e:
        raise ValueError(f"not a readable torch.save file of one tensor ({e})") from e
    except (AttributeError, KeyError, TypeError, IndexError) as e:  # unexpected pickled data
        raise ValueError(f"not a torch.save file of one tensor ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------
# Score maps
# --------------------------------------------------------------------------------------------


def check_score_map(array: np.ndarray, source: str, num_classes: int | None = None) -> np.ndarray:
    """Returns `array` if it is a [2, K, H, W] score map: floats, finite, its indices
    (array[1]) whole numbers in [0, num_classes) (only >= 0 when num_classes is None).

    Raises:
      ScoreMapError: naming `source` and what is wrong.
    """
    if array.ndim != 4 or array.shape[0] != 2 or 0 in array.shape:
        raise ScoreMapError(
            f"{source}: shape {tuple(array.shape)} is not a score map's [2, K, H, W] "
            "(top-K scores, then their class indices, on an H x W grid)"
        )
    if array.dtype.kind != "f":
        raise ScoreMapError(f"{source}: dtype {array.dtype}; a score map holds floats")
    values = array.astype(np.float32, copy=False)  # NumPy's float16 arithmetic is slow
    if not np.isfinite(values).all():
        raise ScoreMapError(f"{source}: holds NaN or infinite values")
    indices = values[1]
    if (indices != np.round(indices)).any() or indices.min() < 0:
        raise ScoreMapError(f"{source}: its class indices (array[1]) are not whole numbers >= 0")
    if num_classes is not None and indices.max() >= num_classes:
        raise ScoreMapError(
            f"{source}: class index {int(indices.max())} is out of range for {num_classes} classes"
        )
    return array


def read_score_map(data: bytes, source: str, num_classes: int | None = None) -> np.ndarray:
    """A score map (dtype as stored) from a `.npy` or `.pt` file's bytes; `source` (the
    file's name) picks the format and names it in errors. Checked as `check_score_map`."""
    try:
        if source.endswith(".pt"):
            array = read_torch_tensor(data)
        else:
            array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise ScoreMapError(f"{source}: {e}") from e
    return check_score_map(array, source, num_classes)


def load_score_map(path: str, num_classes: int | None = None) -> np.ndarray:
    """The float32 score map of a local or gs:// `.npy` or `.pt` file."""
    from volo_jax.paths import read_bytes

    try:
        data = read_bytes(path)
    except OSError as e:
        raise ScoreMapError(f"Cannot read the score map {path}: {e}") from e
    return read_score_map(data, path, num_classes).astype(np.float32)


def score_map_suffix(directory: str) -> str:
    """The suffix of the score maps under `directory` ('.npy' or '.pt'), from its first
    class folder that holds any ('.npy' where a folder holds both).

    Raises:
      DatasetError: no `<directory>/<class>/<name>.npy` or `.pt` file.
    """
    from volo_jax.paths import as_path

    root = as_path(directory)
    if not root.is_dir():
        raise DatasetError(f"The score-map directory {directory} does not exist.")
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        found = {p.suffix for p in folder.iterdir()} & set(SUFFIXES)
        if found:
            return next(s for s in SUFFIXES if s in found)
    raise DatasetError(
        f"No score maps under {directory}: expected {directory}/<class>/<image stem>.npy "
        "(or the official .pt files; `python -m volo_jax.data.score_maps convert` turns "
        "those into .npy)."
    )


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What `convert_directory` did, by relative source path."""

    converted: int = 0
    kept: int = 0  # outputs already there and valid
    failed: dict[str, str] = field(default_factory=dict)  # relative path -> reason


def _find_sources(src: str) -> list[str]:
    """Relative paths of the `.pt` files under `src`, sorted."""
    found = []
    for folder, dirs, files in os.walk(src):
        dirs.sort()
        found += [
            os.path.relpath(os.path.join(folder, f), src)
            for f in sorted(files)
            if f.endswith(".pt")
        ]
    return found


def _output_path(dst: str, relative: str) -> str:
    return os.path.join(dst, os.path.splitext(relative)[0] + ".npy")


def _output_shape(path: str, num_classes: int) -> tuple[int, ...] | None:
    """The shape of a valid score map at `path`, or None (missing, partial, invalid)."""
    try:
        with open(path, "rb") as f:
            return read_score_map(f.read(), path, num_classes).shape
    except (OSError, ScoreMapError):
        return None


def _convert_one(
    task: tuple[str, str, tuple[int, ...] | None, int],
) -> tuple[str, str, tuple[int, ...] | None]:
    """(src file, output file, expected shape or None, num_classes) -> (status, reason,
    shape), status 'converted', 'kept' or 'failed'. Writes the output whole or not at all."""
    source, output, shape, num_classes = task
    kept_shape = _output_shape(output, num_classes) if os.path.exists(output) else None
    if kept_shape is not None and shape in (None, kept_shape):
        return "kept", "", kept_shape
    try:
        with open(source, "rb") as f:
            array = read_score_map(f.read(), source, num_classes)
    except OSError as e:
        return "failed", f"cannot read it: {e}", None
    except ScoreMapError as e:
        return "failed", str(e).removeprefix(f"{source}: "), None
    if shape is not None and array.shape != shape:
        return "failed", f"shape {array.shape} differs from the other files' {shape}", None
    os.makedirs(os.path.dirname(output), exist_ok=True)
    partial = f"{output}.partial-{os.getpid()}"
    with open(partial, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(partial, output)
    return "converted", "", array.shape


def convert_directory(
    src: str,
    dst: str,
    num_classes: int = 1000,
    workers: int = 1,
    progress: Callable[[int], Any] | None = None,
    sources: Sequence[str] | None = None,
) -> ConversionReport:
    """Converts every `<src>/**/<name>.pt` to `<dst>/**/<name>.npy` (values and dtype
    kept), checking each as `check_score_map` and that all share one shape (the first
    readable file's). Outputs already in `dst` that check out are kept, so an interrupted
    run resumes; bad files are reported, not written, and the others still converted.

    Args:
      progress: called with 1 after each file.
      sources: the relative paths to convert (default: all `.pt` files under `src`).
    """
    sources = _find_sources(src) if sources is None else list(sources)
    report = ConversionReport()
    tally = progress or (lambda n: None)

    def record(relative: str, result: tuple[str, str, tuple[int, ...] | None]) -> None:
        status, reason, _ = result
        if status == "failed":
            report.failed[relative] = reason
        elif status == "kept":
            report.kept += 1
        else:
            report.converted += 1
        tally(1)

    def task(relative: str, shape: tuple[int, ...] | None) -> tuple:
        return (os.path.join(src, relative), _output_path(dst, relative), shape, num_classes)

    # The first readable file fixes the shape the others must have.
    shape, position = None, 0
    while shape is None and position < len(sources):
        result = _convert_one(task(sources[position], None))
        record(sources[position], result)
        shape, position = result[2], position + 1
    rest = [task(relative, shape) for relative in sources[position:]]
    if workers <= 1:
        results: Iterable = map(_convert_one, rest)
        for relative, result in zip(sources[position:], results, strict=True):
            record(relative, result)
    else:
        # Spawned, not forked: the caller may be a process with threads (TensorFlow, JAX).
        context = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = pool.map(_convert_one, rest, chunksize=64)
            for relative, result in zip(sources[position:], results, strict=True):
                record(relative, result)
    return report


def _convert_command(args: argparse.Namespace) -> int:
    from volo_jax.progress import Progress

    src, dst = os.path.abspath(args.src), os.path.abspath(args.dst)
    if not os.path.isdir(src):
        raise DatasetError(f"--src {args.src} is not a directory")
    if src == dst:
        raise DatasetError("--dst must differ from --src (the .npy files go to a new tree)")
    sources = _find_sources(src)
    if not sources:
        raise DatasetError(f"No .pt files under {src} (expected {src}/<class>/<image stem>.pt)")
    print(f"converting {len(sources):,} score maps from {src} to {dst}", file=sys.stderr)
    with Progress(
        len(sources), unit="file", desc="convert", every=max(1, len(sources) // 100)
    ) as p:
        report = convert_directory(src, dst, args.num_classes, args.workers, p.update, sources)
    print(
        f"{report.converted:,} converted, {report.kept:,} already converted (kept), "
        f"{len(report.failed):,} failed",
        file=sys.stderr,
    )
    if report.failed:
        listing = os.path.join(dst, "convert_failures.txt")
        os.makedirs(dst, exist_ok=True)
        with open(listing, "w") as f:
            f.writelines(f"{rel}\t{why}\n" for rel, why in sorted(report.failed.items()))
        shown = "\n".join(f"  {rel}: {why}" for rel, why in sorted(report.failed.items())[:10])
        raise ScoreMapError(
            f"{len(report.failed):,} of {len(sources):,} files could not be converted "
            f"(all listed in {listing}):\n{shown}\nReplace them and run the same command: "
            "the files already converted are kept."
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m volo_jax.data.score_maps",
        description="Token-labeling score maps: convert the official .pt files to .npy.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert",
        help="<src>/<class>/<stem>.pt -> <dst>/<class>/<stem>.npy, checked, resumable",
        description="Converts every .pt score map under --src to .npy under --dst (same "
        "relative paths, values and dtype), checking each: [2, K, H, W] floats, finite, "
        "class indices whole and in [0, --num-classes), one shape for all. Run it again "
        "to resume: outputs already written and valid are kept.",
    )
    convert.add_argument("--src", required=True, help="the .pt tree (<class>/<stem>.pt)")
    convert.add_argument("--dst", required=True, help="where the .npy tree goes")
    convert.add_argument("--num-classes", type=int, default=1000, help="default: 1000")
    convert.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes (default: the CPU count, at most 8)",
    )
    args = parser.parse_args(argv)
    if args.num_classes < 1 or args.workers < 1:
        parser.error("--num-classes and --workers must be positive")
    return _convert_command(args)


if __name__ == "__main__":
    from volo_jax.cli import run_cli

    run_cli(main)
