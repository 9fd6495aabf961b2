"""volo-jax: VOLO and the local-attention operators it is compared with, in JAX/Flax."""

from volo_jax.models import create_model, list_models, pretrained_cfg

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models", "pretrained_cfg"]
