"""FLOPs, bytes and time of each VOLO block type, and the fraction of the machine's
measured matmul peak they reach.

  python -m benchmarks.block_costs [--model volo_d1_224] [--batch 8] [--json OUT.json]

FLOPs and bytes accessed are XLA's cost analysis of each block's compiled forward;
time is the median of `--reps` runs; the peak is a large float32 matmul measured in
the same process.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import volo_jax
from benchmarks.bench_volo import compile_stats, time_calls
from volo_jax.models.volo import ClassBlock, Outlooker, PatchEmbed, Transformer


def _median_seconds(fn: Callable[[], Any], reps: int) -> float:
    return time_calls(fn, jax.block_until_ready, reps, warmup=0)["median_s"]


def matmul_peak(reps: int = 5, n: int = 2048) -> float:
    """FLOP/s of an n x n float32 matmul: the machine's practical peak."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / _median_seconds(lambda: f(a), reps)


def block_rows(model_name: str, batch: int, reps: int) -> list[dict[str, Any]]:
    """One row per block type at the model's shapes: cost, time, count in the model."""
    platform = jax.devices()[0].platform  # as the model runs on this machine
    model = volo_jax.create_model(model_name, platform=platform)
    size, dims, heads = model.img_size, model.embed_dims, model.num_heads
    grid = size // model.patch_size
    key = jax.random.key(0)
    blocks = [
        (
            "stem (PatchEmbed)",
            PatchEmbed(model.stem_hidden_dim, dims[0], platform=model.platform),
            (batch, size, size, 3),
            1,
        ),
        (
            "Outlooker",
            Outlooker(
                dims[0],
                heads[0],
                mlp_ratio=model.mlp_ratio,
                outlook_impl=model.outlook_impl,
                platform=model.platform,
            ),
            (batch, grid, grid, dims[0]),
            model.layers[0],
        ),
        (
            "Transformer",
            Transformer(dims[-1], heads[-1], model.mlp_ratio, platform=model.platform),
            (batch, grid // 2, grid // 2, dims[-1]),
            sum(model.layers[1:]),
        ),
        (
            "ClassBlock",
            ClassBlock(dims[-1], heads[-1], mlp_ratio=model.mlp_ratio, platform=model.platform),
            (batch, 1 + (grid // 2) ** 2, dims[-1]),
            len(model.post_layers),
        ),
    ]
    rows = []
    for name, block, shape, count in blocks:
        x = jax.random.normal(key, shape)
        variables = nn.unbox(jax.jit(block.init)(key, x))
        apply = jax.jit(block.apply)
        stats, _ = compile_stats(apply, variables, x)
        seconds = _median_seconds(lambda: apply(variables, x), reps)  # noqa: B023
        cost = {"flops": stats["xla_gflops"] * 1e9, "bytes": stats["xla_gbytes_accessed"] * 1e9}
        rows.append({"block": name, "count": count, "seconds": seconds, **cost})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="volo_d1_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    peak = matmul_peak(args.reps)
    rows = block_rows(args.model, args.batch, args.reps)
    total = sum(r["seconds"] * r["count"] for r in rows)
    print(
        f"{args.model}, batch {args.batch}, forward; matmul peak {peak / 1e9:.0f} GFLOP/s "
        f"({jax.devices()[0].device_kind})"
    )
    print(
        f"{'block':<20}{'x':>3}{'GFLOP':>9}{'MB':>9}{'FLOP/B':>8}{'ms':>9}"
        f"{'GFLOP/s':>9}{'of peak':>9}{'of model':>10}"
    )
    for r in rows:
        rate = r["flops"] / r["seconds"]
        print(
            f"{r['block']:<20}{r['count']:>3}{r['flops'] / 1e9:>9.2f}{r['bytes'] / 1e6:>9.1f}"
            f"{r['flops'] / max(r['bytes'], 1):>8.1f}{r['seconds'] * 1e3:>9.1f}{rate / 1e9:>9.1f}"
            f"{rate / peak:>9.1%}{r['seconds'] * r['count'] / total:>10.1%}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"model": args.model, "batch": args.batch, "peak_flops": peak, "rows": rows},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
