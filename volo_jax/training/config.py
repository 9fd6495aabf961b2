"""The one place that checks a training / evaluation config (once all command-line
overrides are applied), and the values derived from it that several modules read.

`validate_config` raises ConfigError naming the field for every value that is unknown, out
of range or inconsistent with another: the model and its overrides, the weights to load,
the mesh, sharding and multi-host fields, the data, the training recipe, the augmentation
and the token-labeling targets. Fields that moved (`MOVED_FIELDS`) are named with their new
place, on the command line (main.py) and in a config file alike.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from volo_jax.data.location import DIGITS
from volo_jax.data.transforms import parse_randaugment
from volo_jax.errors import ConfigError, DatasetError, UnknownModelError
from volo_jax.models import create_model, model_kwargs
from volo_jax.models.volo import MIXER_NAMES
from volo_jax.ops.attention import ATTENTION
from volo_jax.ops.outlook import IMPLEMENTATIONS as OUTLOOK_IMPLEMENTATIONS
from volo_jax.paths import as_path, is_remote
from volo_jax.platforms.cpu import CPU_SCHEDULERS
from volo_jax.sharding import mesh_shape, rules_from_config
from volo_jax.sharding.distributed import distributed_settings
from volo_jax.weights import is_weights_file, read_metadata, weights_exist

MODES = ("train", "eval")
DTYPES = ("float32", "bfloat16")
MATMUL_PRECISIONS = ("default", "bfloat16", "tensorfloat32", "float32", "highest", "fastest")
INTERPOLATIONS = ("bilinear", "bicubic", "random")
#: Old field -> its place now (the training fields are grouped under `config.train`).
MOVED_FIELDS = {
    name: f"train.{name}"
    for name in (
        "batch_size",
        "grad_accum_steps",
        "num_epochs",
        "cooldown_epochs",
        "label_smoothing",
        "ema_decay",
    )
}


#: optim.name's values (volo_jax.training.optim.create_optimizer).
OPTIMIZERS = ("adamw", "sgd")


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {message}")


#: Sizes and counts that must be positive whatever else they must be (checked first, so
#: that -3 gets "must be positive" rather than a divisibility rule).
POSITIVE_SIZES = (
    "img_size",
    "train.batch_size",
    "train.grad_accum_steps",
    "train.num_epochs",
    "train.num_steps",
    "eval.batch_size",
    "token_label.mix_group_size",
)


def _require_positive_sizes(config: ml_collections.ConfigDict) -> None:
    for field in POSITIVE_SIZES:
        value = config
        for part in field.split("."):
            value = value.get(part) if isinstance(value, ml_collections.ConfigDict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            _require(value > 0, field, f"must be positive, got {value}")


def _require_init_for_model(config: ml_collections.ConfigDict) -> None:
    _require(
        bool(config.init_from),
        "init_from",
        "the weights to start from are required (config.model is None: the model is the "
        "one they hold)",
    )


def complete_config(config: ml_collections.ConfigDict, workdir: str | None) -> None:
    """Fills in what a config leaves to its weights and its data (configs/finetune.py):
    with config.model None, the model, its overrides and (if None) img_size from
    init_from's metadata; with dataset.num_classes None, the number of classes of the
    dataset, and with dataset.class_names None their names (stored with the final
    weights). ConfigError if init_from is needed and missing."""
    _require(
        bool(config.dataset.name),
        "dataset.name",
        "required: an image folder (DIR/<split>/<class>/<image>) or a prepared TFDS dataset",
    )
    with config.unlocked():
        if config.model is None:
            _require_init_for_model(config)
            _require(
                weights_exist(config.init_from), "init_from", _weights_not_found(config.init_from)
            )
            meta = read_metadata(config.init_from)
            config.model = meta["model"]
            given = config.model_overrides.to_dict()
            for key, value in meta.get("overrides", {}).items():
                if key not in given and key not in ("img_size", "num_classes", "dtype"):
                    config.model_overrides[key] = value
            if config.img_size is None:
                config.img_size = (
                    meta.get("overrides", {}).get("img_size") or create_model(config.model).img_size
                )
        if config.dataset.num_classes is None or config.dataset.class_names is None:
            from volo_jax.data.input_pipeline import class_names
            from volo_jax.data.location import dataset_location

            split = config.dataset.train_split if config.mode == "train" else None
            known = config.dataset.num_classes is not None
            # With num_classes given, names are a nicety: a dataset without them (or not
            # there) is for the input pipeline to report.
            with contextlib.suppress(DatasetError) if known else contextlib.nullcontext():
                names = class_names(
                    dataset_location(config.dataset.name, config.dataset.data_dir, workdir),
                    split or config.dataset.eval_split,
                    config.dataset.data_dir,
                    config.dataset.label_key,
                )
                if not known:
                    config.dataset.num_classes = len(names)
                if len(names) == config.dataset.num_classes:
                    config.dataset.class_names = tuple(names)


def _weights_not_found(path: str) -> str:
    return f"weights {'file' if is_weights_file(path) else 'directory'} not found: {path}"


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError, naming the field, for a value that is unknown, out of range
    or inconsistent with another."""
    for old in MOVED_FIELDS:
        _require(old not in config, old, f"moved to config.{MOVED_FIELDS[old]}")
    _require(config.mode in MODES, "mode", f"must be one of {MODES}, got {config.mode!r}")
    _require_positive_sizes(config)
    if config.model is None:  # configs/finetune.py: `complete_config` takes it from init_from
        _require_init_for_model(config)
        _require(False, "model", "None: complete_config(config) reads it from init_from")
    _require(config.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {config.dtype!r}")
    precision = config.get("matmul_precision")
    _require(
        precision is None or precision in MATMUL_PRECISIONS,
        "matmul_precision",
        f"must be None (JAX's default) or one of {MATMUL_PRECISIONS}, got {precision!r}",
    )
    scheduler = config.get("cpu_scheduler", "default")
    _require(
        scheduler in CPU_SCHEDULERS,
        "cpu_scheduler",
        f"must be one of {', '.join(CPU_SCHEDULERS)}, got {scheduler!r}",
    )
    impl = config.model_overrides.get("outlook_impl", "auto")
    impls = ("auto", *OUTLOOK_IMPLEMENTATIONS)  # create_model resolves 'auto'
    _require(
        impl in impls,
        "model_overrides.outlook_impl",
        f"must be one of {', '.join(impls)}, got {impl!r}",
    )
    impl = config.model_overrides.get("attention_impl", "auto")
    impls = ("auto", *ATTENTION)
    _require(
        impl in impls,
        "model_overrides.attention_impl",
        f"must be one of {', '.join(impls)}, got {impl!r}",
    )
    model = _model(config)
    pixels = _token_pixels(model)
    if hasattr(model, "token_mixer"):  # VOLO's outlooker stage: read when traced
        _require(
            model.token_mixer in MIXER_NAMES,
            "model_overrides.token_mixer",
            f"must be one of {', '.join(MIXER_NAMES)}, got {model.token_mixer!r}",
        )
    step = pixels or 1  # a model without a token grid: any positive size
    _require(
        config.img_size > 0 and config.img_size % step == 0,
        "img_size",
        f"must be a positive multiple of {step} (patch_size x pooling_scale of "
        f"{config.model}), got {config.img_size}"
        if pixels
        else f"must be positive, got {config.img_size}",
    )
    if config.mode == "eval" or config.requires_init:
        _require(
            bool(config.init_from),
            "init_from",
            f"weights are required, a .safetensors file or a weights directory "
            f"(mode={config.mode!r}"
            f"{', fine-tuning config' if config.requires_init else ''})",
        )
    if config.init_from:
        _require(weights_exist(config.init_from), "init_from", _weights_not_found(config.init_from))
    distributed_settings(config.get("distributed"))
    _validate_dataset(config)
    devices = batch_devices(config)
    _require(
        config.eval.batch_size > 0 and config.eval.batch_size % devices == 0,
        "eval.batch_size",
        f"must be a positive multiple of the {devices} devices of "
        f"the batch axes (mesh data x fsdp), got {config.eval.batch_size}",
    )
    if config.mode == "train" and config.token_label.enabled:
        _require(
            pixels is not None,
            "model",
            f"{config.model} has no token grid (patch_size x pooling_scale): training with "
            "token labeling needs a VOLO model (or --config.token_label.enabled=False)",
        )
    if config.mode == "train":
        _validate_training(config, devices)


def _validate_dataset(config: ml_collections.ConfigDict) -> None:
    dataset = config.dataset
    _require(
        dataset.num_classes >= 2,
        "dataset.num_classes",
        f"must be >= 2, got {dataset.num_classes}",
    )
    _require(
        not (dataset.name == DIGITS and dataset.data_dir and is_remote(dataset.data_dir)),
        "dataset.data_dir",
        f"{dataset.data_dir}: the built-in digits are written to a local folder; give a "
        "local path or leave it unset",
    )


def batch_devices(config: ml_collections.ConfigDict) -> int:
    """Devices the batch is split over (data x fsdp of `config.mesh`); checks the mesh
    sizes and the sharding preset (ConfigError)."""
    rules_from_config(config)
    data, fsdp, _ = mesh_shape(config.get("mesh"), jax.device_count())
    return data * fsdp


def _validate_training(config: ml_collections.ConfigDict, devices: int) -> None:
    train = config.train
    accum = train.grad_accum_steps
    _require(accum >= 1, "train.grad_accum_steps", f"must be >= 1, got {accum}")
    _require(
        train.batch_size > 0 and train.batch_size % (accum * devices) == 0,
        "train.batch_size",
        f"{train.batch_size} must be divisible by train.grad_accum_steps x "
        f"batch devices (mesh data x fsdp) = {accum} x {devices}",
    )
    _require(train.cooldown_epochs >= 0, "train.cooldown_epochs", "must be >= 0")
    _require(
        0 <= train.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {train.ema_decay}"
    )
    _require(0 <= train.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
    optim = config.optim
    _require(
        optim.name in OPTIMIZERS,
        "optim.name",
        f"must be one of {', '.join(OPTIMIZERS)}, got {optim.name!r}",
    )
    if train.num_steps:
        warmup = optim.warmup_steps or 0
        _require(
            0 <= warmup < train.num_steps,
            "optim.warmup_steps",
            f"must be in [0, train.num_steps={train.num_steps}), got {warmup}",
        )
    else:
        _require(
            0 <= optim.warmup_epochs < train.num_epochs,
            "optim.warmup_epochs",
            f"must be in [0, train.num_epochs={train.num_epochs}), got {optim.warmup_epochs}",
        )
    _require(optim.base_lr > 0, "optim.base_lr", f"must be positive, got {optim.base_lr}")
    _require(0 <= optim.min_lr <= optim.base_lr, "optim.min_lr", "must be in [0, base_lr]")
    _require(optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(optim.grad_clip_norm >= 0, "optim.grad_clip_norm", "must be >= 0 (0: off)")
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
        parse_randaugment(aug.randaugment)
    for name in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "max_steps"):
        value = config.get(name)
        _require(value is None or value > 0, name, f"must be positive (or None), got {value}")
    _require(config.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
    if config.token_label.enabled:
        _validate_token_label(config)


def _validate_token_label(config: ml_collections.ConfigDict) -> None:
    tl, teacher, train = config.token_label, config.teacher, config.train
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
    micro = train.batch_size // train.grad_accum_steps
    _require(
        not tl.mix_token or micro <= group or micro % group == 0,
        "token_label.mix_group_size",
        f"{group} does not divide the (micro-)batch of {micro} images (train.batch_size / "
        f"train.grad_accum_steps = {train.batch_size} / {train.grad_accum_steps}): MixToken "
        "pairs within groups of that many images; use a divisor of it (e.g. its share per "
        "device), or at least the batch for one group",
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
            as_path(tl.data_dir).is_dir(),
            "token_label.data_dir",
            f"directory not found: {tl.data_dir}",
        )
    if teacher.model:
        try:
            model_kwargs(teacher.model)
        except UnknownModelError as err:
            raise ConfigError(f"config.teacher.model: {err}") from None
        _require(
            weights_exist(teacher.init_from),
            "teacher.init_from",
            _weights_not_found(teacher.init_from),
        )
        try:
            classes = model_kwargs(teacher.model, **teacher_overrides(config))["num_classes"]
        except ConfigError as err:
            raise ConfigError(f"config.teacher.init_from: {err}") from None
        _require(
            classes == config.dataset.num_classes,
            "teacher",
            f"{teacher.init_from} predicts {classes} classes, the dataset has "
            f"{config.dataset.num_classes}",
        )


def _model(config: ml_collections.ConfigDict) -> nn.Module:
    """config.model with the config's overrides (the module, not initialised; ConfigError
    for an unknown model or argument)."""
    overrides = model_overrides(config)
    try:
        return create_model(config.model, **overrides)
    except UnknownModelError as err:
        raise ConfigError(f"config.model: {err}") from None
    except ConfigError as err:
        raise ConfigError(f"config.model_overrides: {err}") from None


def _token_pixels(model: nn.Module) -> int | None:
    """Image pixels per token side (VOLO: patch_size x pooling_scale), None for a model
    without a token grid."""
    patch, pooling = getattr(model, "patch_size", None), getattr(model, "pooling_scale", None)
    return None if patch is None or pooling is None else patch * pooling


def token_grid(config: ml_collections.ConfigDict) -> int:
    """Side of the model's token grid, img_size / (patch_size x pooling_scale): the grid of
    the aux tokens, the dense targets and MixToken's boxes (14 for VOLO at 224)."""
    pixels = _token_pixels(_model(config))
    if pixels is None:
        raise ConfigError(
            f"config.model: {config.model} has no token grid (patch_size x pooling_scale)"
        )
    return config.img_size // pixels


def model_overrides(config: ml_collections.ConfigDict) -> dict:
    """Constructor overrides of the model: the config's (token_mixer_kwargs a dict), plus
    size, classes and dtype."""
    overrides = config.model_overrides.to_dict()
    mixer_kwargs = overrides.get("token_mixer_kwargs") or {}
    if isinstance(mixer_kwargs, str):  # a config written for the JSON string it once was
        raise ConfigError(
            "config.model_overrides.token_mixer_kwargs: a nested config of keyword "
            f"arguments now, not a string, e.g. {{'block_size': 2}}; got {mixer_kwargs!r}"
        )
    overrides["token_mixer_kwargs"] = dict(mixer_kwargs)
    if "platform" in overrides:
        raise ConfigError(
            "config.model_overrides.platform: the model is built for the platform of the "
            "devices the run uses (config.mesh); remove this override"
        )
    overrides.update(img_size=config.img_size, num_classes=config.dataset.num_classes)
    if config.dtype == "bfloat16":
        overrides["dtype"] = jnp.bfloat16
    return overrides


def weights_overrides(config: ml_collections.ConfigDict) -> dict:
    """The constructor overrides that weights trained with `config` record (their
    metadata): `model_overrides` without the compute dtype."""
    return {k: v for k, v in model_overrides(config).items() if k != "dtype"}


def teacher_overrides(config: ml_collections.ConfigDict) -> dict:
    """Constructor overrides of the online teacher: the architecture its weights record
    (their model.json), at the student's resolution and compute dtype."""
    meta = read_metadata(config.teacher.init_from)
    overrides = {**meta.get("overrides", {}), "img_size": config.img_size}
    if config.dtype == "bfloat16":
        overrides["dtype"] = jnp.bfloat16
    return overrides


def matmul_precision(config: ml_collections.ConfigDict) -> contextlib.AbstractContextManager:
    """`jax.default_matmul_precision(config.matmul_precision)`, for the steps traced inside
    it (a no-op when unset). 'bfloat16' on the CPU runs float32 models' products with bf16
    operands (volo_jax/platforms/cpu.py); on TPU it is the default already."""
    precision = config.get("matmul_precision")
    return (
        contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)
    )
