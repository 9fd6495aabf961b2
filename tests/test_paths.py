"""gs:// workdirs and weights against a real GCS server on loopback (gcp-storage-emulator).

Train with --workdir=gs://bucket/run, run the same command again and resume from the
bucket, then `predict` and `mode=eval` from the weights in the bucket. Every client is
pointed at the emulator by environment: gcsfs (STORAGE_EMULATOR_HOST), tensorstore, which
orbax writes arrays with (TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING), and
etils.epath (EPATH_USE_TF=0: its fsspec backend, gcsfs).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from tests.support import REPO
from volo_jax.errors import ConfigError
from volo_jax.paths import as_path, is_remote, join

BUCKET = "bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS server on loopback with bucket `BUCKET`; yields the environment that points
    gcsfs, tensorstore and etils.epath at it (this process's too, while the test runs)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.support.gcs_emulator", str(port), BUCKET],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the GCS emulator did not start (see {log.name})") from None
            time.sleep(0.2)
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        "EPATH_USE_TF": "0",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.kill()
        server.wait()
        log.close()


def test_paths_keep_urls_and_refuse_a_lost_slash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
    assert is_remote("gs://b/run") and not is_remote("runs/d1")
    assert os.fspath(as_path("runs/d1")) == str(tmp_path / "runs" / "d1")
    with pytest.raises(ConfigError, match="gs://b/run"):
        as_path("gs:/b/run")
    assert not os.path.exists(tmp_path / "gs:")


def _run(args: list[str], env: dict[str, str], cwd: str, timeout: int = 600):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def test_train_resume_predict_and_eval_on_gs(gcs, tmp_path):
    """Two runs of one command with a gs:// workdir (the second resumes from the bucket),
    then predict and eval from the bucket's weights; nothing lands in a local gs: folder."""
    # Work from a fresh directory (main.py by absolute path) to see any local 'gs:' folder.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {
        **os.environ,
        **gcs,
        "PYTHONPATH": REPO,
        "PYTHONUNBUFFERED": "1",
    }
    workdir = f"gs://{BUCKET}/run"
    train = [
        sys.executable,
        os.path.join(REPO, "main.py"),
        f"--config={os.path.join(REPO, 'configs', 'smoke.py')}",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={tmp_path / 'data'}",
        "--config.eval_every_steps=1000",
        "--config.checkpoint_every_steps=5",
        "--config.log_every_steps=5",
        # The EMA on, as in test_resume's runs: the same programs, from the suite's cache.
        "--config.train.ema_decay=0.999",
    ]
    first = _run([*train, "--config.max_steps=5"], env, cwd)
    assert "resuming" not in first.stderr
    second = _run([*train, "--config.max_steps=10"], env, cwd)
    assert f"resuming from step 5 of {workdir}/checkpoints" in second.stderr

    run = as_path(workdir)
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5, 10]
    meta = json.loads((run / "weights" / "model.json").read_text())
    assert meta["source"].endswith("step 10")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "train/loss" in r] == [5, 10]
    assert any("eval/top1" in r for r in history)
    assert json.loads((run / "config.json").read_text())["model"] == "volo_d1_224"
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list((run / "tensorboard").iterdir())
    assert len(events) == 2 and all(e.name.startswith("events.out.tfevents") for e in events)
    assert all(e.stat().length > 0 for e in events)

    image = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(image)
    predicted = _run(
        [sys.executable, "-m", "volo_jax.predict", "--weights", f"{workdir}/weights", str(image)],
        env,
        cwd,
    )
    # The digits' class names (their folders 0-9) travel with the weights.
    lines = predicted.stdout.splitlines()
    assert lines[0] == str(image) and len(lines) == 6, predicted.stdout
    assert all(line.split()[-1] in "0123456789" for line in lines[1:]), predicted.stdout
    evaluated = _run(
        [
            sys.executable,
            os.path.join(REPO, "main.py"),
            f"--config={os.path.join(REPO, 'configs', 'smoke.py')}",
            "--config.mode=eval",
            f"--config.init_from={workdir}/weights",
            f"--config.dataset.data_dir={tmp_path / 'data'}",
        ],
        env,
        cwd,
    )
    assert "top-1" in evaluated.stdout and "(360 images)" in evaluated.stdout
    assert not any(p.name.startswith("gs:") for p in cwd.rglob("*"))
    assert not os.path.exists(os.path.join(REPO, "gs:"))


def test_broken_checkpoint_on_gs_is_moved_aside(gcs):
    """On the bucket: the latest checkpoint with a data object deleted is skipped for the
    one before and moved to checkpoints_broken/ (cloud storage has no rename of folders:
    it is copied and deleted)."""
    import jax.numpy as jnp

    from volo_jax.training.checkpointing import Checkpointer

    directory = f"gs://{BUCKET}/broken/checkpoints"
    state = {"w": jnp.arange(12.0).reshape(3, 4), "step": jnp.asarray(0, jnp.int32)}
    ckpt = Checkpointer(directory, keep=3)
    for step in (1, 2):
        ckpt.save(step, {**state, "step": jnp.asarray(step, jnp.int32)})
    ckpt.close()
    import fsspec

    gcsfs = fsspec.filesystem("gs")
    objects = gcsfs.find(f"{directory}/2")
    data = [name for name in objects if "/d/" in name]  # OCDBT's data files
    assert data, objects
    gcsfs.rm(data)

    ckpt = Checkpointer(directory, keep=3)
    restored, step = ckpt.restore_latest(state)
    ckpt.close()
    assert step == 1 and int(restored["step"]) == 1
    np.testing.assert_array_equal(restored["w"], np.arange(12.0).reshape(3, 4))
    assert as_path(f"gs://{BUCKET}/broken/checkpoints_broken/2").is_dir()
    assert sorted(p.name for p in as_path(directory).iterdir() if p.name.isdigit()) == ["1"]
