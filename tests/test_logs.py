"""What a person reads from the command-line entry points when their output goes to a file
or a pipe: no TensorFlow / absl / JAX start-up lines, no carriage returns, and progress as
whole lines (training at every log step, evaluation with img/s, predict past a handful of
images). Every command runs as a real subprocess with TF_CPP_MIN_LOG_LEVEL unset, as a bare
command would, and with TensorFlow's oneDNN start-up forced on or off
(TF_ENABLE_ONEDNN_OPTS): on by default it is only on CPUs with AVX-512 VNNI/BF16 or AMX, and
its line ignores TF_CPP_MIN_LOG_LEVEL, so both settings are run on every CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import volo_jax
from tests.support import REPO, without_cuda_plugin_lines

# Start-up lines of TensorFlow (oneDNN, cpu_feature_guard, TF-TRT, CUDA plugins), absl's
# native logging and JAX's backend probing.
NOISE = (
    "oneDNN",
    "cpu_feature_guard",
    "This TensorFlow binary",
    "absl::InitializeLog",
    "TF-TRT",
    "Unable to register cu",
    "Unable to initialize backend",
    "generated new fontManager",
)
#: The files whose INFO lines belong in the output: volo_jax's own and main.py.
OWN_FILES = {p.name for p in Path(volo_jax.__file__).parent.rglob("*.py")} | {"main.py"}
STEPS, LOG_EVERY = 6, 2


def _bare_env(onednn: str) -> dict[str, str]:
    bare = ("TF_CPP_MIN_LOG_LEVEL", "GLIBC_TUNABLES", "VOLO_JAX_MALLOC_TUNABLES")
    env = {k: v for k, v in os.environ.items() if k not in bare}
    env["PYTHONPATH"] = str(REPO)
    env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    return env


def _run(argv: list[str], out: Path, onednn: str = "1", timeout: int = 600) -> str:
    """Runs `argv` with stdout and stderr into the file `out`, with TF_ENABLE_ONEDNN_OPTS
    at `onednn`; returns its text."""
    env = _bare_env(onednn)
    with open(out, "w") as f:
        done = subprocess.run(
            argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
        )
    text = out.read_text()
    assert done.returncode == 0, text[-5000:]
    return without_cuda_plugin_lines(text)


def assert_readable(text: str) -> None:
    assert "\r" not in text, text
    for marker in NOISE:
        assert marker not in text, text
    for match in re.finditer(r"^[IDV]\d{4} [\d:.]+ +\d+ (\S+):\d+\]", text, re.M):
        assert match.group(1) in OWN_FILES, text  # another library's INFO line


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_importing_the_input_pipeline_prints_nothing(onednn, tmp_path):
    code = "import volo_jax.data.input_pipeline, volo_jax.data.prepare"
    text = _run([sys.executable, "-c", code], tmp_path / "import.txt", onednn=onednn)
    assert text == "", text


def test_only_tensorflows_startup_lines_are_dropped():
    from volo_jax.logs import drop_startup_lines

    startup = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to "
        "STDERR\n"
        "I0000 00:00:1796612559.504931    2068 port.cc:153] oneDNN custom operations are on.\n"
        "I0000 00:00:1796612559.549491    2068 cpu_feature_guard.cc:227] This TensorFlow "
        "binary is optimized to use available CPU instructions.\n"
        "To enable the following instructions: AVX512F AVX512_VNNI AVX512_BF16 AMX_TILE, in "
        "other operations, rebuild TensorFlow with the appropriate compiler flags.\n"
    )
    kept = (
        "E0000 00:00:1796612559.549491    2068 op_kernel.cc:1857] OP_REQUIRES failed\n"
        "/x/y.py:3: UserWarning: something a user should see\n"
    )
    assert drop_startup_lines(startup + kept + startup) == kept


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """A few steps of the smoke config, logged to a file; (workdir, log text)."""
    workdir = tmp_path_factory.mktemp("logs") / "run"
    text = _run(
        [
            sys.executable,
            "main.py",
            "--config=configs/smoke.py",
            f"--workdir={workdir}",
            f"--config.max_steps={STEPS}",
            f"--config.log_every_steps={LOG_EVERY}",
            # The EMA on, as in test_resume's runs: the same programs, from the suite's cache.
            "--config.train.ema_decay=0.999",
        ],
        workdir.parent / "train.txt",
    )
    return workdir, text


def test_training_logs_a_line_per_log_step(trained):
    _, text = trained
    assert_readable(text)
    number = r"\d+\.\d+"
    for step in range(LOG_EVERY, STEPS + 1, LOG_EVERY):
        eta = "" if step == STEPS else r"  ETA \d+:\d\d:\d\d"
        pattern = rf"step {step}/{STEPS}  loss {number}  lr {number}e-\d\d  img/s {number}{eta}"
        assert re.search(rf"^{pattern}$", text, re.M), (pattern, text)
    assert re.search(rf"^step {STEPS}: eval top-1 ", text, re.M), text
    assert re.search(rf"^step {STEPS}/{STEPS} done in ", text, re.M), text
    # The run's own INFO lines stay.
    assert "train.py" in text and "final weights written to" in text, text
    # One process, as started: without glibc's malloc tunables in its environment it says
    # how to start with them, once.
    assert text.count("on the CPU, steps are faster in a process started with GLIBC_") == 1, text


def test_eval_mode_logs_progress_with_images_per_second(trained):
    workdir, _ = trained
    text = _run(
        [
            sys.executable,
            "main.py",
            "--config=configs/smoke.py",
            "--config.mode=eval",
            f"--config.init_from={workdir / 'weights'}",
            f"--config.dataset.data_dir={workdir / 'data'}",
            "--config.eval.batch_size=40",
            "--config.log_every_steps=3",
        ],
        workdir.parent / "eval.txt",
        onednn="0",
    )
    assert_readable(text)
    # 360 test images in batches of 40: a line every 3 batches, then the summary.
    for done in (120, 240):
        assert re.search(rf"^eval {done}/360 img  [\d.]+ img/s  ETA \S+$", text, re.M), text
    assert re.search(r"^eval 360/360 img done in \S+ \([\d.]+ img/s\)$", text, re.M), text
    assert re.search(r"top-1 [\d.]+%  top-5 [\d.]+% .* \(360 images\)", text), text


def test_predict_logs_progress_past_a_handful_of_images(trained, tmp_path):
    workdir, _ = trained
    images = sorted((workdir / "data").rglob("*.png"))[:10]
    argv = [sys.executable, "-m", "volo_jax.predict", "--weights", str(workdir / "weights")]
    text = _run([*argv, "--batch-size", "4", *map(str, images)], tmp_path / "predict.txt")
    assert_readable(text)
    assert re.search(r"^predict 10/10 img done in ", text, re.M), text
    assert len(re.findall(r"^\s+\d+\.\d\d%  ", text, re.M)) == 5 * len(images), text
    few = _run([*argv, *map(str, images[:3])], tmp_path / "few.txt")
    assert_readable(few)
    assert not re.search(r"^predict ", few, re.M), few  # 3 images: no progress
    assert len(re.findall(r"^\s+\d+\.\d\d%  ", few, re.M)) == 5 * 3, few


def test_convert_is_quiet(tmp_path):
    from safetensors.numpy import save_file

    from volo_jax.convert import flax_to_torch
    from volo_jax.convert.mapping import abstract_variables
    from volo_jax.models import create_model

    shapes = abstract_variables(create_model("volo_d1_224"))
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    save_file(flax_to_torch(zeros), str(tmp_path / "d1.safetensors"))
    argv = ["--model", "volo_d1_224", "--src", str(tmp_path / "d1.safetensors")]
    text = _run(
        [sys.executable, "-m", "volo_jax.convert", *argv, "--dst", str(tmp_path / "weights")],
        tmp_path / "convert.txt",
    )
    assert_readable(text)
    assert text.startswith("wrote volo_d1_224 (26,632,040 parameters)"), text


def test_tensorboard_finds_the_run_under_the_workdir(trained):
    # What `tensorboard --logdir WORKDIR` loads: the run and its scalars at the log steps.
    pytest.importorskip("tensorboard", reason="the viewer is in the train extra")
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    workdir, _ = trained
    runs = EventMultiplexer().AddRunsFromDirectory(str(workdir))
    runs.Reload()
    (run,) = runs.Runs()
    steps = [event.step for event in runs.Scalars(run, "train/loss")]
    assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for tag in ("train/lr", "train/images_per_sec", "eval/top1"):
        assert runs.Scalars(run, tag), tag
