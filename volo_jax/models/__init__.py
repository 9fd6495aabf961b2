"""Model families and the registry that names them."""

from volo_jax.models import halonet as halonet  # registers halonet26t, halonet50ts
from volo_jax.models import rednet as rednet  # registers rednet26, rednet38, rednet50
from volo_jax.models import volo  # noqa: F401  (registers the VOLO variants)
from volo_jax.models.registry import (
    PretrainedCfg,
    create_model,
    list_models,
    model_kwargs,
    pretrained_cfg,
    register_model,
)

__all__ = [
    "PretrainedCfg",
    "create_model",
    "list_models",
    "model_kwargs",
    "pretrained_cfg",
    "register_model",
]
