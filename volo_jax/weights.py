"""Model weights on disk: a directory that `convert` writes and every command reads.

Layout of DIR:
  variables/   an orbax checkpoint of {'params': ..., 'batch_stats': ...}
  model.json   {"model": registered name, "overrides": {...}, "source": ...}

`--weights DIR` (predict) and `--config.init_from=DIR` (eval, train) both load it
with `load_weights`. DIR may be local or gs:// (`volo_jax.paths`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from volo_jax.errors import CheckpointError
from volo_jax.paths import as_path, makedirs

METADATA_FILE = "model.json"
VARIABLES_DIR = "variables"


def save_weights(
    directory: str | os.PathLike,
    variables: dict[str, Any],
    model_name: str,
    overrides: dict[str, Any] | None = None,
    **metadata: Any,
) -> None:
    """Writes `variables` and what built them to `directory` (replacing its content)."""
    directory = makedirs(directory)
    host = jax.tree_util.tree_map(np.asarray, variables)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / VARIABLES_DIR, host, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() != 0:  # every process joins orbax's save; one writes the rest
        return
    meta = {"model": model_name, "overrides": overrides or {}, **metadata}
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The model.json of a weights directory."""
    directory = as_path(directory)
    path = directory / METADATA_FILE
    if not directory.is_dir():
        raise CheckpointError(f"weights directory not found: {directory}")
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not a volo-jax weights directory (no {METADATA_FILE}); make one "
            "with: python -m volo_jax.convert --model NAME --src FILE --dst DIR"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable or corrupt: {err}") from err


def load_weights(
    directory: str | os.PathLike, expected_model: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a weights directory.

    Args:
      expected_model: if given, the variant (e.g. 'volo_d1') must match the one the
        weights were made for; another resolution of it is fine (the caller resizes).
    Returns:
      (variables as nested dicts of NumPy arrays, metadata).
    """
    meta = read_metadata(directory)
    if expected_model is not None and variant(meta["model"]) != variant(expected_model):
        raise CheckpointError(
            f"{directory} holds weights for {meta['model']}, not {expected_model}; use "
            f"--model {meta['model']} or convert a {expected_model} checkpoint"
        )
    path = as_path(directory) / VARIABLES_DIR
    try:
        variables = ocp.StandardCheckpointer().restore(path)
    except Exception as err:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"cannot restore the weights in {path}: {err}") from err
    return jax.tree_util.tree_map(np.asarray, variables), meta


def variant(model_name: str) -> str:
    """'volo_d1_384' -> 'volo_d1': the architecture without its input resolution."""
    head, _, tail = model_name.rpartition("_")
    return head if tail.isdigit() and head else model_name


def load_weights_into(
    directory: str | os.PathLike,
    model: Any,
    model_name: str,
    skip: tuple[str, ...] = (),
    antialias: bool = True,
) -> dict[str, Any]:
    """Loads a weights directory for `model`, which may differ in resolution (the
    position embedding is resized) or, with `skip`, in its classifier.

    Args:
      model: the Flax module to fill.
      model_name: its registered name; the weights must be of the same variant.
      skip: regexes of Flax paths not to load (see `torch_to_flax`).
      antialias: the position embedding's bicubic resize as timm's (True) or as the
        official fine-tuning's `load_pretrained_weights` (False).
    Returns:
      Variables for `model` as NumPy arrays (skipped paths absent).
    """
    from volo_jax.convert.mapping import flax_to_torch, torch_to_flax

    variables, _ = load_weights(directory, expected_model=model_name)
    return torch_to_flax(
        flax_to_torch(variables), model, skip=skip, model_name=model_name, antialias=antialias
    )
