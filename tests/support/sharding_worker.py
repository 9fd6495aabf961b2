"""Multi-device checks run by tests/sharding/test_sharding.py in a subprocess on 8 CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.support.sharding_worker steps

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
from tests.support.trees import adam_mu, worst_leaf
from volo_jax.models import create_model
from volo_jax.sharding import (
    batch_sharding,
    create_mesh,
    logical_axes,
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

# Data, all three axes, tensor; fsdp alone (1x8x1) is the mesh check_resume trains on.
MESHES = {"8x1x1": (8, 1, 1), "2x2x2": (2, 2, 2), "1x1x8": (1, 1, 8)}
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
    config.train.batch_size = 8
    config.train.ema_decay = 0.9
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


def fixed_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
        "label": rng.permutation(8).astype(np.int32) if seed else np.arange(8, dtype=np.int32),
        "mask": np.ones(8, bool),
    }


def make_init(config, model):
    """() -> a fresh TrainState, its static fields (tx, apply_fn) the same on every call."""
    return train.abstract_train_state(config, model, 10)[1]


def mesh_of(shape, devices=None):
    return create_mesh(dict(zip(("data", "fsdp", "model"), shape, strict=True)), devices)


@functools.cache
def template():
    """(config, model, abstract state) of `tiny_config()`, shared by the checks that step:
    every state they make has these static fields (the optimizer), so that one compiled
    step serves them all."""
    config = tiny_config()
    model = create_model(config.model, **model_overrides(config))
    return config, model, jax.eval_shape(make_init(config, model))


@functools.cache
def compiled_fns(mesh, rules_name: str = "auto"):
    """(state shardings, jitted train step, jitted eval step) of `template()` on `mesh`,
    built as the trainer builds them (cached by mesh: the checks share compilations)."""
    config, model, abstract = template()
    shardings = state_shardings(abstract, logical_axes(model), mesh, preset_rules(rules_name))
    step = train.jit_train_step(config, model, mesh, shardings)  # as the trainer builds it
    var_sh = {"params": shardings.params, "batch_stats": shardings.batch_stats}
    eval_fn = jax.jit(
        functools.partial(eval_lib.eval_step, model=model),
        in_shardings=(var_sh, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )
    return shardings, step, eval_fn


def new_state(mesh):
    """The initial state created sharded on `mesh` (`create_train_state`, as the
    trainer creates it) with `template()`'s static fields."""
    config, model, abstract = template()
    with use_mesh(mesh):
        state, _ = train.create_train_state(config, model, 10, mesh, preset_rules("auto"))
    return state.replace(tx=abstract.tx, apply_fn=abstract.apply_fn)


@functools.cache
def initial_state():
    """A host copy of `new_state` on one device: the start of every run compared here."""
    return jax.device_get(new_state(mesh_of((1, 1, 1), jax.devices()[:1])))


def put_state(start, mesh):
    """A host copy of a state put into its shardings on `mesh`."""
    _, _, abstract = template()
    return jax.device_put(
        start.replace(tx=abstract.tx, apply_fn=abstract.apply_fn), compiled_fns(mesh)[0]
    )


def sharded_run(mesh, start=None):
    """One train step and one eval step of `template()` on `mesh`, from `start` (a host
    copy of a state; default `initial_state()`); returns (loss, eval sums, host copy of
    the new state, host copy of the state it started from)."""
    _, step, eval_fn = compiled_fns(mesh)
    start = initial_state() if start is None else start
    state = put_state(start, mesh)
    with use_mesh(mesh):
        batch = shard_batch(fixed_batch(), mesh)
        train_batch = {"image": batch["image"], "label": batch["label"]}
        state, metrics = step(state, train_batch, None)
        sums = eval_fn({"params": state.params, "batch_stats": state.batch_stats}, batch)
    return float(metrics["loss"]), jax.device_get(sums), jax.device_get(state), start


def max_rel_diff(a, b) -> float:
    """Largest max|a - b| / max|b| over the leaves, with max|b| the largest leaf's."""
    diffs = jax.tree_util.tree_map(
        lambda x, y: float(
            np.max(np.abs(np.asarray(x) - np.asarray(y))) / (np.max(np.abs(np.asarray(y))) + 1e-12)
        ),
        a,
        b,
    )
    return max(jax.tree_util.tree_leaves(diffs))


GRAD_RTOL = 2e-5  # reduction order across devices, relative to each gradient's own size


def check_steps() -> dict:
    """Loss, eval sums, gradients (Adam's first moment), parameter updates and BatchNorm
    statistics on each mesh equal those on one device, each leaf within a tolerance
    relative to its own size."""
    assert jax.device_count() == 8, jax.devices()
    ref_loss, ref_sums, ref_state, start = sharded_run(mesh_of((1, 1, 1), jax.devices()[:1]))
    out = {}
    for name, shape in MESHES.items():
        loss, sums, state, _ = sharded_run(mesh_of(shape), start)
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (name, loss, ref_loss)
        grads = worst_leaf(adam_mu(state.opt_state), adam_mu(ref_state.opt_state), GRAD_RTOL)
        assert grads[0] <= 1, (name, "gradient", grads)
        updates = worst_leaf(state.params, ref_state.params, 1e-4, start.params)
        assert updates[0] <= 1, (name, "update", updates)
        ema = worst_leaf(state.ema_params, ref_state.ema_params, 1e-4, start.ema_params)
        assert ema[0] <= 1, (name, "ema", ema)
        stats = worst_leaf(state.batch_stats, ref_state.batch_stats, 1e-4, start.batch_stats)
        assert stats[0] <= 1, (name, "batch_stats", stats)
        for key in ("top1", "top5", "count"):
            assert float(sums[key]) == float(ref_sums[key]), (name, key, sums, ref_sums)
        assert abs(float(sums["loss"]) - float(ref_sums["loss"])) <= 1e-5 * float(
            ref_sums["loss"]
        ), (name, sums, ref_sums)
        out[name] = {"loss": loss, "gradient": grads, "update": updates}
    out["reference_loss"] = ref_loss
    return out


def run_steps(mesh, state, batches):
    """`state` (in its shardings on `mesh`) trained on `batches`; (state, losses)."""
    _, step, _ = compiled_fns(mesh)
    losses = []
    with use_mesh(mesh):
        for batch in batches:
            sharded = shard_batch(batch, mesh)
            state, metrics = step(
                state, {"image": sharded["image"], "label": sharded["label"]}, None
            )
            losses.append(float(metrics["loss"]))
    return state, losses


def check_resume() -> dict:
    """A run on the 2x2x2 mesh checkpoints after step 1; the checkpoint restored onto the
    1x8x1 mesh (params and Adam moments split 8 ways) trains step 2 and ends where 2
    uninterrupted steps on one device end: loss, gradients (Adam's first moment) and
    parameter updates, each leaf against its own size."""
    _, _, abstract = template()
    batches = [fixed_batch(0), fixed_batch(1)]
    one = mesh_of((1, 1, 1), jax.devices()[:1])
    start = initial_state()
    ref, ref_losses = run_steps(one, put_state(start, one), batches)
    ref = jax.device_get(ref)

    saver, resumer = mesh_of((2, 2, 2)), mesh_of((1, 8, 1))
    first, losses = run_steps(saver, put_state(start, saver), batches[:1])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(os.path.join(tmp, "ckpt"), keep=1)
        ckpt.save(1, first)
        ckpt.close()
        ckpt = Checkpointer(os.path.join(tmp, "ckpt"), keep=1)
        restored, step = ckpt.restore_latest(with_shardings(abstract, compiled_fns(resumer)[0]))
        ckpt.close()
    assert step == 1 and int(restored.step) == 1, (step, restored.step)
    qkv = restored.params["network_2_0"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.mesh.shape == resumer.shape, qkv.sharding
    last, more = run_steps(resumer, restored, batches[1:])
    losses += more
    last = jax.device_get(last)
    assert int(last.step) == 2, last.step
    for got, want in zip(losses, ref_losses, strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (losses, ref_losses)
    grads = worst_leaf(adam_mu(last.opt_state), adam_mu(ref.opt_state), GRAD_RTOL)
    updates = worst_leaf(last.params, ref.params, 1e-4, start.params)
    assert grads[0] <= 1 and updates[0] <= 1, (grads, updates)
    return {"losses": losses, "reference_losses": ref_losses, "gradient": grads}


def check_layout() -> dict:
    """The presets put a qkv kernel (and its Adam moments) where they say."""
    _, model, abstract = template()
    host = initial_state().replace(tx=abstract.tx, apply_fn=abstract.apply_fn)
    axes = logical_axes(model)
    specs = {}
    for preset, shape in (("fsdp", (1, 8, 1)), ("tensor", (1, 1, 8)), ("auto", (2, 2, 2))):
        mesh = mesh_of(shape)
        state = jax.device_put(host, state_shardings(abstract, axes, mesh, preset_rules(preset)))
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
    _, model, abstract = template()
    mesh_a, mesh_b = mesh_of((2, 2, 2)), mesh_of((1, 1, 8))
    sh_b = state_shardings(abstract, logical_axes(model), mesh_b, preset_rules("tensor"))
    state = put_state(initial_state(), mesh_a)  # in compiled_fns(mesh_a)'s 'auto' shardings
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


def compiled_step_text(step, abstract, shardings, mesh, batch: int) -> str:
    """The compiled HLO text of the jitted train `step` on `mesh` for `batch` 32-px images
    and a state like `abstract` in `shardings` (lowered from shapes: nothing is initialized)."""
    images = jax.ShapeDtypeStruct((batch, 32, 32, 3), np.float32)
    labels = jax.ShapeDtypeStruct((batch,), np.int32)
    state = with_shardings(abstract, shardings)
    with use_mesh(mesh):
        return step.lower(state, {"image": images, "label": labels}, None).compile().as_text()


#: HLO collectives that move data from device to device. The reductions (all-reduce,
#: reduce-scatter: the gradients', the loss's, BatchNorm's statistics) are left out.
MOVING_COLLECTIVES = re.compile(
    r"\b(collective-permute|all-to-all|ragged-all-to-all|all-gather|collective-broadcast)"
    r"(?:-start)?\("
)


def check_mix_pairs_local() -> dict:
    """On 8 devices (mesh 8x1x1, 16 images, 2 per device), MixToken groups of 2, which stay
    on their device, compile to a step that moves no data between devices (only
    reductions); the control, check_steps' own program on this mesh (8 images, 1 per device,
    in groups of 4 that span devices), moves some. (When check_steps ran first, in this
    process, the control's compile is read back from the compilation cache.)"""
    mesh = mesh_of((8, 1, 1))
    config = tiny_config()
    config.train.batch_size = 16
    config.token_label.mix_group_size = 2
    model = create_model(config.model, **model_overrides(config))
    abstract, _ = train.abstract_train_state(config, model, 10)
    shardings = state_shardings(abstract, logical_axes(model), mesh, preset_rules("auto"))
    step = train.jit_train_step(config, model, mesh, shardings, donate=False)
    local = compiled_step_text(step, abstract, shardings, mesh, 16)
    _, _, abstract = template()
    shardings, step, _ = compiled_fns(mesh)
    spanning = compiled_step_text(step, abstract, shardings, mesh, 8)
    moves = {
        name: sorted(m.group(1) for m in MOVING_COLLECTIVES.finditer(text))
        for name, text in (("groups of 2", local), ("groups of 4 over devices", spanning))
    }
    assert not moves["groups of 2"] and moves["groups of 4 over devices"], moves
    return moves


CHECKS = {
    "steps": check_steps,
    "layout": check_layout,
    "checkpoint": check_checkpoint,
    "resume": check_resume,
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
