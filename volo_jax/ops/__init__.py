"""Local operators: the shared unfold/fold primitives and the token mixers built on them."""

from volo_jax.ops.patches import fold, unfold

__all__ = ["fold", "unfold"]
