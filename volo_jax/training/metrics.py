"""Where metrics go: TensorBoard event files, a JSON-lines history, the console, and
a PNG of the loss and accuracy curves drawn from the history at the end of a run.

The workdir may be local or gs:// (`volo_jax.paths`). Cloud storage cannot append to an
object: there the history and the event file are rewritten whole on each write (both stay
small: a few hundred bytes per logged step).
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from collections.abc import Mapping

import jax

from volo_jax.paths import as_path, is_remote

HISTORY_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


class _WholeObjectFile:
    """A binary file on cloud storage: what was written is kept in memory and uploaded
    whole on every flush (cloud objects cannot be appended to)."""

    def __init__(self, path: str) -> None:
        self._path = as_path(path)
        self._buffer = io.BytesIO()
        self._flushed = -1

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        if self._buffer.tell() != self._flushed:
            self._path.write_bytes(self._buffer.getvalue())
            self._flushed = self._buffer.tell()

    def close(self) -> None:
        self.flush()


class EventFile:
    """A TensorBoard event file of scalars: `Event` protos in TFRecord framing, written
    with TensorBoard's own record writer and protos (without TensorFlow or torch, which a
    summary-writer package may import: 3.6 s of every training run's start where torch is
    installed)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        directory = as_path(directory)
        # TensorBoard's file name: it reads every events.out.tfevents.* file in a run folder.
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        if is_remote(directory):
            file = _WholeObjectFile(os.fspath(directory / name))
        else:
            directory.mkdir(parents=True, exist_ok=True)
            file = open(directory / name, "wb")  # noqa: SIM115  (closed by close())
        self._records = RecordWriter(file)
        self._records.write(
            self._event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()
        )

    def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        event = self._event(wall_time=time.time(), step=step, summary=self._summary(value=values))
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


class MetricWriter:
    """Writes scalars of process 0 under `workdir` (no-op on other processes)."""

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.workdir = as_path(workdir)
        self._active = jax.process_index() == 0
        self._tb: EventFile | None = None
        self._history = self.workdir / HISTORY_FILE
        self._lines: list[str] | None = None  # the whole history, on cloud storage
        if self._active:
            self._tb = EventFile(self.workdir / "tensorboard")
            if is_remote(self.workdir):
                text = self._history.read_text() if self._history.exists() else ""
                self._lines = text.splitlines(keepends=True)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Records `scalars` (e.g. {'train/loss': 2.3}) at `step`."""
        if not self._active:
            return
        self._tb.add_scalars(step, scalars)
        self._tb.flush()
        line = json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n"
        if self._lines is None:
            with self._history.open("a") as f:
                f.write(line)
        else:
            self._lines.append(line)
            self._history.write_text("".join(self._lines))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_history(workdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from the history; after a resume, the values
    logged last for a step win."""
    path = as_path(workdir) / HISTORY_FILE
    latest: dict[str, dict[int, float]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            step = record.pop("step")
            for name, value in record.items():
                latest.setdefault(name, {})[step] = value
    return {name: sorted(values.items()) for name, values in latest.items()}


def plot_curves(workdir: str | os.PathLike) -> str:
    """Draws training loss and eval accuracy against the step; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = read_history(workdir)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("train/loss", "eval/loss"):
        if name in history:
            steps, values = zip(*history[name], strict=True)
            loss_ax.plot(steps, values, label=name)
    for name in ("train/accuracy", "eval/top1", "eval/top5", "eval/ema_top1"):
        if name in history:
            steps, values = zip(*history[name], strict=True)
            acc_ax.plot(steps, values, label=name, marker="o" if name.startswith("eval") else "")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    acc_ax.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    path = as_path(workdir) / PLOT_FILE
    path.write_bytes(png.getvalue())
    return os.fspath(path)
