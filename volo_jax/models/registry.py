"""Model registry: timm's model names, their constructors and pretrained configs.

`create_model('volo_d1_224', num_classes=10, dtype=jnp.bfloat16)` builds the Flax
module for the platform it will run on; `pretrained_cfg(name)` gives the preprocessing
its weights expect.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from volo_jax import platforms
from volo_jax.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from volo_jax.errors import ConfigError, UnknownModelError
from volo_jax.ops.attention import resolve_attention
from volo_jax.ops.outlook import resolve_implementation


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
    """What a model's published weights expect of their input (timm's `pretrained_cfg`)."""

    input_size: tuple[int, int, int] = (3, 224, 224)  # (C, H, W), as timm
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    num_classes: int = 1000
    url: str = ""
    hf_hub_id: str = ""

    @property
    def img_size(self) -> int:
        return self.input_size[-1]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    module: type[nn.Module]
    kwargs: dict[str, Any]
    cfg: PretrainedCfg


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, module: type[nn.Module], cfg: PretrainedCfg, **kwargs: Any) -> None:
    """Registers `name` as `module(**kwargs)` with the pretrained config `cfg`."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = ModelEntry(name, module, kwargs, cfg)


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def _entry(name: str) -> ModelEntry:
    base = name.split(".")[0]  # accept timm's 'volo_d1_224.sail_in1k'
    if base not in _REGISTRY:
        close = [n for n in _REGISTRY if base.rsplit("_", 1)[0] in n] or list_models()
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(sorted(close))}")
    return _REGISTRY[base]


def pretrained_cfg(name: str) -> PretrainedCfg:
    """The input size, crop_pct, interpolation, mean and std of `name`'s weights."""
    return _entry(name).cfg


def model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of `name` with `overrides` applied and checked."""
    entry = _entry(name)
    fields = {f.name for f in dataclasses.fields(entry.module)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"{name}: unknown model argument(s) {unknown}; valid ones: {', '.join(sorted(fields))}"
        )
    kwargs = {"img_size": entry.cfg.img_size, "num_classes": entry.cfg.num_classes}
    kwargs.update(entry.kwargs)
    kwargs.update(overrides)
    return {k: _hashable(v) for k, v in kwargs.items()}


def _hashable(value: Any) -> Any:
    """Module fields must be hashable: lists become tuples, dicts sorted item tuples."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def create_model(name: str, platform: platforms.Where = None, **overrides: Any) -> nn.Module:
    """Builds a registered model for `platform`; `overrides` replace any constructor
    argument.

    `platform`: the platform the model will run on, or the device, devices or mesh it
    will run on ('cpu', 'gpu', 'tpu', a `jax.Device`, a `Mesh`; None: the default
    backend's). It picks the products, outlook attention and backward passes the model
    is traced with (`volo_jax.platforms.RULES`), so `jax.jit(model.apply)` runs that
    platform's fast path; an outlook attention and a self-attention of 'auto' are
    resolved here, for the devices' kind where they are given or the default backend's
    devices for None (`ops.outlook.resolve_implementation`,
    `ops.attention.resolve_attention`).
    """
    entry = _entry(name)
    kwargs = model_kwargs(name, **overrides)
    fields = {f.name: f for f in dataclasses.fields(entry.module)}
    target = platforms.platform_of(platform)
    if "platform" in fields:
        kwargs["platform"] = target
    # The devices: those given, or the default backend's (a name says no more than the
    # platform).
    devices = jax.devices() if platform is None else platform
    kind = platforms.device_kind_of(devices)
    if "outlook_impl" in fields:
        impl = kwargs.get("outlook_impl", fields["outlook_impl"].default)
        kwargs["outlook_impl"] = resolve_implementation(impl, target, kind)
    if "attention_impl" in fields:
        impl = kwargs.get("attention_impl", fields["attention_impl"].default)
        capability = platforms.compute_capability_of(devices)
        kwargs["attention_impl"] = resolve_attention(impl, target, kind, capability)
    return entry.module(**kwargs)
