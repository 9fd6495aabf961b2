"""What every command-line entry point shares: one clear line for user errors, the
process setup for XLA:CPU's large host buffers (the glibc malloc tunables a launcher puts
in the environment, synchronous dispatch), and the imported modules kept out of the
garbage collector's way.

`python -m volo_jax.cli glibc-tunables` prints GLIBC_TUNABLES with `MALLOC_TUNABLES`
added (what scripts/train_default.sh exports before it starts Python)."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Mapping

from volo_jax.errors import VoloJaxError

#: glibc malloc tunables for XLA:CPU: transparent huge pages for large blocks; large blocks
#: of the main thread from its heap instead of fresh mappings; that heap never trimmed.
MALLOC_TUNABLES = (
    "glibc.malloc.hugetlb=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.trim_threshold=17179869184",
)
#: Set to 0 to keep the process as it was started.
MALLOC_TUNABLES_SWITCH = "VOLO_JAX_MALLOC_TUNABLES"


def with_malloc_tunables(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with `MALLOC_TUNABLES` added to GLIBC_TUNABLES: each one whose name is not
    set there already (the user's own settings win); VOLO_JAX_MALLOC_TUNABLES=0 leaves
    `env` alone.

    Why: XLA:CPU allocates an executable's temporaries as one block (gigabytes for a
    VOLO-D1 train step) on every call. glibc maps a block that large afresh each time and
    unmaps it after, so the kernel faults in and zeroes it again on every step (the page
    faults and their cost are measured in docs/performance.md). With the main thread's
    large blocks kept in its heap (and `synchronous_cpu_dispatch`, so that the main thread
    is the one that allocates them), the step reuses the same memory.
    """
    env = dict(env)
    if env.get(MALLOC_TUNABLES_SWITCH) == "0":
        return env
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=")[0] for t in tunables}
    tunables += [t for t in MALLOC_TUNABLES if t.split("=")[0] not in names]
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env


def malloc_tunables_missing(env: Mapping[str, str] | None = None) -> bool:
    """Whether this Linux process started without `MALLOC_TUNABLES` (glibc reads
    GLIBC_TUNABLES only at start: a launcher sets them, as scripts/train_default.sh does
    with `with_malloc_tunables`); False elsewhere and with VOLO_JAX_MALLOC_TUNABLES=0."""
    env = os.environ if env is None else env
    return sys.platform.startswith("linux") and with_malloc_tunables(env) != dict(env)


def synchronous_cpu_dispatch() -> None:
    """Runs XLA:CPU executions on the calling thread (`jax_cpu_enable_async_dispatch`
    off): their temporaries then come from the main thread's heap, which
    `MALLOC_TUNABLES` keeps mapped, instead of a worker thread's arena, which glibc maps
    afresh for every large block. Call it before JAX's first computation. Python then
    waits for each CPU step; the input pipeline prefetches in its own threads."""
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)


def prog_name(module: str) -> str:
    """The command as it was called, for usage lines: the console script's name
    ('volo-jax-predict'), or 'python -m MODULE' when run as a module (argv[0] a .py)."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not script or script.endswith(".py") or script == "-c":
        return f"python -m {module}"
    return script


def run_cli(main: Callable[[], int | None]) -> None:
    """Runs `main`, turning a `VoloJaxError` into 'error: ...' and exit status 2.

    The objects alive when it starts (the modules imported so far: with TensorFlow and
    JAX about 450,000) live until the process ends, so they are moved out of the garbage
    collector's view (`gc.freeze`); so are those alive when `main` returns, after one last
    collection. Otherwise every full collection walks all of them, during the run and
    several times at interpreter exit: on a 2-vCPU AMD EPYC Zen 3, exiting after a smoke
    training run took 4-6 s instead of under 1 s.
    """
    gc.freeze()
    try:
        status = main()
    except VoloJaxError as err:
        print(f"error: {err}", file=sys.stderr)
        status = 2
    gc.collect()
    gc.freeze()
    sys.exit(status or 0)


if __name__ == "__main__":
    if sys.argv[1:] != ["glibc-tunables"]:
        sys.exit("usage: python -m volo_jax.cli glibc-tunables")
    print(with_malloc_tunables(os.environ).get("GLIBC_TUNABLES", ""))
