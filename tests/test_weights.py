"""Weights as one .safetensors file and as a directory: round trips, the same logits,
metadata, errors, and what loading a file imports (no orbax, tensorstore, TensorFlow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from tests.support import REPO, timm_pairs
from volo_jax.convert.mapping import abstract_variables
from volo_jax.errors import CheckpointError
from volo_jax.weights import (
    load_weights,
    load_weights_into,
    read_metadata,
    save_weights,
    weights_exist,
)

NAME = "volo_d1_224"
#: A shrunk volo_d1 at 64 px: a 4 x 4 token grid, seconds to compile.
OVERRIDES = {**timm_pairs.shrunk_overrides(NAME, factor=8), "img_size": 64}
CLASS_NAMES = [f"class {i}" for i in range(OVERRIDES["num_classes"])]


def random_variables(model, seed: int = 0) -> dict:
    """Variables of `model` with every leaf random (no leaf left at its initial value)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(abstract_variables(model))
    out = {}
    for path, leaf in flat.items():
        value = (
            rng.uniform(0.5, 1.5, leaf.shape) if path[-1] == "var" else rng.normal(size=leaf.shape)
        )
        out[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def model_and_variables():
    model = timm_pairs.jax_volo(NAME, **OVERRIDES)
    return model, random_variables(model)


@pytest.mark.parametrize("form", ["volo_d1_224.safetensors", "weights_dir"])
def test_round_trip_keeps_every_array_and_the_metadata(tmp_path, model_and_variables, form):
    _, variables = model_and_variables
    path = tmp_path / form
    save_weights(path, variables, NAME, OVERRIDES, class_names=CLASS_NAMES, source="test")
    assert weights_exist(path)
    loaded, meta = load_weights(path, expected_model="volo_d1_384")  # same variant
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(variables)
    assert meta["model"] == NAME and meta["class_names"] == CLASS_NAMES
    assert meta["source"] == "test"
    # Tuples come back as lists, as from model.json; create_model takes either.
    assert meta["overrides"] == json.loads(json.dumps(OVERRIDES))
    assert read_metadata(path) == meta


def test_a_file_gives_the_same_logits(tmp_path, model_and_variables):
    model, variables = model_and_variables
    path = tmp_path / "w.safetensors"
    save_weights(path, variables, NAME, OVERRIDES)
    loaded = load_weights_into(path, model, NAME)
    images = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    expected = np.asarray(model.apply(variables, images))
    np.testing.assert_array_equal(np.asarray(model.apply(loaded, images)), expected)


def test_a_file_loads_at_another_resolution(tmp_path, model_and_variables):
    _, variables = model_and_variables
    path = tmp_path / "w.safetensors"
    save_weights(path, variables, NAME, OVERRIDES)
    at_96 = timm_pairs.jax_volo("volo_d1_384", **{**OVERRIDES, "img_size": 96})
    loaded = load_weights_into(path, at_96, "volo_d1_384")
    assert loaded["params"]["pos_embed"].shape == (1, 6, 6, OVERRIDES["embed_dims"][-1])


def test_a_file_of_another_model_is_named(tmp_path, model_and_variables):
    _, variables = model_and_variables
    path = tmp_path / "w.safetensors"
    save_weights(path, variables, NAME, OVERRIDES)
    with pytest.raises(CheckpointError, match="holds weights for volo_d1_224, not volo_d2_224"):
        load_weights(path, expected_model="volo_d2_224")
    d2 = timm_pairs.jax_volo("volo_d2_224", **timm_pairs.shrunk_overrides("volo_d2_224", 8))
    with pytest.raises(CheckpointError, match="holds weights for volo_d1_224"):
        load_weights_into(path, d2, "volo_d2_224")


def test_files_that_are_not_volo_jax_weights(tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(CheckpointError, match="weights file not found"):
        load_weights(tmp_path / "missing.safetensors")
    timm_file = tmp_path / "model.safetensors"  # a state dict without our metadata
    save_file({"cls_token": np.zeros((1, 1, 8), np.float32)}, timm_file)
    with pytest.raises(CheckpointError, match=r"without volo-jax metadata.*volo-jax-convert"):
        load_weights(timm_file)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(CheckpointError, match=r"not a readable \.safetensors file"):
        read_metadata(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match=r"not a readable \.safetensors file"):
        load_weights(truncated)


def test_a_damaged_file_body_is_one_error(tmp_path, model_and_variables):
    _, variables = model_and_variables
    path = tmp_path / "w.safetensors"
    save_weights(path, variables, NAME, OVERRIDES)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])  # the header intact, tensors cut short
    with pytest.raises(CheckpointError, match=r"not a readable \.safetensors file"):
        load_weights(path)


def test_loading_a_file_imports_neither_orbax_nor_tensorflow(tmp_path, model_and_variables):
    _, variables = model_and_variables
    path = tmp_path / "w.safetensors"
    save_weights(path, variables, NAME, OVERRIDES)
    code = (
        "import sys\n"
        "from volo_jax.predict import load_classifier\n"
        f"load_classifier({str(path)!r})\n"
        "heavy = ('orbax', 'tensorstore', 'tensorflow', 'torch')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
