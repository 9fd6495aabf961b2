"""Parameters and FLOPs of VOLO with each token mixer in its outlooker stage.

  python -m benchmarks.token_mixers [--model volo_d1_224] [--json OUT.json]

FLOPs are XLA's cost analysis of the compiled forward pass at batch 1 (multiply
and add counted separately), for the whole model and for one outlooker-stage mixer.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import volo_jax
from benchmarks.bench_volo import compile_stats
from volo_jax.models.volo import MIXER_NAMES


def _count(tree: Any) -> int:
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))


def measure(model_name: str, mixer: str) -> dict[str, Any]:
    """Params and forward GFLOPs of the model and of its first outlooker's mixer."""
    model = volo_jax.create_model(model_name, token_mixer=mixer)
    size = model.img_size
    x = jnp.zeros((1, size, size, 3))
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), x))
    mixer_params = variables["params"]["network_0_0"]["attn"]
    return {
        "mixer": mixer,
        "params_m": _count(variables["params"]) / 1e6,
        "mixer_params_k": _count(mixer_params) / 1e3,
        "gflops": compile_stats(jax.jit(model.apply), variables, x)[0]["xla_gflops"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="volo_d1_224")
    parser.add_argument("--mixers", default=",".join(MIXER_NAMES))
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    rows = [measure(args.model, m) for m in args.mixers.split(",")]
    print(f"{args.model}: token mixer of the outlooker stage")
    print(f"{'mixer':<16}{'params (M)':>12}{'mixer params (k)':>18}{'GFLOPs':>10}")
    for r in rows:
        print(
            f"{r['mixer']:<16}{r['params_m']:>12.2f}{r['mixer_params_k']:>18.1f}"
            f"{r['gflops']:>10.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
