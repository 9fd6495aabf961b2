"""volo_jax.cli: the process setup every training run starts with (glibc malloc tunables by
a restart, synchronous CPU dispatch)."""

import os
import subprocess
import sys

import pytest

from tests.support import REPO
from volo_jax.cli import MALLOC_TUNABLES, MALLOC_TUNABLES_SWITCH, with_malloc_tunables

OURS = ":".join(MALLOC_TUNABLES)


def test_with_malloc_tunables_adds_them_and_keeps_others():
    assert with_malloc_tunables({})["GLIBC_TUNABLES"] == OURS
    env = with_malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{OURS}", "HOME": "/h"}


def test_with_malloc_tunables_leaves_the_users_own():
    # A tunable the user set keeps the user's value; the others are added.
    env = with_malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    tunables = env["GLIBC_TUNABLES"].split(":")
    assert tunables[0] == "glibc.malloc.hugetlb=0"
    assert tunables[1:] == [t for t in MALLOC_TUNABLES if not t.startswith("glibc.malloc.hugetlb")]
    every = {
        "GLIBC_TUNABLES": "glibc.malloc.mmap_max=8:glibc.malloc.trim_threshold=1:"
        "glibc.malloc.hugetlb=0"
    }
    assert with_malloc_tunables(every) == every
    off = {MALLOC_TUNABLES_SWITCH: "0"}
    assert with_malloc_tunables(off) == off


_PROBE = (
    "import os; print('start', flush=True); from volo_jax.cli import restart_with_malloc_tunables;"
    " restart_with_malloc_tunables(); print(os.environ.get('GLIBC_TUNABLES'))"
)


def _probe(**env: str) -> list[str]:
    base = {
        k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", MALLOC_TUNABLES_SWITCH)
    }
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**base, "PYTHONPATH": REPO, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables: Linux only")
def test_restart_happens_once_with_the_same_command_line():
    # The restarted process runs the same command line again: 'start' twice, then the
    # environment it ends with; it does not restart a second time.
    assert _probe() == ["start", "start", OURS]
    assert _probe(**{MALLOC_TUNABLES_SWITCH: "0"}) == ["start", "None"]
    complete = ":".join(t.replace("=1", "=0", 1) for t in MALLOC_TUNABLES)
    assert _probe(GLIBC_TUNABLES=complete) == ["start", complete]


def test_synchronous_cpu_dispatch_switches_off_async_dispatch():
    # In a fresh process: the setting only counts before JAX's first computation.
    code = (
        "import jax; from volo_jax.cli import synchronous_cpu_dispatch; "
        "synchronous_cpu_dispatch(); jax.numpy.ones(2).block_until_ready(); "
        "print(jax.config.values['jax_cpu_enable_async_dispatch'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split()[-1] == "False"
