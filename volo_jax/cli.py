"""What every command-line entry point shares: one clear line for user errors, and the
process start with huge pages for XLA's large host buffers."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping

from volo_jax.errors import VoloJaxError

#: glibc's malloc tunable that backs its large (mmap'd) blocks with transparent huge pages.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
#: Set to 0 to keep the process as it was started.
HUGE_PAGES_SWITCH = "VOLO_JAX_HUGE_PAGES"


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with `HUGE_PAGES_TUNABLE` added to GLIBC_TUNABLES (other tunables kept; an
    explicit glibc.malloc.hugetlb setting, or VOLO_JAX_HUGE_PAGES=0, is left alone).

    Why: XLA:CPU allocates an executable's temporaries (about 2 GiB for a VOLO-D1 train
    step at batch 8) afresh on every call, and glibc maps such blocks anew each time, so
    the kernel faults in and zeroes every 4 KiB page again: about 590,000 page faults and
    1 s of system time per step on this project's CPU machine. With huge pages it is a
    few thousand faults, and the step is 10-20% faster (docs/performance.md).
    """
    env = dict(env)
    tunables = env.get("GLIBC_TUNABLES", "")
    if env.get(HUGE_PAGES_SWITCH) == "0" or "glibc.malloc.hugetlb" in tunables:
        return env
    env["GLIBC_TUNABLES"] = ":".join(filter(None, (tunables, HUGE_PAGES_TUNABLE)))
    return env


def restart_with_huge_pages() -> None:
    """Re-executes this process with `with_huge_pages(os.environ)` if that differs from
    its environment (glibc reads its tunables only at start). Linux only; call it first
    thing in a script's `__main__`, before anything worth keeping has run."""
    if not sys.platform.startswith("linux"):
        return
    env = with_huge_pages(os.environ)
    if env == dict(os.environ):
        return
    env[HUGE_PAGES_SWITCH] = "0"  # never more than one restart
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def run_cli(main: Callable[[], int | None]) -> None:
    """Runs `main`, turning a `VoloJaxError` into 'error: ...' and exit status 2."""
    try:
        status = main()
    except VoloJaxError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)
