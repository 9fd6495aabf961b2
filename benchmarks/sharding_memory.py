"""Per-device memory of a VOLO train step under a mesh and a sharding preset.

Prints the bytes one device holds for the parameters, the AdamW state (and EMA, if
on), from the shardings' shard shapes, and what XLA's compiled train step reports
(`memory_analysis()`: arguments, outputs, temporaries, i.e. activations and
gradients). With `--sharding=fsdp` on a mesh with fsdp=N the state shrinks ~N times.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.sharding_memory \\
      --model=volo_d1_224 --mesh=1,8,1 --sharding=replicated --sharding=fsdp
"""

from __future__ import annotations

import argparse
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from configs.common import get_base_config
from volo_jax.models import create_model, model_kwargs
from volo_jax.sharding import (
    batch_sharding,
    create_mesh,
    logical_axes,
    preset_rules,
    replicated,
    state_shardings,
    use_mesh,
    with_shardings,
)
from volo_jax.training import train
from volo_jax.training.config import model_overrides

MIB = 1024 * 1024


def per_device_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes of the largest shard of each leaf, summed: what one device stores."""
    total = 0
    for leaf, sharding in zip(
        jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings), strict=True
    ):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def make_config(model: str, batch_size: int, ema: bool) -> Any:
    config = get_base_config()
    config.model = model
    config.img_size = model_kwargs(model).get("img_size", 224)
    config.train.batch_size = batch_size
    config.train.ema_decay = 0.9999 if ema else 0.0
    return config


def measure(
    model_name: str,
    mesh_sizes: tuple[int, int, int],
    preset: str,
    batch_size: int,
    ema: bool = False,
) -> dict[str, float]:
    """MiB per device: params, opt_state, ema, and the compiled step's arguments,
    outputs and temporaries."""
    config = make_config(model_name, batch_size, ema)
    model = create_model(config.model, **model_overrides(config))
    template, _ = train.abstract_train_state(config, model, 1000)
    mesh = create_mesh(dict(zip(("data", "fsdp", "model"), mesh_sizes, strict=True)))
    shardings = state_shardings(template, logical_axes(model), mesh, preset_rules(preset))
    result = {
        name: per_device_bytes(getattr(template, name), getattr(shardings, name)) / MIB
        for name in ("params", "opt_state", "ema_params")
        if getattr(template, name) is not None
    }
    step = jax.jit(
        functools.partial(
            train.train_step, model=model, teacher=None, opts=train.StepOptions.from_config(config)
        ),
        in_shardings=(shardings, batch_sharding(mesh), replicated(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
    size = config.img_size
    batch = {
        "image": jax.ShapeDtypeStruct(
            (batch_size, size, size, 3), jnp.float32, sharding=batch_sharding(mesh)
        ),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding(mesh)),
    }
    with use_mesh(mesh):
        compiled = step.lower(with_shardings(template, shardings), batch, None).compile()
    stats = compiled.memory_analysis()
    if stats is not None:
        result.update(
            step_arguments=stats.argument_size_in_bytes / MIB,
            step_outputs=stats.output_size_in_bytes / MIB,
            step_aliased=stats.alias_size_in_bytes / MIB,
            step_temporaries=stats.temp_size_in_bytes / MIB,
        )
        # Live at once: inputs, outputs not written in place of a donated input, temporaries.
        result["step_peak_estimate"] = (
            result["step_arguments"]
            + result["step_outputs"]
            - result["step_aliased"]
            + result["step_temporaries"]
        )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="volo_d1_224")
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,model sizes (-1: the rest)")
    parser.add_argument(
        "--sharding",
        action="append",
        default=None,
        help="preset(s): replicated, fsdp, tensor, auto (repeatable)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="global batch (default: 2 per device)"
    )
    parser.add_argument("--ema", action="store_true", help="keep an EMA of the params")
    args = parser.parse_args(argv)
    values = [int(s) for s in args.mesh.split(",")]
    if len(values) != 3:
        parser.error(f"--mesh needs 3 sizes data,fsdp,model, got {args.mesh!r}")
    sizes = dict(zip(("data", "fsdp", "model"), values, strict=True))
    shape = tuple(create_mesh(sizes).shape.values())
    batch = args.batch_size or 2 * jax.device_count()
    presets = args.sharding or ["replicated", "fsdp"]
    print(
        f"{args.model}, mesh data x fsdp x model = {' x '.join(map(str, shape))} "
        f"({jax.device_count()} {jax.default_backend()} devices), global batch {batch}, "
        "float32; MiB per device"
    )
    rows = {preset: measure(args.model, shape, preset, batch, args.ema) for preset in presets}
    keys = list(dict.fromkeys(k for row in rows.values() for k in row))
    print(f"{'':18s}" + "".join(f"{p:>14s}" for p in presets))
    for key in keys:
        print(f"{key:18s}" + "".join(f"{rows[p].get(key, float('nan')):14.1f}" for p in presets))


if __name__ == "__main__":
    main()
