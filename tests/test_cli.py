"""volo_jax.cli: the huge-page restart every training run starts with."""

import os
import subprocess
import sys

import pytest

from volo_jax.cli import HUGE_PAGES_TUNABLE, with_huge_pages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_with_huge_pages_adds_the_tunable_and_keeps_others():
    assert with_huge_pages({})["GLIBC_TUNABLES"] == HUGE_PAGES_TUNABLE
    env = with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
    assert env == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}",
        "HOME": "/h",
    }


@pytest.mark.parametrize(
    "env",
    [
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's own choice
        {"VOLO_JAX_HUGE_PAGES": "0"},  # switched off
    ],
)
def test_with_huge_pages_leaves_explicit_settings(env):
    assert with_huge_pages(env) == env


_PROBE = (
    "import os; print('start', flush=True); from volo_jax.cli import restart_with_huge_pages; "
    "restart_with_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'))"
)


def _probe(**env: str) -> list[str]:
    base = {
        k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "VOLO_JAX_HUGE_PAGES")
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
    assert _probe() == ["start", "start", HUGE_PAGES_TUNABLE]
    assert _probe(VOLO_JAX_HUGE_PAGES="0") == ["start", "None"]
    explicit = "glibc.malloc.hugetlb=0"
    assert _probe(GLIBC_TUNABLES=explicit) == ["start", explicit]
