"""Checkpoints: retention, corruption, and an exact resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from volo_jax.errors import CheckpointError
from volo_jax.training.checkpointing import Checkpointer
from volo_jax.weights import load_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_state(value: float) -> dict[str, jax.Array]:
    return {
        "step": jnp.asarray(int(value), jnp.int32),
        "w": jnp.full((3, 4), value),
        "rng": jax.random.PRNGKey(0),
    }


def test_keeps_the_last_n_and_the_best(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    accuracies = {1: 0.5, 2: 0.9, 3: 0.6, 4: None, 5: 0.7}
    for step, top1 in accuracies.items():
        ckpt.save(step, small_state(step), None if top1 is None else {"top1": top1})
    ckpt.close()
    ckpt = Checkpointer(tmp_path, keep=2)
    assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [2, 4, 5]
    assert ckpt.best_step == 2 and ckpt.latest_step == 5
    restored = ckpt.restore(2, small_state(0))
    np.testing.assert_array_equal(restored["w"], np.full((3, 4), 2.0))
    ckpt.close()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(1, small_state(1))
    ckpt.close()
    for folder, _, files in os.walk(tmp_path / "1"):
        for name in files:
            if not name.startswith("_"):  # keep orbax's metadata, damage the data
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(b"\0garbage")
    ckpt = Checkpointer(tmp_path, keep=2)
    with pytest.raises(CheckpointError, match="cannot restore the training checkpoint"):
        ckpt.restore(1, small_state(0))
    ckpt.close()


def _command(workdir, data_dir) -> list[str]:
    return [
        sys.executable,
        "main.py",
        "--config=configs/smoke.py",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={data_dir}",
        "--config.max_steps=30",
        "--config.eval_every_steps=1000",
        "--config.ema_decay=0.999",
    ]


def test_killed_run_resumes_exactly(tmp_path):
    """SIGKILL after the checkpoint of step 20, resume, and compare with a run that was
    never interrupted: the final parameters must be identical."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    data = tmp_path / "data"
    killed = subprocess.Popen(
        _command(tmp_path / "killed", data),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in killed.stdout:
        if "step 20: checkpoint saved" in line:
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert not os.path.exists(tmp_path / "killed" / "weights")  # it did not finish

    resumed = subprocess.run(
        _command(tmp_path / "killed", data),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step" in resumed.stderr
    straight = subprocess.run(
        _command(tmp_path / "straight", data),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    a, meta = load_weights(tmp_path / "killed" / "weights")
    b, _ = load_weights(tmp_path / "straight" / "weights")
    assert meta["source"].endswith("step 30")
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
