"""Converting PyTorch (official VOLO, timm) checkpoints to Flax variables.

Python API:
  state = read_state_dict('d1_224_84.2.pth.tar')      # {name: np.ndarray}
  variables = torch_to_flax(state, create_model('volo_d1_224'))
Command line (writes one .safetensors file or a weights directory, see `volo_jax.weights`):
  volo-jax-convert --model volo_d1_224 --src FILE --dst weights/volo_d1_224.safetensors
  (the same as python -m volo_jax.convert ...)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from volo_jax.convert.mapping import flax_to_torch, identify_model, torch_to_flax
from volo_jax.convert.resize import resize_pos_embed
from volo_jax.convert.torch_checkpoint import read_state_dict
from volo_jax.errors import CheckpointError


def convert_checkpoint(
    model_name: str,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    key: str | None = None,
    class_names: Sequence[str] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Reads `src`, converts it for `create_model(model_name, **overrides)` and writes
    `dst`: one .safetensors file, or a weights directory for any other path
    (`volo_jax.weights`). Returns the variables.

    Args:
      class_names: the names of the model's classes, stored with the weights (default:
        ImageNet's for a 1000-class model, none otherwise).
    """
    from volo_jax.data.transforms import imagenet_class_names
    from volo_jax.models import create_model
    from volo_jax.weights import save_weights

    model = create_model(model_name, **overrides)
    if class_names is None and model.num_classes == 1000:
        class_names = imagenet_class_names()
    names = {}
    if class_names is not None:
        if len(class_names) != model.num_classes:
            raise CheckpointError(
                f"{len(class_names)} class names for {model_name}, which has "
                f"{model.num_classes} classes"
            )
        names["class_names"] = list(class_names)
    state = read_state_dict(src, key=key)
    variables = torch_to_flax(state, model, model_name=model_name)
    save_weights(
        dst,
        variables,
        model_name,
        overrides,
        source=os.path.basename(os.fspath(src)),
        **names,
    )
    return variables


__all__ = [
    "convert_checkpoint",
    "flax_to_torch",
    "identify_model",
    "read_state_dict",
    "resize_pos_embed",
    "torch_to_flax",
]
