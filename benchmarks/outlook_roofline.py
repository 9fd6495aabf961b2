"""Roofline of outlook attention, per implementation, at one VOLO outlooker layer.

The op counted is what the fused Pallas kernel replaces: softmax over the K*K logits of
every window and head, the weighted sum over the window's values, and the fold back onto
the image (logits (B, h, w, heads, KK, KK) and v (B, H, W, C) -> out (B, H, W, C)),
forward and forward+backward (cotangent g of out -> dv and dlogits).

Two counts per implementation:
  - by formula (`formula_counts`): FLOPs of the products, the fold's adds and the
    softmax, and bytes with every materialised tensor written once and read once by
    each consumer, inputs read from and outputs written to memory once, fusion only
    where the implementation is written to fuse (listed in `TERMS`);
  - XLA's cost analysis of the op compiled for this machine's CPU (`xla_counts`), for
    the XLA implementations (reference, slices, planes): XLA:CPU's fusion decisions,
    which are not XLA:TPU's or XLA:GPU's. Each implementation is called by name and
    traced as written, for no platform in particular (plain products: the CPU rules of
    `volo_jax.platforms.cpu` apply only to code built for the CPU). The Pallas kernel is
    not counted by XLA: on a CPU host it runs in interpret mode and its count would be
    the interpreter's loop.

Times are lower bounds, max(FLOPs / peak, bytes / bandwidth), for the platforms of
`PLATFORMS` (dense bf16 matrix peaks). Usage (from the repository root):

  python -m benchmarks.outlook_roofline                 # VOLO-D1 outlooker, batch 128, bf16
  python -m benchmarks.outlook_roofline --no-xla        # formula only (no compiles)
  python -m benchmarks.outlook_roofline --json roofline.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `volo_jax` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: name -> (dense bf16 matrix peak FLOP/s, memory bandwidth B/s), from the vendors' sheets.
PLATFORMS = {
    "TPU v5e": (197e12, 819e9),
    "H100 SXM": (989e12, 3.35e12),
}

IMPLS = ("reference", "slices", "planes", "pallas")
XLA_IMPLS = ("reference", "slices", "planes")
PASSES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Shape:
    """One outlooker layer: (B, size, size, dim), heads, K, stride, padding."""

    batch: int = 128
    size: int = 28
    dim: int = 192
    heads: int = 6
    kernel: int = 3
    stride: int = 2
    padding: int = 1
    itemsize: int = 2  # bf16 activations, logits and weights

    @property
    def grid(self) -> int:  # windows per axis
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def plane(self) -> int:  # `patches.to_planes` extent per axis: s * Hq
        padded = self.size + 2 * self.padding
        hq = max(math.ceil(padded / self.stride), self.grid + (self.kernel - 1) // self.stride)
        return self.stride * hq


def tensor_sizes(shape: Shape) -> dict[str, float]:
    """Bytes of every tensor the formulas use, and the element counts behind the FLOPs."""
    b, n, c, kk = shape.batch, shape.size, shape.dim, shape.kernel**2
    windows = b * shape.grid**2  # window positions
    return {
        # bytes
        "E": b * n * n * c * shape.itemsize,  # v, out, g, dv
        "W": windows * kk * c * shape.itemsize,  # unfolded windows / per-window outputs
        "A": windows * shape.heads * kk * kk * shape.itemsize,  # logits, weights, their grads
        "P": b * shape.plane**2 * c * shape.itemsize,  # stride planes of v or g (padded)
        # element counts
        "heads_windows": windows * shape.heads,
        "window_elements": windows * kk * c,
        "logits": windows * shape.heads * kk * kk,
    }


#: Bytes per implementation and pass, in the tensor sizes of `tensor_sizes`, with what
#: each term is. Softmax forward (XLA implementations): read logits, write weights = 2A;
#: softmax backward: read d_weights and weights, write d_logits = 3A.
TERMS: dict[str, dict[str, tuple[dict[str, int], str]]] = {
    "reference": {
        "fwd": (
            {"E": 2, "W": 4, "A": 3},
            "softmax 2A; unfold E+W; product A+2W (reads weights and windows, writes "
            "per-window outputs); scatter-add fold W+E",
        ),
        "bwd": (
            {"E": 2, "W": 6, "A": 5},
            "unfold of g E+W; d_weights 2W+A (g windows, saved windows); d_windows "
            "A+2W; fold E+W; softmax backward 3A",
        ),
    },
    "slices": {
        "fwd": (
            {"E": 2, "W": 4, "A": 3},
            "as reference if XLA fuses the K*K strided slices into one stack and the K*K "
            "strided placements into one sum: softmax 2A; stack E+W; product A+2W; fold W+E",
        ),
        "bwd": (
            {"E": 2, "W": 6, "A": 5},
            "as reference under the same fusion (autodiff of slices and pads)",
        ),
    },
    "planes": {
        "fwd": (
            {"E": 2, "P": 2, "A": 3},
            "softmax 2A; to_planes (pad) E+P; one fused loop of the K^4 products and the "
            "fold P+A+E (no windows materialised)",
        ),
        "bwd": (
            {"E": 2, "P": 3, "W": 5, "A": 5},
            "g to planes E+P; g windows P+W; v windows (from the saved planes) P+W; "
            "d_weights 2W+A; d_v products and fold fused A+W+E; softmax backward 3A",
        ),
    },
    "pallas": {
        "fwd": (
            {"E": 2, "A": 1},
            "ideal fused kernel: read v and logits, write out (softmax in the kernel)",
        ),
        "bwd": (
            {"E": 3, "A": 2},
            "ideal fused kernel: read v, logits and g, write dv and dlogits (weights "
            "recomputed from the logits in the kernel)",
        ),
    },
}


def formula_counts(shape: Shape) -> dict[str, dict[str, dict[str, Any]]]:
    """impl -> pass -> {flops, bytes, terms}: the counts by formula.

    FLOPs: products 2 * (B h w heads) * KK^2 * hd per product (one forward, two
    backward: d_weights and d_windows), the fold one add per window element, softmax 5
    per logit forward (max, subtract, exp, sum, divide) and 4 backward. The same for
    every implementation, except that the fused backward recomputes the softmax.
    """
    t = tensor_sizes(shape)
    hd = shape.dim // shape.heads
    product = 2 * t["heads_windows"] * shape.kernel**4 * hd
    fold_adds = t["window_elements"]
    fwd_flops = product + fold_adds + 5 * t["logits"]
    bwd_flops = 2 * product + fold_adds + 4 * t["logits"]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for impl, passes in TERMS.items():
        rows = {}
        for name, (coeffs, text) in passes.items():
            rows[name] = {
                "bytes": sum(k * t[sym] for sym, k in coeffs.items()),
                "terms": " + ".join(f"{k}{sym}" if k > 1 else sym for sym, k in coeffs.items()),
                "what": text,
            }
        recompute = 5 * t["logits"] if impl == "pallas" else 0
        out[impl] = {
            "fwd": {**rows["fwd"], "flops": fwd_flops},
            "bwd": {**rows["bwd"], "flops": bwd_flops + recompute},
            "fwd+bwd": {
                "bytes": rows["fwd"]["bytes"] + rows["bwd"]["bytes"],
                "flops": fwd_flops + bwd_flops + recompute,
                "terms": f"fwd + {rows['bwd']['terms']}",
            },
        }
    return out


def xla_counts(shape: Shape, impl: str) -> dict[str, dict[str, Any]]:
    """pass -> XLA:CPU's cost analysis of softmax + `outlook_aggregate(impl=impl)`,
    compiled (not run) for ShapeDtypeStructs of `shape`."""
    import jax
    import jax.numpy as jnp

    from volo_jax.ops import outlook

    k, s, p = shape.kernel, shape.stride, shape.padding
    dtype = jnp.bfloat16 if shape.itemsize == 2 else jnp.float32
    h, kk = shape.grid, k * k
    v = jax.ShapeDtypeStruct((shape.batch, shape.size, shape.size, shape.dim), dtype)
    logits = jax.ShapeDtypeStruct((shape.batch, h, h, shape.heads, kk, kk), dtype)

    def op(v: jax.Array, logits: jax.Array) -> jax.Array:  # as OutlookAttention does it
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        return outlook.outlook_aggregate(v, weights, k, s, p, impl)

    def fwd_bwd(v: jax.Array, logits: jax.Array, g: jax.Array) -> Any:
        out, pullback = jax.vjp(op, v, logits)
        return out, pullback(g)

    out = {}
    for name, fn, args in (("fwd", op, (v, logits)), ("fwd+bwd", fwd_bwd, (v, logits, v))):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        mem = compiled.memory_analysis()
        out[name] = {
            "flops": float(cost.get("flops", float("nan"))),
            "bytes": float(cost.get("bytes accessed", float("nan"))),
            "transcendentals": float(cost.get("transcendentals", 0.0)),
            "temp_bytes": float(getattr(mem, "temp_size_in_bytes", float("nan"))),
            "compile_s": time.perf_counter() - t0,
        }
    return out


def bound_us(flops: float, nbytes: float, platform: str) -> dict[str, float]:
    peak, bandwidth = PLATFORMS[platform]
    compute, memory = flops / peak * 1e6, nbytes / bandwidth * 1e6
    return {"compute_us": compute, "memory_us": memory, "bound_us": max(compute, memory)}


def build(shape: Shape, xla: bool = True) -> dict[str, Any]:
    """The report: sizes, formula counts, XLA:CPU counts, intensities and bounds."""
    import jax

    formula = formula_counts(shape)
    rows = []
    for impl in IMPLS:
        counted = xla_counts(shape, impl) if xla and impl in XLA_IMPLS else {}
        for name in PASSES:
            f = formula[impl][name]
            row: dict[str, Any] = {
                "impl": impl,
                "pass": name,
                "formula_gflop": f["flops"] / 1e9,
                "formula_mb": f["bytes"] / 1e6,
                "formula_flop_per_byte": f["flops"] / f["bytes"],
                "formula_terms": f["terms"],
            }
            for platform in PLATFORMS:
                row[platform] = bound_us(f["flops"], f["bytes"], platform)
            if name in counted:
                c = counted[name]
                row.update(
                    xla_cpu_gflop=c["flops"] / 1e9,
                    xla_cpu_mb=c["bytes"] / 1e6,
                    xla_cpu_flop_per_byte=c["flops"] / c["bytes"],
                    xla_cpu_transcendentals=c["transcendentals"],
                    xla_cpu_temp_mb=c["temp_bytes"] / 1e6,
                    xla_cpu_compile_s=c["compile_s"],
                )
                for platform in PLATFORMS:
                    row[f"{platform} (XLA:CPU bytes)"] = bound_us(c["flops"], c["bytes"], platform)
            rows.append(row)
    sizes = tensor_sizes(shape)
    return {
        "benchmark": "outlook_roofline",
        "shape": dataclasses.asdict(shape) | {"grid": shape.grid, "plane": shape.plane},
        "tensor_mb": {k: sizes[k] / 1e6 for k in ("E", "W", "A", "P")},
        "platforms": {
            name: {
                "peak_tflops": peak / 1e12,
                "bandwidth_gbs": bw / 1e9,
                "ridge_flop_per_byte": peak / bw,
            }
            for name, (peak, bw) in PLATFORMS.items()
        },
        "terms": {
            impl: {name: {"bytes": coeffs, "what": text} for name, (coeffs, text) in passes.items()}
            for impl, passes in TERMS.items()
        },
        "xla_counted_on": (
            f"XLA:CPU's cost analysis of the compiled op (jax {jax.__version__}, not run)"
            if xla
            else None
        ),
        "rows": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    s = report["shape"]
    mb = report["tensor_mb"]
    lines = [
        f"outlook softmax + aggregate, B={s['batch']}, {s['size']}x{s['size']}x{s['dim']}, "
        f"{s['heads']} heads, K={s['kernel']}, s={s['stride']}, p={s['padding']}, "
        f"{s['itemsize']}-byte elements",
        f"E (v, out, g, dv) {mb['E']:.1f} MB; W (windows) {mb['W']:.1f} MB; "
        f"A (logits, weights) {mb['A']:.1f} MB; P (planes) {mb['P']:.1f} MB",
        "ridge points: "
        + ", ".join(
            f"{k} {v['ridge_flop_per_byte']:.0f} FLOP/B" for k, v in report["platforms"].items()
        ),
        "",
    ]
    head = (
        "| impl | pass | bytes (formula) | GFLOP | MB | FLOP/B | XLA:CPU GFLOP | XLA:CPU MB "
        "| XLA:CPU FLOP/B | v5e us (formula / XLA:CPU MB) | H100 us (formula / XLA:CPU MB) |"
    )
    lines += [head, "|---" * (head.count("|") - 1) + "|"]

    def f(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        return format(value, fmt) if isinstance(value, float) else "-"

    for r in report["rows"]:
        times = []
        for platform in PLATFORMS:
            xla = r.get(f"{platform} (XLA:CPU bytes)")
            times.append(
                f"{r[platform]['bound_us']:.0f}" + (f" / {xla['bound_us']:.0f}" if xla else "")
            )
        lines.append(
            f"| {r['impl'] + (' (ideal fused)' if r['impl'] == 'pallas' else '')} "
            f"| {r['pass']} | {r['formula_terms']} "
            f"| {r['formula_gflop']:.3f} | {r['formula_mb']:.0f} "
            f"| {r['formula_flop_per_byte']:.1f} | {f(r, 'xla_cpu_gflop', '.3f')} "
            f"| {f(r, 'xla_cpu_mb', '.0f')} | {f(r, 'xla_cpu_flop_per_byte', '.1f')} "
            f"| {times[0]} | {times[1]} |"
        )
    if report["xla_counted_on"]:
        lines.append(f"XLA:CPU columns: {report['xla_counted_on']}.")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = Shape()
    for field in ("batch", "size", "dim", "heads", "kernel", "stride", "padding", "itemsize"):
        p.add_argument(f"--{field}", type=int, default=getattr(d, field))
    p.add_argument("--no-xla", action="store_true", help="formula only, no XLA compiles")
    p.add_argument("--json", default=None, help="write the report here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    fields = {f.name for f in dataclasses.fields(Shape)}
    shape = Shape(**{k: v for k, v in vars(args).items() if k in fields})
    report = build(shape, xla=not args.no_xla)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
