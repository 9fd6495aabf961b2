"""Multi-host set-up: `jax.distributed.initialize` as `config.distributed` asks.

`maybe_initialize_distributed(config.distributed)` runs first in `train_and_evaluate` and
`evaluate`, before anything touches the devices; `distributed_settings` checks the config
field and gives the arguments (`volo_jax.training.config.validate_config` calls it too).
On the CPU, cross-process collectives use gloo.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import jax

from volo_jax.errors import ConfigError

#: Fields of `config.distributed` that name the cluster explicitly (all or none).
CLUSTER_FIELDS = ("coordinator_address", "num_processes", "process_id")
DISTRIBUTED_FIELDS = ("enabled", *CLUSTER_FIELDS, "initialization_timeout")
DISTRIBUTED_ENV = "VOLO_JAX_DISTRIBUTED"
# Installed JAX plugins that bring an accelerator backend (CUDA, ROCm, TPU).
_ACCELERATOR_MODULES = (
    "libtpu",
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm60_plugin",
    "jax_rocm7_plugin",
)


def distributed_settings(settings: Any) -> dict[str, Any] | None:
    """The `jax.distributed.initialize` arguments that `config.distributed` asks for, or
    None when it is off. Raises ConfigError (naming the field) for bad values.

    `settings`: None / False (off), True (auto-detect the cluster: Cloud TPU, Slurm,
    Open MPI, k8s), or a mapping {'enabled', 'coordinator_address', 'num_processes',
    'process_id', 'initialization_timeout'} where `enabled` auto-detects and the three
    cluster fields, all given, name the cluster explicitly (they imply `enabled`).
    """
    if settings is None or isinstance(settings, bool):
        return {} if settings else None
    if hasattr(settings, "to_dict"):  # an ml_collections.ConfigDict
        settings = settings.to_dict()
    if not isinstance(settings, Mapping):
        raise ConfigError(
            f"config.distributed: expected True/False or a mapping of "
            f"{list(DISTRIBUTED_FIELDS)}, got {settings!r}"
        )
    unknown = sorted(set(settings) - set(DISTRIBUTED_FIELDS))
    if unknown:
        raise ConfigError(
            f"config.distributed: unknown fields {unknown}; the fields are "
            f"{list(DISTRIBUTED_FIELDS)}"
        )
    enabled = settings.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"config.distributed.enabled: must be True or False, got {enabled!r}")
    given = {f: settings[f] for f in CLUSTER_FIELDS if settings.get(f) is not None}
    if given and len(given) < len(CLUSTER_FIELDS):
        missing = [f for f in CLUSTER_FIELDS if f not in given]
        raise ConfigError(
            f"config.distributed: {sorted(given)} given without {missing}; set all of "
            f"{list(CLUSTER_FIELDS)} (the same coordinator and count on every process, "
            "each process its own id), or none of them to auto-detect the cluster"
        )
    timeout = settings.get("initialization_timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0
    ):
        raise ConfigError(
            "config.distributed.initialization_timeout: must be a positive "
            f"number of seconds, got {timeout!r}"
        )
    if not (enabled or given):
        return None
    args: dict[str, Any] = {} if timeout is None else {"initialization_timeout": timeout}
    if given:
        args.update(_cluster_args(**given))
    return args


def _cluster_args(coordinator_address: Any, num_processes: Any, process_id: Any) -> dict:
    """Checked explicit cluster fields (see `distributed_settings`)."""
    host, _, port = str(coordinator_address).rpartition(":")
    if not (
        isinstance(coordinator_address, str) and host and port.isdigit() and 0 < int(port) < 65536
    ):
        raise ConfigError(
            "config.distributed.coordinator_address: must be 'host:port' of process 0 "
            f"(e.g. '10.0.0.1:1234', the same on every process), got {coordinator_address!r}"
        )
    for field, value in (("num_processes", num_processes), ("process_id", process_id)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config.distributed.{field}: must be an integer, got {value!r}")
    if num_processes < 1:
        raise ConfigError(
            "config.distributed.num_processes: must be >= 1 (the number of "
            f"processes of the job), got {num_processes}"
        )
    if not 0 <= process_id < num_processes:
        raise ConfigError(
            f"config.distributed.process_id: must be in [0, num_processes={num_processes}), "
            f"got {process_id}; give each process its own id 0..{num_processes - 1}"
        )
    return {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }


def _backend_will_be_cpu() -> bool:
    """Whether JAX will compute on the CPU, decided without starting a backend: the
    first of JAX_PLATFORMS (`jax_platforms`) if set, otherwise no accelerator plugin
    (CUDA, ROCm, TPU) installed."""
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_MODULES)


def maybe_initialize_distributed(settings: Any = None) -> bool:
    """Calls `jax.distributed.initialize` as `config.distributed` asks (see
    `distributed_settings`; where that leaves it off, the env var VOLO_JAX_DISTRIBUTED=1
    turns on auto-detection). Must run before anything touches the devices. Returns
    whether JAX is now distributed.

    When the computation will run on the CPU, cross-process CPU collectives (gloo) are
    switched on first unless another implementation is chosen; accelerators are left
    alone.
    """
    args = distributed_settings(settings)
    if args is None and os.environ.get(DISTRIBUTED_ENV, "0") == "1":
        args = {}
    if args is None:
        return False
    if jax.distributed.is_initialized():
        return True
    if _backend_will_be_cpu() and not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**args)
    except ValueError as err:  # auto-detection found no cluster, or JAX rejected a value
        message = f"config.distributed: jax.distributed.initialize failed: {str(err).rstrip('.')}"
        if "coordinator_address" not in args:
            message += (
                "; outside Cloud TPU, Slurm, Open MPI and k8s, set coordinator_address, "
                "num_processes and process_id"
            )
        raise ConfigError(message) from err
    return True
