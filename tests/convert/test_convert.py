"""The converter: every checkpoint format, strictness, variant detection, the CLI."""

from __future__ import annotations

import collections
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from tests.support import timm_pairs  # noqa: E402
from volo_jax.convert import read_state_dict, torch_to_flax  # noqa: E402
from volo_jax.errors import CheckpointError  # noqa: E402
from volo_jax.weights import load_weights, load_weights_into  # noqa: E402

NAME = "volo_d1_224"


@pytest.fixture(scope="module")
def tiny():
    """(overrides, timm model, numpy state dict) of a shrunk volo_d1_224."""
    overrides = timm_pairs.shrunk_overrides(NAME, factor=8)
    torch_model = timm_pairs.timm_volo(NAME, **overrides)
    return overrides, torch_model, timm_pairs.state_dict_numpy(torch_model)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "state_dict_ema"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_reads_official_pth_tar_in_every_wrapping(tmp_path, tiny, wrapper, prefix):
    _, torch_model, state = tiny
    tensors = {prefix + k: v for k, v in torch_model.state_dict().items()}
    payload = tensors if wrapper is None else {wrapper: tensors, "epoch": 7}
    path = tmp_path / "d1_224_84.2.pth.tar"
    torch.save(payload, path)
    loaded = read_state_dict(path)
    assert sorted(loaded) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_reads_training_checkpoints_with_args(tmp_path, tiny):
    import argparse

    _, torch_model, _ = tiny
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": torch_model.state_dict(), "args": argparse.Namespace(lr=1.0)}, path)
    assert "cls_token" in read_state_dict(path)


def test_safetensors_and_pth_give_the_same_variables(tmp_path, tiny):
    from safetensors.torch import save_file

    overrides, torch_model, state = tiny
    save_file(torch_model.state_dict(), tmp_path / "model.safetensors")
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.pth")
    model = timm_pairs.jax_volo(NAME, **overrides)
    a = torch_to_flax(read_state_dict(tmp_path / "model.safetensors"), model)
    b = torch_to_flax(read_state_dict(tmp_path / "pytorch_model.pth"), model)
    c = torch_to_flax(state, model)
    import chex

    chex.assert_trees_all_equal(a, b, c)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    bad = tmp_path / "truncated.pth.tar"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_state_dict(bad)
    bad_st = tmp_path / "x.safetensors"
    bad_st.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(bad_st)


def test_strict_errors_list_missing_unexpected_and_misshaped(tiny):
    overrides, _, state = tiny
    model = timm_pairs.jax_volo(NAME, **overrides)
    broken = dict(state)
    del broken["network.0.0.attn.v.weight"]
    broken["extra.weight"] = np.zeros(3, np.float32)
    broken["head.bias"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as err:
        torch_to_flax(broken, model)
    message = str(err.value)
    assert "missing from the checkpoint (1)" in message and "network.0.0.attn.v.weight" in message
    assert "unexpected in the checkpoint (1)" in message and "extra.weight" in message
    assert "mis-shaped (1)" in message and "head.bias: checkpoint (3,), model (17,)" in message


def test_a_checkpoint_of_another_variant_is_named():
    import timm

    state = timm_pairs.state_dict_numpy(timm.create_model("volo_d2_224"))
    model = timm_pairs.jax_volo("volo_d1_224")
    with pytest.raises(CheckpointError, match="fits volo_d2_224 / volo_d2_384"):
        torch_to_flax(state, model, model_name="volo_d1_224")


def test_only_candidates_with_the_checkpoints_block_counts_and_widths_are_traced(monkeypatch):
    from volo_jax.convert import mapping
    from volo_jax.models import create_model, list_models

    for name in list_models():  # the fingerprint never rules out the model itself
        model = create_model(name)
        names = mapping._registered_torch_shapes(model)  # once per architecture
        assert not collections.Counter(model.block_counts) - mapping.numbered_groups(names)
        assert set(model.widths) <= {d for shape in names.values() for d in shape}, name
    traced = []
    monkeypatch.setattr(mapping, "_ARCHITECTURE_SHAPES", {})
    real = mapping.torch_shapes
    monkeypatch.setattr(mapping, "torch_shapes", lambda m: traced.append(m) or real(m))
    shapes = real(create_model("volo_d3_224"))  # D4 has D3's block counts, not its widths
    state = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    assert mapping.identify_model(state) == ["volo_d3_224", "volo_d3_448"]
    assert [m.embed_dims for m in traced] == [(256, 512, 512, 512)]  # one trace


def test_skip_leaves_out_the_classifier(tiny):
    overrides, _, state = tiny
    model = timm_pairs.jax_volo(NAME, **dict(overrides, num_classes=3))
    variables = torch_to_flax(state, model, skip=[r"^params/(head|aux_head)/"])
    assert "head" not in variables["params"] and "aux_head" not in variables["params"]
    assert "network_0_0" in variables["params"]


def test_cli_writes_a_safetensors_file_that_loads_at_another_resolution(tmp_path):
    import timm

    from volo_jax.data import imagenet_class_names

    torch_model = timm.create_model("volo_d1_224")
    timm_pairs.randomize_(torch_model)
    src = tmp_path / "d1_224_84.2.pth.tar"
    torch.save(torch_model.state_dict(), src)
    dst = tmp_path / "weights" / "volo_d1_224.safetensors"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "volo_jax.convert",
            "--model",
            NAME,
            "--src",
            str(src),
            "--dst",
            str(dst),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "26,632,040 parameters" in done.stdout
    assert dst.is_file() and not (tmp_path / "weights" / "volo_d1_224").exists()
    variables, meta = load_weights(dst)
    assert meta["model"] == NAME and meta["overrides"] == {}
    assert meta["source"] == src.name and meta["class_names"] == imagenet_class_names()
    np.testing.assert_array_equal(
        variables["params"]["cls_token"], torch_model.cls_token.detach().numpy()
    )
    at_384 = load_weights_into(dst, timm_pairs.jax_volo("volo_d1_384"), "volo_d1_384")
    # The position grid resampled as timm resamples it (antialiased bicubic), the rest as is.
    from timm.layers import resample_abs_pos_embed_nhwc

    expected = resample_abs_pos_embed_nhwc(torch_model.pos_embed.detach(), [24, 24]).numpy()
    pos_embed = at_384["params"]["pos_embed"]
    assert pos_embed.shape == (1, 24, 24, 384)
    np.testing.assert_allclose(pos_embed, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_array_equal(
        at_384["params"]["head"]["kernel"], variables["params"]["head"]["kernel"]
    )
    with pytest.raises(CheckpointError, match="holds weights for volo_d1_224"):
        load_weights(dst, expected_model="volo_d2_224")


def test_a_converted_file_gives_timms_logits(tmp_path, tiny):
    from safetensors.torch import save_file

    from volo_jax.convert import convert_checkpoint

    overrides, torch_model, _ = tiny
    src = tmp_path / "model.safetensors"  # timm's own format, read without torch
    save_file(torch_model.state_dict(), src)
    names = [f"kind {i}" for i in range(overrides["num_classes"])]
    dst = tmp_path / "tiny.safetensors"  # the directory form loads the same (test_weights)
    convert_checkpoint(NAME, src, dst, class_names=names, **overrides)
    model = timm_pairs.jax_volo(NAME, **overrides)
    variables = load_weights_into(dst, model, NAME)
    images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    expected, _ = timm_pairs.timm_logits(torch_model, images)
    np.testing.assert_allclose(np.asarray(model.apply(variables, images)), expected, atol=1e-4)
    assert load_weights(dst)[1]["class_names"] == names


def test_class_names_must_match_the_model_and_weights_are_no_source(tmp_path, tiny):
    from safetensors.torch import save_file

    from volo_jax.convert import convert_checkpoint

    overrides, torch_model, _ = tiny
    src = tmp_path / "model.safetensors"
    save_file(torch_model.state_dict(), src)
    with pytest.raises(CheckpointError, match="3 class names for volo_d1_224, which has 17"):
        convert_checkpoint(NAME, src, tmp_path / "x.safetensors", class_names="abc", **overrides)
    converted = tmp_path / "w.safetensors"
    convert_checkpoint(NAME, src, converted, **overrides)
    with pytest.raises(CheckpointError, match="is volo-jax weights already"):
        read_state_dict(converted)


@pytest.mark.parametrize(
    ("source", "target"), [((14, 14), (24, 24)), ((28, 28), (14, 14)), ((7, 9), (12, 5))]
)
def test_pos_embed_resize_is_torchs_bicubic_with_and_without_antialias(source, target):
    """timm's resize (antialias=True) and the official code's `resize_pos_embed_4d`
    (`F.interpolate(mode='bicubic')`, antialias=False), up and down; the two differ."""
    from volo_jax.convert import resize_pos_embed

    grid = np.random.default_rng(0).standard_normal((1, *source, 6)).astype(np.float32)
    results = {}
    for antialias in (True, False):
        expected = (
            torch.nn.functional.interpolate(
                torch.from_numpy(grid).permute(0, 3, 1, 2),
                size=target,
                mode="bicubic",
                align_corners=False,
                antialias=antialias,
            )
            .permute(0, 2, 3, 1)
            .numpy()
        )
        results[antialias] = resize_pos_embed(grid, target, antialias=antialias)
        np.testing.assert_allclose(results[antialias], expected, rtol=0, atol=1e-5)
    assert np.abs(results[True] - results[False]).max() > 1e-2


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "volo_jax.convert",
            "--model",
            "volo_d7",
            "--src",
            "x.pth",
            "--dst",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown model 'volo_d7'" in done.stderr and "volo_d1_224" in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "volo_jax.convert",
            "--model",
            NAME,
            "--src",
            str(tmp_path / "missing.pth"),
            "--dst",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "checkpoint file not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_weights_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="weights directory not found"):
        load_weights(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"make one with: volo-jax-convert --model NAME"):
        load_weights(tmp_path)
