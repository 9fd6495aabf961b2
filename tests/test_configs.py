"""Configs: every file loads and validates; bad values and unknown fields are named."""

from __future__ import annotations

import glob
import importlib
import os
import subprocess
import sys

import pytest

from volo_jax.errors import ConfigError
from volo_jax.training.config import validate_config
from volo_jax.training.optim import peak_learning_rate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    config.batch_size = 512
    assert peak_learning_rate(config) == pytest.approx(lr / 2)
    assert config.model_overrides.drop_path_rate == drop_path
    assert (config.optim.warmup_epochs, config.num_epochs, config.cooldown_epochs) == (20, 300, 10)
    assert (config.optim.weight_decay, config.label_smoothing, config.seed) == (0.05, 0.1, 42)
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
    assert (config.num_epochs, config.optim.warmup_epochs) == (30, 5)
    # The README's lr is 8e-6 whatever the batch; MixToken pairs within a GPU's share.
    assert config.batch_size == batch and peak_learning_rate(config) == pytest.approx(8e-6)
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
        ("batch_size", 30, "config.batch_size"),  # with grad_accum_steps = 4
        ("model", "volo_d9_224", "config.model"),
        ("init_from", "/no/such/dir", "config.init_from"),
        ("optim.warmup_epochs", 400, "config.optim.warmup_epochs"),
        ("augment.randaugment", "rand-m9-foo3", "config.augment.randaugment"),
        ("teacher.model", "volo_d1_224", "config.teacher"),  # without teacher.init_from
        ("token_label.roi_sampling_ratio", 0, "config.token_label.roi_sampling_ratio"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    config = load("default")
    config.grad_accum_steps = 4
    section, _, name = field.rpartition(".")
    setattr(config[section] if section else config, name, value)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
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
