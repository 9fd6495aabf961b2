"""What the snapshot copy before an async checkpoint save costs in memory on the CPU.

`Checkpointer.save` copies CPU-resident arrays before handing them to orbax (the host
"transfer" of a CPU array is a view of the buffer the next, donating step overwrites).
This saves a state of VOLO-D1's size (its 26.6M parameters and two AdamW moments, float32,
in 150 arrays) with orbax's async CheckpointManager, once as is and once copied first, and
prints the process's peak resident memory during each save above what it held before.

  python -m benchmarks.checkpoint_memory
"""

from __future__ import annotations

import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

PARAMS = 26_600_000  # volo_d1_224
LEAVES = 150


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def peak_during_save(state: dict, copy: bool) -> float:
    """Peak RSS (MiB) above the starting RSS while one async save runs to completion."""
    start = _rss_mib()
    peak = start
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_mib())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with tempfile.TemporaryDirectory() as directory:
        manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
        )
        saved = jax.tree_util.tree_map(jnp.copy, state) if copy else state
        manager.save(1, args=ocp.args.StandardSave(saved))
        del saved
        manager.wait_until_finished()
        manager.close()
    done.set()
    watcher.join()
    return peak - start


def main() -> None:
    size = 3 * PARAMS // LEAVES
    state = {f"a{i}": jnp.full((size,), float(i), jnp.float32) for i in range(LEAVES)}
    jax.block_until_ready(state)
    mib = sum(x.nbytes for x in state.values()) / 2**20
    print(f"state: {mib:.0f} MiB in {LEAVES} arrays on {jax.devices()[0].platform}")
    peak_during_save(state, copy=False)  # warm-up: orbax's threads and tensorstore
    for copy in (False, True):
        extra = peak_during_save(state, copy)
        print(f"save {'after a copy' if copy else 'as is':13s}: peak RSS +{extra:.0f} MiB")


if __name__ == "__main__":
    main()
