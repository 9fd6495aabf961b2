"""Op-level benchmark of outlook attention at VOLO-D1's outlooker shape.

Default shape: B=8, 28 x 28 x 192, 6 heads, K=3, stride 2, padding 1 (a 14 x 14 window
grid). Rows, each timed forward and forward+backward:
  - JAX `outlook_aggregate` (unfold, per-window attention, fold), every implementation
    in `volo_jax.ops.outlook.IMPLEMENTATIONS` where that dict exists, else the default;
  - our whole Flax `OutlookAttention` layer and timm's `OutlookAttention` (same weights);
  - the same aggregate in torch (`F.unfold`, `attn @ v`, `F.fold`);
  - the unfold / fold primitives alone: ours (custom VJPs), the plain
    `lax.conv_general_dilated_patches` unfold with its automatic gradient, torch's.
JAX rows carry XLA's cost analysis (flops, bytes accessed) and memory plan (temp +
output). The JAX rows and the torch rows run in two fresh subprocesses, one after
the other (`--in-process` to skip that). Usage (from the repository root):

  python -m benchmarks.bench_ops --batch 8 --reps 10 --json ops.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `volo_jax` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_volo import (
    REPO_ROOT,
    MemoryProbe,
    cpu_count,
    loadavg,
    machine_info,
    time_calls,
    worker_env,
    write_report,
)

FRAMEWORKS = ("jax", "torch")


@dataclasses.dataclass
class OpsConfig:
    """Shape and timing settings shared by both frameworks' workers."""

    batch: int = 8
    size: int = 28
    dim: int = 192
    heads: int = 6
    kernel: int = 3
    stride: int = 2
    padding: int = 1
    dtype: str = "float32"
    reps: int = 10
    warmup: int = 2
    threads: int = 0
    seed: int = 0
    only: str = ""  # regular expression on row names
    torch_compile: bool = False  # also time torch.compile'd timm layer and aggregate


def grid_size(cfg: OpsConfig) -> int:
    return (cfg.size + 2 * cfg.padding - cfg.kernel) // cfg.stride + 1


def make_inputs(cfg: OpsConfig) -> dict[str, np.ndarray]:
    """Values, softmaxed attention, layer input, layer weights and cotangents, float32."""
    rng = np.random.default_rng(cfg.seed)
    b, n, c, heads, kk = cfg.batch, cfg.size, cfg.dim, cfg.heads, cfg.kernel**2
    h = grid_size(cfg)
    logits = rng.standard_normal((b, h, h, heads, kk, kk)).astype(np.float32)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)

    def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    return {
        "v": normal(b, n, n, c),
        "attn": attn.astype(np.float32),
        "x": normal(b, n, n, c),
        "g": normal(b, n, n, c),  # cotangent of every (B, H, W, C) output
        "g_cols": normal(b, h, h, kk, c),  # cotangent of unfold's output
        # OutlookAttention weights, torch layout (out, in).
        "w_v": normal(c, c, scale=c**-0.5),
        "w_attn": normal(kk * kk * heads, c, scale=c**-0.5),
        "b_attn": normal(kk * kk * heads, scale=0.02),
        "w_proj": normal(c, c, scale=c**-0.5),
        "b_proj": normal(c, scale=0.02),
    }


def _selected(cfg: OpsConfig, name: str) -> bool:
    return not cfg.only or re.search(cfg.only, name) is not None


def _record(name: str, framework: str, passes: str, fn: Callable[[], dict[str, Any]]) -> dict:
    row: dict[str, Any] = {"op": name, "framework": framework, "pass": passes}
    try:
        row.update(fn())
        row["status"] = "ok"
    except Exception as err:
        row.update(
            status="failed",
            reason=f"{type(err).__name__}: {err}"[:2000],
            traceback=traceback.format_exc(limit=4),
        )
    return row


# --------------------------------------------------------------------------- JAX


def jax_rows(cfg: OpsConfig, inputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Every JAX row: forward and forward+backward, timed, with XLA's cost analysis."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from benchmarks.bench_volo import compile_stats
    from volo_jax.cli import synchronous_cpu_dispatch
    from volo_jax.ops import TOKEN_MIXERS, fold, outlook, unfold
    from volo_jax.ops.cpu import cpu_kernels

    synchronous_cpu_dispatch()  # as main.py and bench_volo's workers
    dtype = jnp.dtype(cfg.dtype)
    device = jax.devices()[0]
    arr = {k: jax.device_put(jnp.asarray(v, dtype), device) for k, v in inputs.items()}
    k, s, p, n = cfg.kernel, cfg.stride, cfg.padding, cfg.size
    impls = getattr(outlook, "IMPLEMENTATIONS", None) or {"default": outlook.outlook_aggregate}

    def patches_unfold(x: jax.Array) -> jax.Array:  # no custom VJP: XLA's own gradient
        out = lax.conv_general_dilated_patches(
            x,
            (k, k),
            (s, s),
            ((p, p), (p, p)),
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
            precision=lax.Precision.HIGHEST,
        )
        return out.reshape(*out.shape[:3], x.shape[-1], k * k).swapaxes(-1, -2)

    layer_dtype = None if cfg.dtype == "float32" else dtype
    params = jax.device_put(
        {
            "params": {
                "v": {"kernel": jnp.asarray(inputs["w_v"].T)},
                "attn": {
                    "kernel": jnp.asarray(inputs["w_attn"].T),
                    "bias": jnp.asarray(inputs["b_attn"]),
                },
                "proj": {
                    "kernel": jnp.asarray(inputs["w_proj"].T),
                    "bias": jnp.asarray(inputs["b_proj"]),
                },
            }
        },
        device,
    )

    # name -> (function, its arguments, cotangent of its output)
    cases: dict[str, tuple[Callable, tuple, jax.Array]] = {}
    for impl, fn in impls.items():
        cases[f"outlook_aggregate[{impl}]"] = (
            lambda v, a, fn=fn: fn(v, a, k, s, p),
            (arr["v"], arr["attn"]),
            arr["g"],
        )
    layer_impls = list(impls) if "impl" in outlook.OutlookAttention.__dataclass_fields__ else []
    for impl in layer_impls or [None]:
        extra = {"impl": impl} if impl else {}
        layer = outlook.OutlookAttention(cfg.dim, cfg.heads, k, p, s, dtype=layer_dtype, **extra)
        cases[f"OutlookAttention layer (flax{f', {impl}' if impl else ''})"] = (
            lambda prm, x, layer=layer: cpu_kernels(layer.apply)(prm, x),
            (params, arr["x"]),
            arr["g"],
        )
    # The other token mixers (issue #6) at the same (B, H, W, C), stride 1, their
    # parameters freshly initialised: the operators VOLO's outlook attention is compared with.
    for mixer_name, factory in TOKEN_MIXERS.items():
        if mixer_name == "outlook":
            continue
        kwargs = {}
        if mixer_name == "halo":  # blocks must tile the grid: the largest divisor <= 7
            block = max(d for d in range(1, 8) if n % d == 0)
            kwargs = {"block_size": block, "halo_size": min(3, block)}
        mixer = factory(cfg.dim, cfg.heads, dtype=layer_dtype, **kwargs)
        mixer_vars = jax.jit(mixer.init)(jax.random.key(0), arr["x"])
        cases[f"{mixer_name} layer (flax)"] = (
            lambda prm, x, mixer=mixer: cpu_kernels(mixer.apply)(prm, x),
            (mixer_vars, arr["x"]),
            arr["g"],
        )
    cases["unfold (ours)"] = (lambda x: unfold(x, k, s, p), (arr["v"],), arr["g_cols"])
    cases["fold (ours)"] = (lambda c: fold(c, (n, n), k, s, p), (arr["g_cols"],), arr["g"])
    cases["unfold (conv patches, autodiff)"] = (patches_unfold, (arr["v"],), arr["g_cols"])

    rows = []
    for name, (fn, args, cot) in cases.items():
        if not _selected(cfg, name):
            continue
        forward = jax.jit(fn)

        def vjp(*args_and_cot: Any, fn: Callable = fn) -> Any:
            *primals, g = args_and_cot
            out, pullback = jax.vjp(fn, *primals)
            return out, pullback(g)

        backward = jax.jit(vjp)
        for passes, jitted, call_args in (
            ("fwd", forward, args),
            ("fwd+bwd", backward, (*args, cot)),
        ):

            def measure(jitted: Any = jitted, call_args: tuple = call_args) -> dict[str, Any]:
                stats, _ = compile_stats(jitted, *call_args)
                probe = MemoryProbe("jax_gpu" if device.platform == "gpu" else "rss", device)
                timing = time_calls(
                    lambda: jitted(*call_args), jax.block_until_ready, cfg.reps, cfg.warmup, probe
                )
                mem = stats.get("xla_memory_mb", {})
                timing["first_call_s"] += stats["compile_s"]
                return {
                    **timing,
                    **stats,
                    "mem_mb": mem.get("temp", 0.0) + mem.get("output", 0.0),
                    "mem_method": "XLA memory plan: temp + output buffers",
                }

            rows.append(_record(name, "jax", passes, measure))
    for row in rows:
        row["device"] = f"{device.platform}:{device.device_kind}"
    return rows


# --------------------------------------------------------------------------- torch


def torch_rows(cfg: OpsConfig, inputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Every torch row: timm's layer, the F.unfold/F.fold aggregate, the primitives."""
    import torch
    import torch.nn.functional as F
    from timm.models.volo import OutlookAttention

    torch.set_num_threads(cfg.threads or cpu_count())
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, cfg.dtype)
    t = {k: torch.from_numpy(v).to(device=device, dtype=dtype) for k, v in inputs.items()}
    k, s, p, n, heads, c = cfg.kernel, cfg.stride, cfg.padding, cfg.size, cfg.heads, cfg.dim
    b, h, kk = cfg.batch, grid_size(cfg), cfg.kernel**2

    layer = OutlookAttention(c, heads, k, p, s).to(device=device, dtype=dtype)
    with torch.no_grad():
        layer.v.weight.copy_(t["w_v"])
        layer.attn.weight.copy_(t["w_attn"])
        layer.attn.bias.copy_(t["b_attn"])
        layer.proj.weight.copy_(t["w_proj"])
        layer.proj.bias.copy_(t["b_proj"])

    v_nchw = t["v"].permute(0, 3, 1, 2).contiguous()
    # attn (B, h, w, heads, KK, KK) -> timm's (B, heads, h*w, KK, KK)
    attn_t = t["attn"].reshape(b, h * h, heads, kk, kk).permute(0, 2, 1, 3, 4).contiguous()
    cols_t = F.unfold(v_nchw, k, padding=p, stride=s).detach()  # (B, C*KK, L)

    def aggregate(v: Any, attn: Any) -> Any:  # timm's OutlookAttention minus the linears
        cols = F.unfold(v, k, padding=p, stride=s)
        cols = cols.reshape(b, heads, c // heads, kk, h * h).permute(0, 1, 4, 3, 2)
        out = (attn @ cols).permute(0, 1, 4, 3, 2).reshape(b, c * kk, h * h)
        return F.fold(out, (n, n), k, padding=p, stride=s)

    cases: dict[str, tuple[Callable, tuple]] = {
        "outlook_aggregate (torch F.unfold/fold)": (aggregate, (v_nchw, attn_t)),
        "OutlookAttention layer (timm)": (layer, (t["x"],)),
        "unfold (torch F.unfold)": (lambda x: F.unfold(x, k, padding=p, stride=s), (v_nchw,)),
        "fold (torch F.fold)": (
            lambda cols: F.fold(cols, (n, n), k, padding=p, stride=s),
            (cols_t,),
        ),
    }

    if cfg.torch_compile:
        cases["OutlookAttention layer (timm, torch.compile)"] = (torch.compile(layer), (t["x"],))
        cases["outlook_aggregate (torch.compile)"] = (torch.compile(aggregate), (v_nchw, attn_t))

    def sync(_: Any) -> None:
        if cuda:
            torch.cuda.synchronize()

    rows = []
    for name, (fn, args) in cases.items():
        if not _selected(cfg, name):
            continue

        def fwd(fn: Callable = fn, args: tuple = args) -> Any:
            with torch.no_grad():
                return fn(*args)

        def fwd_bwd(fn: Callable = fn, args: tuple = args) -> Any:
            leaves = [a.detach().requires_grad_() for a in args]
            out = fn(*leaves)
            out.backward(torch.ones_like(out))
            for param in layer.parameters():
                param.grad = None
            return [a.grad for a in leaves]

        for passes, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):

            def measure(call: Callable = call) -> dict[str, Any]:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                probe = MemoryProbe("torch_cuda" if cuda else "rss")
                timing = time_calls(call, sync, cfg.reps, cfg.warmup, probe)
                mem = timing["memory"]
                return {
                    **timing,
                    "mem_mb": mem["peak_mb"] if cuda else mem["steady_growth_mb"],
                    "mem_method": mem["method"]
                    if cuda
                    else "CPU: peak RSS growth during the "
                    "timed calls (VmHWM reset after warm-up); approximate",
                }

            rows.append(_record(name, "torch", passes, measure))
    for row in rows:
        row["device"] = f"cuda:{torch.cuda.get_device_name()}" if cuda else "cpu"
        row["torch_threads"] = torch.get_num_threads()
    return rows


# --------------------------------------------------------------------------- driver


def run_framework(framework: str, cfg: OpsConfig) -> list[dict[str, Any]]:
    """All rows of one framework, in this process."""
    inputs = make_inputs(cfg)
    return (jax_rows if framework == "jax" else torch_rows)(cfg, inputs)


def _run_subprocess(framework: str, cfg: OpsConfig, timeout: float) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bench_ops_") as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_ops",
            "--worker-framework",
            framework,
            "--worker-config",
            json.dumps(dataclasses.asdict(cfg)),
            "--worker-out",
            str(out),
        ]
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO_ROOT,
                env=worker_env(malloc_tunables=True),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return [
                {
                    "op": "*",
                    "framework": framework,
                    "status": "failed",
                    "reason": f"worker timed out after {timeout:.0f} s",
                }
            ]
        if proc.returncode != 0 or not out.exists():
            return [
                {
                    "op": "*",
                    "framework": framework,
                    "status": "failed",
                    "reason": f"worker exited with {proc.returncode}: {proc.stderr[-2000:]}",
                }
            ]
        return json.loads(out.read_text())


def run(
    cfg: OpsConfig,
    frameworks: Sequence[str] = FRAMEWORKS,
    isolate: bool = True,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """Measures every row of every framework -> the report dict."""
    rows: list[dict[str, Any]] = []
    for framework in frameworks:
        if isolate:
            rows.extend(_run_subprocess(framework, cfg, timeout))
        else:
            rows.extend(run_framework(framework, cfg))
    h = grid_size(cfg)
    return {
        "benchmark": "bench_ops",
        "config": dataclasses.asdict(cfg),
        "shapes": {
            "v": [cfg.batch, cfg.size, cfg.size, cfg.dim],
            "attn": [cfg.batch, h, h, cfg.heads, cfg.kernel**2, cfg.kernel**2],
            "unfolded": [cfg.batch, h, h, cfg.kernel**2, cfg.dim],
        },
        "timing": "median of reps timed calls after first call + warm-up, device-synchronised",
        "isolation": (
            "one fresh subprocess per framework, with main.py's glibc malloc tunables "
            "(bench_volo.worker_env)"
            if isolate
            else "one process"
        ),
        "memory_note": (
            "JAX: XLA's memory plan (temp + output buffers of the compiled op). torch: "
            "CUDA max_memory_allocated, or on CPU the peak-RSS growth during the timed calls "
            "over the RSS after warm-up (approximate: allocators keep and reuse freed memory)."
        ),
        "machine": machine_info(),
        "loadavg_end": loadavg(),
        "rows": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    head = (
        f"{'op':<46}{'pass':<9}{'ms':>9}{'min ms':>9}{'first s':>9}{'GFLOP':>8}"
        f"{'GB acc':>8}{'mem MiB':>9}"
    )
    lines = [head, "-" * len(head)]

    def num(row: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
        value = row.get(key)
        if isinstance(value, (int, float)):
            return format(value * scale, fmt)
        return f"{'-':>{int(fmt.split('.')[0])}}"

    for r in report["rows"]:
        name = f"{r['op']} [{r['framework']}]" if r["op"] == "*" else r["op"]
        if r["status"] != "ok":
            reason = (r.get("reason") or "").splitlines()[0][:90] if r.get("reason") else ""
            lines.append(f"{name:<46}{r.get('pass', ''):<9}  {r['status']}: {reason}")
            continue
        lines.append(
            f"{name:<46}{r['pass']:<9}{num(r, 'median_s', '9.2f', 1e3)}"
            f"{num(r, 'min_s', '9.2f', 1e3)}{num(r, 'first_call_s', '9.2f')}"
            f"{num(r, 'xla_gflops', '8.3f')}{num(r, 'xla_gbytes_accessed', '8.3f')}"
            f"{num(r, 'mem_mb', '9.1f')}"
        )
    lines.append(report["memory_note"])
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = OpsConfig()
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--size", type=int, default=d.size, help="H = W of the outlooker grid")
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kernel", type=int, default=d.kernel)
    p.add_argument("--stride", type=int, default=d.stride)
    p.add_argument("--padding", type=int, default=d.padding)
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16"))
    p.add_argument("--reps", type=int, default=d.reps)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: all)")
    p.add_argument("--only", default="", help="regular expression on op names")
    p.add_argument(
        "--torch-compile", action="store_true", help="add torch.compile'd timm rows (slow start)"
    )
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--in-process", action="store_true", help="no subprocess per framework")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--json", default=None, help="write the report here")
    for name in ("framework", "config", "out"):
        p.add_argument(f"--worker-{name}", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_framework:
        cfg = OpsConfig(**json.loads(args.worker_config))
        rows = run_framework(args.worker_framework, cfg)
        Path(args.worker_out).write_text(json.dumps(rows))
        return 0
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = sorted(set(frameworks) - set(FRAMEWORKS))
    if unknown:
        raise SystemExit(f"unknown frameworks {unknown}; choose from {list(FRAMEWORKS)}")
    fields = {f.name for f in dataclasses.fields(OpsConfig)}
    cfg = OpsConfig(**{k: v for k, v in vars(args).items() if k in fields})
    report = run(cfg, frameworks, isolate=not args.in_process, timeout=args.timeout)
    write_report(report, format_table(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
