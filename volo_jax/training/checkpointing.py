"""Training checkpoints with orbax: the last N steps and the best by eval top-1.

Layout: WORKDIR/checkpoints/<step>/ (an orbax `CheckpointManager` directory). A
checkpoint holds the whole `TrainState` (step, params, batch_stats, optimizer state,
EMA params, RNG); the data position is a function of (seed, step), so resuming from
the latest step continues the run exactly.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from volo_jax.errors import CheckpointError

State = TypeVar("State")
BEST_METRIC = "top1"


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
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    @property
    def best_step(self) -> int | None:
        return self._manager.best_step()

    def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> None:
        """Starts saving a copy of `state` at `step` (returns before the write completes).

        The copy matters: the caller donates `state`'s buffers to its next step while
        orbax is still reading them (on the CPU, host "transfers" alias device memory).
        """
        if step in self._manager.all_steps():
            return
        snapshot = jax.tree_util.tree_map(jnp.copy, state)
        self._manager.save(step, args=ocp.args.StandardSave(snapshot), metrics=metrics)

    def restore(self, step: int, target: State) -> State:
        """The state saved at `step`, with the structure, dtypes and shardings of `target`."""
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as err:  # orbax raises many types for damaged or foreign data
            path = os.path.join(self.directory, str(step))
            raise CheckpointError(
                f"cannot restore the training checkpoint {path}: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}. It is damaged or was made "
                "with another model/config; delete it to fall back to an older step, or "
                "use a new --workdir."
            ) from err

    def close(self) -> None:
        """Waits for pending saves, then releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
