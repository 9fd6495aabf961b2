"""Memory of one VOLO train step on one device, from XLA's plan of the compiled step.

For each variant's recipe config (`configs.common.variant_config`, at its batch per device)
and each setting of `model_overrides.remat`, compiles `volo_jax.training.train.train_step`
ahead of time, never runs it, and reports `compiled.memory_analysis()`: the arguments
(train state and batch), outputs, the bytes of outputs written in place of donated
arguments, the temporaries (activations, gradients, the optimizer's intermediates) and
the peak estimate arguments + outputs - aliased + temporaries.

`--program accelerator` (the default) builds the model for no platform in particular
(outlook attention's `impl="auto"` is 'slices', XLA's own products and autodiff: what a
GPU or TPU runs, less the Pallas kernel); `--program cpu` builds it for the CPU
(`volo_jax.platforms.RULES["cpu"]`). Either way the plan is the
one XLA:CPU makes for that program: compiling for a TPU or a GPU needs that backend, and
`jax.export` gives the program (StableHLO) for any platform but no memory plan.

  python -m benchmarks.train_memory                                # D1-D5, batch 128, remat off/on
  python -m benchmarks.train_memory --variants d1 --batch 8 --program cpu --dtypes float32,bfloat16
  python -m benchmarks.train_memory --variants d1 --batch 8 --no-donate --json d1.json
  python -m benchmarks.train_memory --variants d1 --batch 8 --program cpu --cpu-scheduler memory
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MIB = 2**20
VARIANTS = ("d1", "d2", "d3", "d4", "d5")
RECIPE_BATCH_PER_DEVICE = 128  # the README's 8 GPUs x 128 images at 224 (configs/common.py)


@dataclasses.dataclass(frozen=True)
class Setting:
    variant: str = "d1"
    batch: int = RECIPE_BATCH_PER_DEVICE
    remat: bool = False
    dtype: str = "float32"  # the compute dtype (parameters stay float32)
    donate: bool = True
    program: str = "accelerator"  # or 'cpu'
    scheduler: str = "default"  # XLA:CPU's instruction scheduler (ops.cpu.CPU_SCHEDULERS)


def _bytes(tree: Any) -> int:
    import jax
    import numpy as np

    return sum(
        math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree_util.tree_leaves(tree)
    )


def measure(setting: Setting) -> dict[str, Any]:
    """Compiles the train step for `setting` (abstract inputs, nothing allocated) ->
    its memory plan in MiB and the compile time."""
    import jax
    import jax.numpy as jnp

    from configs.common import variant_config
    from volo_jax.models import create_model
    from volo_jax.platforms.cpu import compiler_options
    from volo_jax.training import train
    from volo_jax.training.config import model_overrides

    config = variant_config(setting.variant)
    config.model_overrides.remat = setting.remat
    config.dtype = setting.dtype
    platform = "cpu" if setting.program == "cpu" else None
    model = create_model(config.model, platform=platform, **model_overrides(config))
    state, _ = train.abstract_train_state(config, model, 1000)
    step = functools.partial(
        train.train_step, model=model, teacher=None, opts=train.StepOptions.from_config(config)
    )
    jitted = jax.jit(
        step,
        donate_argnums=(0,) if setting.donate else (),
        compiler_options=compiler_options("cpu", setting.scheduler),  # compiled by XLA:CPU
    )
    size = config.img_size
    batch = {
        "image": jax.ShapeDtypeStruct((setting.batch, size, size, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((setting.batch,), jnp.int32),
    }
    start = time.perf_counter()
    compiled = jitted.lower(state, batch, None).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    plan = {
        "arguments": stats.argument_size_in_bytes / MIB,
        "outputs": stats.output_size_in_bytes / MIB,
        "aliased": stats.alias_size_in_bytes / MIB,
        "temporaries": stats.temp_size_in_bytes / MIB,
    }
    plan["peak_estimate"] = (
        plan["arguments"] + plan["outputs"] - plan["aliased"] + plan["temporaries"]
    )
    return {
        **dataclasses.asdict(setting),
        "model": config.model,
        "img_size": size,
        "params_mib": _bytes(state.params) / MIB,
        "state_mib": _bytes(state) / MIB,
        "mib": plan,
        "compile_s": compile_s,
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| model | batch | remat | dtype | donate | program | scheduler | state | temporaries | "
        "peak estimate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mib = r["mib"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {'on' if r['remat'] else 'off'} | {r['dtype']} | "
            f"{'yes' if r['donate'] else 'no'} | {r['program']} | {r['scheduler']} | "
            f"{r['state_mib']:,.0f} | "
            f"{mib['temporaries']:,.0f} | {mib['peak_estimate']:,.0f} |"
        )
    return "\n".join(lines)


def _csv(value: str, allowed: Sequence[str] | None, what: str) -> list[str]:
    items = [v for v in value.split(",") if v]
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: expected a comma-separated subset of {allowed}, got {value!r}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=RECIPE_BATCH_PER_DEVICE)
    parser.add_argument("--remat", default="off,on", help="off, on or off,on")
    parser.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16")
    parser.add_argument("--no-donate", action="store_true", help="do not donate the state")
    parser.add_argument("--program", choices=("accelerator", "cpu"), default="accelerator")
    parser.add_argument(
        "--cpu-scheduler",
        default="default",
        choices=("default", "memory", "concurrency"),
        help="XLA:CPU's instruction scheduler (volo_jax.ops.cpu.CPU_SCHEDULERS)",
    )
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    import jax

    rows = []
    for variant in _csv(args.variants, VARIANTS, "variants"):
        for dtype in _csv(args.dtypes, ("float32", "bfloat16"), "dtypes"):
            for remat in _csv(args.remat, ("off", "on"), "remat"):
                setting = Setting(
                    variant,
                    args.batch,
                    remat == "on",
                    dtype,
                    not args.no_donate,
                    args.program,
                    args.cpu_scheduler,
                )
                row = measure(setting)
                rows.append(row)
                print(format_table([row]).splitlines()[-1], f"({row['compile_s']:.0f} s)")
                if args.json:  # after every row: a long run keeps what it measured
                    Path(args.json).write_text(
                        json.dumps({"backend": jax.default_backend(), "rows": rows}, indent=1)
                    )
    print(f"XLA:{jax.default_backend()} memory plans, MiB per device")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
