"""Multi-device checks run by tests/test_sharding.py in a subprocess on 8 CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests._sharding_worker steps

Each check prints one JSON line (its results) on success and raises otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools
import json
import re
import sys
import tempfile
import traceback

import jax
import numpy as np

from configs.default import get_config
from volo_jax.models import create_model
from volo_jax.ops.cpu import for_platform
from volo_jax.sharding import (
    batch_sharding,
    create_mesh,
    preset_rules,
    replicated,
    shard_batch,
    state_shardings,
    use_mesh,
    with_shardings,
)
from volo_jax.training import evaluate as eval_lib
from volo_jax.training import train
from volo_jax.training.checkpointing import Checkpointer
from volo_jax.training.config import model_overrides

MESHES = {"8x1x1": (8, 1, 1), "2x2x2": (2, 2, 2), "1x8x1": (1, 8, 1), "1x1x8": (1, 1, 8)}
TINY = {
    "layers": (1, 1, 1, 1),
    "embed_dims": (16, 32, 32, 32),
    "num_heads": (2, 4, 4, 4),
    "stem_hidden_dim": 8,
    "mlp_ratio": 2.0,
    "drop_path_rate": 0.0,
    "remat": False,
}


def tiny_config():
    config = get_config()
    config.model_overrides.update(TINY)
    config.dataset.num_classes = 8
    config.batch_size = 8
    config.ema_decay = 0.9
    config.optim.warmup_epochs = 0
    # Adam's first update is lr * g / (|g| + eps): with the usual eps 1e-8 it is
    # lr * sign(g), which turns the rounding of a near-zero gradient into an lr-sized
    # difference; eps = 1 keeps the update linear in the gradient, so comparing the
    # updated parameters compares the gradients.
    config.optim.eps = 1.0
    # MixToken in 2 groups of 4: groups span devices on some meshes and not on others, and
    # the pairing must not depend on which.
    config.token_label.mix_group_size = 4
    return config


def fixed_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
        "label": np.arange(8, dtype=np.int32),
        "mask": np.ones(8, bool),
    }


def make_init(config, model):
    """() -> a fresh TrainState, its static fields (tx, apply_fn) the same on every call."""
    return train.abstract_train_state(config, model, 10)[1]


def mesh_of(shape, devices=None):
    return create_mesh(dict(zip(("data", "fsdp", "model"), shape, strict=True)), devices)


def sharded_run(config, mesh, rules, start=None):
    """One train step and one eval step on `mesh`, from a state created sharded (or
    from `start`, a host copy of one); returns (loss, eval sums, new state, host copy
    of the state it started from)."""
    model = create_model(config.model, **model_overrides(config))
    with use_mesh(mesh):
        if start is None:
            state, shardings = train.create_sharded_train_state(config, model, 10, mesh, rules)
            start = jax.device_get(state)
        else:
            abstract = jax.eval_shape(make_init(config, model))
            shardings = state_shardings(abstract, mesh, rules)
            state = jax.device_put(
                start.replace(tx=abstract.tx, apply_fn=abstract.apply_fn), shardings
            )
        step = jax.jit(
            for_platform(
                functools.partial(
                    train.train_step,
                    model=model,
                    teacher=None,
                    opts=train.StepOptions.from_config(config),
                ),
                mesh.devices.flat[0].platform,  # as the trainer builds it
            ),
            in_shardings=(shardings, batch_sharding(mesh), replicated(mesh)),
            out_shardings=(shardings, replicated(mesh)),
            donate_argnums=(0,),
        )
        batch = shard_batch(fixed_batch(), mesh)
        train_batch = {"image": batch["image"], "label": batch["label"]}
        state, metrics = step(state, train_batch, None)
        var_sh = {"params": shardings.params, "batch_stats": shardings.batch_stats}
        eval_fn = jax.jit(
            functools.partial(eval_lib.eval_step, model=model),
            in_shardings=(var_sh, batch_sharding(mesh)),
            out_shardings=replicated(mesh),
        )
        sums = eval_fn({"params": state.params, "batch_stats": state.batch_stats}, batch)
    return float(metrics["loss"]), jax.device_get(sums), state, start


def max_rel_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(
        lambda x, y: float(
            np.max(np.abs(np.asarray(x) - np.asarray(y))) / (np.max(np.abs(np.asarray(y))) + 1e-12)
        ),
        a,
        b,
    )
    return max(jax.tree_util.tree_leaves(diffs))


def check_steps() -> dict:
    """Loss, eval sums and updated params on each mesh equal those on one device."""
    assert jax.device_count() == 8, jax.devices()
    config = tiny_config()
    rules = preset_rules("auto")
    ref_loss, ref_sums, ref_state, start = sharded_run(
        config, mesh_of((1, 1, 1), jax.devices()[:1]), rules
    )
    ref_params = jax.device_get(ref_state.params)
    out = {}
    for name, shape in MESHES.items():
        loss, sums, state, _ = sharded_run(config, mesh_of(shape), rules, start)
        rel = max_rel_diff(jax.device_get(state.params), ref_params)
        ema = max_rel_diff(jax.device_get(state.ema_params), jax.device_get(ref_state.ema_params))
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (name, loss, ref_loss)
        assert rel <= 1e-5 and ema <= 1e-5, (name, rel, ema)
        for key in ("top1", "top5", "count"):
            assert float(sums[key]) == float(ref_sums[key]), (name, key, sums, ref_sums)
        assert abs(float(sums["loss"]) - float(ref_sums["loss"])) <= 1e-5 * float(
            ref_sums["loss"]
        ), (name, sums, ref_sums)
        out[name] = {"loss": loss, "params_rel": rel}
    out["reference_loss"] = ref_loss
    return out


def check_layout() -> dict:
    """The presets put a qkv kernel (and its Adam moments) where they say."""
    config = tiny_config()
    model = create_model(config.model, **model_overrides(config))
    specs = {}
    for preset, shape in (("fsdp", (1, 8, 1)), ("tensor", (1, 1, 8)), ("auto", (2, 2, 2))):
        mesh = mesh_of(shape)
        state, _ = train.create_sharded_train_state(config, model, 10, mesh, preset_rules(preset))
        qkv = state.params["network_2_0"]["attn"]["qkv"]["kernel"]  # (32, 96)
        mu = state.opt_state[0].mu["network_2_0"]["attn"]["qkv"]["kernel"]
        specs[preset] = [
            tuple(qkv.sharding.spec),
            tuple(mu.sharding.spec),
            list(qkv.addressable_shards[0].data.shape),
        ]
    assert specs["fsdp"][0] == ("fsdp",) and specs["fsdp"][2] == [4, 96], specs
    assert specs["tensor"][0] == (None, "model") and specs["tensor"][2] == [32, 12], specs
    assert specs["auto"][0] == ("fsdp", "model") and specs["auto"][2] == [16, 48], specs
    for preset in specs:
        assert specs[preset][1] == specs[preset][0], specs  # Adam's mu follows the param
    return specs


def check_checkpoint() -> dict:
    """A state saved under a 2x2x2 mesh restores under 1x1x8 (tensor) with equal values."""
    config = tiny_config()
    model = create_model(config.model, **model_overrides(config))
    init = make_init(config, model)
    abstract = jax.eval_shape(init)
    mesh_a, mesh_b = mesh_of((2, 2, 2)), mesh_of((1, 1, 8))
    sh_a = state_shardings(abstract, mesh_a, preset_rules("auto"))
    sh_b = state_shardings(abstract, mesh_b, preset_rules("tensor"))
    state = jax.jit(init, out_shardings=sh_a)()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(os.path.join(tmp, "ckpt"), keep=1)
        ckpt.save(3, state)
        ckpt.close()
        ckpt = Checkpointer(os.path.join(tmp, "ckpt"), keep=1)
        restored = ckpt.restore(3, with_shardings(abstract, sh_b))
        ckpt.close()
    diff = max_rel_diff(jax.device_get(restored.params), jax.device_get(state.params))
    mu_diff = max_rel_diff(jax.device_get(restored.opt_state), jax.device_get(state.opt_state))
    assert diff == 0.0 and mu_diff == 0.0, (diff, mu_diff)
    fc1 = restored.params["network_2_0"]["mlp"]["fc1"]["kernel"]
    before = state.params["network_2_0"]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.mesh.shape == mesh_b.shape, fc1.sharding
    assert tuple(fc1.sharding.spec) == (None, "model"), fc1.sharding
    return {"spec_before": str(before.sharding.spec), "spec_after": str(fc1.sharding.spec)}


def compiled_step_text(config, mesh, batch: int) -> str:
    """The compiled HLO text of `config`'s train step on `mesh` for `batch` 32-px images."""
    model = create_model(config.model, **model_overrides(config))
    rules = preset_rules("auto")
    with use_mesh(mesh):
        state, shardings = train.create_sharded_train_state(config, model, 10, mesh, rules)
        step = jax.jit(
            for_platform(
                functools.partial(
                    train.train_step,
                    model=model,
                    teacher=None,
                    opts=train.StepOptions.from_config(config),
                ),
                mesh.devices.flat[0].platform,  # as the trainer builds it
            ),
            in_shardings=(shardings, batch_sharding(mesh), replicated(mesh)),
            out_shardings=(shardings, replicated(mesh)),
        )
        images = jax.ShapeDtypeStruct((batch, 32, 32, 3), np.float32)
        labels = jax.ShapeDtypeStruct((batch,), np.int32)
        return step.lower(state, {"image": images, "label": labels}, None).compile().as_text()


def check_mix_pairs_local() -> dict:
    """On 8 devices (mesh 8x1x1, 16 images, 2 per device), MixToken groups of 2, which stay
    on their device, compile to a step without any collective-permute; one group of the 16
    images spans the devices and needs them (the control: the pairing of the whole batch,
    x[::-1], that the groups replaced)."""
    mesh = mesh_of((8, 1, 1))
    permutes = {}
    for group in (2, 16):
        config = tiny_config()
        config.batch_size = 16
        config.token_label.mix_group_size = group
        text = compiled_step_text(config, mesh, 16)
        permutes[group] = len(re.findall(r" collective-permute(?:-start)?\(", text))
    assert permutes[2] == 0 and permutes[16] > 0, permutes
    return permutes


CHECKS = {
    "steps": check_steps,
    "layout": check_layout,
    "checkpoint": check_checkpoint,
    "mix_pairs_local": check_mix_pairs_local,
}


def main(names: list[str]) -> None:
    """Runs the checks; prints one JSON line per check: its result or its error."""
    jax.config.update("jax_default_matmul_precision", "highest")
    for name in names or list(CHECKS):
        try:
            result = {"ok": CHECKS[name]()}
        except Exception:  # reported to the test, which fails with the traceback
            result = {"error": traceback.format_exc()}
        print(json.dumps({name: result}, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
