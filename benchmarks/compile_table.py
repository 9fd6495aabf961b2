"""What the VOLO train step costs on TPUs and GPUs, read from the real compilers on this
host, with no accelerator (`volo_jax.sharding.deviceless`, `volo_jax.training.aot`).

For each model x machine x outlook implementation: compiles or not (with the compiler's
error), compile time, per-device argument / output / temporary memory and the peak they
add up to, whether that fits the device's HBM, XLA:TPU's FLOPs and bytes accessed per
image (`cost_analysis()`; XLA:GPU's compile-only client has none), the HLO's own count of
bytes moved per image (`aot.hlo_bytes_accessed`, every platform) and the collectives.
`--fit` adds the largest per-device batch that fits (a line through two compiles,
checked by a third); `--reuse FILE` takes a row already in a results file (same model,
machine, implementation, sharding, batch, backward and attention) instead of compiling it
again, so a fit can start from a measured row. `--peer` compiles a plain Flax ViT-S/16
step the same way. `--coverage FILE` shows which model x machine cells a results file
holds for the program a model built for each machine runs today.
`--pod` compiles the models for a 256-chip v5e pod, data parallel and FSDP.

  python -m benchmarks.compile_table --models volo_d1_224 --machines v5e-1,h100-8 \\
      --impls slices,reference,pallas --peer --json benchmarks/results/compile_table.json
  python -m benchmarks.compile_table --pod --models volo_d1_224,volo_d5_224 \\
      --json benchmarks/results/compile_table.json

Every row is appended to the JSON file as soon as it is measured (one compile of D1 takes
minutes on a 2-core host), so an interrupted run keeps what it measured. Installs:
`pip install -c constraints.txt -e '.[train,accel-compile]'`.
"""

from __future__ import annotations

import os

# Before JAX starts: the CUDA plugin's start-up check needs a host without a GPU to run
# as 'cpu', and XLA:GPU cannot autotune Triton GEMM fusions without a GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false"
).strip()

import argparse
import dataclasses
import json
import multiprocessing
import platform
import re
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from configs.common import finetune_config, variant_config
from volo_jax.sharding import deviceless
from volo_jax.training import aot

MIB = 2**20
DEFAULT_MACHINES = ("v5e-1", "v5e-8", "v4-8", "v5p-8", "v6e-8", "h100-8")
DEFAULT_IMPLS = ("slices", "reference", "pallas")
#: The transformer stages' self-attention (`--attention`; 'auto': the platform's).
ATTENTION = "auto"
#: Rows measured before (`--reuse`), which `measure` returns instead of compiling again.
REUSE: list[dict[str, Any]] = []
#: Whether `measure` compiles in a child process (`main` sets it): a compiler that crashes
#: the process (libtpu overflowing a thread's stack, say) then leaves a row that says so,
#: and the run goes on.
ISOLATE = False
#: Whether `use_custom_vjps` switched this process's rules (a child is told to as well).
CUSTOM_VJPS = False
#: Chips an FSDP group spans (`--pod`): divides VOLO's widths 192, 256, 384, 512.
FSDP_GROUP = 16


def make_config(model: str, impl: str, per_device_batch: int, devices: int, sharding: str):
    """The model's training config (224: the recipe; 384-512: the fine-tuning), bf16
    compute, `per_device_batch` images a device, MixToken pairing within a device."""
    _, variant, size = model.split("_")
    size = int(size)
    config = variant_config(variant) if size == 224 else finetune_config(variant, size)
    config.dtype = "bfloat16"
    config.model_overrides.outlook_impl = impl
    config.model_overrides.attention_impl = ATTENTION
    config.train.batch_size = per_device_batch * devices
    config.token_label.mix_group_size = per_device_batch
    if sharding == "fsdp":
        # A parameter dimension that the fsdp axis does not divide stays whole, and VOLO's
        # widths (192-512) do not divide over a pod's 256 chips: FSDP within groups of
        # FSDP_GROUP chips, data parallel across them (the hybrid a pod runs).
        config.mesh = {"data": -1, "fsdp": min(devices, FSDP_GROUP)}
        config.sharding = "fsdp"
    return config


def measure(
    model: str, machine: str, impl: str, per_device_batch: int, sharding: str = "replicated"
) -> dict[str, Any]:
    acc = deviceless.accelerator(machine)
    row = _row(model, acc, impl, sharding, None, per_device_batch, 0.0)
    known = _reused(row)
    if known is not None:
        return known
    config = make_config(model, impl, per_device_batch, acc.num_devices, sharding)
    if ISOLATE:
        args = (ATTENTION, CUSTOM_VJPS, model, machine, impl, per_device_batch, sharding)
        result, crash, seconds = run_in_child(_measure_in_child, *args)
        return result or row | {
            "mesh": dict(config.mesh),
            "compile_s": round(seconds, 1),
            "compiled": False,
            "error": crash,
        }
    compiled, seconds, error = aot.timed_compile(config, machine)
    row.update(mesh=dict(config.mesh), compile_s=round(seconds, 1))
    row["compiled"] = compiled is not None
    if compiled is None:
        row["error"] = error
        return row
    row.update(_summary_fields(aot.summary(compiled, config.train.batch_size), acc))
    row["hlo_mib_per_image_by_scope"] = _top_scopes(compiled, per_device_batch)
    return row


#: The fields that say what a row compiled: a reused row must match all of them.
IDENTITY = ("model", "machine", "impl", "sharding", "per_device_batch", "layers", "attention")


def _measure_in_child(attention: str, custom_vjps: bool, *args: Any) -> dict[str, Any]:
    """`measure(*args)` in a child process, under the parent's switches."""
    global ATTENTION
    ATTENTION = attention
    if custom_vjps:
        use_custom_vjps()
    return measure(*args)


def run_in_child(target: Callable[..., Any], *args: Any) -> tuple[Any, str | None, float]:
    """(`target(*args)`, None, seconds) run in a fresh process, or (None, how the process
    died, seconds) where it died: a compiler's crash (a signal, with the frame it died in
    from the child's stderr) or an exception. The child's stderr is passed on."""
    with tempfile.TemporaryDirectory() as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "stderr"
        child = multiprocessing.get_context("spawn").Process(
            target=_child_main, args=(str(result), str(log), target, args)
        )
        start = time.perf_counter()
        child.start()
        child.join()
        seconds = time.perf_counter() - start
        stderr = log.read_text(errors="replace") if log.exists() else ""
        sys.stderr.write(stderr)
        if child.exitcode == 0 and result.exists():
            return json.loads(result.read_text()), None, seconds
        return None, _death(child.exitcode, stderr), seconds


def _child_main(result: str, log: str, target: Callable[..., Any], args: tuple) -> None:
    """The child's body: stderr to `log` (a crash's trace is written there), the result
    as JSON to `result`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    Path(result).write_text(json.dumps(target(*args)))


def _death(exitcode: int | None, stderr: str) -> str:
    """What ended a child: 'CompilerCrash: SIGSEGV (stack overflow) in <frame>', with the
    frame of the crash report that absl's failure handler writes, or the last line of a
    Python traceback."""
    if exitcode is not None and exitcode < 0:
        how = signal.Signals(-exitcode).name
        if "STACK OVERFLOW" in stderr:
            how += " (stack overflow)"
        if -exitcode == signal.SIGKILL:
            how += " (killed: the host's memory?)"
        frame = re.search(r"PC: @\s+\S+\s+\S+\s+(.+)", stderr)
        return f"CompilerCrash: {how}" + (f" in {frame.group(1).strip()}" if frame else "")
    lines = [line for line in stderr.splitlines() if line.strip()]
    return f"ChildFailed: exit status {exitcode}" + (f": {lines[-1][:300]}" if lines else "")


#: What a `--fit` adds to the row it starts from (`fit_batch`): the old fit's, not the
#: compile's, so a reused row leaves them behind.
FIT_FIELDS = ("max_batch", "fit_note", "fit_rows", "mib_per_image")


def _reused(wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The last row in `REUSE` that compiled what `wanted` names, or that ran out of the
    device's memory doing so (any other failure is compiled again), marked as reused."""
    for row in reversed(_reused_batches(wanted)):
        if row.get("per_device_batch") == wanted["per_device_batch"]:
            return {k: v for k, v in row.items() if k not in FIT_FIELDS} | {"reused": True}
    return None


def _reused_batches(wanted: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row in `REUSE` that compiled what `wanted` names at any batch, or ran out of
    the device's memory doing so: what an earlier fit learned, wherever its path went."""
    keys = [k for k in IDENTITY if k != "per_device_batch"]
    return [
        row
        for row in REUSE
        if all(row.get(k) == wanted[k] for k in keys) and (row.get("compiled") or _out_of_hbm(row))
    ]


def _with_fit_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A results file's rows with each fit's own compiles (`fit_rows`) before its row."""
    return [r for row in rows for r in (*row.get("fit_rows", ()), row)]


def _out_of_hbm(row: dict[str, Any]) -> bool:
    """Whether a row's compile failed because the program does not fit the device."""
    return "RESOURCE_EXHAUSTED" in row.get("error", "")


def _top_scopes(compiled: jax.stages.Compiled, per_device_batch: int, top: int = 12):
    """The model parts that move the most bytes (`aot.hlo_bytes_by_scope`), MiB/image,
    the blocks of a stage summed ('network_2_*/attn': stage 2's attention layers)."""
    scopes: dict[str, int] = {}
    for scope, n in aot.hlo_bytes_by_scope(compiled.as_text(), depth=2).items():
        key = re.sub(r"_(\d+)_\d+(?=/|$)", r"_\1_*", scope)
        scopes[key] = scopes.get(key, 0) + n
    ranked = sorted(scopes.items(), key=lambda kv: -kv[1])[:top]
    return {k or "(no scope)": round(v / per_device_batch / MIB, 1) for k, v in ranked}


def _row(
    model: str,
    acc: deviceless.Accelerator,
    impl: str,
    sharding: str,
    mesh: dict[str, int] | None,
    per_device_batch: int,
    seconds: float,
) -> dict[str, Any]:
    """The fields that name a row: what was compiled, for which machine, how long it took."""
    return {
        "model": model,
        "machine": acc.name,
        "device": acc.description,
        "impl": impl,
        "sharding": sharding,
        "mesh": mesh,
        "per_device_batch": per_device_batch,
        "compile_s": round(seconds, 1),
        "hbm_mib": acc.hbm_bytes / MIB,
        "layers": _backward(acc),
        "attention": _attention(acc),
        "stack_limit_kib": _stack_limit_kib(),
    }


def _stack_limit_kib() -> int | None:
    """`ulimit -s`, None where unlimited: the stack glibc gives each of the compiler's
    threads (2 MiB where unlimited). A compile that overflows one crashes the process."""
    soft = resource.getrlimit(resource.RLIMIT_STACK)[0]
    return None if soft == resource.RLIM_INFINITY else soft // 1024


def _attention(acc: deviceless.Accelerator) -> str:
    """How the rows' self-attention runs on `acc`, resolved as `create_model` resolves it
    (`ops.attention.resolve_attention`)."""
    from volo_jax import platforms
    from volo_jax.ops.attention import resolve_attention

    devices = deviceless.devices(acc.name)
    return resolve_attention(
        ATTENTION,
        platforms.platform_of(devices),
        platforms.device_kind_of(devices),
        platforms.compute_capability_of(devices),
    )


def _backward(acc: deviceless.Accelerator) -> str:
    """How the rows' GELU, softmax and LayerNorm are differentiated on `acc`: "custom VJPs"
    where the platform's rules recompute in the backward (GPUs; every platform with
    `--custom-vjps`), "autodiff" where XLA differentiates them (TPUs)."""
    from volo_jax import platforms

    rules = platforms.RULES[platforms.platform_of(deviceless.devices(acc.name))]
    return "custom VJPs" if rules.recompute_in_backward else "autodiff"


def todays_program(machine: str) -> tuple[str, str]:
    """(self-attention, backward) of a model built for `machine` today: what a row must
    name to describe the program `auto` runs there."""
    acc = deviceless.accelerator(machine)
    return _attention(acc), _backward(acc)


def _summary_fields(s: aot.Summary, acc: deviceless.Accelerator) -> dict[str, Any]:
    return {
        "argument_mib": round(s.argument_bytes / MIB, 1),
        "output_mib": round(s.output_bytes / MIB, 1),
        "alias_mib": round(s.alias_bytes / MIB, 1),
        "temp_mib": round(s.temp_bytes / MIB, 1),
        "peak_mib": round(s.peak_bytes / MIB, 1),
        "fits": s.peak_bytes <= acc.hbm_bytes,
        "gflop_per_image": s.flops_per_image and round(s.flops_per_image / 1e9, 2),
        "xla_mib_per_image": s.bytes_accessed_per_image
        and round(s.bytes_accessed_per_image / MIB, 1),
        "flop_per_byte": s.flops_per_byte and round(s.flops_per_byte, 1),
        "hlo_mib_per_image": round(s.hlo_bytes_per_image / MIB, 1),
        "collectives": s.collectives,
    }


def use_custom_vjps() -> None:
    """Compiles the models with `volo_jax.layers`' GELU, softmax and LayerNorm custom VJPs
    (which keep only their inputs, or the softmax's output, and recompute the rest), as
    a model built for the CPU has them, instead of the accelerators' own autodiff: the
    A/B behind `platforms.RULES`' choice. A benchmark-only switch: it changes the rules
    of this process."""
    from volo_jax import platforms

    global CUSTOM_VJPS
    CUSTOM_VJPS = True
    for name in ("gpu", "tpu"):
        rules = platforms.RULES[name]
        platforms.RULES[name] = dataclasses.replace(rules, recompute_in_backward=True)


def fit_batch(
    model: str, machine: str, impl: str, first: dict[str, Any], checks: int = 4
) -> dict[str, Any]:
    """The largest per-device batch (a multiple of 8) whose peak fits the device, found
    by up to `checks` compiles past the first two (a row taken from `--reuse` is not a
    compile). Two compiles at halved batches (halving again while one runs out of HBM)
    give a line through the peak; each check compiles
    the batch where the line through the two largest batches measured meets the HBM, or
    halfway to the smallest batch that did not fit once the line points past it. A
    plan that grows slower than the line (XLA:GPU's at large batches, XLA:TPU's, which
    recomputes activations to fit HBM, for more FLOPs an image: the row's GFLOP / image
    says what fitting cost) moves the next check up; once the line's slope is under half
    the first line's (a plan gone nearly flat, whose line points far past the limit),
    at most to twice the largest batch that fit. The search stops when the next batch is
    within 5% of the largest that fit, or when its compiles run out (`fit_note` then says
    between which batches the largest lies). Every batch an earlier fit compiled
    (`--reuse`) bounds the search from its start."""
    acc = deviceless.accelerator(machine)
    hbm = acc.hbm_bytes / MIB
    rows: list[dict[str, Any]] = []
    points = [first] if first.get("compiled") else []
    batch = first["per_device_batch"]
    while len(points) < 2 and batch > 8:
        batch = max(8, batch // 2)
        row = measure(model, machine, impl, batch)
        rows.append(row)
        if row.get("compiled"):
            points.append(row)
        elif not _out_of_hbm(row):
            return {"max_batch": None, "fit_note": "a compile failed", "fit_rows": rows}
    if len(points) < 2:
        return {"max_batch": None, "fit_note": "fewer than 2 batches compile", "fit_rows": rows}
    line = sorted((r["per_device_batch"], r["peak_mib"]) for r in points)
    best = max((r["per_device_batch"] for r in points if r["fits"]), default=None)
    over = min((r["per_device_batch"] for r in points if not r["fits"]), default=None)
    (b1, p1), (b2, p2) = line[:2]
    first_slope = (p2 - p1) / (b2 - b1)

    def learn(row: dict[str, Any]) -> None:
        """Take a compile that fit (a point of the line) or did not (a bound)."""
        nonlocal line, best, over
        b = row["per_device_batch"]
        if row.get("compiled") and row["fits"]:
            best = max(best or 0, b)
            if b not in dict(line):
                line = sorted([*line, (b, row["peak_mib"])])
        else:
            over = b if over is None else min(over, b)

    for known in _reused_batches(_row(model, acc, impl, "replicated", None, batch, 0.0)):
        learn(known)
    slope, compiled, ended = 0.0, 0, False
    while True:
        (b1, p1), (b2, p2) = line[-2:]
        slope = (p2 - p1) / (b2 - b1)
        guess = int(b2 + (hbm - p2) / slope) // 8 * 8 if slope > 0 else 2 * b2
        if best is not None and slope < first_slope / 2:
            guess = min(guess, 2 * best)
        if over is not None and guess >= over:
            guess = ((best or 0) + over) // 16 * 8
        if guess < 8 or (best is not None and guess <= best * 1.05):
            ended = True
            break
        if compiled >= checks:
            break
        check = measure(model, machine, impl, guess)
        rows.append(check)
        compiled += not check.get("reused")
        if not (check.get("compiled") or _out_of_hbm(check)):
            return {"max_batch": None, "fit_note": "a compile failed", "fit_rows": rows}
        learn(check)
    if best is None:
        return {"max_batch": None, "fit_note": "no batch checked fits", "fit_rows": rows}
    result = {"max_batch": best, "fit_rows": rows, "mib_per_image": round(slope, 1)}
    if not ended:
        above = f"{over} (does not)" if over is not None else "no batch found that does not"
        result["fit_note"] = (
            f"the compiles ran out between {best} (fits) and {above}: rerun with --reuse to go on"
        )
    return result


def measure_peer(machine: str, per_device_batch: int) -> dict[str, Any]:
    from benchmarks import vit_peer

    acc = deviceless.accelerator(machine)
    devices = deviceless.devices(machine)
    start = time.perf_counter()
    compiled = vit_peer.compile_train_step(devices, per_device_batch * acc.num_devices)
    seconds = time.perf_counter() - start
    row = _row(
        "vit_s16_224 (plain Flax peer)", acc, "-", "replicated", None, per_device_batch, seconds
    )
    row["compiled"] = True
    row["attention"] = "flax"  # the peer's own nn.MultiHeadDotProductAttention
    row.update(_summary_fields(aot.summary(compiled, per_device_batch * acc.num_devices), acc))
    return row


def _append(path: Path | None, row: dict[str, Any]) -> None:
    if path is None:
        return
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows.append(row)
    meta = {
        "jax": jax.__version__,
        "libtpu": _version("libtpu"),
        "jax_cuda12_plugin": _version("jax-cuda12-plugin"),
        "host": platform.processor() or platform.machine(),
        "note": "compile-only devices on a CPU host; per-device bytes; cost per image",
    }
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _print(row: dict[str, Any]) -> None:
    if not row.get("compiled"):
        print(f"{row['model']:14s} {row['machine']:8s} {row['impl']:10s} FAILS: {row['error']}")
        return
    print(
        f"{row['model']:14s} {row['machine']:8s} {row['impl']:10s} {row['attention']:8s} "
        f"{row['sharding']:10s} "
        f"b={row['per_device_batch']:<4d} {row['compile_s']:6.1f}s "
        f"peak {row['peak_mib'] / 1024:6.2f} GiB (temp {row['temp_mib'] / 1024:5.2f}) "
        f"fits={row['fits']!s:5s} GFLOP/img={row['gflop_per_image']} "
        f"XLA MiB/img={row['xla_mib_per_image']} F/B={row['flop_per_byte']} "
        f"HLO MiB/img={row['hlo_mib_per_image']} {row['collectives']}"
        + (f" max_batch={row['max_batch']}" if "max_batch" in row else "")
        + (f" ({row['fit_note']})" if row.get("fit_note") else ""),
        flush=True,
    )


def report(path: Path) -> str:
    """The rows of a results file as a markdown table (the last row of each model,
    machine, impl, GELU/softmax/LayerNorm backward, sharding and batch)."""
    rows: dict[tuple, dict[str, Any]] = {}
    for row in json.loads(path.read_text())["rows"]:
        key = (row["model"], row["machine"], row["impl"], row.get("layers", "-"), _attn(row))
        rows[(*key, row["sharding"], row["per_device_batch"])] = row
    lines = [
        "| model | machine | impl | attention | backward | sharding | images / device "
        "| compile | peak / HBM | GFLOP / image | XLA MiB / image | FLOP / byte "
        "| HLO MiB / image | largest batch | collectives |",
        "|" + "---|" * 15,
    ]
    for row in rows.values():
        if not row.get("compiled"):
            lines.append(
                f"| {row['model']} | {row['machine']} | {row['impl']} | {_attn(row)} "
                f"| {row.get('layers', '-')} | {row['sharding']} | {row['per_device_batch']} "
                f"| fails: {row.get('error', '')[:120]} |" + " |" * 7
            )
            continue
        hbm = row["hbm_mib"] / 1024
        cells = [
            row["model"],
            row["machine"],
            row["impl"],
            _attn(row),
            row.get("layers", "-"),
            row["sharding"],
            str(row["per_device_batch"]),
            f"{row['compile_s']:.0f} s",
            f"{row['peak_mib'] / 1024:.2f} / {hbm:.0f} GiB" + ("" if row["fits"] else " (over)"),
            _cell(row.get("gflop_per_image")),
            _cell(row.get("xla_mib_per_image"), "{:,.0f}"),
            _cell(row.get("flop_per_byte")),
            _cell(row.get("hlo_mib_per_image"), "{:,.0f}"),
            _cell(row.get("max_batch"), "{}"),
            ", ".join(f"{k} {v}" for k, v in sorted(row.get("collectives", {}).items())) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The models of the table: D1-D5 at 224 and the fine-tuning resolutions.
TABLE_MODELS = (
    *(f"volo_d{i}_224" for i in range(1, 6)),
    "volo_d1_384",
    "volo_d2_384",
    "volo_d3_448",
    "volo_d4_448",
    "volo_d5_448",
    "volo_d5_512",
)


def coverage(path: Path, impl: str = "pallas") -> str:
    """Which cells of model x machine a results file holds for `impl` as a model built
    for the machine runs it today (the platform's self-attention and backward): per cell
    the batches compiled ("128: 8.9" GiB, "over" past the HBM, "fails" where the compiler
    failed otherwise) and the largest batch `--fit` found ("max 448"); "-" where nothing
    is compiled yet."""
    cells: dict[tuple[str, str], dict[int, str]] = {}
    largest: dict[tuple[str, str], int] = {}
    today = {m: todays_program(m) for m in DEFAULT_MACHINES}
    for row in _with_fit_rows(json.loads(path.read_text())["rows"]):
        key = (row["model"], row["machine"])
        program = (row["impl"], row.get("sharding"), _attn(row), row.get("layers"))
        if row["machine"] not in today or program != (impl, "replicated", *today[key[1]]):
            continue
        batch = row["per_device_batch"]
        if row.get("compiled"):
            peak = f"{row['peak_mib'] / 1024:.1f}"
            cells.setdefault(key, {})[batch] = peak if row["fits"] else f"over ({peak})"
        elif _out_of_hbm(row):
            cells.setdefault(key, {})[batch] = "over"
        else:
            cells.setdefault(key, {})[batch] = "fails"
        if row.get("max_batch"):
            largest[key] = row["max_batch"]
    machines = list(today)
    lines = [
        "| model | " + " | ".join(machines) + " |",
        "|---|" + "---|" * len(machines),
    ]
    for model in TABLE_MODELS:
        row_cells = []
        for machine in machines:
            got = cells.get((model, machine), {})
            text = "; ".join(f"{b}: {got[b]}" for b in sorted(got)) or "-"
            if (model, machine) in largest:
                text += f"; max {largest[model, machine]}"
            row_cells.append(text)
        lines.append(f"| {model} | " + " | ".join(row_cells) + " |")
    return "\n".join(lines)


def _attn(row: dict[str, Any]) -> str:
    """A row's self-attention; rows from before the field ran XLA's."""
    return row.get("attention", "xla")


def _cell(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="volo_d1_224", help="comma-separated names")
    parser.add_argument("--machines", default=",".join(DEFAULT_MACHINES))
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS))
    parser.add_argument("--batch", type=int, default=128, help="images per device")
    parser.add_argument("--fit", action="store_true", help="bisect the largest batch")
    parser.add_argument("--peer", action="store_true", help="also a plain Flax ViT-S/16")
    parser.add_argument(
        "--pod", action="store_true", help="--models on v5e-256: data parallel and FSDP"
    )
    parser.add_argument(
        "--pod-shardings", default="replicated,fsdp", help="--pod: the presets to compile"
    )
    parser.add_argument(
        "--custom-vjps",
        action="store_true",
        help="volo_jax.layers' GELU, softmax and LayerNorm custom VJPs (the CPU's) on the "
        "accelerators too, instead of their autodiff",
    )
    parser.add_argument(
        "--attention",
        default="auto",
        help="the self-attention implementation (volo_jax.ops.attention.ATTENTION; 'auto': "
        "the platform's)",
    )
    parser.add_argument("--json", type=Path, default=None, help="append rows to this file")
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="a results file whose matching rows are taken instead of compiled again",
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="print a results file as markdown and stop"
    )
    parser.add_argument(
        "--coverage",
        type=Path,
        default=None,
        help="print which model x machine cells a results file holds for today's program "
        "(a table for each of --impls) and stop",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="compile in this process, not a child process a row (a compiler crash then "
        "ends the run, and leaves no row)",
    )
    args = parser.parse_args(argv)
    global ATTENTION, ISOLATE
    ATTENTION = args.attention
    ISOLATE = not args.in_process
    if args.custom_vjps:
        use_custom_vjps()
    if args.reuse:
        # A fit's own compiles (`fit_rows`) are rows to reuse too.
        REUSE[:] = _with_fit_rows(json.loads(args.reuse.read_text())["rows"])
    if args.report:
        print(report(args.report))
        return
    if args.coverage:
        for impl in args.impls.split(","):
            print(f"\noutlook impl `{impl}`:\n\n{coverage(args.coverage, impl)}")
        return

    if args.pod:
        for model in args.models.split(","):
            for sharding in args.pod_shardings.split(","):
                row = measure(model, "v5e-256", "auto", args.batch, sharding)
                _print(row)
                _append(args.json, row)
        return
    for machine in args.machines.split(","):
        if args.peer:
            row = measure_peer(machine, args.batch)
            _print(row)
            _append(args.json, row)
        for model in args.models.split(","):
            for impl in args.impls.split(","):
                row = measure(model, machine, impl, args.batch)
                if args.fit:
                    row.update(fit_batch(model, machine, impl, row))
                _print(row)
                _append(args.json, row)


if __name__ == "__main__":
    main()
