"""volo-jax: VOLO and the local-attention operators it is compared with, in JAX/Flax."""

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models", "pretrained_cfg"]

# Imported on first use, so that the command-line tools that need no model (the score-map
# converter, the dataset preparation) start without importing JAX and Flax.
_LAZY_ATTRIBUTES = {name: "volo_jax.models" for name in __all__[1:]}


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        return getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
