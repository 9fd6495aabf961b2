"""Checks a training / evaluation config once all command-line overrides are applied."""

from __future__ import annotations

import contextlib
import json

import jax
import jax.numpy as jnp
import ml_collections

from volo_jax.errors import ConfigError, UnknownModelError
from volo_jax.models import model_kwargs

MODES = ("train", "eval")
DTYPES = ("float32", "bfloat16")
MATMUL_PRECISIONS = ("default", "bfloat16", "tensorfloat32", "float32", "highest", "fastest")
INTERPOLATIONS = ("bilinear", "bicubic", "random")
DIGITS = "sklearn_digits"  # the built-in dataset of configs/default.py
PATCH_GRID = 16  # image pixels per token side (patch 8 x pooling 2)


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {message}")


def _is_dir(path: str) -> bool:
    """A local or gs:// directory exists (`volo_jax.paths`)."""
    from volo_jax.paths import as_path

    return as_path(path).is_dir()


def _weights_exist(path: str) -> bool:
    """A .safetensors weights file or a weights directory exists (`volo_jax.weights`)."""
    from volo_jax.weights import weights_exist

    return weights_exist(path)


def _weights_not_found(path: str) -> str:
    from volo_jax.weights import is_weights_file

    return f"weights {'file' if is_weights_file(path) else 'directory'} not found: {path}"


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError, naming the field, for a value that is unknown, out of range
    or inconsistent with another."""
    _require(config.mode in MODES, "mode", f"must be one of {MODES}, got {config.mode!r}")
    _require(config.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {config.dtype!r}")
    precision = config.get("matmul_precision")
    _require(
        precision is None or precision in MATMUL_PRECISIONS,
        "matmul_precision",
        f"must be None (JAX's default) or one of {MATMUL_PRECISIONS}, got {precision!r}",
    )
    _require(
        config.img_size > 0 and config.img_size % PATCH_GRID == 0,
        "img_size",
        f"must be a positive multiple of {PATCH_GRID}, got {config.img_size}",
    )
    try:
        model_kwargs(config.model, **model_overrides(config))
    except UnknownModelError as err:
        raise ConfigError(f"config.model: {err}") from None
    except ConfigError as err:
        raise ConfigError(f"config.model_overrides: {err}") from None
    if config.mode == "eval" or config.requires_init:
        _require(
            bool(config.init_from),
            "init_from",
            f"weights are required, a .safetensors file or a weights directory "
            f"(mode={config.mode!r}"
            f"{', fine-tuning config' if config.requires_init else ''})",
        )
    if config.init_from:
        _require(
            _weights_exist(config.init_from), "init_from", _weights_not_found(config.init_from)
        )
    from volo_jax.sharding.mesh import distributed_settings

    distributed_settings(config.get("distributed"))
    _require(
        config.dataset.num_classes >= 2,
        "dataset.num_classes",
        f"must be >= 2, got {config.dataset.num_classes}",
    )
    devices = batch_devices(config)
    _require(
        config.eval.batch_size > 0 and config.eval.batch_size % devices == 0,
        "eval.batch_size",
        f"must be a positive multiple of the {devices} devices of "
        f"the batch axes (mesh data x fsdp), got {config.eval.batch_size}",
    )
    if config.mode == "train":
        _validate_training(config, devices)


def batch_devices(config: ml_collections.ConfigDict) -> int:
    """Devices the batch is split over (data x fsdp of `config.mesh`); checks the mesh
    sizes and the sharding preset (ConfigError)."""
    from volo_jax.sharding import mesh_shape, rules_from_config

    rules_from_config(config)
    data, fsdp, _ = mesh_shape(config.get("mesh"), jax.device_count())
    return data * fsdp


def _validate_training(config: ml_collections.ConfigDict, devices: int) -> None:
    accum = config.grad_accum_steps
    _require(accum >= 1, "grad_accum_steps", f"must be >= 1, got {accum}")
    _require(
        config.batch_size > 0 and config.batch_size % (accum * devices) == 0,
        "batch_size",
        f"{config.batch_size} must be divisible by grad_accum_steps x "
        f"batch devices (mesh data x fsdp) = {accum} x {devices}",
    )
    _require(config.num_epochs > 0, "num_epochs", f"must be positive, got {config.num_epochs}")
    _require(config.cooldown_epochs >= 0, "cooldown_epochs", "must be >= 0")
    optim = config.optim
    _require(
        0 <= optim.warmup_epochs < config.num_epochs,
        "optim.warmup_epochs",
        f"must be in [0, num_epochs={config.num_epochs}), got {optim.warmup_epochs}",
    )
    _require(optim.base_lr > 0, "optim.base_lr", f"must be positive, got {optim.base_lr}")
    _require(0 <= optim.min_lr <= optim.base_lr, "optim.min_lr", "must be in [0, base_lr]")
    _require(optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(optim.grad_clip_norm >= 0, "optim.grad_clip_norm", "must be >= 0 (0: off)")
    _require(0 <= config.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {config.ema_decay}")
    _require(0 <= config.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
    aug = config.augment
    _require(
        0 < aug.crop_scale[0] <= aug.crop_scale[1] <= 1,
        "augment.crop_scale",
        f"must be 0 < min <= max <= 1, got {aug.crop_scale}",
    )
    _require(
        0 < aug.crop_ratio[0] <= aug.crop_ratio[1],
        "augment.crop_ratio",
        f"must be 0 < min <= max, got {aug.crop_ratio}",
    )
    _require(
        aug.interpolation in INTERPOLATIONS,
        "augment.interpolation",
        f"must be one of {INTERPOLATIONS}, got {aug.interpolation!r}",
    )
    _require(
        0 <= aug.hflip <= 1 and 0 <= aug.erase_prob <= 1,
        "augment",
        "hflip and erase_prob are probabilities",
    )
    if aug.randaugment:
        from volo_jax.data.augment import parse_randaugment

        parse_randaugment(aug.randaugment)
    for name in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "max_steps"):
        value = config.get(name)
        _require(value is None or value > 0, name, f"must be positive (or None), got {value}")
    _require(config.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
    _validate_token_label(config)


def _validate_token_label(config: ml_collections.ConfigDict) -> None:
    tl, teacher = config.token_label, config.teacher
    _require(
        tl.cls_weight >= 0 and tl.dense_weight >= 0 and tl.cls_weight + tl.dense_weight > 0,
        "token_label",
        "cls_weight and dense_weight must be >= 0 with a positive sum",
    )
    ratio = tl.roi_sampling_ratio
    _require(
        isinstance(ratio, int) and (ratio >= 1 or ratio == -1),
        "token_label.roi_sampling_ratio",
        f"must be -1 (ceil(bin length) samples, the official) or a positive count, got {ratio!r}",
    )
    group = tl.mix_group_size
    _require(
        isinstance(group, int) and group >= 1,
        "token_label.mix_group_size",
        f"must be a positive number of images (official: 128), got {group!r}",
    )
    micro = config.batch_size // config.grad_accum_steps
    _require(
        not tl.mix_token or micro <= group or micro % group == 0,
        "token_label.mix_group_size",
        f"{group} does not divide the (micro-)batch of {micro} images (batch_size / "
        f"grad_accum_steps = {config.batch_size} / {config.grad_accum_steps}): MixToken pairs "
        "within groups of that many images; use a divisor of it (e.g. its share per device), "
        "or at least the batch for one group",
    )
    _require(
        bool(teacher.model) == bool(teacher.init_from),
        "teacher",
        "teacher.model and teacher.init_from go together",
    )
    _require(
        not (tl.data_dir and teacher.model),
        "token_label.data_dir",
        "precomputed label maps and an online teacher are exclusive",
    )
    if tl.data_dir:
        _require(
            _is_dir(tl.data_dir),
            "token_label.data_dir",
            f"directory not found: {tl.data_dir}",
        )
    if teacher.model:
        try:
            model_kwargs(teacher.model)
        except UnknownModelError as err:
            raise ConfigError(f"config.teacher.model: {err}") from None
        _require(
            _weights_exist(teacher.init_from),
            "teacher.init_from",
            _weights_not_found(teacher.init_from),
        )


def model_overrides(config: ml_collections.ConfigDict) -> dict:
    """Constructor overrides of the model: the config's, plus size, classes and dtype."""
    overrides = dict(config.model_overrides.to_dict())
    mixer_kwargs = overrides.pop("token_mixer_kwargs", "") or "{}"
    try:
        overrides["token_mixer_kwargs"] = json.loads(mixer_kwargs)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"config.model_overrides.token_mixer_kwargs must be a JSON object, got "
            f"{mixer_kwargs!r} ({err})"
        ) from None
    overrides.update(img_size=config.img_size, num_classes=config.dataset.num_classes)
    if config.dtype == "bfloat16":
        overrides["dtype"] = jnp.bfloat16
    return overrides


def matmul_precision(config: ml_collections.ConfigDict) -> contextlib.AbstractContextManager:
    """`jax.default_matmul_precision(config.matmul_precision)`, for the steps traced inside
    it (a no-op when unset). 'bfloat16' on the CPU runs float32 models' products with bf16
    operands (volo_jax/ops/cpu.py); on TPU it is the default already."""
    precision = config.get("matmul_precision")
    return (
        contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)
    )
