"""Sharding: the logical axis rules (1 device), and on 8 CPU devices (one subprocess,
so this process keeps its single device) a train and eval step equal to one device's
on 3 meshes (gradients and updates leaf by leaf), a run resumed on a fourth mesh that keeps
training as one device does, the presets' layouts, and a checkpoint moving between meshes."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from tests.support import REPO
from volo_jax.errors import ConfigError
from volo_jax.models import create_model
from volo_jax.sharding import (
    axes_of,
    create_mesh,
    mesh_shape,
    param_specs,
    preset_rules,
    rules_from_config,
)
from volo_jax.sharding.rules import spec_for


class FakeMesh:
    """The parts of a Mesh that the rules read: axis names and sizes."""

    def __init__(self, **shape: int) -> None:
        self.shape = shape
        self.axis_names = tuple(shape)


@functools.cache
def abstract_variables(name: str = "volo_d1_224"):
    """(plain abstract variables, their logical axes) of a registered model."""
    model = create_model(name)
    size = model.img_size
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
    return nn.unbox(boxed), axes_of(boxed)


def test_specs_for_a_mesh():
    mesh = FakeMesh(data=2, fsdp=2, model=2)
    variables, axes = abstract_variables()
    specs = param_specs(variables["params"], axes["params"], preset_rules("auto"), mesh)
    assert specs["network_2_0"]["attn"]["qkv"]["kernel"] == P("fsdp", "model")
    assert specs["network_2_0"]["attn"]["proj"]["kernel"] == P("model", "fsdp")
    assert specs["network_2_0"]["mlp"]["fc1"]["bias"] == P("model")
    assert specs["post_network_0"]["attn"]["kv"]["kernel"] == P("fsdp", "model")
    assert specs["head"]["kernel"] == P("fsdp")
    assert specs["norm"]["scale"] == P()
    assert specs["pos_embed"] == P(None, None, None, "fsdp")
    fsdp = param_specs(variables["params"], axes["params"], preset_rules("fsdp"), mesh)
    assert fsdp["network_2_0"]["attn"]["qkv"]["kernel"] == P("fsdp")
    tensor = param_specs(variables["params"], axes["params"], preset_rules("tensor"), mesh)
    assert tensor["network_2_0"]["attn"]["qkv"]["kernel"] == P(None, "model")
    none = param_specs(variables["params"], axes["params"], preset_rules("replicated"), mesh)
    assert all(
        s == P() for s in jax.tree_util.tree_leaves(none, is_leaf=lambda x: isinstance(x, P))
    )
    with pytest.raises(ValueError, match=r"params: no logical axes for \['extra'\]"):
        param_specs({**variables["params"], "extra": jnp.zeros(3)}, axes["params"], {}, mesh)


def test_non_divisible_dimension_stays_whole():
    rules = preset_rules("auto")
    # Outlook attention's weight generator: 486 = 3^4 x 6 outputs, not divisible by 4.
    qkv = ("embed", "heads")
    assert spec_for(qkv, (192, 486), rules, FakeMesh(data=1, fsdp=8, model=4)) == P("fsdp")
    assert spec_for(qkv, (192, 486), rules, FakeMesh(data=1, fsdp=1, model=2)) == P(None, "model")
    head = ("embed", "classes")
    assert spec_for(head, (12, 10), rules, FakeMesh(data=1, fsdp=8, model=1)) == P()
    with pytest.raises(ValueError, match="do not fit shape"):
        spec_for(qkv, (12,), rules, FakeMesh(data=1, fsdp=8, model=1))


def test_mesh_shapes_and_errors():
    assert mesh_shape({"data": -1, "fsdp": 1, "model": 1}, 8) == (8, 1, 1)
    assert mesh_shape({"data": 2, "fsdp": -1, "model": 2}, 8) == (2, 2, 2)
    assert mesh_shape(None, 4) == (4, 1, 1)
    with pytest.raises(
        ConfigError,
        match=r"data=2, fsdp=2, model=1 is 4 devices, but there "
        r"are 8 devices",
    ):
        mesh_shape({"data": 2, "fsdp": 2, "model": 1}, 8)
    with pytest.raises(ConfigError, match="do not divide the 8 devices"):
        mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ConfigError, match="unknown axes"):
        mesh_shape({"tensor": 2}, 8)
    with pytest.raises(ConfigError, match="at most one -1"):
        mesh_shape({"data": -1, "fsdp": -1}, 8)
    assert jax.device_count() == 1  # tests/conftest.py: the test process has one device
    with pytest.raises(ConfigError, match=r"config\.mesh"):
        create_mesh({"data": 2})
    assert create_mesh({"data": -1}).shape == {"data": 1, "fsdp": 1, "model": 1}


def test_rules_from_config_and_bad_preset():
    import ml_collections

    config = ml_collections.ConfigDict(
        {
            "sharding": "tensor",
            "sharding_rules": {
                "batch": ("data", "fsdp"),
                "embed": ("fsdp",),
                "heads": ("model",),
                "mlp": ("model",),
            },
        }
    )
    rules = rules_from_config(config)
    assert rules["embed"] == () and rules["heads"] == ("model",)
    assert rules["batch"] == ("data", "fsdp")
    with pytest.raises(ConfigError, match=r"config\.sharding"):
        preset_rules("zero3")


def run_worker(*checks: str) -> dict:
    """Runs tests/support/sharding_worker.py's `checks` on 8 CPU devices in a subprocess;
    {check: {'ok'|'error': ...}}."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.sharding_worker", *checks],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            results.update(json.loads(line))
    if not results:
        pytest.fail(f"worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return results


#: The worker's checks (tests/support/sharding_worker.py): train and eval steps, resume,
#: layouts, checkpoint, and the MixToken groups that compile without moving data.
CHECKS = ["steps", "resume", "layout", "checkpoint", "mix_pairs_local"]


@pytest.fixture(scope="module")
def eight_devices() -> dict:
    """The worker's checks, run once for the module (in one process: they share its
    compilations; mix_pairs_local's control is check_steps' program)."""
    return run_worker(*CHECKS)


@pytest.mark.parametrize("check", CHECKS)
def test_on_eight_devices(eight_devices, check):
    result = eight_devices.get(check)
    assert result is not None, f"check {check} did not run"
    assert "error" not in result, result["error"]


def test_train_state_with_init_from_holds_the_weights_in_their_shardings(tmp_path):
    """create_train_state with init_from: the loaded params and BatchNorm statistics, the
    skipped paths as a fresh state has them (config.seed), the EMA started from the loaded
    weights, the optimizer state of those params, every leaf in its sharding."""
    from flax import traverse_util

    from configs.smoke import get_config
    from volo_jax.training import train
    from volo_jax.training.config import model_overrides
    from volo_jax.weights import save_weights

    config = get_config()
    config.train.ema_decay = 0.9
    model = create_model(config.model, **model_overrides(config))
    variables = train.initial_variables(model, config.img_size, jax.random.PRNGKey(7))
    save_weights(
        tmp_path / "w",
        variables,
        config.model,
        {k: v for k, v in model_overrides(config).items() if k != "dtype"},
    )
    # A fresh state's head: the initial variables of config.seed's init key.
    init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
    fresh = train.initial_variables(model, config.img_size, init_rng)
    config.init_from = str(tmp_path / "w")
    config.init_skip = (r"^params/head/",)
    state, shardings = train.create_train_state(
        config, model, 10, create_mesh(), rules_from_config(config)
    )
    params = traverse_util.flatten_dict(variables["params"])
    params.update(
        {k: v for k, v in traverse_util.flatten_dict(fresh["params"]).items() if k[0] == "head"}
    )
    params = traverse_util.unflatten_dict(params)
    expected = (
        params,
        variables["batch_stats"],
        params,
        variables["batch_stats"],
        state.tx.init(params),
    )
    got = (
        state.params,
        state.batch_stats,
        state.ema_params,
        state.ema_batch_stats,
        state.opt_state,
    )
    equal = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), got, expected)
    assert all(jax.tree_util.tree_leaves(equal))
    assert not jnp.array_equal(
        state.params["head"]["kernel"], variables["params"]["head"]["kernel"]
    )
    in_place = jax.tree_util.tree_map(
        lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), state, shardings
    )
    assert all(jax.tree_util.tree_leaves(in_place))
