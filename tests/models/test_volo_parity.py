"""Same weights in, same logits out: volo-jax against timm's VOLO (float32, CPU)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.support import timm_pairs
from tests.support.timm_pairs import TIMM_PARAM_COUNTS
from volo_jax.convert import torch_to_flax
from volo_jax.convert.resize import resize_pos_embed
from volo_jax.models import list_models

timm = pytest.importorskip("timm")

ATOL = 1e-4


def _images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _check(name: str, overrides: dict, batch: int = 2, registered: bool = False) -> None:
    """Logits and aux logits of our `name` equal timm's with the same weights: timm's own
    `name` (`registered`, `overrides` passed to timm's constructor too; the architecture is
    checked, through the dense forward only), or timm's VOLO built from our registry's
    arguments (the eval forward too)."""
    if registered:
        torch_model = timm_pairs.timm_registered(name, **overrides)
    else:
        torch_model = timm_pairs.timm_volo(name, **overrides)
    model = timm_pairs.jax_volo(name, **overrides)
    variables = torch_to_flax(timm_pairs.state_dict_numpy(torch_model), model)
    x = _images(model.img_size, batch)
    ref_logits, ref_aux = timm_pairs.timm_logits(torch_model, x)
    cls, aux = jax.jit(lambda v, x: model.apply(v, x, return_dense=True))(variables, x)
    cls, aux = np.asarray(cls), np.asarray(aux)
    assert np.abs(aux - ref_aux).max() <= ATOL
    assert np.abs(cls + 0.5 * aux.max(axis=1) - ref_logits).max() <= ATOL
    if not registered:  # the eval path (no dense outputs) gives the same logits
        logits = np.asarray(jax.jit(model.apply)(variables, x))
        assert np.abs(logits - ref_logits).max() <= ATOL
        np.testing.assert_allclose(logits, cls + 0.5 * aux.max(axis=1), atol=1e-5)


@pytest.mark.parametrize("name", list_models("volo_*"))
def test_every_registered_name_has_timms_blocks_and_parameter_count(name):
    """Our `name` against `timm.create_model(name)` (built on torch's meta device: shapes,
    no weights), block by block: kind, width, heads (outlooker, transformer and class
    attention), head width, outlook window and MLP width; and the parameter count, which is
    also the one timm 1.0.31 gives (in case timm's model changes)."""
    import torch

    with torch.device("meta"):
        theirs = timm.create_model(name)
    blocks, count = timm_pairs.jax_blocks(timm_pairs.jax_volo(name))
    assert blocks == timm_pairs.timm_blocks(theirs)
    assert count == sum(p.numel() for p in theirs.parameters()) == TIMM_PARAM_COUNTS[name]


#: Registered names whose forward is checked against timm's own model in the default run:
#: the smallest and the largest architecture (their blocks, and those of the others, are
#: checked above; the code is the same for all).
REPRESENTATIVES = ["volo_d1_224", "volo_d5_224"]
#: What timm's named constructors let us shrink: the images (2 x 2 tokens after the stem).
SMALL_INPUT = {"img_size": 32, "num_classes": 17}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=() if n in REPRESENTATIVES else pytest.mark.slow)
        for n in list_models("volo_*")
    ],
)
def test_registered_model_matches_timms_own_model(name):
    """Our `name` against `timm.create_model(name)` with the same weights: all widths,
    depths, heads and MLP ratios as timm registers them, on 32 px images."""
    _check(name, SMALL_INPUT, registered=True)


#: One registered name per resolution above 224 (384, 448, 512); at 224 the shrunk volo_d1_224
#: is checked by the pooling and BatchNorm tests below.
AT_EACH_RESOLUTION = ["volo_d1_384", "volo_d3_448", "volo_d5_512"]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=() if n in AT_EACH_RESOLUTION else pytest.mark.slow)
        for n in list_models("volo_*")
    ],
)
def test_every_variant_shrunk_at_its_resolution_matches_timm(name):
    """Each registered variant, widths shrunk, at its own resolution: the resolution's
    position grid and the operators at its token grid (one name per resolution in the
    default run; the architectures are checked against timm's own models above)."""
    _check(name, timm_pairs.shrunk_overrides(name))


def test_avg_pool_and_no_aux_head_match_timm():
    overrides = dict(timm_pairs.shrunk_overrides("volo_d1_224"), global_pool="avg")
    _check("volo_d1_224", overrides)
    torch_model = timm_pairs.timm_volo("volo_d1_224", **dict(overrides, use_aux_head=False))
    model = timm_pairs.jax_volo("volo_d1_224", **dict(overrides, use_aux_head=False))
    variables = torch_to_flax(timm_pairs.state_dict_numpy(torch_model), model)
    x = _images(224)
    import torch

    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert np.abs(np.asarray(jax.jit(model.apply)(variables, x)) - ref).max() <= ATOL


def test_checkpoint_made_at_224_loads_at_384():
    """The 224 state dict in a 384 model equals timm at 384 with timm's resampled grid."""
    import torch

    overrides = timm_pairs.shrunk_overrides("volo_d1_224")
    torch_224 = timm_pairs.timm_volo("volo_d1_224", **overrides)
    state = timm_pairs.state_dict_numpy(torch_224)
    torch_384 = timm_pairs.timm_volo("volo_d1_384", **overrides)
    from timm.layers import resample_abs_pos_embed_nhwc

    resized = dict(torch_224.state_dict())
    resized["pos_embed"] = resample_abs_pos_embed_nhwc(resized["pos_embed"], [24, 24])
    torch_384.load_state_dict(resized)
    np.testing.assert_allclose(
        resize_pos_embed(state["pos_embed"], (24, 24)), resized["pos_embed"].numpy(), atol=1e-5
    )

    model = timm_pairs.jax_volo("volo_d1_384", **overrides)
    variables = torch_to_flax(state, model)
    x = _images(384)
    with torch.no_grad():
        ref = torch_384(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert np.abs(np.asarray(jax.jit(model.apply)(variables, x)) - ref).max() <= ATOL


def test_batchnorm_eval_uses_the_converted_running_stats():
    overrides = timm_pairs.shrunk_overrides("volo_d1_224")
    torch_model = timm_pairs.timm_volo("volo_d1_224", **overrides)
    model = timm_pairs.jax_volo("volo_d1_224", **overrides)
    variables = torch_to_flax(timm_pairs.state_dict_numpy(torch_model), model)
    stats = variables["batch_stats"]["patch_embed"]["conv_1"]
    np.testing.assert_array_equal(
        stats["mean"], torch_model.patch_embed.conv[1].running_mean.numpy()
    )
    x = _images(224)
    ref, _ = timm_pairs.timm_logits(torch_model, x)
    # With the statistics reset the output moves away from timm's: they are used.
    reset = {
        "params": variables["params"],
        "batch_stats": {
            "patch_embed": {
                k: {"mean": np.zeros_like(v["mean"]), "var": np.ones_like(v["var"])}
                for k, v in variables["batch_stats"]["patch_embed"].items()
            }
        },
    }
    forward = jax.jit(model.apply)
    assert np.abs(np.asarray(forward(reset, x)) - ref).max() > 1e-2
    assert np.abs(np.asarray(forward(variables, x)) - ref).max() <= ATOL


def test_train_mode_logits_and_batchnorm_updates_match_timm():
    """timm's model.train() (no dropout, no stochastic depth): the logits from the batch
    statistics, and the running statistics updated with PyTorch's momentum 0.1 (Flax's
    0.9). Running variance: PyTorch adds the unbiased batch variance, Flax the biased one,
    smaller by (n - 1) / n for n = B x H x W values per channel (512 here, 1 / 511
    apart); at training sizes (n >= 128 x 112 x 112) the difference is below 1e-6."""
    import torch

    overrides = dict(timm_pairs.shrunk_overrides("volo_d1_224"), img_size=32)
    torch_model = timm_pairs.timm_volo("volo_d1_224", **overrides)
    model = timm_pairs.jax_volo("volo_d1_224", **overrides)
    variables = torch_to_flax(timm_pairs.state_dict_numpy(torch_model), model)
    # torch_to_flax's arrays may share memory with torch's buffers, which train() updates.
    variables = jax.tree_util.tree_map(np.array, variables)
    x = _images(32, batch=2)
    torch_model.train()
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    logits, new = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    assert np.abs(np.asarray(logits) - ref).max() <= ATOL
    n = 2 * 16 * 16  # the stem's batch x height x width
    for name, index in (("conv_1", 1), ("conv_4", 4), ("conv_7", 7)):
        bn = torch_model.patch_embed.conv[index]
        old = variables["batch_stats"]["patch_embed"][name]
        ours = new["batch_stats"]["patch_embed"][name]
        np.testing.assert_allclose(ours["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        unbiased = (bn.running_var.numpy() - 0.9 * np.asarray(old["var"])) / 0.1
        biased = 0.9 * np.asarray(old["var"]) + 0.1 * unbiased * (n - 1) / n
        np.testing.assert_allclose(ours["var"], biased, rtol=2e-6)
        assert np.abs(np.asarray(ours["var"]) - bn.running_var.numpy()).max() > 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["volo_d1_224", "volo_d1_384"])
def test_full_size_model_matches_timm(name):
    _check(name, {}, batch=1, registered=True)
