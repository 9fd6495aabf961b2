"""Whole-model benchmark: volo-jax (jax.jit, float32 / bfloat16) against timm's VOLO
(PyTorch eager, AMP autocast, torch.compile): same weights, same input, same machine.

Modes: `infer` (eval-mode forward) and `train` (a full token-labeling step: train-mode
forward, CE on the class logits + 0.5 x CE on the aux tokens with soft targets,
backward, AdamW update). Each (backend, mode) runs in a fresh subprocess, one after
another, so that peak memory figures do not mix and one backend's threads do not
compete with another's. Usage (from the repository root):

  python -m benchmarks.bench_volo --batch 8 --reps 5 --json volo_d1.json
  python -m benchmarks.bench_volo --modes train --backends jax_fp32,torch_eager --profile-top 20
  python -m benchmarks.bench_volo --overrides '{"layers": [1, 1, 1, 1]}' --batch 2 --reps 3

Library modules (jax, torch, volo_jax) are imported inside functions so that a
worker process loads only the framework it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make volo_jax importable
    sys.path.insert(0, str(REPO_ROOT))
#: jax_bf16mm: a float32 model whose products take bf16 operands
#: (jax_default_matmul_precision='bfloat16', config.matmul_precision in training).
#: jax_plain: float32 through the README's Python API as a user writes it:
#: `create_model(name)`, `jax.jit(model.apply)`, an optax AdamW step under a plain
#: `jax.jit` (no donation, no compiler options, JAX's default asynchronous dispatch).
JAX_BACKENDS = ("jax_fp32", "jax_bf16", "jax_bf16mm", "jax_plain")
#: torch_compile: float32 (TF32 only with --torch-tf32); torch_compile_amp: the same
#: autocast as torch_amp around the compiled model, the like-for-like rival of jax_bf16.
TORCH_BACKENDS = ("torch_eager", "torch_amp", "torch_compile", "torch_compile_amp")
BACKENDS = JAX_BACKENDS + TORCH_BACKENDS
MODES = ("infer", "train")
#: Fields of our VOLO that timm's constructor does not take.
#: AdamW hyper-parameters, the same for optax and torch.
ADAMW = dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05)
AUX_WEIGHT = 0.5


class UnavailableError(Exception):
    """A backend that cannot run here (no CUDA for AMP, a failed torch.compile, ...)."""


# --------------------------------------------------------------------------- machine


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


#: CPU features that decide which product paths XLA and PyTorch take on the CPU: AMX
#: tiles (Intel), AVX-512 BF16 (Intel and AMD Zen 4+), AVX-512, AVX2.
CPU_FEATURES = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx2")


def cpu_details() -> dict[str, Any]:
    """Vendor, family/model numbers (e.g. AMD family 26 is Zen 5) and the features in
    CPU_FEATURES: the model name alone ('AMD EPYC') does not tell machines apart."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "vendor": info.get("vendor_id"),
        "family": info.get("cpu family"),
        "model": info.get("model"),
        "features": [f for f in CPU_FEATURES if f in flags],
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, core count, library versions and thread settings; no framework is initialised
    here (a JAX GPU client would pre-allocate memory in the parent process)."""
    gpus = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpus = (
            subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,memory.total,driver_version",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
            .stdout.strip()
            .splitlines()
        )
    return {
        "cpu_model": cpu_model(),
        "cpu": cpu_details(),
        "cpu_cores_available": cpu_count(),
        "cpu_count_total": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpus": gpus,
        "versions": {p: _version(p) for p in ("jax", "jaxlib", "flax", "optax", "torch", "timm")},
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "threads_note": (
            "torch: torch.set_num_threads(--threads), default = cores available. JAX/XLA on "
            "CPU sizes its intra-op thread pool to all cores it sees; it has no per-process "
            "knob besides XLA_FLAGS (recorded above). On GPU both run on the one device."
        ),
    }


def loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


# --------------------------------------------------------------------------- memory


def rss_mb() -> float | None:
    """Current resident set size of this process, MiB (Linux), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float:
    """Peak RSS since the last `reset_peak_rss` (VmHWM), or the lifetime ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of one backend: device allocator peaks on GPU, RSS on CPU.

    `start()` after setup (weights, optimizer state and inputs in place), `mark_warm()`
    after the first call and warm-up, `result()` after the timed runs.
    """

    def __init__(self, kind: str, device: Any = None) -> None:
        self.kind = kind  # 'jax_gpu', 'torch_cuda' or 'rss'
        self.device = device
        self.base: float | None = None
        self.first_peak: float | None = None
        self.warm: float | None = None
        self.resettable = False

    def _device_now(self, key: str) -> float:
        if self.kind == "jax_gpu":
            stats = self.device.memory_stats() or {}
            return stats.get(key, 0) / 2**20
        import torch

        if key == "peak_bytes_in_use":
            return torch.cuda.max_memory_allocated() / 2**20
        return torch.cuda.memory_allocated() / 2**20

    def start(self) -> None:
        if self.kind == "rss":
            self.resettable = reset_peak_rss()
            self.base = rss_mb()
        else:
            self.base = self._device_now("bytes_in_use")

    def mark_warm(self) -> None:
        if self.kind == "rss":
            self.first_peak = peak_rss_mb()
            self.resettable = reset_peak_rss()
            self.warm = rss_mb()
        else:
            self.first_peak = self._device_now("peak_bytes_in_use")

    def result(self) -> dict[str, Any]:
        if self.kind == "rss":
            peak = peak_rss_mb()
            base = self.base or 0.0
            return {
                "method": (
                    "CPU: peak RSS (VmHWM, reset after warm-up) minus RSS after setup"
                    if self.resettable
                    else "CPU: lifetime peak RSS (ru_maxrss) minus RSS after setup"
                ),
                "peak_mb": peak - base,
                "first_call_peak_mb": (self.first_peak or 0.0) - base,
                # Growth during the timed calls alone: what a step needs beyond what the
                # allocators kept from the first call and warm-up.
                "steady_growth_mb": peak - (self.warm or base),
                "base_rss_mb": base,
                "peak_rss_mb": peak,
            }
        peak = self._device_now("peak_bytes_in_use")
        return {
            "method": (
                "GPU: JAX memory_stats()['peak_bytes_in_use'] (process lifetime)"
                if self.kind == "jax_gpu"
                else "GPU: torch.cuda.max_memory_allocated() (process lifetime)"
            ),
            "peak_mb": peak,
            "first_call_peak_mb": self.first_peak,
            "base_mb": self.base,
        }


# --------------------------------------------------------------------------- timing


def time_calls(
    fn: Callable[[], Any],
    sync: Callable[[Any], Any],
    reps: int,
    warmup: int,
    memory: MemoryProbe | None = None,
) -> dict[str, Any]:
    """First call (compile included), `warmup` untimed calls, then `reps` timed calls,
    each synchronised with the device. Times in seconds."""
    if memory is not None:
        memory.start()
    t0 = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t0
    for _ in range(warmup):
        sync(fn())
    if memory is not None:
        memory.mark_warm()
    times = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        "first_call_s": first,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
    }
    if memory is not None:
        out["memory"] = memory.result()
    return out


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Config:
    """What every worker needs to rebuild the same model and batch."""

    model: str = "volo_d1_224"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch: int = 8
    reps: int = 5
    warmup: int = 2
    threads: int = 0  # 0: all cores available
    seed: int = 0
    jax_matmul_precision: str | None = None
    cpu_scheduler: str = "default"  # XLA:CPU's scheduler for the JAX jits (ops.cpu.CPU_SCHEDULERS)
    profile_top: int = 0  # > 0: profile the JAX step's HLO ops after timing
    torch_tf32: bool = False  # CUDA: let torch's float32 matmuls use TF32 (as JAX's default)
    cpu_amp: bool = False  # torch_amp on CPU: bfloat16 autocast (worth it with AMX/AVX512-BF16)
    # Workers start with volo_jax.cli.with_malloc_tunables (both frameworks), as
    # scripts/train_default.sh starts main.py.
    malloc_tunables: bool = True


def model_kwargs(cfg: Config) -> dict[str, Any]:
    from volo_jax.models import model_kwargs as registry_kwargs

    return registry_kwargs(cfg.model, **cfg.overrides)


def build_timm_model(cfg: Config) -> Any:
    """timm's VOLO with our registry's arguments for `cfg.model`, seeded init."""
    import torch
    from timm.models.volo import VOLO

    from volo_jax.models.volo import JAX_ONLY_FIELDS

    torch.manual_seed(cfg.seed)
    kw = {k: v for k, v in model_kwargs(cfg).items() if k not in JAX_ONLY_FIELDS}
    return VOLO(**kw).eval()


def make_data(cfg: Config) -> dict[str, np.ndarray]:
    """The timm state dict (prefixed 'sd/'), NHWC images and soft targets, as NumPy."""
    from volo_jax.models import create_model

    spec = create_model(cfg.model, **cfg.overrides)  # an unbound module: just the fields
    model = build_timm_model(cfg)
    data = {"sd/" + k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(cfg.seed)
    size, classes = spec.img_size, spec.num_classes
    tokens = (size // spec.patch_size // spec.pooling_scale) ** 2

    def soft(shape: tuple[int, ...]) -> np.ndarray:
        logits = 3.0 * rng.standard_normal(shape).astype(np.float32)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True)).astype(np.float32)

    data["images"] = rng.standard_normal((cfg.batch, size, size, spec.in_chans)).astype(np.float32)
    data["cls_target"] = soft((cfg.batch, classes))
    data["dense_target"] = soft((cfg.batch, tokens, classes))
    return data


def state_dict_of(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[3:]: v for k, v in data.items() if k.startswith("sd/")}


# --------------------------------------------------------------------------- JAX


_HLO_LINE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (opcode, source op_name from the metadata)} of an HLO module."""
    out = {}
    for line in hlo_text.splitlines():
        match = _HLO_LINE.match(line)
        if match:
            source = _OP_NAME.search(line)
            out[match.group(1)] = (match.group(2), source.group(1) if source else "")
    return out


def _source_group(op_name: str) -> str:
    """'jit(step)/jvp(VOLO)/VOLO.forward_features/network_0_1/attn/v/dot_general' ->
    'network_0_*/attn/v' (transforms, block indices and the primitive dropped)."""
    skip = ("VOLO", "cpu_branch")
    parts = [p for p in op_name.split("/") if p and "(" not in p and not p.startswith(skip)]
    parts = [re.sub(r"^(network_\d+)_\d+$", r"\1_*", p) for p in parts[:-1] if "->" not in p]
    parts = [re.sub(r"^post_network_\d+$", "post_network_*", p) for p in parts]
    return "/".join(parts[:3]) or "(outside the model: loss, optimizer, layout)"


def profile_xla_ops(
    hlo_text: str, run_once: Callable[[], Any], calls: int = 3, top: int = 25
) -> dict[str, Any]:
    """Runs `run_once` `calls` times under `jax.profiler` and sums the time of each
    executed HLO instruction (XLA's thunks on CPU, kernels on GPU) per call ->
    the `top` instructions and the time per model part (from the ops' metadata)."""
    import gzip

    import jax

    with tempfile.TemporaryDirectory(prefix="xla_profile_") as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(run_once())
        traces = sorted(Path(tmp).rglob("*perfetto_trace.json.gz"))
        if not traces:
            return {"error": "the profiler wrote no perfetto trace"}
        with gzip.open(traces[-1]) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op: dict[str, float] = {}
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op and not e.get("name", "").startswith("end:"):
            per_op[op] = per_op.get(op, 0.0) + e.get("dur", 0.0) / 1e3 / calls  # ms per call
    instructions = hlo_instructions(hlo_text)
    groups: dict[str, float] = {}
    rows = []
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1]):
        opcode, source = instructions.get(op, ("?", ""))
        group = _source_group(source)
        groups[group] = groups.get(group, 0.0) + ms
        rows.append({"hlo_op": op, "opcode": opcode, "ms": ms, "source": source})
    total = sum(per_op.values())
    return {
        "note": "ms per call summed over executed HLO instructions (threads may overlap)",
        "total_ms": total,
        "top_ops": rows[:top],
        "by_part_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
    }


def compile_stats(jitted: Any, *args: Any) -> tuple[dict[str, Any], str]:
    """Compiles `jitted` for `args` ahead of time (later calls hit the same cache) ->
    ({compile time, XLA's cost analysis (flops, bytes accessed), memory plan (MiB)},
    the optimized HLO text)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    out: dict[str, Any] = {"compile_s": time.perf_counter() - t0}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out["xla_gflops"] = cost.get("flops", float("nan")) / 1e9
        out["xla_gbytes_accessed"] = cost.get("bytes accessed", float("nan")) / 1e9
    except Exception as err:  # not every backend implements it
        out["xla_cost_error"] = repr(err)
    try:
        mem = compiled.memory_analysis()
        out["xla_memory_mb"] = {
            k: getattr(mem, f"{k}_size_in_bytes") / 2**20
            for k in ("argument", "output", "alias", "temp")
        }
    except Exception as err:
        out["xla_memory_error"] = repr(err)
    return out, compiled.as_text()


def run_jax(backend: str, mode: str, cfg: Config, data: dict[str, np.ndarray]) -> tuple:
    """Times `mode` for a JAX backend. Returns (result dict, logits or None)."""
    import jax
    import jax.numpy as jnp
    import optax

    from volo_jax.cli import synchronous_cpu_dispatch
    from volo_jax.convert import torch_to_flax
    from volo_jax.models import create_model
    from volo_jax.platforms.cpu import compiler_options

    plain = backend == "jax_plain"
    if not plain:
        synchronous_cpu_dispatch()  # as main.py (before the first computation of a worker)
    precision = "bfloat16" if backend == "jax_bf16mm" else cfg.jax_matmul_precision
    if precision:
        jax.config.update("jax_default_matmul_precision", precision)
    dtype = jnp.bfloat16 if backend == "jax_bf16" else jnp.float32
    device = jax.devices()[0]
    if plain:  # the README's call: built for the default backend
        model = create_model(cfg.model, **cfg.overrides)
    else:
        model = create_model(cfg.model, platform=device, dtype=dtype, **cfg.overrides)
    variables = torch_to_flax(state_dict_of(data), model, model_name=cfg.model)
    options = None if plain else compiler_options(device.platform, cfg.cpu_scheduler)
    variables = jax.device_put(variables, device)
    images = jax.device_put(data["images"], device)
    memory = MemoryProbe("jax_gpu" if device.platform == "gpu" else "rss", device)
    sync = jax.block_until_ready
    logits = None

    if mode == "infer":
        forward = jax.jit(model.apply, compiler_options=options)
        xla, hlo = compile_stats(forward, variables, images)
        timing = time_calls(lambda: forward(variables, images), sync, cfg.reps, cfg.warmup, memory)
        logits = np.asarray(forward(variables, images), dtype=np.float32)
        if cfg.profile_top:
            timing["xla_profile"] = profile_xla_ops(
                hlo, lambda: forward(variables, images), top=cfg.profile_top
            )
    else:
        tx = optax.adamw(
            ADAMW["lr"], ADAMW["b1"], ADAMW["b2"], ADAMW["eps"], weight_decay=ADAMW["weight_decay"]
        )
        cls_t = jax.device_put(data["cls_target"], device)
        dense_t = jax.device_put(data["dense_target"], device)

        def soft_ce(logits: jax.Array, target: jax.Array) -> jax.Array:
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            return -(target * logp).sum(-1).mean()

        def loss_fn(params, batch_stats, x, ct, dt, rng):
            (cls, aux), updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                return_dense=True,
                rngs={"dropout": rng},
                mutable=["batch_stats"],
            )
            loss = soft_ce(cls, ct) + AUX_WEIGHT * soft_ce(aux, dt)
            return loss, updates["batch_stats"]

        def step(params, batch_stats, opt_state, x, ct, dt, rng):
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, batch_stats), grads = grad_fn(params, batch_stats, x, ct, dt, rng)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), batch_stats, opt_state, loss

        train_step = jax.jit(
            step, donate_argnums=() if plain else (0, 1, 2), compiler_options=options
        )
        params = variables["params"]
        state = {
            "params": params,
            "batch_stats": variables.get("batch_stats", {}),
            "opt": jax.jit(tx.init)(params),
        }
        # Commit every argument to the device: outputs of the step are committed, and
        # a first call with uncommitted arguments would compile the step a second time.
        state = jax.device_put(state, device)
        del variables, params
        rng = jax.random.key(cfg.seed)
        xla, hlo = compile_stats(
            train_step,
            state["params"],
            state["batch_stats"],
            state["opt"],
            images,
            cls_t,
            dense_t,
            rng,
        )

        def call() -> jax.Array:
            p, b, o, loss = train_step(
                state["params"], state["batch_stats"], state["opt"], images, cls_t, dense_t, rng
            )
            state.update(params=p, batch_stats=b, opt=o)
            return loss

        timing = time_calls(call, sync, cfg.reps, cfg.warmup, memory)
        timing["final_loss"] = float(call())
        if cfg.profile_top:
            timing["xla_profile"] = profile_xla_ops(hlo, call, top=cfg.profile_top)
    # Compilation happened ahead of time; the first call ran the cached executable.
    timing["first_call_s"] += xla["compile_s"]
    timing.update(xla)
    timing.update(
        device=f"{device.platform}:{device.device_kind}",
        compute_dtype=jnp.dtype(dtype).name,
        jax_matmul_precision=str(jax.config.jax_default_matmul_precision),
        cpu_scheduler=cfg.cpu_scheduler if device.platform == "cpu" else None,
    )
    return timing, logits


# --------------------------------------------------------------------------- torch


def run_torch(backend: str, mode: str, cfg: Config, data: dict[str, np.ndarray]) -> tuple:
    """Times `mode` for a torch backend (eager or torch.compile, float32 or AMP autocast).
    Returns (result, logits)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(cfg.threads or cpu_count())
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    amp_dtype = None
    compiled = backend.startswith("torch_compile")
    if backend in ("torch_amp", "torch_compile_amp"):
        if cuda:
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif cfg.cpu_amp:
            amp_dtype = torch.bfloat16
        else:
            raise UnavailableError(
                "AMP autocast is measured on CUDA only (CPU run: skipped; --cpu-amp for "
                "CPU bfloat16 autocast)"
            )
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = cfg.torch_tf32
        torch.cuda.reset_peak_memory_stats()
    model = build_timm_model(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict_of(data).items()})
    model = model.to(device)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous().to(device)
    memory = MemoryProbe("torch_cuda" if cuda else "rss")

    def sync(_: Any) -> None:
        if cuda:
            torch.cuda.synchronize()

    def autocast() -> Any:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    logits = None
    try:
        if mode == "infer":
            model.eval()
            forward = torch.compile(model) if compiled else model

            def call() -> Any:
                with torch.inference_mode(), autocast():
                    return forward(images)

            timing = time_calls(call, sync, cfg.reps, cfg.warmup, memory)
            logits = call().float().cpu().numpy()
        else:
            model.train()
            cls_t = torch.from_numpy(data["cls_target"]).to(device)
            dense_t = torch.from_numpy(data["dense_target"]).to(device)
            opt = torch.optim.AdamW(
                model.parameters(),
                lr=ADAMW["lr"],
                betas=(ADAMW["b1"], ADAMW["b2"]),
                eps=ADAMW["eps"],
                weight_decay=ADAMW["weight_decay"],
            )
            scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

            def soft_ce(logits: Any, target: Any) -> Any:
                return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()

            def loss_fn(x: Any, ct: Any, dt: Any) -> Any:
                # timm's forward_train without MixToken: features, class and aux heads.
                feats = model.forward_features(x)
                cls = model.head(model.head_drop(feats[:, 0]))
                aux = model.aux_head(feats[:, 1:])
                return soft_ce(cls, ct) + AUX_WEIGHT * soft_ce(aux, dt)

            loss_call = torch.compile(loss_fn) if compiled else loss_fn

            def call() -> Any:
                with autocast():
                    loss = loss_call(images, cls_t, dense_t)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                return loss

            timing = time_calls(call, sync, cfg.reps, cfg.warmup, memory)
            timing["final_loss"] = float(call().detach())
    except Exception as err:
        if compiled:
            raise UnavailableError(f"torch.compile failed: {type(err).__name__}: {err}") from err
        raise
    timing.update(
        device=f"cuda:{torch.cuda.get_device_name()}" if cuda else "cpu",
        compute_dtype=str(amp_dtype or torch.float32).replace("torch.", ""),
        torch_threads=torch.get_num_threads(),
        cuda_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32 if cuda else None,
    )
    return timing, logits


# --------------------------------------------------------------------------- orchestration


def run_backend(
    backend: str, mode: str, cfg: Config, data: dict[str, np.ndarray]
) -> tuple[dict[str, Any], np.ndarray | None]:
    """One (backend, mode) measurement in this process -> (result record, eval logits)."""
    record: dict[str, Any] = {"backend": backend, "mode": mode}
    runner = run_jax if backend in JAX_BACKENDS else run_torch
    try:
        timing, logits = runner(backend, mode, cfg, data)
    except UnavailableError as err:
        record.update(status="skipped", reason=str(err))
        return record, None
    except Exception as err:
        record.update(
            status="failed",
            reason=f"{type(err).__name__}: {err}",
            traceback=traceback.format_exc(limit=6),
        )
        return record, None
    record.update(status="ok", **timing)
    record["images_per_s"] = cfg.batch / timing["median_s"]
    return record, logits


def _worker(args: argparse.Namespace) -> int:
    """Subprocess entry: load the shared data, measure one (backend, mode), write JSON."""
    cfg = Config(**json.loads(Path(args.worker_config).read_text()))
    with np.load(args.worker_data) as npz:
        data = {k: npz[k] for k in npz.files}
    record, logits = run_backend(args.worker_backend, args.worker_mode, cfg, data)
    if logits is not None:
        np.save(args.worker_out + ".logits.npy", logits)
    Path(args.worker_out).write_text(json.dumps(record))
    return 0


def worker_env(malloc_tunables: bool) -> dict[str, str]:
    """The environment of a worker process: this one's, the repository importable, and
    (`malloc_tunables`) the glibc malloc tunables `main.py` starts with, the same for JAX
    and torch workers (`volo_jax.cli.with_malloc_tunables`; docs/performance.md has what
    they change)."""
    from volo_jax.cli import with_malloc_tunables

    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return with_malloc_tunables(env) if malloc_tunables else env


def _run_subprocess(
    backend: str, mode: str, workdir: Path, timeout: float, malloc_tunables: bool
) -> tuple[dict[str, Any], np.ndarray | None]:
    out = workdir / f"{backend}_{mode}.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_volo",
        "--worker-backend",
        backend,
        "--worker-mode",
        mode,
        "--worker-config",
        str(workdir / "config.json"),
        "--worker-data",
        str(workdir / "data.npz"),
        "--worker-out",
        str(out),
    ]
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO_ROOT,
            env=worker_env(malloc_tunables),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        reason = f"worker timed out after {timeout:.0f} s"
        status = "skipped" if backend.startswith("torch_compile") else "failed"
        return {"backend": backend, "mode": mode, "status": status, "reason": reason}, None
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {
            "backend": backend,
            "mode": mode,
            "status": "failed",
            "reason": f"worker exited with {proc.returncode}: {tail}",
        }, None
    record = json.loads(out.read_text())
    logits_path = Path(str(out) + ".logits.npy")
    return record, np.load(logits_path) if logits_path.exists() else None


def compute_ratios(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """images/s of each JAX backend over each torch backend, per mode (> 1: JAX faster)."""
    ratios: dict[str, dict[str, float]] = {}
    ok = {(r["backend"], r["mode"]): r["images_per_s"] for r in results if r["status"] == "ok"}
    for mode in MODES:
        for jb in JAX_BACKENDS:
            for tb in TORCH_BACKENDS:
                if (jb, mode) in ok and (tb, mode) in ok:
                    ratios.setdefault(mode, {})[f"{jb}/{tb}"] = ok[jb, mode] / ok[tb, mode]
    return ratios


def run(
    cfg: Config,
    backends: Sequence[str],
    modes: Sequence[str],
    isolate: bool = True,
    timeout: float = 3600.0,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Measures every (backend, mode), one after another -> the report dict."""
    data = make_data(cfg)
    results, logits = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_volo_") as tmp:
        workdir = Path(tmp)
        if isolate:
            np.savez(workdir / "data.npz", **data)
            (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        for mode in modes:
            for backend in backends:
                log(f"[bench_volo] {backend} {mode} ... (load {loadavg()})")
                if isolate:
                    record, out = _run_subprocess(
                        backend, mode, workdir, timeout, cfg.malloc_tunables
                    )
                else:
                    record, out = run_backend(backend, mode, cfg, data)
                record["loadavg_after"] = loadavg()
                results.append(record)
                if out is not None:
                    logits[backend] = out
                log(f"[bench_volo]   {_summary(record)}")
    parity = {}
    if "torch_eager" in logits:
        ref = logits["torch_eager"]
        parity = {b: float(np.abs(v - ref).max()) for b, v in logits.items() if b != "torch_eager"}
    kw = model_kwargs(cfg)
    return {
        "benchmark": "bench_volo",
        "model": cfg.model,
        "overrides": cfg.overrides,
        "img_size": kw["img_size"],
        "num_classes": kw["num_classes"],
        "config": dataclasses.asdict(cfg),
        "adamw": ADAMW,
        "loss": f"soft CE(cls) + {AUX_WEIGHT} x soft CE(aux tokens), mean over batch (and tokens)",
        "isolation": (
            "each (backend, mode) in a fresh subprocess, run one after another"
            if isolate
            else "all backends in this one process (peak memory figures mix)"
        ),
        "worker_glibc_tunables": (worker_env(cfg.malloc_tunables) if isolate else os.environ).get(
            "GLIBC_TUNABLES"
        ),
        "timing": "median of reps timed calls after first call + warm-up, device-synchronised",
        "machine": machine_info(),
        "loadavg_end": loadavg(),
        "results": results,
        "ratios": compute_ratios(results),
        "parity_max_abs_logit_diff_vs_torch_eager": parity,
    }


def _summary(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {r.get('reason', '')[:300]}"
    mem = r.get("memory", {}).get("peak_mb")
    return (
        f"{r['images_per_s']:.2f} img/s, median {1e3 * r['median_s']:.1f} ms, "
        f"first call {r['first_call_s']:.2f} s, peak mem {mem:.0f} MiB"
    )


def _fmt(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return format(value, spec) if value is not None else f"{'-':>{width}}"


def format_table(report: dict[str, Any]) -> str:
    """Plain-text table of the results and the JAX / torch ratios."""
    head = f"{'backend':<14}{'mode':<7}{'img/s':>9}{'ms/iter':>10}{'first s':>9}"
    head += f"{'peak MiB':>10}{'XLA tmp':>9}  note"
    machine = report.get("machine", {})
    cpu = machine.get("cpu") or {}
    lines = [
        f"machine: {machine.get('cpu_model')}, {machine.get('cpu_cores_available')} cores "
        f"({cpu.get('vendor')} family {cpu.get('family')} model {cpu.get('model')}; "
        f"{' '.join(cpu.get('features', [])) or 'no listed features'})"
        + (f"; GPUs: {', '.join(machine['gpus'])}" if machine.get("gpus") else ""),
        head,
        "-" * len(head),
    ]
    for r in report["results"]:
        if r["status"] != "ok":
            reason = r.get("reason", "").splitlines()[0][:70] if r.get("reason") else ""
            dashes = f"{'-':>9}{'-':>10}{'-':>9}{'-':>10}{'-':>9}"
            lines.append(f"{r['backend']:<14}{r['mode']:<7}{dashes}  {r['status']}: {reason}")
            continue
        mem = r.get("memory", {}).get("peak_mb")
        xla_tmp = r.get("xla_memory_mb", {}).get("temp")
        lines.append(
            f"{r['backend']:<14}{r['mode']:<7}{r['images_per_s']:>9.2f}"
            f"{1e3 * r['median_s']:>10.1f}{r['first_call_s']:>9.2f}"
            f"{_fmt(mem, '10.0f')}{_fmt(xla_tmp, '9.0f')}  {r.get('compute_dtype', '')}"
        )
    for mode, ratios in report["ratios"].items():
        lines.append(f"ratios ({mode}, images/s, > 1 means JAX faster):")
        lines.extend(f"  {k:<28}{v:6.2f}" for k, v in ratios.items())
    parity = report.get("parity_max_abs_logit_diff_vs_torch_eager")
    if parity:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in parity.items())
        lines.append(f"max |logits - torch_eager logits|: {diffs}")
    for r in report["results"]:
        prof = r.get("xla_profile")
        if prof and "by_part_ms" in prof:
            lines.append(
                f"XLA profile {r['backend']} {r['mode']}: {prof['total_ms']:.1f} ms of ops per call"
            )
            parts = list(prof["by_part_ms"].items())[:12]
            lines.extend(f"  {ms:9.1f} ms  {part}" for part, ms in parts)
            lines.append("  slowest ops:")
            lines.extend(
                f"  {o['ms']:9.1f} ms  {o['hlo_op']} ({o['opcode']}) {o['source'][-70:]}"
                for o in prof["top_ops"][:8]
            )
    mem = next((r["memory"]["method"] for r in report["results"] if "memory" in r), None)
    if mem:
        lines.append(f"peak MiB: {mem}; XLA tmp: XLA's planned temp buffers (MiB)")
    return "\n".join(lines)


def write_report(report: dict[str, Any], table: str, json_path: str | None) -> None:
    """Prints `table` and, if `json_path` is given, writes `report` there as JSON."""
    print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
        print(f"wrote {json_path}")


def _csv(value: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {list(allowed)}")
    return items


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="volo_d1_224", help="any registered model name")
    p.add_argument("--overrides", default="{}", help="JSON of model arguments, e.g. shrunk sizes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs after the first call")
    p.add_argument("--modes", default="infer,train", type=lambda s: _csv(s, MODES, "mode"))
    p.add_argument(
        "--backends", default=",".join(BACKENDS), type=lambda s: _csv(s, BACKENDS, "backend")
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--jax-matmul-precision",
        default=None,
        help="jax_default_matmul_precision for the JAX workers (default: JAX's own)",
    )
    p.add_argument(
        "--cpu-scheduler",
        default="default",
        choices=("default", "memory", "concurrency"),
        help="XLA:CPU's instruction scheduler for the JAX workers (volo_jax.ops.cpu."
        "CPU_SCHEDULERS; config.cpu_scheduler in training)",
    )
    p.add_argument(
        "--profile-top",
        type=int,
        default=0,
        help="JAX backends: after timing, profile 3 calls with jax.profiler and report the "
        "N slowest HLO ops and the time per model part",
    )
    p.add_argument(
        "--torch-tf32",
        action="store_true",
        help="CUDA: allow TF32 in torch's float32 matmuls (JAX's default precision on GPU "
        "does; --jax-matmul-precision highest is the strict-float32 alternative)",
    )
    p.add_argument(
        "--cpu-amp",
        action="store_true",
        help="run torch_amp and torch_compile_amp on CPU too (bfloat16 autocast; fast where "
        "the CPU has AMX)",
    )
    p.add_argument(
        "--no-malloc-tunables",
        dest="malloc_tunables",
        action="store_false",
        help="start the workers without main.py's glibc malloc tunables (see worker_env)",
    )
    p.add_argument("--in-process", action="store_true", help="no subprocess per backend")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker process")
    p.add_argument("--json", default=None, help="write the report here")
    for name in ("backend", "mode", "config", "data", "out"):
        p.add_argument(f"--worker-{name}", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_backend:
        return _worker(args)
    cfg = Config(
        model=args.model,
        overrides=json.loads(args.overrides),
        batch=args.batch,
        reps=args.reps,
        warmup=args.warmup,
        threads=args.threads,
        seed=args.seed,
        jax_matmul_precision=args.jax_matmul_precision,
        cpu_scheduler=args.cpu_scheduler,
        profile_top=args.profile_top,
        torch_tf32=args.torch_tf32,
        cpu_amp=args.cpu_amp,
        malloc_tunables=args.malloc_tunables,
    )
    report = run(cfg, args.backends, args.modes, isolate=not args.in_process, timeout=args.timeout)
    write_report(report, format_table(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
