"""When to stop early and save: a preemption notice (SIGTERM), and a non-finite loss.

Cloud TPU maintenance, spot/preemptible VMs and Kubernetes stop a job with SIGTERM and
kill it a grace period later. Training then saves a checkpoint at the step it reached,
waits for the write, and exits 0; the same command resumes from that step.

* One process: a SIGTERM handler sets a flag that the loop reads after each step.
* Several processes (jax.distributed): JAX's preemption service catches SIGTERM on the
  host that got it and makes all hosts agree on one step to save at (orbax
  `CheckpointManager.reached_preemption`); no Python handler is installed, it would
  replace JAX's.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from volo_jax.errors import TrainingDivergedError


class PreemptionWatch:
    """`reached(step)`: True once the run should save at `step` and stop. A context
    manager: the SIGTERM handler (single process, main thread) lives inside it."""

    def __init__(self, checkpointer: Any) -> None:
        self._checkpointer = checkpointer
        self._signalled: int | None = None
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> PreemptionWatch:
        if _single_process() and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            # None: the previous handler was not set from Python; the default is closest.
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._installed = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signalled = signum
        logging.warning("got SIGTERM: saving a checkpoint after this step, then stopping")

    def reached(self, step: int) -> bool:
        if self._signalled is not None:
            return True
        return self._checkpointer.reached_preemption(step)


def _single_process() -> bool:
    return jax.process_count() == 1


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def check_finite(
    step: int,
    losses: Sequence[float],
    params: Any,
    last_good: Callable[[], str],
) -> None:
    """Raises `TrainingDivergedError` if a loss of steps step-len(losses)+1 .. step (host
    values, already fetched) or `params` (None: not checked; else checked on device, one
    scalar comes back) is not finite. `last_good()` names the last good checkpoint."""
    losses = np.asarray(losses, np.float64)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        first = step - len(losses) + 1 + int(bad[0])
        what = f"the training loss is {losses[bad[0]]} at step {first}"
    elif params is not None and not bool(_all_finite(params)):
        what = f"the parameters after step {step} are not finite"
    else:
        return
    raise TrainingDivergedError(
        f"{what}: training stopped without saving them. The last good checkpoint is "
        f"{last_good()}; resuming from it with the same config diverges again: lower "
        "optim.base_lr, set optim.grad_clip_norm, or use dtype=float32."
    )
