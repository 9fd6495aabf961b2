"""Model weights on disk, in either of two forms that `convert` writes and every command
(`predict --weights`, `--config.init_from`, `--config.teacher.init_from`) reads:

- one `.safetensors` file (a path ending in `.safetensors`): the Flax variables under
  their paths ('params/network_0_0/attn/v/kernel', 'batch_stats/...'), and the model
  name, its constructor overrides, class names and source in the file's metadata (each
  value JSON text, the format marked by `volo_jax_weights`). Reading it needs only
  `safetensors` and NumPy: neither orbax's tensorstore nor TensorFlow is imported.
- a directory (any other path):
    variables/   an orbax checkpoint of {'params': ..., 'batch_stats': ...}
    model.json   {"model": registered name, "overrides": {...}, "source": ...}
  written by every process of a multi-host run (training's final weights).

Both may be local or gs:// (`volo_jax.paths`).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from volo_jax.errors import CheckpointError
from volo_jax.paths import as_path, makedirs

METADATA_FILE = "model.json"
VARIABLES_DIR = "variables"
#: The suffix of the single-file form.
SAFETENSORS_SUFFIX = ".safetensors"
#: Metadata key that marks a volo-jax weights file, and the version of its layout.
FORMAT_KEY = "volo_jax_weights"
FORMAT_VERSION = "1"
#: Separator of the Flax path segments in a tensor name.
PATH_SEPARATOR = "/"

_CONVERT_HINT = "make one with: volo-jax-convert --model NAME --src FILE --dst OUT.safetensors"


def is_weights_file(path: str | os.PathLike) -> bool:
    """True for the single-file form (a path ending in .safetensors)."""
    return os.fspath(path).endswith(SAFETENSORS_SUFFIX)


def weights_exist(path: str | os.PathLike) -> bool:
    """A weights file or directory is at `path` (local or gs://)."""
    target = as_path(path)
    return target.is_file() if is_weights_file(path) else target.is_dir()


def save_weights(
    path: str | os.PathLike,
    variables: Mapping[str, Any],
    model_name: str,
    overrides: Mapping[str, Any] | None = None,
    **metadata: Any,
) -> None:
    """Writes `variables` and what built them to `path`: a .safetensors file, or a
    weights directory (replacing its content) for any other path.

    Args:
      variables: {'params': ..., 'batch_stats': ...} of arrays.
      model_name: the registered name the variables are for.
      overrides: constructor overrides of `create_model` (JSON-serialisable).
      **metadata: more JSON-serialisable entries, e.g. source=..., class_names=[...].
    """
    meta = {"model": model_name, "overrides": dict(overrides or {}), **metadata}
    if is_weights_file(path):
        _save_file(path, variables, meta)
    else:
        _save_directory(path, variables, meta)


def _save_file(path: str | os.PathLike, variables: Mapping[str, Any], meta: dict) -> None:
    from flax import traverse_util
    from safetensors.numpy import save

    tensors = {
        PATH_SEPARATOR.join(key): np.ascontiguousarray(np.asarray(value))
        for key, value in traverse_util.flatten_dict(dict(variables)).items()
    }
    header = {FORMAT_KEY: FORMAT_VERSION, **{k: json.dumps(v) for k, v in meta.items()}}
    if jax.process_index() != 0:  # the arrays are whole on every process; one writes
        return
    target = as_path(path)
    makedirs(target.parent)
    target.write_bytes(save(tensors, metadata=header))


def _save_directory(path: str | os.PathLike, variables: Mapping[str, Any], meta: dict) -> None:
    import orbax.checkpoint as ocp

    directory = makedirs(path)
    host = jax.tree_util.tree_map(np.asarray, dict(variables))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / VARIABLES_DIR, host, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() != 0:  # every process joins orbax's save; one writes the rest
        return
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a weights file or directory: {'model', 'overrides', ...}."""
    if is_weights_file(path):
        return _file_metadata(path, read_safetensors_header(path))
    directory = as_path(path)
    meta_path = directory / METADATA_FILE
    if directory.is_file():
        raise CheckpointError(
            f"{directory} is a file, but neither a .safetensors weights file nor a weights "
            f"directory; {_CONVERT_HINT}"
        )
    if not directory.is_dir():
        raise CheckpointError(f"weights directory not found: {directory}")
    if not meta_path.is_file():
        raise CheckpointError(
            f"{directory} is not a volo-jax weights directory (no {METADATA_FILE}); {_CONVERT_HINT}"
        )
    try:
        return json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path} is unreadable or corrupt: {err}") from err


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a .safetensors file (8-byte little-endian length, then JSON),
    read without the tensors."""
    target = as_path(path)
    if not target.is_file():
        raise CheckpointError(f"weights file not found: {target}")
    try:
        with target.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:  # a real header is kilobytes
                raise ValueError(f"header length {length}")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, struct.error) as err:
        raise CheckpointError(f"{target} is not a readable .safetensors file ({err})") from err
    return header


def _file_metadata(path: str | os.PathLike, header: Mapping[str, Any]) -> dict[str, Any]:
    raw = header.get("__metadata__") or {}
    if raw.get(FORMAT_KEY) is None:
        raise CheckpointError(
            f"{path} is a .safetensors file without volo-jax metadata (a PyTorch/timm state "
            f"dict?); convert it first: volo-jax-convert --model NAME --src {path} "
            "--dst OUT.safetensors"
        )
    if raw[FORMAT_KEY] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is volo-jax weights format {raw[FORMAT_KEY]}; this version reads "
            f"format {FORMAT_VERSION}"
        )
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k != FORMAT_KEY}
    except (TypeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt volo-jax metadata ({err})") from err
    if not isinstance(meta.get("model"), str):
        raise CheckpointError(f"{path}: the metadata names no model")
    meta.setdefault("overrides", {})
    return meta


def load_weights(
    path: str | os.PathLike, expected_model: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a weights file or directory.

    Args:
      expected_model: if given, the variant (e.g. 'volo_d1') must match the one the
        weights were made for; another resolution of it is fine (the caller resizes).
    Returns:
      (variables as nested dicts of NumPy arrays, metadata).
    Raises:
      CheckpointError: missing, unreadable, not volo-jax weights, or for another model.
    """
    meta = read_metadata(path)
    if expected_model is not None and variant(meta["model"]) != variant(expected_model):
        raise CheckpointError(
            f"{path} holds weights for {meta['model']}, not {expected_model}; use "
            f"--model {meta['model']} or convert a {expected_model} checkpoint"
        )
    if is_weights_file(path):
        return _load_file(path), meta
    return _load_directory(path), meta


def _load_file(path: str | os.PathLike) -> dict[str, Any]:
    from flax import traverse_util
    from safetensors.numpy import load

    try:
        tensors = load(as_path(path).read_bytes())
    except Exception as err:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path} is not a readable .safetensors file ({err})") from err
    flat = {tuple(name.split(PATH_SEPARATOR)): value for name, value in tensors.items()}
    variables = traverse_util.unflatten_dict(flat)
    unknown = sorted(set(variables) - {"params", "batch_stats"})
    if unknown or "params" not in variables:
        raise CheckpointError(
            f"{path}: expected tensors under params/ and batch_stats/, found {unknown or 'none'}"
        )
    return variables


def _load_directory(path: str | os.PathLike) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    variables_path = as_path(path) / VARIABLES_DIR
    try:
        variables = ocp.StandardCheckpointer().restore(variables_path)
    except Exception as err:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"cannot restore the weights in {variables_path}: {err}") from err
    return jax.tree_util.tree_map(np.asarray, variables)


def variant(model_name: str) -> str:
    """'volo_d1_384' -> 'volo_d1': the architecture without its input resolution."""
    head, _, tail = model_name.rpartition("_")
    return head if tail.isdigit() and head else model_name


#: The Flax paths of a classifier: VOLO's head and aux_head, the CNNs' head/fc.
CLASSIFIER_PATHS = "^params/(head|aux_head)/"


def classifier_classes(variables: Mapping[str, Any]) -> int | None:
    """The number of classes of the classifier in `variables` (its head's kernel's last
    dimension); None without one."""
    head = variables.get("params", {}).get("head", {})
    while isinstance(head, Mapping) and "kernel" not in head and len(head) == 1:
        head = next(iter(head.values()))  # head/fc/kernel
    kernel = head.get("kernel") if isinstance(head, Mapping) else None
    return None if kernel is None else int(np.shape(kernel)[-1])


def load_weights_into(
    path: str | os.PathLike,
    model: Any,
    model_name: str,
    skip: tuple[str, ...] = (),
    antialias: bool = True,
    new_classifier: bool = False,
) -> dict[str, Any]:
    """Loads a weights file or directory for `model`, which may differ in resolution (the
    position embedding is resized) or, with `skip` or `new_classifier`, in its classifier.

    Args:
      model: the Flax module to fill.
      model_name: its registered name; the weights must be of the same variant.
      skip: regexes of Flax paths not to load (see `torch_to_flax`).
      antialias: the position embedding's bicubic resize as timm's (True) or as the
        official fine-tuning's `load_pretrained_weights` (False).
      new_classifier: when the weights' classifier has another number of classes than
        `model.num_classes`, leave it out (`CLASSIFIER_PATHS`), for a fresh one.
    Returns:
      Variables for `model` as NumPy arrays (skipped paths absent).
    """
    from volo_jax.convert.mapping import flax_to_torch, torch_to_flax

    variables, _ = load_weights(path, expected_model=model_name)
    classes = classifier_classes(variables)
    if new_classifier and classes not in (None, model.num_classes):
        skip = (*skip, CLASSIFIER_PATHS)
        logging.info(
            "%s has a classifier for %d classes, the model %d: the classifier (%s) starts afresh",
            path,
            classes,
            model.num_classes,
            CLASSIFIER_PATHS,
        )
    return torch_to_flax(
        flax_to_torch(variables), model, skip=skip, model_name=model_name, antialias=antialias
    )
