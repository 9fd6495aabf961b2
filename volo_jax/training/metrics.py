"""Where metrics go: TensorBoard event files, a JSON-lines history, the console, and
a PNG of the loss and accuracy curves drawn from the history at the end of a run."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax

HISTORY_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


class MetricWriter:
    """Writes scalars of process 0 under `workdir` (no-op on other processes)."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self._active = jax.process_index() == 0
        self._tb = None
        if self._active:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Records `scalars` (e.g. {'train/loss': 2.3}) at `step`."""
        if not self._active:
            return
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._tb.flush()
        with open(os.path.join(self.workdir, HISTORY_FILE), "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}))
            f.write("\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_history(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from the history; after a resume, the values
    logged last for a step win."""
    path = os.path.join(workdir, HISTORY_FILE)
    latest: dict[str, dict[int, float]] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                step = record.pop("step")
                for name, value in record.items():
                    latest.setdefault(name, {})[step] = value
    return {name: sorted(values.items()) for name, values in latest.items()}


def plot_curves(workdir: str) -> str:
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
    path = os.path.join(workdir, PLOT_FILE)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
