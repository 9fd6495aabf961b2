"""The tiny VOLO and the small training config that most tests build (compiling is most of a
test's time on the CPU, so they are as small as the code paths allow)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from configs.smoke import get_config
from volo_jax.convert.mapping import abstract_variables
from volo_jax.models import create_model

#: VOLO-D1's structure at a size that compiles in seconds: one block per stage, 32 x 32
#: images (a 4 x 4 token grid after the stem's 8x patch embedding).
TINY_VOLO = dict(
    layers=(1, 1, 1, 1),
    embed_dims=(16, 32, 32, 32),
    num_heads=(2, 4, 4, 4),
    stem_hidden_dim=8,
    img_size=32,
    num_classes=5,
)


def tiny_volo(**overrides: Any):
    """`volo_d1_224` with `TINY_VOLO`, then `overrides`."""
    return create_model("volo_d1_224", **{**TINY_VOLO, **overrides})


def random_variables(model: Any, seed: int = 0) -> dict[str, Any]:
    """Variables for `model` drawn with NumPy into the shapes of its abstract init (no init
    program to compile, which takes seconds for each new model): kernels ~ N(0, 1/fan_in),
    norm scales 1, other parameters ~ N(0, 0.02^2); BatchNorm means 0, variances 1."""
    shapes = abstract_variables(model)
    rng = np.random.default_rng(seed)

    def draw(path, leaf) -> np.ndarray:
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name == "mean":
            return np.zeros(leaf.shape, leaf.dtype)
        std = (1 / np.prod(leaf.shape[:-1])) ** 0.5 if name == "kernel" else 0.02
        return (std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def smoke_config(**changes: Any) -> ml_collections.ConfigDict:
    """configs/smoke.py with 4 classes, then `changes` by dotted name
    (`smoke_config(**{"train.batch_size": 8, "seed": 1})`)."""
    config = get_config()
    config.dataset.num_classes = 4
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        setattr(config[section] if section else config, name, value)
    return config
