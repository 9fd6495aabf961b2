"""Reading PyTorch-side checkpoints into a flat {name: np.ndarray} state dict.

Formats: the official VOLO release (`.pth.tar`, a `torch.save` file, bare or
wrapped under 'state_dict', 'model' or 'state_dict_ema', names possibly prefixed
'module.'), timm's `.pth`/`.bin`, and `.safetensors` (read without torch).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from volo_jax.errors import CheckpointError
from volo_jax.extras import import_extra

#: Wrapper keys of training checkpoints, in the order they are looked for.
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema")


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    import torch  # only reached for torch tensors

    tensor = value.detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.numpy()


def unwrap_state_dict(obj: Any, key: str | None = None) -> dict[str, Any]:
    """Finds the state dict in a loaded checkpoint and strips 'module.' prefixes.

    Args:
      obj: what `torch.load` returned.
      key: the wrapper key to use ('state_dict', 'model', 'state_dict_ema'), or
        None to take the first of those present, or the object itself if none is.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict (a mapping), found {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(
                f"the checkpoint has no {key!r} entry; its top-level keys: {sorted(obj)[:10]}"
            )
        obj = obj[key]
    else:
        for candidate in WRAPPER_KEYS:
            if isinstance(obj.get(candidate), Mapping):
                obj = obj[candidate]
                break
    state = {}
    for name, value in obj.items():
        if not hasattr(value, "shape"):
            continue  # epoch counters, args and the like beside the tensors
        state[name[len("module.") :] if name.startswith("module.") else name] = value
    if not state:
        raise CheckpointError("the checkpoint holds no tensors")
    return state


def _reject_volo_jax_weights(path: str) -> None:
    """A volo-jax weights file is not a PyTorch state dict: say so, instead of listing
    every tensor as unexpected."""
    from volo_jax.weights import read_metadata

    try:
        meta = read_metadata(path)
    except CheckpointError:
        return  # a state dict (or unreadable: load_file's error says why)
    raise CheckpointError(
        f"{path} is volo-jax weights already (model {meta['model']}), not a PyTorch state "
        "dict: pass it to --weights / --config.init_from as it is"
    )


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, np.ndarray]:
    """Reads a `.pth.tar`, `.pth`, `.bin` or `.safetensors` file into NumPy arrays.

    Raises:
      CheckpointError: the file is missing, unreadable or not a checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        _reject_volo_jax_weights(path)
        from safetensors.numpy import load_file

        try:
            raw: Any = load_file(path)
        except Exception as err:  # safetensors raises several types for bad files
            raise CheckpointError(f"{path} is not a readable .safetensors file: {err}") from err
    else:
        torch = import_extra(
            "torch",
            "torch",
            f"reading {os.path.basename(path)}",
            note="; timm's .safetensors files convert without it",
        )
        try:
            # Training checkpoints (timm's CheckpointSaver) also pickle their argparse args.
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for damaged or foreign files
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint ({reason}); is the file complete, "
                "and is it a .pth/.pth.tar state dict?"
            ) from err
    state = unwrap_state_dict(raw, key)
    return {name: _to_numpy(value) for name, value in state.items()}
