"""One process of a training run for tests/sharding/test_multiprocess.py: `train_and_evaluate` on
a few steps of configs/smoke.py, then one line 'RESULT {json}' with what the process saw.

  python -m tests.support.multiprocess_worker '{"workdir": ..., "data_dir": ..., "max_steps": 4}'

Keys of the JSON spec: workdir, data_dir, max_steps; optional mesh ({axis: size}),
sharding, coordinator + num_processes + process_id (a multi-process run), and
emulate_processes (one process reads the global batches that this many processes would
read together, so that its run can be compared with theirs).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from volo_jax.training import train

RESULT = "RESULT "


def make_config(spec: dict[str, Any]) -> ml_collections.ConfigDict:
    """configs/smoke.py for `spec["max_steps"]` steps, logging every step, one eval (at
    the end) on 120 images, a checkpoint every 2 steps and no warmup (a real lr)."""
    from configs.smoke import get_config

    config = get_config()
    config.dataset.data_dir = spec["data_dir"]
    config.dataset.num_eval_examples = 120
    config.max_steps = spec["max_steps"]
    config.log_every_steps = 1
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 2
    config.optim.warmup_epochs = 0
    # Adam's update is lr * m / (sqrt(v) + eps): with the usual eps 1e-8 a near-zero
    # gradient's update is +-lr whatever its rounding, so two runs whose gradients differ
    # in the last bits (all-reduce order) differ by lr there; eps = 1 keeps the update
    # linear in the gradient, so comparing parameters compares gradients.
    config.optim.eps = 1.0
    config.mesh.update(spec.get("mesh", {}))
    config.sharding = spec.get("sharding", "auto")
    if "process_id" in spec:
        config.distributed.coordinator_address = spec["coordinator"]
        config.distributed.num_processes = spec["num_processes"]
        config.distributed.process_id = spec["process_id"]
        config.distributed.initialization_timeout = 120
    return config


class _Together:
    """The training data of several emulated processes: global batches made of each
    one's local batch, in process order (what make_array_from_process_local_data
    assembles from them)."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.num_examples = parts[0].num_examples
        self.steps_per_epoch = parts[0].steps_per_epoch

    def batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        for local in zip(*(p.batches(start_step) for p in self.parts), strict=False):
            yield {key: np.concatenate([b[key] for b in local]) for key in local[0]}


def emulate_processes(count: int) -> None:
    """Makes this (single) process train on the data that `count` processes would read."""
    from volo_jax.data import input_pipeline

    create = input_pipeline.create_train_dataset

    def create_together(*args: Any, batch_size: int, **kwargs: Any) -> _Together:
        return _Together(
            [
                create(
                    *args,
                    batch_size=batch_size // count,
                    process_index=index,
                    process_count=count,
                    **kwargs,
                )
                for index in range(count)
            ]
        )

    input_pipeline.create_train_dataset = create_together


def digest(tree: Any) -> str:
    """SHA-256 of the leaves' bytes in path order (equal only for identical values)."""
    sha = hashlib.sha256()
    for path, leaf in sorted(
        jax.tree_util.tree_flatten_with_path(tree)[0],
        key=lambda item: jax.tree_util.keystr(item[0]),
    ):
        sha.update(jax.tree_util.keystr(path).encode())
        sha.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return sha.hexdigest()


def main(spec: dict[str, Any]) -> None:
    began = time.perf_counter()
    jax.config.update("jax_default_matmul_precision", "highest")
    if spec.get("emulate_processes", 1) > 1:
        emulate_processes(spec["emulate_processes"])
    seen: dict[str, Any] = {"losses": {}, "seconds": {}}

    def mark(event: str) -> None:
        seen["seconds"][event] = round(time.perf_counter() - began, 1)

    # Spies on the loop: the step it starts from, every logged train loss (all
    # processes compute them; only process 0 writes them), and the exported weights.
    run, log_train, save_weights = train._Loop.run, train._Loop._log_train, train.save_weights

    def spy_run(self: Any, state: Any, batches: Any, start: int, last: int) -> Any:
        seen["start_step"] = start
        mark("loop")
        out = run(self, state, batches, start, last)
        mark("loop_done")
        return out

    def spy_log_train(self: Any, step: int, *args: Any) -> dict:
        means = log_train(self, step, *args)
        seen["losses"][step] = means["loss"]
        mark(f"step_{step}")
        return means

    def spy_save_weights(directory: Any, variables: Any, *args: Any, **kwargs: Any) -> None:
        seen["weights_digest"] = digest(variables)
        save_weights(directory, variables, *args, **kwargs)

    train._Loop.run, train._Loop._log_train = spy_run, spy_log_train
    train.save_weights = spy_save_weights
    mark("imports")
    eval_metrics = train.train_and_evaluate(make_config(spec), spec["workdir"])
    mark("done")
    seen.update(
        eval=eval_metrics,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        local_device_count=jax.local_device_count(),
    )
    print(RESULT + json.dumps(seen), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
