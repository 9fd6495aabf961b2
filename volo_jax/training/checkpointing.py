"""Training checkpoints with orbax: the last N steps and the best by eval top-1.

Layout: WORKDIR/checkpoints/<step>/ (an orbax `CheckpointManager` directory). A
checkpoint holds the whole `TrainState` (step, params, batch_stats, optimizer state,
EMA params, RNG); the data position is a function of (seed, step), so resuming from
the latest step continues the run exactly.

The directory may be local or gs:// (`volo_jax.paths`). A checkpoint that cannot be
restored (a truncated or deleted file) is named in a warning, moved aside to
WORKDIR/checkpoints_broken/<step>, and the newest intact one is restored instead
(`Checkpointer.restore_latest`); orbax itself never lists a checkpoint whose write did
not finish.

Saves are asynchronous: a save is reported complete (`Checkpointer.completed`) only once
its write has finished, and a failed write (a full disk, a quota) is raised as one
`CheckpointSaveError` naming the step, the path, the OS error and the last complete
checkpoint, which the next run resumes from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from volo_jax.errors import CheckpointError, CheckpointSaveError
from volo_jax.paths import as_path, makedirs

State = TypeVar("State")
BEST_METRIC = "top1"
BROKEN_SUFFIX = "_broken"


def _best_metric(metrics: dict[str, Any]) -> float:
    return float(metrics[BEST_METRIC])


class Checkpointer:
    """Saves (asynchronously) and restores a train state under `directory`."""

    def __init__(self, directory: str | os.PathLike, keep: int) -> None:
        policy = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(n=keep),
                checkpoint_managers.BestN(
                    get_metric_fn=_best_metric,
                    reverse=False,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            best_fn=_best_metric,
            best_mode="max",
            create=True,
            enable_async_checkpointing=True,
        )
        self.path = as_path(directory)
        self.directory = os.fspath(self.path)
        self._manager = ocp.CheckpointManager(self.path, options=options)
        self._unconfirmed: list[int] = []  # the step whose save is in flight (orbax: one)
        self._complete: list[int] = []  # steps saved completely, not yet reported
        self._failed: CheckpointSaveError | None = None
        self._echoes = _FailedWriteEchoes(self)

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    @property
    def best_step(self) -> int | None:
        return self._manager.best_step()

    def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> None:
        """Starts saving `state` at `step` (returns before the write completes; the
        caller may donate `state` to its next step right away).

        Before `save` returns, orbax has copied every array to host memory (it waits for
        the device-to-host transfers and writes from those host copies in the
        background). On an accelerator that host copy is separate memory, so `state`
        is saved as it is. On the CPU the "transfer" is a view of the same buffer, which
        the next step, donated `state`, overwrites while the write still runs: there the
        arrays are copied first (`needs_snapshot`), which costs one more state in memory
        until the write finishes (`benchmarks/checkpoint_memory.py` measures it;
        docs/performance.md, "The checkpoint snapshot on the CPU", has the figure and its
        machine). On an accelerator the copy would hold a second state in its memory for
        nothing, so there the state is handed to orbax as it is.
        """
        if self._unconfirmed:  # orbax would wait for it first, too
            self.wait()
        if step in self._manager.all_steps():
            return
        snapshot = jax.tree_util.tree_map(lambda x: jnp.copy(x) if needs_snapshot(x) else x, state)
        self._manager.save(step, args=ocp.args.StandardSave(snapshot), metrics=metrics)
        self._unconfirmed.append(step)

    def completed(self) -> list[int]:
        """The steps whose save has completed since the last call (each one once); cheap
        enough to call every step. Raises CheckpointSaveError once a save has failed."""
        self._raise_if_failed()
        if self._unconfirmed and not self._manager.is_saving_in_progress():
            self.wait()  # finished: raises its failure, if it failed
        done, self._complete = self._complete, []
        return done

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise self._failed
        try:
            self._manager.check_for_errors()
        except Exception as err:  # orbax re-raises what the write raised, of any type
            self._failed = self._save_error(err)
            raise self._failed from err

    def _save_error(self, err: Exception) -> CheckpointSaveError:
        """One line: the step, its path, the OS error and the last complete checkpoint."""
        step = self._unconfirmed[-1] if self._unconfirmed else None
        with contextlib.suppress(Exception):  # the same failure again
            self._manager.wait_until_finished()  # the save's other writes end first
        self._manager.reload()  # the steps on disk: a failed save is not among them
        latest = self._manager.latest_step()
        last = (
            "no checkpoint is complete yet"
            if latest is None
            else f"the last complete checkpoint is step {latest} in {self.directory}; the "
            "same command resumes from it"
        )
        target = self.path / str(step) if step is not None else self.path
        return CheckpointSaveError(
            f"saving the checkpoint of step {step} to {target} failed: {os_error(err)}; {last}"
        )

    def reached_preemption(self, step: int) -> bool:
        """True at the step on which all processes agreed to save after one of them got a
        preemption notice (JAX's preemption service, set up by jax.distributed); always
        False in a single process."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        """Blocks until every started save is written; raises CheckpointSaveError if one
        failed."""
        if self._failed is None:
            try:
                self._manager.wait_until_finished()
            except Exception as err:  # orbax re-raises what the write raised
                self._failed = self._save_error(err)
                raise self._failed from err
        self._raise_if_failed()
        self._complete += self._unconfirmed
        self._unconfirmed = []
        self._echoes.release()

    def restore_latest(self, target: State) -> tuple[State, int] | None:
        """The newest checkpoint that restores, as (state, step); None without any.

        A checkpoint that fails to restore while an older one restores is broken (a
        truncated or deleted file): it is named in a warning and moved aside to
        <directory>_broken/<step>, so that the next start does not try it again and a
        later save of that step is not skipped. When none restores (damaged, or made
        with another model or config) nothing is moved and the error says so.
        """
        failed: list[tuple[int, CheckpointError]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state = self.restore(step, target)
            except CheckpointError as err:
                failed.append((step, err))
                continue
            for bad, err in failed:
                logging.warning("%s; restored step %d instead", err, step)
                self._move_aside(bad)
            return state, step
        if failed:
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores (steps "
                f"{[step for step, _ in failed]}): they are damaged or were made with another "
                "model or config; use the config they were made with, or a new --workdir"
            ) from failed[0][1]
        return None

    def _move_aside(self, step: int) -> None:
        """Moves the checkpoint of `step` to <directory>_broken/<step> (<step>-2, ... if
        taken) on process 0; then all processes reload the list of steps."""
        if jax.process_index() == 0:
            source = self.path / str(step)
            target = self.path.parent / (self.path.name + BROKEN_SUFFIX) / str(step)
            makedirs(target.parent)
            # Also makes the folder exist on cloud storage, where rename requires it.
            (target.parent / "README.txt").write_text(
                "Training checkpoints that failed to restore, moved here by volo_jax.\n"
            )
            copies = 1
            while target.exists():  # broken before: keep that one too
                copies += 1
                target = target.parent / f"{step}-{copies}"
            source.rename(target)
            logging.warning("moved the broken checkpoint %s to %s", source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"volo_jax: checkpoint {step} moved aside")
        self._manager.reload()

    def restore(self, step: int, target: State) -> State:
        """The state saved at `step`, with the structure, dtypes and shardings of `target`."""
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as err:  # orbax raises many types for damaged or foreign data
            path = self.path / str(step)
            raise CheckpointError(
                f"cannot restore the training checkpoint {path}: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}"
            ) from err

    def close(self) -> None:
        """Waits for pending saves, then releases the manager. After a failed save
        (already raised), only releases it."""
        if self._failed is None:
            self.wait()
        try:
            self._manager.close()
        except Exception:
            if self._failed is None:
                raise
        if self._failed is None:
            self._echoes.remove()


class _FailedWriteEchoes(logging.Filter):
    """Keeps the echoes of a failed asynchronous write out of the output: the write's
    failure is reported once, as a CheckpointSaveError (one line).

    When a write fails, each of orbax's threads that waits on it logs the same OSError as
    an ERROR with a traceback, asyncio logs every write task whose exception nobody
    retrieved, and tensorstore's callbacks into orbax's closed event loop each print an
    unraisable "Event loop is closed" traceback: with a full disk during a smoke run,
    about 1,300 lines. While a save is in flight, orbax's and asyncio's ERROR records are
    held, and passed on if the save completes (`release`); after a failure they are
    dropped. "Event loop is closed" unraisables are dropped while a save is in flight or
    has failed; any other unraisable goes to the previous hook."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        super().__init__()
        self._checkpointer = checkpointer
        self._held: list[logging.LogRecord] = []
        self._loggers = (logging.getLogger("absl"), logging.getLogger("asyncio"))
        for logger in self._loggers:
            logger.addFilter(self)
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable

    def _saving(self) -> bool:
        return bool(self._checkpointer._unconfirmed) or self._checkpointer._failed is not None

    def filter(self, record: logging.LogRecord) -> bool:
        from_saver = record.name == "asyncio" or f"{os.sep}orbax{os.sep}" in record.pathname
        if record.levelno >= logging.ERROR and from_saver and self._saving():
            if self._checkpointer._failed is None:
                self._held.append(record)
            return False
        return True

    def _unraisable(self, unraisable: Any) -> None:
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and (
            str(unraisable.exc_value) == "Event loop is closed"
        )
        if not (closed_loop and self._saving()):
            self._previous_hook(unraisable)

    def release(self) -> None:
        """Passes on the records held during saves that completed."""
        held, self._held = self._held, []
        for record in held:
            logging.getLogger(record.name).callHandlers(record)

    def remove(self) -> None:
        for logger in self._loggers:
            logger.removeFilter(self)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous_hook


#: How tensorstore (orbax's writer) reports the errno of a failed write.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)'?")


def os_error(err: BaseException) -> str:
    """The operating system's reason for `err` ('No space left on device', 'File too
    large'), from an OSError in its chain or the errno in tensorstore's message; else the
    first line of the message."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        match = _OS_ERROR_CODE.search(str(seen))
        if match:
            return os.strerror(int(match.group(1)))
        seen = seen.__cause__ or seen.__context__
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def needs_snapshot(x: Any) -> bool:
    """Whether `Checkpointer.save` copies the array `x` before handing it to orbax: a
    jax.Array on CPU devices (whose host transfer aliases the buffer that the next,
    donating step overwrites). Decided by where `x` lives, not by jax.default_backend():
    a CPU-resident array in a TPU process is copied, a TPU array is not."""
    if not isinstance(x, jax.Array):
        return False
    return any(device.platform == "cpu" for device in x.sharding.device_set)
