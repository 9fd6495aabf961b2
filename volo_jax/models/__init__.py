"""The model families and the registry that names them: `volo.py` (VOLO-D1..D5 and its
token-mixer variants), `halonet.py` (halonet26t, halonet50ts), `rednet.py` (RedNet-26/38/50),
`registry.py` (`create_model`, `list_models`, pretrained configs). Layers they share with
the operators: `volo_jax.layers`; the operators: `volo_jax.ops`."""

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
