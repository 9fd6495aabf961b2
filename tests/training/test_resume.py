"""Checkpoints: retention, corruption, an exact resume after SIGTERM (a preemption notice)
and SIGKILL, a broken latest checkpoint, a diverged run, and a save that fails (a real
EFBIG from a file size limit)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support import REPO
from volo_jax.errors import CheckpointError, TrainingDivergedError
from volo_jax.training import train
from volo_jax.training.checkpointing import Checkpointer, needs_snapshot
from volo_jax.training.preemption import PreemptionWatch, check_finite
from volo_jax.weights import load_weights


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


def _smoke_steps(step_model=None, **changes):
    """(initial state, jitted train step) of configs/smoke.py with `changes`, 4 classes;
    `step_model(model)`: what the step applies in the model's place."""
    from tests.support.small import smoke_config
    from volo_jax.models import create_model
    from volo_jax.sharding import create_mesh
    from volo_jax.training.config import model_overrides

    config = smoke_config(**{"token_label.mix_group_size": 4, **changes})
    model = create_model(config.model, **model_overrides(config))
    mesh = create_mesh(config.mesh)
    state, shardings = train.create_train_state(config, model, 10, mesh)
    if step_model is not None:
        model = step_model(model)
    return state, train.jit_train_step(config, model, mesh, shardings, donate=False)


def _batch() -> dict[str, jax.Array]:
    images = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
    return {"image": images, "label": jnp.arange(8, dtype=jnp.int32) % 4}


def _save_and_restore(state, directory):
    """`state` through a checkpoint: saved, then restored into its own shapes, dtypes and
    shardings (so that the step compiled for it runs the restored state as is)."""
    ckpt = Checkpointer(directory, keep=1)
    ckpt.save(int(state.step), state)
    ckpt.close()
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    ckpt = Checkpointer(directory, keep=1)
    restored = ckpt.restore(int(state.step), target)
    ckpt.close()
    return restored


def test_each_step_draws_new_random_numbers_and_a_resumed_run_the_same(tmp_path, monkeypatch):
    """MixToken and stochastic depth on: the MixToken boxes (and the key they are drawn
    from) and the dropout key of steps 1, 2, 3 differ from step to step; a state saved after
    step 2 and restored from the checkpoint draws at step 3 what the uninterrupted run
    draws there, and ends with the same parameters."""
    boxes, dropout_keys = [], []
    sample_mix_box = train.sample_mix_box

    def record(into):
        return lambda *values: into.append(tuple(np.asarray(v) for v in values))

    def recording_sample_mix_box(key, *args, **kwargs):
        box = sample_mix_box(key, *args, **kwargs)
        jax.debug.callback(record(boxes), key, box)
        return box

    class RecordingModel:
        """The model, recording the dropout key of every `apply`."""

        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            return getattr(self.model, name)

        def apply(self, *args, **kwargs):
            jax.debug.callback(record(dropout_keys), kwargs["rngs"]["dropout"])
            return self.model.apply(*args, **kwargs)

    monkeypatch.setattr(train, "sample_mix_box", recording_sample_mix_box)
    state, step = _smoke_steps(RecordingModel, **{"model_overrides.drop_path_rate": 0.5})
    batch = _batch()
    for _ in range(2):
        state, _ = step(state, batch, None)
    restored = _save_and_restore(state, tmp_path / "ckpt")
    assert int(restored.step) == 2
    straight, _ = step(state, batch, None)
    resumed, _ = step(restored, batch, None)
    jax.effects_barrier()
    assert len(boxes) == len(dropout_keys) == 4, (len(boxes), len(dropout_keys))
    (k1, b1), (k2, b2), (k3, b3), (k3_resumed, b3_resumed) = boxes
    assert b1.shape == (2, 4)  # one box per group of 4 images
    for first, second in [(k1, k2), (k2, k3), (k1, k3)]:
        assert not np.array_equal(first, second)
    assert not (np.array_equal(b1, b2) and np.array_equal(b2, b3)), (b1, b2, b3)
    (d1,), (d2,), (d3,), (d3_resumed,) = dropout_keys
    for first, second in [(d1, d2), (d2, d3), (d1, d3), (d1, k1)]:
        assert not np.array_equal(first, second)
    np.testing.assert_array_equal(k3_resumed, k3)
    np.testing.assert_array_equal(b3_resumed, b3)
    np.testing.assert_array_equal(d3_resumed, d3)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.params, straight.params)


def _command(workdir, data_dir, max_steps: int = 30) -> list[str]:
    return [
        sys.executable,
        "main.py",
        "--config=configs/smoke.py",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={data_dir}",
        f"--config.max_steps={max_steps}",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=1000",
        "--config.train.ema_decay=0.999",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A shared data folder, and the uninterrupted 30-step run that the interrupted ones
    are compared with (its workdir). The runs share the suite's compilation cache
    (tests/conftest.py)."""
    root = tmp_path_factory.mktemp("runs")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
    }
    runs = {"env": env, "data": root / "data", "straight": root / "straight"}
    straight = _train(runs["straight"], runs, timeout=900)  # the first compiles
    assert straight.returncode == 0, straight.stderr[-3000:]
    return runs


def _same_final_state(workdir, straight) -> None:
    """The final weights (EMA) and the final eval are those of the uninterrupted run."""
    a, meta = load_weights(workdir / "weights")
    b, _ = load_weights(straight / "weights")
    assert meta["source"].endswith("step 30")
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert _final_eval(workdir) == _final_eval(straight)


def _final_eval(workdir) -> dict:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval/top1" in r][-1]


def _checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())


def _train(
    workdir, runs, *flags: str, timeout: int = 600, file_size_kib: int | None = None
) -> subprocess.CompletedProcess:
    """The 30-step command run to its end in `workdir` (with extra `flags`), writing no
    file beyond `file_size_kib` KiB if given (the shell's `ulimit -f`: a write past it
    fails with EFBIG, as one on a full disk fails with ENOSPC)."""
    command = [*_command(workdir, runs["data"]), *flags]
    if file_size_kib is not None:
        command = ["bash", "-c", f'ulimit -f {file_size_kib} && exec "$@"', "bash", *command]
    return subprocess.run(
        command, cwd=REPO, env=runs["env"], capture_output=True, text=True, timeout=timeout
    )


def _interrupt(workdir, runs, after: str, sig: signal.Signals) -> tuple[int, str]:
    """The 30-step command in `workdir`, sent `sig` when it prints the line `after`;
    (exit status, everything it printed)."""
    run = subprocess.Popen(
        _command(workdir, runs["data"]),
        cwd=REPO,
        env=runs["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    for line in run.stdout:
        output.append(line)
        if after in line:
            run.send_signal(sig)
            break
    output.extend(run.stdout)
    run.wait(timeout=600)
    return run.returncode, "".join(output)


def _damage(checkpoint) -> None:
    """Truncates the largest data file of a checkpoint and deletes another."""
    files = sorted(
        (p for p in checkpoint.rglob("*") if p.is_file() and not p.name.startswith("_")),
        key=lambda p: p.stat().st_size,
    )
    largest, other = files[-1], files[-2]
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    other.unlink()


def test_preempted_killed_and_broken_runs_resume_exactly(runs, tmp_path):
    """One workdir, three runs of one command. SIGTERM (a preemption notice) at step 13,
    after the periodic checkpoint of step 10: the run saves the step it reached (between
    two periodic ones) and exits 0. The second run resumes from there and is killed
    (SIGKILL) at step 25, after the periodic checkpoint of step 20 began. Then the newest
    checkpoint is damaged (a truncated and a deleted file): the third run names it in a
    warning, moves it aside, resumes from the one before and ends with the uninterrupted
    run's final parameters and eval."""
    workdir = tmp_path / "interrupted"
    status, text = _interrupt(workdir, runs, "step 13/30 ", signal.SIGTERM)
    assert status == 0, text[-3000:]
    match = re.search(r"preempted: stopped at step (\d+)", text)
    assert match, text[-3000:]
    stopped = int(match.group(1))
    assert 10 < stopped < 20, text[-3000:]  # not a periodic checkpoint (every 10 steps)
    assert _checkpoint_steps(workdir)[-1] == stopped
    assert not os.path.exists(workdir / "weights")  # it did not finish

    status, text = _interrupt(workdir, runs, "step 25/30 ", signal.SIGKILL)
    assert status == -signal.SIGKILL, text[-3000:]
    assert f"resuming from step {stopped} " in text, text[-3000:]
    assert not os.path.exists(workdir / "weights")
    # The step-20 save is asynchronous: the kill may come before it is complete, and then
    # the newest complete checkpoint is the preempted step's (orbax lists only those).
    *_, intact, latest = _checkpoint_steps(workdir)
    assert (intact, latest) in ((10, stopped), (stopped, 20)), _checkpoint_steps(workdir)

    _damage(workdir / "checkpoints" / str(latest))
    resumed = _train(workdir, runs)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr
    assert f"cannot restore the training checkpoint {workdir}/checkpoints/{latest}" in log, log
    assert f"restored step {intact} instead" in log, log[-3000:]
    assert f"resuming from step {intact} " in log, log[-3000:]
    assert os.path.isdir(workdir / "checkpoints_broken" / str(latest))
    assert _checkpoint_steps(workdir)[-1] == 30
    _same_final_state(workdir, runs["straight"])


def test_a_failed_save_stops_the_run_with_one_line_and_the_next_run_resumes(runs, tmp_path):
    """A run resumed from step 10 whose files may not exceed 100 KiB: the checkpoint of
    step 20 fails to write (EFBIG). It is never called saved, the run stops at once with
    one line naming the step, the path, the OS error and the last complete checkpoint, and
    exits 2. The same command without the limit resumes from step 10 and ends as the
    uninterrupted run does."""
    workdir = tmp_path / "full"
    shutil.copytree(runs["straight"] / "checkpoints" / "10", workdir / "checkpoints" / "10")
    full = _train(workdir, runs, file_size_kib=100)
    assert full.returncode == 2, full.stderr[-3000:]
    log = full.stderr.splitlines()
    assert log[-1] == (
        f"error: saving the checkpoint of step 20 to {workdir}/checkpoints/20 failed: File "
        f"too large; the last complete checkpoint is step 10 in {workdir}/checkpoints; the "
        "same command resumes from it"
    ), full.stderr[-5000:]
    run = full.stderr[full.stderr.index("resuming from step 10 ") :]
    assert "Traceback" not in run and "checkpoint saved" not in run, run[-5000:]
    assert len(run.splitlines()) < 40, run  # the step lines, orbax's one warning, the error
    assert _checkpoint_steps(workdir) == [10] and not os.path.exists(workdir / "weights")

    resumed = _train(workdir, runs)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 10 " in resumed.stderr, resumed.stderr[-3000:]
    assert f"step 20: checkpoint saved to {workdir}/checkpoints/20" in resumed.stderr
    _same_final_state(workdir, runs["straight"])


def test_no_restorable_checkpoint_is_an_error_that_moves_nothing(tmp_path):
    """When no checkpoint restores (here: a state of another structure), the error says
    so and every checkpoint stays where it is."""
    ckpt = Checkpointer(tmp_path, keep=3)
    for step in (1, 2):
        ckpt.save(step, small_state(step))
    ckpt.close()
    ckpt = Checkpointer(tmp_path, keep=3)
    other = {"v": jnp.zeros((5,))}
    with pytest.raises(CheckpointError, match=r"no checkpoint .* restores \(steps \[2, 1\]\)"):
        ckpt.restore_latest(other)
    ckpt.close()
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["1", "2"]


def test_only_cpu_arrays_are_copied_before_an_async_save():
    """Checkpointer.save copies an array only where the host transfer would alias the
    buffer the next (donating) step overwrites: on CPU devices."""
    cpu = jax.devices("cpu")[0]
    assert needs_snapshot(jax.device_put(jnp.ones(3), cpu))
    assert not needs_snapshot(np.ones(3))
    assert not needs_snapshot(3)
    accelerators = [d for d in jax.devices() if d.platform != "cpu"]
    for device in accelerators:  # only where this machine has one
        assert not needs_snapshot(jax.device_put(jnp.ones(3), device))


def test_non_finite_loss_stops_before_saving(runs, tmp_path):
    """The uninterrupted run's checkpoint of step 10, resumed with an absurd learning rate:
    the loss turns non-finite; the error names its step and the last good checkpoint,
    exit status 2, and nothing after it is saved (no later checkpoint, no final weights)."""
    workdir = tmp_path / "diverged"
    shutil.copytree(runs["straight"] / "checkpoints" / "10", workdir / "checkpoints" / "10")
    diverged = _train(workdir, runs, "--config.log_every_steps=2", "--config.optim.base_lr=1e32")
    assert diverged.returncode == 2, diverged.stderr[-3000:]
    match = re.search(r"error: the training loss is (nan|inf|-inf) at step (\d+)", diverged.stderr)
    assert match, diverged.stderr[-3000:]
    assert 10 < int(match.group(2)) <= 20
    assert f"The last good checkpoint is step 10 in {workdir}/checkpoints" in diverged.stderr
    assert _checkpoint_steps(workdir) == [10]
    assert not os.path.exists(workdir / "weights")


def test_check_finite_names_the_first_bad_step():
    params = {"w": jnp.ones(3)}
    check_finite(20, [1.0, 2.0], params, lambda: "none")  # all finite: no error
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 19.*is step 10 in x"):
        check_finite(20, [1.0, float("nan"), float("inf")], params, lambda: "step 10 in x")
    with pytest.raises(TrainingDivergedError, match="parameters after step 20 are not finite"):
        check_finite(20, [1.0, 2.0], {"w": jnp.array([1.0, jnp.inf])}, lambda: "none")


def test_preemption_watch_turns_sigterm_into_a_flag(tmp_path):
    """Inside the watch SIGTERM sets the flag instead of ending the process; outside it
    the previous handler is back."""
    before = signal.getsignal(signal.SIGTERM)
    ckpt = Checkpointer(tmp_path, keep=1)
    with PreemptionWatch(ckpt) as watch:
        assert not watch.reached(1)  # one process: no preemption service to ask
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.reached(2)
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) is before
