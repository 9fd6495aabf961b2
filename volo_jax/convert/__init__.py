"""Converting PyTorch (official VOLO, timm) checkpoints to Flax variables.

Python API:
  state = read_state_dict('d1_224_84.2.pth.tar')      # {name: np.ndarray}
  variables = torch_to_flax(state, create_model('volo_d1_224'))
Command line (writes a weights directory, see `volo_jax.weights`):
  python -m volo_jax.convert --model volo_d1_224 --src FILE --dst DIR
"""

from __future__ import annotations

import os
from typing import Any

from volo_jax.convert.mapping import flax_to_torch, identify_model, torch_to_flax
from volo_jax.convert.resize import resize_pos_embed
from volo_jax.convert.torch_checkpoint import read_state_dict


def convert_checkpoint(
    model_name: str,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    key: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Reads `src`, converts it for `create_model(model_name, **overrides)` and writes
    the weights directory `dst`. Returns the variables."""
    from volo_jax.models import create_model
    from volo_jax.weights import save_weights

    state = read_state_dict(src, key=key)
    model = create_model(model_name, **overrides)
    variables = torch_to_flax(state, model, model_name=model_name)
    save_weights(dst, variables, model_name, overrides, source=os.path.abspath(os.fspath(src)))
    return variables


__all__ = [
    "convert_checkpoint",
    "flax_to_torch",
    "identify_model",
    "read_state_dict",
    "resize_pos_embed",
    "torch_to_flax",
]
