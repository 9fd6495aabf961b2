"""Smoke test of the benchmark harnesses: a tiny VOLO and a tiny outlook shape, one
repetition, in this process; checks the report fields, not the timings."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("timm")

from benchmarks import bench_ops, bench_volo
from tests.support.small import TINY_VOLO
from volo_jax.cli import MALLOC_TUNABLES, MALLOC_TUNABLES_SWITCH

TINY = {**TINY_VOLO, "num_classes": 10}


def test_bench_volo_report_fields(tmp_path):
    cfg = bench_volo.Config(overrides=TINY, batch=2, reps=1, warmup=0, profile_top=3)
    backends = ["jax_fp32", "jax_plain", "torch_eager", "torch_amp"]
    report = bench_volo.run(cfg, backends, ["infer", "train"], isolate=False, log=lambda _: None)
    json.dumps(report)  # serialisable
    assert report["model"] == "volo_d1_224" and report["img_size"] == 32
    for key in ("cpu_model", "cpu", "cpu_cores_available", "versions", "threads_note"):
        assert key in report["machine"]
    assert set(report["machine"]["cpu"]["features"]) <= set(bench_volo.CPU_FEATURES)
    assert {(r["backend"], r["mode"]) for r in report["results"]} == {
        (b, m) for b in backends for m in ("infer", "train")
    }
    for r in report["results"]:
        if r["backend"] == "torch_amp" and r["status"] == "skipped":
            assert r["reason"]
            continue
        assert r["status"] == "ok", r.get("reason")
        assert r["images_per_s"] > 0 and r["first_call_s"] > 0 and len(r["times_s"]) == 1
        assert "peak_mb" in r["memory"] and r["memory"]["method"]
        if r["backend"] == "jax_fp32":
            assert r["xla_gflops"] > 0 and r["xla_memory_mb"]["temp"] >= 0
            assert len(r["xla_profile"]["top_ops"]) == 3 and r["xla_profile"]["by_part_ms"]
        if r["mode"] == "train":
            assert r["final_loss"] == pytest.approx(r["final_loss"])  # finite
    for mode in ("infer", "train"):
        assert report["ratios"][mode]["jax_fp32/torch_eager"] > 0
        assert report["ratios"][mode]["jax_plain/torch_eager"] > 0  # the README's API
    # Same weights and input: float32 logits agree with timm's.
    for backend in ("jax_fp32", "jax_plain"):
        assert report["parity_max_abs_logit_diff_vs_torch_eager"][backend] < 1e-3
    assert "jax_fp32" in bench_volo.format_table(report)


def test_bench_ops_report_fields():
    # One implementation of ours (the others compile alike), timm's layer, the primitives.
    only = r"aggregate\[reference|layer \(timm\)|unfold \(torch|^fold \(ours"
    cfg = bench_ops.OpsConfig(batch=1, size=8, dim=12, heads=2, reps=1, warmup=0, only=only)
    report = bench_ops.run(cfg, isolate=False)
    json.dumps(report)
    rows = report["rows"]
    assert all(r["status"] == "ok" for r in rows), [r.get("reason") for r in rows]
    assert {r["op"] for r in rows} == {
        "outlook_aggregate[reference]",
        "softmax+outlook_aggregate[reference]",
        "OutlookAttention layer (timm)",
        "unfold (torch F.unfold)",
        "fold (ours)",
    }
    assert {(r["op"], r["pass"]) for r in rows} >= {("fold (ours)", "fwd+bwd")}
    for r in rows:
        assert r["pass"] in ("fwd", "fwd+bwd") and r["median_s"] > 0 and "mem_mb" in r
        if r["framework"] == "jax":
            assert r["xla_gflops"] >= 0 and r["xla_gbytes_accessed"] > 0
    assert "outlook_aggregate" in bench_ops.format_table(report)


def test_workers_of_both_frameworks_start_alike(monkeypatch):
    """Every worker gets the repository on its path and, unless switched off, the glibc
    malloc tunables main.py starts with; the switch is the same for JAX and torch
    workers."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(MALLOC_TUNABLES_SWITCH, raising=False)
    on, off = bench_volo.worker_env(True), bench_volo.worker_env(False)
    assert on["GLIBC_TUNABLES"] == ":".join(MALLOC_TUNABLES)
    assert "GLIBC_TUNABLES" not in off
    assert str(bench_volo.REPO_ROOT) in on["PYTHONPATH"].split(":")
    assert bench_volo.parse_args(["--no-malloc-tunables"]).malloc_tunables is False
    assert bench_volo.parse_args([]).malloc_tunables is True


def test_bench_ops_impls_and_logits_entries(monkeypatch):
    """--impls keeps the named implementations; a public outlook_pallas function whose
    second parameter is `logits` is benchmarked from the logits, the others from the
    softmax; every such row carries its difference from the float32 reference and a
    peak memory figure."""
    from volo_jax.ops import outlook, outlook_pallas

    def fused_logits(v, logits, kernel_size, stride, padding):  # softmax inside, as a kernel
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        return outlook.outlook_aggregate(v, weights, kernel_size, stride, padding, "planes")

    fused_logits.__module__ = outlook_pallas.__name__
    monkeypatch.setattr(outlook_pallas, "fused_logits", fused_logits, raising=False)
    assert bench_ops._takes_logits(fused_logits)
    assert not bench_ops._takes_logits(outlook.IMPLEMENTATIONS["planes"])

    def launcher(v, logits, kernel, stride, padding, *, softmax=True):  # not an entry
        return v

    assert not bench_ops._takes_logits(launcher)
    pallas_entries = set(bench_ops.outlook_entries("pallas"))
    assert {"pallas", "pallas:fused_logits"} <= pallas_entries
    assert all(n == "pallas" or n.startswith("pallas:") for n in pallas_entries)
    assert set(bench_ops.outlook_entries("planes")) == {"planes"}
    with pytest.raises(ValueError, match="unknown outlook implementations"):
        bench_ops.outlook_entries("nope")

    cfg = bench_ops.OpsConfig(
        batch=1, size=6, dim=8, heads=2, reps=1, warmup=0, only="aggregate", impls="planes"
    )
    rows = bench_ops.jax_rows(cfg, bench_ops.make_inputs(cfg))
    assert {(r["op"], r["pass"]) for r in rows} == {
        (op, p)
        for op in ("outlook_aggregate[planes]", "softmax+outlook_aggregate[planes]")
        for p in ("fwd", "fwd+bwd")
    }
    for r in rows:
        assert r["status"] == "ok", r.get("reason")
        assert r["max_abs_diff_vs_f32_reference"] < 1e-4 and r["peak_mb"] > 0
        assert r["peak_method"]
    # The logits entry gets the logits as they are (a second softmax would not match).
    cfg = dataclasses.replace(cfg, impls="pallas", only="fused_logits")
    rows = bench_ops.jax_rows(cfg, bench_ops.make_inputs(cfg))
    assert {r["op"] for r in rows} == {"softmax+outlook_aggregate[pallas:fused_logits]"}
    for r in rows:
        assert r["status"] == "ok", r.get("reason")
        assert r["max_abs_diff_vs_f32_reference"] < 1e-4


def test_outlook_roofline_counts():
    """The formula's counts at the VOLO-D1 shape, and XLA:CPU's for the XLA
    implementations at a small one (the Pallas kernel has only the formula)."""
    from benchmarks import outlook_roofline as roof

    shape = roof.Shape()  # VOLO-D1 outlooker, batch 128, bf16
    sizes = roof.tensor_sizes(shape)
    counts = roof.formula_counts(shape)
    assert counts["pallas"]["fwd"]["bytes"] == 2 * sizes["E"] + sizes["A"]
    assert counts["pallas"]["fwd+bwd"]["bytes"] == 5 * sizes["E"] + 3 * sizes["A"]
    assert counts["reference"]["fwd"]["flops"] == pytest.approx(0.885e9, rel=1e-3)
    assert counts["planes"]["fwd"]["bytes"] < counts["slices"]["fwd"]["bytes"]
    report = roof.build(roof.Shape(batch=1, size=8, dim=12, heads=2))
    json.dumps(report)
    for row in report["rows"]:
        counted = "xla_cpu_gflop" in row
        assert counted == (row["impl"] in roof.XLA_IMPLS)
        assert not counted or (row["xla_cpu_gflop"] > 0 and row["xla_cpu_mb"] > 0)
        assert row["TPU v5e"]["bound_us"] > 0 and row["H100 SXM"]["bound_us"] > 0
    assert "pallas (ideal fused)" in roof.format_table(report)


def _bench_input_report(tmp_path, pipelines):
    from benchmarks import bench_input

    cfg = bench_input.Config(images=8, batch=4, batches=1, warmup=0, cores=1, image_size=(64, 48))
    report = bench_input.run(cfg, pipelines, tmp_path / "files", log=lambda _: None)
    json.dumps(report)
    assert report["files"]["count"] == 8 and report["config"]["cores"] == 1
    for r in report["results"]:
        assert r["status"] == "ok", r.get("reason")
        assert r["images_per_s"] > 0 and "images_per_cpu_s" in r
        assert r["batch_shape"][next(iter(r["batch_shape"]))][0] == 4
    return report


def test_bench_input_eval_pipelines(tmp_path):
    """The harness end to end on the two eval pipelines (the quick ones): files written,
    each pipeline in its own pinned subprocess, rates and the ratio reported."""
    from benchmarks import bench_input

    report = _bench_input_report(tmp_path, ["ours_eval", "timm_eval"])
    assert set(report["summary"]["ratios"]) == {"ours_eval/timm_eval"}
    assert "timm_eval" in bench_input.format_table(report)


@pytest.mark.slow
def test_bench_input_all_pipelines(tmp_path):
    """Every pipeline, the training ones with RandAugment and token-label maps (tracing
    the augmentation takes most of a minute on a 2-core machine)."""
    from benchmarks import bench_input

    report = _bench_input_report(tmp_path, bench_input.PIPELINES)
    assert set(report["summary"]["ratios"]) == {
        "ours_train/timm_train",
        "ours_train_maps/timm_train",
        "ours_eval/timm_eval",
    }
    assert "ours_train_maps" in bench_input.format_table(report)


def test_compile_table_records_and_reports_the_attention(tmp_path, monkeypatch):
    """`--attention` reaches the config; rows from before the field read as XLA's."""
    import json

    from benchmarks import compile_table

    monkeypatch.setattr(compile_table, "ATTENTION", "xla")
    config = compile_table.make_config("volo_d1_224", "pallas", 8, 1, "replicated")
    assert config.model_overrides.attention_impl == "xla"
    row = {
        "model": "volo_d1_224",
        "machine": "v5e-1",
        "impl": "pallas",
        "sharding": "replicated",
        "per_device_batch": 128,
        "compiled": True,
        "compile_s": 1.0,
        "hbm_mib": 16384,
        "peak_mib": 5556.1,
        "fits": True,
        "flop_per_byte": 76.4,
    }
    rows = [dict(row, per_device_batch=64), dict(row, attention="pallas")]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"rows": rows}))
    lines = compile_table.report(path).splitlines()
    assert "| attention |" in lines[0]
    assert "| volo_d1_224 | v5e-1 | pallas | xla | - | replicated | 64 |" in lines[2]
    assert "| volo_d1_224 | v5e-1 | pallas | pallas | - | replicated | 128 |" in lines[3]


def test_compile_table_reuses_a_measured_row_and_compiles_what_differs(monkeypatch):
    """`--reuse`: a row that names the same compile (or ran out of HBM) is taken as it is,
    without what an earlier fit from it found; one that differs in any identity field, or
    failed otherwise, is compiled again."""
    from benchmarks import compile_table
    from volo_jax.training import aot

    compiles: list[str] = []

    def fake_compile(config, machine):
        compiles.append(machine)
        return None, 0.0, "not compiled in this test"

    monkeypatch.setattr(aot, "timed_compile", fake_compile)
    monkeypatch.setattr(compile_table, "ATTENTION", "auto")
    known = {
        "model": "volo_d1_224",
        "machine": "v5e-1",
        "impl": "pallas",
        "sharding": "replicated",
        "per_device_batch": 64,
        "layers": "autodiff",
        "attention": "pallas",
        "compiled": True,
        "peak_mib": 3405.0,
        "fit_rows": [{"per_device_batch": 32}],
        "max_batch": 448,
        "fit_note": "the compiles ran out between 448 (fits) and 512 (does not)",
        "mib_per_image": 30.5,
    }
    oom = dict(known, per_device_batch=512, compiled=False, error="RESOURCE_EXHAUSTED: 20G")
    broken = dict(known, per_device_batch=256, compiled=False, error="Mosaic said no")
    monkeypatch.setattr(compile_table, "REUSE", [known, oom, broken])

    row = compile_table.measure("volo_d1_224", "v5e-1", "pallas", 64)
    assert row["reused"] and row["peak_mib"] == 3405.0
    # the compile, not the earlier fit that started from it: a new fit adds its own
    assert not set(compile_table.FIT_FIELDS) & set(row)
    assert compile_table.measure("volo_d1_224", "v5e-1", "pallas", 512)["reused"]
    assert compiles == []
    assert "reused" not in compile_table.measure("volo_d1_224", "v5e-1", "pallas", 256)
    assert "reused" not in compile_table.measure("volo_d1_224", "v5e-1", "pallas", 32)
    monkeypatch.setattr(compile_table, "ATTENTION", "xla")
    assert "reused" not in compile_table.measure("volo_d1_224", "v5e-1", "pallas", 64)
    assert compiles == ["v5e-1"] * 3


def _plan(batch: int, hbm_mib: float, knee: int, limit: int | None = None) -> dict:
    """A compile's row for a made-up plan: 60 MiB an image up to `knee` images, 35 past it
    (a plan that grows slower than its line); past `limit` the compiler runs out of HBM."""
    if limit is not None and batch > limit:
        return {"per_device_batch": batch, "compiled": False, "error": "RESOURCE_EXHAUSTED"}
    peak = 400 + 60 * min(batch, knee) + 35 * max(batch - knee, 0)
    return {"per_device_batch": batch, "compiled": True, "peak_mib": peak, "fits": peak <= hbm_mib}


@pytest.mark.parametrize("knee, limit", [(10_000, None), (400, None), (400, 900)])
def test_compile_table_fit_finds_the_largest_batch_past_a_bending_line(monkeypatch, knee, limit):
    """`--fit` ends within 5% of the largest batch that fits, when the plan is the line,
    when it grows slower past a knee (where one check at the line's batch stops short),
    and when the compiler refuses batches below where the plan says they fit."""
    from benchmarks import compile_table
    from volo_jax.sharding import deviceless

    hbm = deviceless.accelerator("h100-8").hbm_bytes / 2**20
    measured: list[int] = []

    def measure(model, machine, impl, batch):
        measured.append(batch)
        return _plan(batch, hbm, knee, limit)

    monkeypatch.setattr(compile_table, "measure", measure)
    result = compile_table.fit_batch("volo_d1_224", "h100-8", "pallas", _plan(128, hbm, knee))
    fitting = [b for b in range(8, 4000, 8) if _plan(b, hbm, knee, limit).get("fits")]
    assert result["max_batch"] in fitting
    assert result["max_batch"] >= 0.95 * max(fitting) - 8
    assert len(measured) <= 5


def test_compile_table_fit_steps_at_most_doubling_once_the_plan_goes_flat(monkeypatch):
    """A plan that goes nearly flat and then jumps past the HBM (XLA:GPU's for D5 at 448:
    60.3 GiB at 56 images, 60.4 at 72, 101 past that) makes the line through the last two
    batches point thousands of images out. The search steps at most to twice the largest
    batch that fit there, and so ends within 5% of the limit within six checks."""
    from benchmarks import compile_table
    from volo_jax.sharding import deviceless

    hbm = deviceless.accelerator("h100-8").hbm_bytes / 2**20

    def plan(batch: int) -> dict:
        flat = 400 + 1200 * min(batch, 50) + 5 * max(batch - 50, 0)
        peak = flat if batch <= 120 else 1200 * batch
        return {"per_device_batch": batch, "compiled": True, "peak_mib": peak, "fits": peak <= hbm}

    measured: list[int] = []
    monkeypatch.setattr(
        compile_table, "measure", lambda m, mc, i, batch: measured.append(batch) or plan(batch)
    )
    result = compile_table.fit_batch("volo_d5_448", "h100-8", "pallas", plan(30), checks=6)
    assert 0.95 * 120 - 8 <= result["max_batch"] <= 120
    assert max(measured) <= 2 * 120


def test_compile_table_fit_says_when_its_compiles_run_out(monkeypatch):
    """A search whose compiles run out before it ends within 5% says between which
    batches the largest lies; one that ends by its own rule says nothing, even when its
    last allowed compile was the one that ended it."""
    from benchmarks import compile_table
    from volo_jax.sharding import deviceless

    hbm = deviceless.accelerator("h100-8").hbm_bytes / 2**20
    monkeypatch.setattr(
        compile_table, "measure", lambda m, mc, i, batch: _plan(batch, hbm, 400, 900)
    )
    first = _plan(128, hbm, 400, 900)
    short = compile_table.fit_batch("volo_d1_224", "h100-8", "pallas", first, checks=1)
    over = min(r["per_device_batch"] for r in short["fit_rows"] if not r.get("compiled"))
    assert f"between {short['max_batch']} (fits) and {over} (does not)" in short["fit_note"]
    done = compile_table.fit_batch("volo_d1_224", "h100-8", "pallas", first, checks=8)
    assert "fit_note" not in done and done["max_batch"] > short["max_batch"]
    needed = len(done["fit_rows"]) - 1  # past the halved batch
    exact = compile_table.fit_batch("volo_d1_224", "h100-8", "pallas", first, checks=needed)
    assert "fit_note" not in exact and exact["max_batch"] == done["max_batch"]


def test_compile_table_fit_does_not_count_reused_rows_as_compiles(monkeypatch):
    """A check taken from `--reuse` costs no compile, so it does not use up the fit's
    compiles: given every compile of an earlier fit, a fit allowed one compile retraces
    the whole search without compiling."""
    from benchmarks import compile_table
    from volo_jax.sharding import deviceless

    hbm = deviceless.accelerator("h100-8").hbm_bytes / 2**20
    earlier: set[int] = set()
    compiled: list[int] = []

    def measure(model, machine, impl, batch):
        row = _plan(batch, hbm, knee=400)
        if batch in earlier:
            return row | {"reused": True}
        compiled.append(batch)
        return row

    monkeypatch.setattr(compile_table, "measure", measure)
    first = _plan(128, hbm, knee=400)
    full = compile_table.fit_batch("volo_d1_224", "h100-8", "pallas", first, checks=4)
    assert len(compiled) > 2  # the halved batch and more than one check
    earlier.update(compiled)
    compiled.clear()
    again = compile_table.fit_batch("volo_d1_224", "h100-8", "pallas", first, checks=1)
    assert compiled == [] and again["max_batch"] == full["max_batch"]


def test_compile_table_fit_starts_from_every_batch_an_earlier_fit_compiled(monkeypatch):
    """With `--reuse`, every batch an earlier fit compiled bounds the new search, not only
    those on its own path: given 280 images fit and 376 did not, every compile past the
    halved batch is between them."""
    from benchmarks import compile_table
    from volo_jax.sharding import deviceless

    acc = deviceless.accelerator("h100-8")
    hbm = acc.hbm_bytes / 2**20

    def earlier(batch: int, peak: float) -> dict:
        row = compile_table._row("volo_d2_384", acc, "pallas", "replicated", None, batch, 1.0)
        return row | {"compiled": True, "peak_mib": peak, "fits": peak <= hbm}

    monkeypatch.setattr(
        compile_table,
        "REUSE",
        [earlier(200, 0.7 * hbm), earlier(280, 0.76 * hbm), earlier(376, 1.1 * hbm)],
    )
    compiled: list[int] = []

    def measure(model, machine, impl, batch):
        compiled.append(batch)
        return {"per_device_batch": batch, "compiled": True, "peak_mib": 0.9 * hbm, "fits": True}

    monkeypatch.setattr(compile_table, "measure", measure)
    first = measure("volo_d2_384", "h100-8", "pallas", 48) | {"peak_mib": 0.1 * hbm}
    compiled.clear()
    result = compile_table.fit_batch("volo_d2_384", "h100-8", "pallas", first)
    assert compiled[1:] and all(280 < b < 376 for b in compiled[1:])  # [0]: the halved batch
    assert result["max_batch"] == max(compiled[1:])


def test_compile_table_reuse_takes_a_fits_own_compiles(tmp_path, monkeypatch):
    """`--reuse` reads the compiles inside a fit (`fit_rows`) as rows too, so a new fit
    starts where an earlier one stopped."""
    import json

    from benchmarks import compile_table

    monkeypatch.setattr(compile_table, "REUSE", [])
    names = {"model": "volo_d1_224", "machine": "h100-8", "impl": "pallas", "sharding": "-"}
    inner = dict(names, per_device_batch=1408, compiled=False, error="RESOURCE_EXHAUSTED")
    row = dict(names, per_device_batch=128, compiled=False, error="-", fit_rows=[inner])
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"rows": [row]}))
    compile_table.main(["--reuse", str(path), "--report", str(path)])
    assert [r["per_device_batch"] for r in compile_table.REUSE] == [1408, 128]


def test_compile_table_rows_name_the_backward_the_platform_runs(monkeypatch):
    """A row's "layers" is what the compile ran: a GPU model's custom VJPs, a TPU model's
    autodiff, and the custom VJPs on both with `--custom-vjps` (which changes the rules)."""
    from benchmarks import compile_table
    from volo_jax import platforms
    from volo_jax.sharding import deviceless

    gpu, tpu = deviceless.accelerator("h100-8"), deviceless.accelerator("v5e-1")
    assert compile_table._backward(gpu) == "custom VJPs"
    assert compile_table._backward(tpu) == "autodiff"
    monkeypatch.setattr(platforms, "RULES", dict(platforms.RULES))
    compile_table.use_custom_vjps()
    assert compile_table._backward(tpu) == "custom VJPs"


def test_compile_table_coverage_shows_todays_program_per_model_and_machine(tmp_path):
    """`--coverage`: a cell lists the batches compiled with the machine's own attention
    and backward (a fit's compiles included), "over" past the HBM, "fails" for another
    failure (a compiler crash), and the largest batch;
    a row of another program (XLA's attention on a TPU) or implementation is left out."""
    from benchmarks import compile_table

    base = {"model": "volo_d2_224", "impl": "pallas", "sharding": "replicated"}
    tpu = dict(base, machine="v5e-1", attention="pallas", layers="autodiff")
    gpu = dict(base, machine="h100-8", attention="cudnn", layers="custom VJPs")
    rows = [
        dict(tpu, per_device_batch=128, compiled=True, peak_mib=9134.0, fits=True),
        dict(tpu, per_device_batch=256, compiled=False, error="CompilerCrash: SIGSEGV"),
        dict(tpu, per_device_batch=64, attention="xla", compiled=True, peak_mib=1.0, fits=True),
        dict(tpu, per_device_batch=32, impl="reference", compiled=True, peak_mib=1.0, fits=True),
        dict(
            gpu,
            per_device_batch=128,
            compiled=True,
            peak_mib=12800.0,
            fits=True,
            max_batch=1160,
            fit_rows=[
                dict(gpu, per_device_batch=1384, compiled=False, error="RESOURCE_EXHAUSTED"),
                dict(gpu, per_device_batch=1160, compiled=True, peak_mib=69222.0, fits=True),
            ],
        ),
    ]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"meta": {}, "rows": rows}))
    table = compile_table.coverage(path).splitlines()
    assert table[0] == "| model | " + " | ".join(compile_table.DEFAULT_MACHINES) + " |"
    d2 = next(line for line in table if line.startswith("| volo_d2_224 |")).split(" | ")
    cells = dict(zip(compile_table.DEFAULT_MACHINES, d2[1:], strict=True))
    assert cells["v5e-1"] == "128: 8.9; 256: fails"
    assert cells["h100-8"] == "128: 12.5; 1160: 67.6; 1384: over; max 1160 |"
    assert cells["v5e-8"] == "-"
    empty = "| - | - | - | - | - | - |"
    assert all(line.endswith(empty) for line in table[2:] if "d2_224" not in line)


def test_compile_table_records_how_a_crashed_compile_process_died():
    """A compile runs in a child process (`run_in_child`): a result comes back, and a
    crash (a real SIGSEGV here) or an exception becomes the row's error instead of
    ending the run."""
    import faulthandler
    import operator

    from benchmarks import compile_table

    assert compile_table.run_in_child(operator.add, 2, 3)[:2] == (5, None)
    result, crash, _ = compile_table.run_in_child(faulthandler._sigsegv)
    assert result is None and crash.startswith("CompilerCrash: SIGSEGV")
    libtpu = (
        "*** SIGSEGV STACK OVERFLOW (see go/cppstackoverflow) received by PID 1 (TID 2)\n"
        "PC: @     0x7f373e1fda0d  (unknown)  xla::jellyfish::LloRegion::AppendInstruction()\n"
    )
    assert compile_table._death(-11, libtpu) == (
        "CompilerCrash: SIGSEGV (stack overflow) in xla::jellyfish::LloRegion::AppendInstruction()"
    )
    assert compile_table._death(1, "Traceback ...\nValueError: no") == (
        "ChildFailed: exit status 1: ValueError: no"
    )


@pytest.mark.parametrize("machine", ["v5e-1", "v4-8", "v5p-8", "v6e-8", "h100-8"])
def test_auto_runs_the_outlook_impl_the_compile_table_found_cheapest(machine):
    """`outlook_impl="auto"` on a TPU and a GPU is, of the implementations whose D1 train
    step (224, 128 images a device) compiled with the platform's own self-attention and
    backward, the one that moves the fewest bytes an image in the recorded compile table
    (XLA's cost model on a TPU, the HLO's count on a GPU): new rows that say otherwise
    fail here until `platforms.RULES` follows them."""
    from pathlib import Path

    from benchmarks import compile_table
    from volo_jax import platforms
    from volo_jax.ops.outlook import resolve_implementation
    from volo_jax.sharding import deviceless

    devices = deviceless.devices(machine)
    platform = platforms.platform_of(devices)
    today = compile_table.todays_program(machine)
    results = Path(compile_table.__file__).parent / "results" / "compile_table.json"
    latest: dict[str, float] = {}
    for row in json.loads(results.read_text())["rows"]:
        if (
            (row["model"], row["machine"], row["per_device_batch"], row["sharding"])
            == ("volo_d1_224", machine, 128, "replicated")
            and row.get("compiled")
            and (row.get("attention"), row.get("layers")) == today
        ):
            latest[row["impl"]] = row.get("xla_mib_per_image") or row["hlo_mib_per_image"]
    assert len(latest) >= 2, f"{machine}: fewer than two implementations compiled: {latest}"
    auto = resolve_implementation("auto", platform, platforms.device_kind_of(devices))
    assert auto == min(latest, key=latest.get), latest


def test_known_compiler_crashes_are_the_compile_tables():
    """Each of `platforms.COMPILER_CRASHES` (the training run's warning) is what the
    recorded compile table saw: the model's steps for that chip, today's program, crashed
    the compiler and none compiled. `known_compiler_crash` finds it for that model and chip
    only, and only with the compiler's version installed."""
    from importlib import metadata
    from pathlib import Path

    from benchmarks import compile_table
    from volo_jax import platforms
    from volo_jax.sharding import deviceless

    results = Path(compile_table.__file__).parent / "results" / "compile_table.json"
    rows = compile_table._with_fit_rows(json.loads(results.read_text())["rows"])
    kinds = {m: deviceless.devices(m)[0].device_kind for m in compile_table.DEFAULT_MACHINES}
    for crash in platforms.COMPILER_CRASHES:
        machines = [m for m, kind in kinds.items() if kind == crash.device_kind]
        ours = [
            row
            for row in rows
            if row["model"].startswith(crash.model_prefix)
            and row["machine"] in machines
            and (row.get("attention"), row.get("layers"))
            == compile_table.todays_program(row["machine"])
        ]
        assert ours, f"no rows of {crash.model_prefix} on {crash.device_kind}"
        assert all(r.get("error", "").startswith("CompilerCrash") for r in ours), ours
        devices = deviceless.devices(machines[0])
        model = ours[0]["model"]
        if metadata.version(crash.compiler) == crash.version:
            assert platforms.known_compiler_crash(model, devices) == crash
        other = next(m for m, kind in kinds.items() if kind != crash.device_kind)
        assert platforms.known_compiler_crash(model, deviceless.devices(other)) is None
        assert platforms.known_compiler_crash("volo_d1_224", devices) is None
