"""Data loading and preprocessing for evaluation and prediction.

``create_eval_dataset`` is imported lazily so that using the image transforms alone does not
import TensorFlow.
"""

import importlib
from typing import Any

from volo_jax.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    INTERPOLATIONS,
    decode_image,
    eval_transform,
    imagenet_class_names,
    load_image,
)

_LAZY_ATTRIBUTES = {"create_eval_dataset": "volo_jax.data.input_pipeline"}

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "INTERPOLATIONS",
    "create_eval_dataset",
    "decode_image",
    "eval_transform",
    "imagenet_class_names",
    "load_image",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        return getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
