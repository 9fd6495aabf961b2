"""Same weights in, same logits out: volo-jax against timm's VOLO (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("timm")

from tests import timm_pairs
from volo_jax.convert import torch_to_flax
from volo_jax.convert.resize import resize_pos_embed
from volo_jax.models import list_models

ATOL = 1e-4


def _images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _check(name: str, overrides: dict, batch: int = 2) -> None:
    torch_model = timm_pairs.timm_volo(name, **overrides)
    model = timm_pairs.jax_volo(name, **overrides)
    variables = torch_to_flax(timm_pairs.state_dict_numpy(torch_model), model)
    x = _images(model.img_size, batch)
    ref_logits, ref_aux = timm_pairs.timm_logits(torch_model, x)
    logits = np.asarray(model.apply(variables, x))
    cls, aux = model.apply(variables, x, return_dense=True)
    assert np.abs(logits - ref_logits).max() <= ATOL
    assert np.abs(np.asarray(aux) - ref_aux).max() <= ATOL
    np.testing.assert_allclose(
        logits, np.asarray(cls) + 0.5 * np.asarray(aux).max(axis=1), atol=1e-5
    )


@pytest.mark.parametrize("name", list_models("volo_*"))
def test_every_variant_structure_matches_timm(name):
    """Each registered variant, widths shrunk, at its own resolution."""
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
    assert np.abs(np.asarray(model.apply(variables, x)) - ref).max() <= ATOL


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
    assert np.abs(np.asarray(model.apply(variables, x)) - ref).max() <= ATOL


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
    assert np.abs(np.asarray(model.apply(reset, x)) - ref).max() > 1e-2
    assert np.abs(np.asarray(model.apply(variables, x)) - ref).max() <= ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["volo_d1_224", "volo_d1_384"])
def test_full_size_model_matches_timm(name):
    _check(name, {}, batch=1)
