"""Op-level benchmark of outlook attention at VOLO-D1's outlooker shape.

Default shape: B=8, 28 x 28 x 192, 6 heads, K=3, stride 2, padding 1 (a 14 x 14 window
grid). Rows, each timed forward and forward+backward:
  - JAX `outlook_aggregate` (unfold, per-window attention, fold), every implementation
    in `volo_jax.ops.outlook.IMPLEMENTATIONS` where that dict exists, else the default
    (`--impls` to choose), from the attention weights; and `softmax+outlook_aggregate`,
    the same from the logits (what a fused kernel that takes the logits replaces): an
    implementation or a public function of `outlook_pallas` called as `fn(v, logits,
    kernel_size, stride, padding)` gets the logits, the others the float32 softmax cast
    to v's dtype, as the layer does. These rows carry their largest difference from the float32
    `reference` (output and gradients);
  - our whole Flax `OutlookAttention` layer and timm's `OutlookAttention` (same weights);
  - the same aggregate in torch (`F.unfold`, `attn @ v`, `F.fold`);
  - the unfold / fold primitives alone: ours (custom VJPs), the plain
    `lax.conv_general_dilated_patches` unfold with its automatic gradient, torch's.
JAX rows carry XLA's cost analysis (flops, bytes accessed), memory plan (temp +
output) and the device's allocator peak where the device reports one
(`memory_stats()['peak_bytes_in_use']`: a process-lifetime peak, so run one
implementation per process to attribute it), else the plan's argument + output + temp.
The JAX rows and the torch rows run in two fresh subprocesses, one after the other
(`--in-process` to skip that). Usage (from the repository root):

  python -m benchmarks.bench_ops --batch 8 --reps 10 --json ops.json
  python -m benchmarks.bench_ops --frameworks jax --impls pallas --only outlook --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
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
    impls: str = ""  # comma-separated outlook implementations (empty: all)
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
        "logits": logits,
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


#: The parameters of an aggregate entry that takes the logits (fused softmax).
LOGITS_ENTRY = ("v", "logits", "kernel_size", "stride", "padding")


def _takes_logits(fn: Callable) -> bool:
    """True when `fn` is called as `fn(v, logits, kernel_size, stride, padding)`: those
    five parameters first, any others with defaults (a fused-softmax entry; the kernels'
    own launchers, with other parameters, are not)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    names = tuple(p.name for p in params[: len(LOGITS_ENTRY)])
    rest = params[len(LOGITS_ENTRY) :]
    return names == LOGITS_ENTRY and all(p.default is not p.empty for p in rest)


def outlook_entries(impls: str = "") -> dict[str, Callable]:
    """Name -> aggregate function: `outlook.IMPLEMENTATIONS` (or the default), plus any
    public function of `outlook_pallas` that takes the logits and is not one of them
    (named 'pallas:<function>'); `impls` (comma-separated, empty: all) keeps those whose
    name, or the part before ':', it lists."""
    from volo_jax.ops import outlook

    found = getattr(outlook, "IMPLEMENTATIONS", None) or {"default": outlook.outlook_aggregate}
    entries = dict(found)
    try:
        from volo_jax.ops import outlook_pallas
    except ImportError:
        outlook_pallas = None
    if outlook_pallas is not None:
        known = {id(fn) for fn in found.values()}
        for name in sorted(vars(outlook_pallas)):
            fn = getattr(outlook_pallas, name)
            if (
                not name.startswith("_")
                and callable(fn)
                and id(fn) not in known
                and getattr(fn, "__module__", None) == outlook_pallas.__name__
                and _takes_logits(fn)
            ):
                entries[f"pallas:{name}"] = fn
    wanted = [x.strip() for x in impls.split(",") if x.strip()]
    if wanted:
        unknown = sorted(set(wanted) - {n.split(":")[0] for n in entries} - set(entries))
        if unknown:
            raise ValueError(f"unknown outlook implementations {unknown}; have {sorted(entries)}")
        entries = {n: fn for n, fn in entries.items() if n in wanted or n.split(":")[0] in wanted}
    return entries


def device_memory(device: Any) -> dict[str, float] | None:
    """The device allocator's statistics in MiB, or None where it keeps none (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return {k: stats.get(k, 0) / 2**20 for k in ("peak_bytes_in_use", "bytes_in_use")}


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


def jax_rows(
    cfg: OpsConfig, inputs: dict[str, np.ndarray], emit: Callable[[dict], Any] | None = None
) -> list[dict[str, Any]]:
    """Every JAX row: forward and forward+backward, timed, with XLA's cost analysis;
    `emit` gets each row as soon as it is measured."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax import lax

    from benchmarks.bench_volo import compile_stats
    from volo_jax.cli import synchronous_cpu_dispatch
    from volo_jax.ops import TOKEN_MIXERS, fold, outlook, unfold

    synchronous_cpu_dispatch()  # as main.py and bench_volo's workers
    dtype = jnp.dtype(cfg.dtype)
    device = jax.devices()[0]
    arr = {k: jax.device_put(jnp.asarray(v, dtype), device) for k, v in inputs.items()}
    k, s, p, n = cfg.kernel, cfg.stride, cfg.padding, cfg.size
    entries = outlook_entries(cfg.impls)
    all_impls = getattr(outlook, "IMPLEMENTATIONS", None) or {"default": outlook.outlook_aggregate}
    impls = {name: fn for name, fn in all_impls.items() if name in entries}

    def softmax(logits: jax.Array, like: jax.Array) -> jax.Array:  # as OutlookAttention
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(like.dtype)

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
    checked: dict[str, str] = {}  # row -> which float32 reference it is compared with
    for impl, entry in entries.items():
        logits_in = _takes_logits(entry)
        # outlook.IMPLEMENTATIONS take the platform their products are for.
        fn = functools.partial(entry, platform=device.platform) if impl in all_impls else entry
        if not logits_in:
            cases[f"outlook_aggregate[{impl}]"] = (
                lambda v, a, fn=fn: fn(v, a, k, s, p),
                (arr["v"], arr["attn"]),
                arr["g"],
            )
            checked[f"outlook_aggregate[{impl}]"] = "attn"
        cases[f"softmax+outlook_aggregate[{impl}]"] = (
            lambda v, lg, fn=fn, logits_in=logits_in: fn(
                v, lg if logits_in else softmax(lg, v), k, s, p
            ),
            (arr["v"], arr["logits"]),
            arr["g"],
        )
        checked[f"softmax+outlook_aggregate[{impl}]"] = "logits"
    references: dict[str, list[np.ndarray]] = {}

    def reference(kind: str) -> list[np.ndarray]:
        """(out, dv, d_weights or d_logits) of the float32 `reference` at full precision,
        computed on the host CPU so that it leaves the device's memory peak alone."""
        if kind not in references:
            host = jax.devices("cpu")[0]

            def f(v: jax.Array, a: jax.Array) -> jax.Array:
                weights = softmax(a, v) if kind == "logits" else a
                return outlook.outlook_aggregate(v, weights, k, s, p, impl="reference")

            with jax.default_device(host), jax.default_matmul_precision("highest"):
                v32, a32, g32 = (jax.device_put(inputs[key], host) for key in ("v", kind, "g"))
                out, pullback = jax.vjp(jax.jit(f), v32, a32)
                references[kind] = [np.asarray(x) for x in (out, *pullback(g32))]
        return references[kind]

    def max_diff(name: str, result: Any) -> float:
        """Largest |result - float32 reference| over the output (and gradients)."""
        leaves = jax.tree_util.tree_leaves(result)
        return max(
            float(np.max(np.abs(np.asarray(x).astype(np.float32) - r)))
            for x, r in zip(leaves, reference(checked[name]), strict=False)
        )

    has_impl = "impl" in outlook.OutlookAttention.__dataclass_fields__
    layer_impls = list(impls) if has_impl else []
    for impl in layer_impls or ([None] if not cfg.impls else []):
        extra = {"impl": impl} if impl else {}
        layer = outlook.OutlookAttention(
            cfg.dim, cfg.heads, k, p, s, dtype=layer_dtype, platform=device.platform, **extra
        )
        cases[f"OutlookAttention layer (flax{f', {impl}' if impl else ''})"] = (
            layer.apply,
            (params, arr["x"]),
            arr["g"],
        )
    # The other local token mixers at the same (B, H, W, C), stride 1, their
    # parameters freshly initialised: the operators VOLO's outlook attention is compared with.
    for mixer_name, factory in TOKEN_MIXERS.items():
        if mixer_name in ("outlook", "self_attention"):
            continue
        kwargs = {}
        if mixer_name == "halo":  # blocks must tile the grid: the largest divisor <= 7
            block = max(d for d in range(1, 8) if n % d == 0)
            kwargs = {"block_size": block, "halo_size": min(3, block)}
        mixer = factory(cfg.dim, cfg.heads, dtype=layer_dtype, platform=device.platform, **kwargs)
        mixer_vars = nn.unbox(jax.jit(mixer.init)(jax.random.key(0), arr["x"]))
        cases[f"{mixer_name} layer (flax)"] = (
            mixer.apply,
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

            def measure(
                jitted: Any = jitted, call_args: tuple = call_args, name: str = name
            ) -> dict[str, Any]:
                before = device_memory(device)
                stats, _ = compile_stats(jitted, *call_args)
                probe = MemoryProbe("jax_gpu" if before is not None else "rss", device)
                timing = time_calls(
                    lambda: jitted(*call_args), jax.block_until_ready, cfg.reps, cfg.warmup, probe
                )
                mem = stats.get("xla_memory_mb", {})
                timing["first_call_s"] += stats["compile_s"]
                after = device_memory(device)
                plan_peak = sum(mem.get(key, 0.0) for key in ("argument", "output", "temp"))
                if after is not None and before is not None:
                    peak = {
                        "peak_mb": after["peak_bytes_in_use"],
                        "peak_in_use_before_mb": before["bytes_in_use"],
                        # False: an earlier row's peak was higher, so this row's own peak
                        # is not known (at most peak_mb).
                        "peak_raised_by_row": after["peak_bytes_in_use"]
                        > before["peak_bytes_in_use"],
                        "peak_method": "device allocator: memory_stats()['peak_bytes_in_use'] "
                        "(process lifetime)",
                    }
                else:
                    peak = {
                        "peak_mb": plan_peak,
                        "peak_method": "XLA memory plan: argument + output + temp buffers",
                    }
                row = {
                    **timing,
                    **stats,
                    **peak,
                    # Beside the allocator's peak, which may include compile-time scratch
                    # (autotuning) and earlier rows: what the compiled call itself needs.
                    "xla_plan_peak_mb": plan_peak,
                    "mem_mb": mem.get("temp", 0.0) + mem.get("output", 0.0),
                    "mem_method": "XLA memory plan: temp + output buffers",
                }
                if name in checked:
                    row["max_abs_diff_vs_f32_reference"] = max_diff(name, jitted(*call_args))
                return row

            rows.append(_record(name, "jax", passes, measure))
            rows[-1]["device"] = f"{device.platform}:{device.device_kind}"
            if emit is not None:
                emit(rows[-1])
    return rows


# --------------------------------------------------------------------------- torch


def torch_rows(
    cfg: OpsConfig, inputs: dict[str, np.ndarray], emit: Callable[[dict], Any] | None = None
) -> list[dict[str, Any]]:
    """Every torch row: timm's layer, the F.unfold/F.fold aggregate, the primitives;
    `emit` gets each row as soon as it is measured."""
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
                peak = {"peak_mb": mem["peak_mb"], "peak_method": mem["method"]} if cuda else {}
                return {
                    **timing,
                    **peak,
                    "mem_mb": mem["peak_mb"] if cuda else mem["steady_growth_mb"],
                    "mem_method": mem["method"]
                    if cuda
                    else "CPU: peak RSS growth during the "
                    "timed calls (VmHWM reset after warm-up); approximate",
                }

            rows.append(_record(name, "torch", passes, measure))
            rows[-1]["device"] = f"cuda:{torch.cuda.get_device_name()}" if cuda else "cpu"
            rows[-1]["torch_threads"] = torch.get_num_threads()
            if emit is not None:
                emit(rows[-1])
    return rows


# --------------------------------------------------------------------------- driver


def run_framework(
    framework: str, cfg: OpsConfig, emit: Callable[[dict], Any] | None = None
) -> list[dict[str, Any]]:
    """All rows of one framework, in this process."""
    inputs = make_inputs(cfg)
    return (jax_rows if framework == "jax" else torch_rows)(cfg, inputs, emit)


def _partial(out: Path) -> list[dict[str, Any]]:
    """The rows a worker finished before it stopped (its progress file)."""
    path = Path(f"{out}.partial")
    try:
        return json.loads(path.read_text()) if path.exists() else []
    except ValueError:
        return []


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
                *_partial(out),
                {
                    "op": "*",
                    "framework": framework,
                    "status": "failed",
                    "reason": f"worker timed out after {timeout:.0f} s",
                },
            ]
        if proc.returncode != 0 or not out.exists():
            return [
                *_partial(out),
                {
                    "op": "*",
                    "framework": framework,
                    "status": "failed",
                    "reason": f"worker exited with {proc.returncode}: {proc.stderr[-2000:]}",
                },
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
            "mem MiB: JAX: XLA's memory plan (temp + output buffers of the compiled op). torch: "
            "CUDA max_memory_allocated, or on CPU the peak-RSS growth during the timed calls "
            "over the RSS after warm-up (approximate: allocators keep and reuse freed memory). "
            "peak MiB (JAX): the device allocator's peak_bytes_in_use where the device keeps "
            "one (process lifetime: inputs of every row included; rows that did not raise it "
            "are marked peak_raised_by_row=false), else the plan's argument + output + temp. "
            "max diff: largest |output or gradient - float32 reference|."
        ),
        "machine": machine_info(),
        "loadavg_end": loadavg(),
        "rows": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    width = max([46] + [len(r["op"]) + 2 for r in report["rows"]])
    head = (
        f"{'op':<{width}}{'pass':<9}{'ms':>9}{'min ms':>9}{'first s':>9}{'GFLOP':>8}"
        f"{'GB acc':>8}{'mem MiB':>9}{'peak MiB':>10}{'max diff':>10}"
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
            lines.append(f"{name:<{width}}{r.get('pass', ''):<9}  {r['status']}: {reason}")
            continue
        lines.append(
            f"{name:<{width}}{r['pass']:<9}{num(r, 'median_s', '9.2f', 1e3)}"
            f"{num(r, 'min_s', '9.2f', 1e3)}{num(r, 'first_call_s', '9.2f')}"
            f"{num(r, 'xla_gflops', '8.3f')}{num(r, 'xla_gbytes_accessed', '8.3f')}"
            f"{num(r, 'mem_mb', '9.1f')}{num(r, 'peak_mb', '10.1f')}"
            f"{num(r, 'max_abs_diff_vs_f32_reference', '10.1e')}"
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
        "--impls",
        default=d.impls,
        help="comma-separated outlook implementations, e.g. 'pallas' (default: all)",
    )
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
        done: list[dict[str, Any]] = []
        partial = Path(f"{args.worker_out}.partial")

        def emit(row: dict[str, Any]) -> None:  # progress, for a worker that times out
            done.append(row)
            partial.write_text(json.dumps(done))

        rows = run_framework(args.worker_framework, cfg, emit)
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
