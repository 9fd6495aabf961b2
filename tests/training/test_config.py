"""Configs: every file loads and validates; bad values and unknown fields are named."""

from __future__ import annotations

import glob
import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from tests.support import REPO, without_cuda_plugin_lines
from volo_jax.errors import ConfigError
from volo_jax.models import create_model
from volo_jax.training.config import (
    POSITIVE_SIZES,
    model_overrides,
    token_grid,
    validate_config,
)
from volo_jax.training.optim import peak_learning_rate
from volo_jax.training.train import StepOptions

CONFIG_NAMES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if not os.path.basename(p).startswith(("_", "common"))
)


def load(name: str):
    """configs/<name>.py's get_config() (the repository root is on sys.path in tests)."""
    return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_validates(name, tmp_path):
    config = load(name)
    if config.requires_init:
        with pytest.raises(ConfigError, match="init_from"):
            validate_config(config)
        config.init_from = str(tmp_path)
    if config.model is None:  # configs/finetune.py: what complete_config reads from the
        config.model = "volo_d1_224"  # weights and the data
        config.img_size = 224
        config.dataset.name, config.dataset.num_classes = "my_photos", 5
    validate_config(config)


@pytest.mark.parametrize(
    ("variant", "lr", "drop_path"),
    [
        ("d1", 1.6e-3, 0.1),
        ("d2", 1e-3, 0.2),
        ("d3", 1e-3, 0.5),
        ("d4", 1e-3, 0.5),
        ("d5", 8e-4, 0.75),
    ],
)
def test_official_recipe(variant, lr, drop_path):
    config = load(f"volo_{variant}")
    assert config.model == f"volo_{variant}_224"
    assert peak_learning_rate(config) == pytest.approx(lr)
    config.train.batch_size = 512
    assert peak_learning_rate(config) == pytest.approx(lr / 2)
    assert config.model_overrides.drop_path_rate == drop_path
    train = config.train
    assert (config.optim.warmup_epochs, train.num_epochs, train.cooldown_epochs) == (20, 300, 10)
    assert (config.optim.weight_decay, train.label_smoothing, config.seed) == (0.05, 0.1, 42)
    assert (train.grad_accum_steps, train.ema_decay) == (1, 0.0)
    assert config.optim.grad_clip_norm == 0


@pytest.mark.parametrize(
    ("name", "img_size", "batch", "per_gpu"),
    [
        ("volo_d1_384", 384, 512, 64),  # README: 8 GPUs x 64
        ("volo_d2_384", 384, 384, 48),  # 8 x 48
        ("volo_d3_448", 448, 240, 30),  # 8 x 30
        ("volo_d4_448", 448, 240, 30),  # our choice: D3's
        ("volo_d5_448", 448, 240, 30),
        ("volo_d5_512", 512, 240, 30),
    ],
)
def test_finetune_recipe(name, img_size, batch, per_gpu, tmp_path):
    config = load(name)
    assert (config.model, config.img_size, config.requires_init) == (name, img_size, True)
    assert (config.optim.base_lr, config.optim.min_lr, config.optim.weight_decay) == (
        8e-6,
        4e-6,
        1e-8,
    )
    assert (config.train.num_epochs, config.optim.warmup_epochs) == (30, 5)
    # The README's lr is 8e-6 whatever the batch; MixToken pairs within a GPU's share.
    assert config.train.batch_size == batch and peak_learning_rate(config) == pytest.approx(8e-6)
    assert config.token_label.mix_group_size == per_gpu
    assert config.token_label.ground_truth and config.token_label.official_box_order
    config.init_from = str(tmp_path)
    validate_config(config)


def test_official_token_labeling_defaults():
    config = load("volo_d1")
    assert config.token_label.official_box_order is True
    assert config.token_label.roi_sampling_ratio == -1
    assert config.optim.per_epoch_schedule is True
    assert config.token_label.mix_group_size == 128


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mode", "predict", "config.mode"),
        ("dtype", "float16", "config.dtype"),
        ("matmul_precision", "bf16", "config.matmul_precision"),
        ("img_size", 100, "config.img_size"),
        ("train.batch_size", 30, "config.train.batch_size"),  # with grad_accum_steps = 4
        ("model", "volo_d9_224", "config.model"),
        ("init_from", "/no/such/dir", "config.init_from"),
        ("optim.warmup_epochs", 400, "config.optim.warmup_epochs"),
        ("augment.randaugment", "rand-m9-foo3", "config.augment.randaugment"),
        ("teacher.model", "volo_d1_224", "config.teacher"),  # without teacher.init_from
        ("token_label.roi_sampling_ratio", 0, "config.token_label.roi_sampling_ratio"),
        ("model_overrides.token_mixer", "outlok", "config.model_overrides.token_mixer"),
        ("model_overrides.outlook_impl", "plane", "config.model_overrides.outlook_impl"),
        ("model_overrides.attention_impl", "flash", "config.model_overrides.attention_impl"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    config = load("default")
    config.train.grad_accum_steps = 4
    section, _, name = field.rpartition(".")
    setattr(config[section] if section else config, name, value)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate_config(config)


@pytest.mark.parametrize("field", POSITIVE_SIZES)
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_sizes_are_named_as_such(field, value):
    config = load("default")
    section, _, name = field.rpartition(".")
    setattr(config[section] if section else config, name, value)
    with pytest.raises(ConfigError, match=rf"config\.{field}: must be positive, got {value}$"):
        validate_config(config)


def test_eval_mode_needs_init_from():
    config = load("volo_d1")
    config.mode = "eval"
    with pytest.raises(ConfigError, match=r"config\.init_from"):
        validate_config(config)


def test_unknown_model_override_is_named():
    config = load("default")
    config.model_overrides.layer_count = 3
    with pytest.raises(ConfigError, match="layer_count"):
        validate_config(config)


def test_the_platform_is_not_a_model_override():
    """The trainer builds the model for its mesh's platform; an override of it is a
    config error, not a clash of keyword arguments deep in the trainer."""
    config = load("default")
    config.model_overrides.platform = "tpu"
    with pytest.raises(ConfigError, match=r"model_overrides\.platform.*config\.mesh"):
        validate_config(config)


def _main(*flags: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "main.py"), *flags],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_line_errors_are_one_line(tmp_path):
    unknown = _main(
        "--config=configs/default.py", "--config.bogus_field=1", f"--workdir={tmp_path}"
    )
    assert unknown.returncode != 0
    assert "bogus_field" in unknown.stderr and "Traceback" not in unknown.stderr
    bad = _main("--config=configs/default.py", "--config.mode=infer", f"--workdir={tmp_path}")
    assert bad.returncode == 2
    assert "error: config.mode" in bad.stderr and "Traceback" not in bad.stderr


def _own_lines(stderr: str) -> list[str]:
    return without_cuda_plugin_lines(stderr).splitlines()


def test_a_missing_config_file_or_a_negative_batch_is_one_line(tmp_path):
    missing = _main("--config=configs/volo_d9.py", f"--workdir={tmp_path}")
    assert missing.returncode == 2
    assert _own_lines(missing.stderr) == [
        f"error: --config: no config file configs/volo_d9.py (the configs are in "
        f"{REPO / 'configs'}, e.g. configs/volo_d1.py)"
    ], missing.stderr
    negative = _main(
        "--config=configs/default.py", "--config.train.batch_size=-3", f"--workdir={tmp_path}"
    )
    assert negative.returncode == 2
    assert _own_lines(negative.stderr) == [
        "error: config.train.batch_size: must be positive, got -3"
    ], negative.stderr


def test_old_command_line_of_a_moved_field_names_its_new_place(tmp_path):
    moved = _main("--config=configs/default.py", "--config.batch_size=256", f"--workdir={tmp_path}")
    assert moved.returncode == 2
    assert "error: --config.batch_size: moved to --config.train.batch_size" in moved.stderr
    assert "Traceback" not in moved.stderr


def test_a_moved_field_set_in_a_config_file_names_its_new_place():
    config = load("default")  # not locked: a config file may add fields
    config.num_epochs = 5
    with pytest.raises(
        ConfigError, match=r"config\.num_epochs: moved to config\.train\.num_epochs"
    ):
        validate_config(config)


def _parse(*overrides: str):
    """configs/default.py with command-line overrides, parsed and locked as main.py does."""
    argv = ["main.py", f"--config={os.path.join(REPO, 'configs', 'default.py')}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    return flag_values.config


@pytest.mark.parametrize(
    "value",
    [
        '{"block_size": 2, "halo_size": 1}',  # the JSON string it once was: still parses
        "{'block_size': 2, 'halo_size': 1}",
    ],
)
def test_token_mixer_kwargs_from_the_command_line(value):
    """The mixer's keyword arguments, a nested config, given as a whole (the old JSON
    command line keeps working) reach the model."""
    config = _parse(
        "--config.model_overrides.token_mixer=halo",
        f"--config.model_overrides.token_mixer_kwargs={value}",
    )
    validate_config(config)
    overrides = model_overrides(config)
    assert overrides["token_mixer_kwargs"] == {"block_size": 2, "halo_size": 1}
    model = create_model(config.model, **overrides)
    # block_size 2 divides the 4 x 4 grid of the 32 px digits (halo's default, 7, does not).
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_token_grid_comes_from_the_model():
    """img_size / (patch_size x pooling_scale): 32 / 16 for the default; a model with
    4-px patches has 8-px tokens, and the aux tokens the model returns match the grid."""
    config = load("default")
    assert token_grid(config) == 2
    config.model_overrides.patch_size = 4
    config.img_size = 40
    validate_config(config)
    assert token_grid(config) == StepOptions.from_config(config).grid == 5
    model = create_model(config.model, **model_overrides(config))
    images = jnp.zeros((1, 40, 40, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    _, aux = jax.eval_shape(lambda v: model.apply(v, images, return_dense=True), variables)
    assert aux.shape[1] == token_grid(config) ** 2
    config.img_size = 36
    with pytest.raises(ConfigError, match=r"config\.img_size: must be a positive multiple of 8"):
        validate_config(config)
