"""volo_jax.cli: the process setup of a training run (the glibc malloc tunables its launcher
puts in the environment, synchronous CPU dispatch)."""

from tests.support import REPO, run_python
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


def _glibc_tunables(**env: str | None) -> str:
    """What `python -m volo_jax.cli glibc-tunables` prints (scripts/train_default.sh)."""
    unset = {"GLIBC_TUNABLES": None, MALLOC_TUNABLES_SWITCH: None}
    argv = ("-m", "volo_jax.cli", "glibc-tunables")
    return run_python(*argv, env={**unset, **env}, timeout=60, check=True).stdout.strip()


def test_the_launchers_tunables_come_from_one_place():
    assert _glibc_tunables() == OURS
    assert _glibc_tunables(GLIBC_TUNABLES="glibc.malloc.arena_max=2") == (
        f"glibc.malloc.arena_max=2:{OURS}"
    )
    assert _glibc_tunables(**{MALLOC_TUNABLES_SWITCH: "0"}) == ""
    script = (REPO / "scripts" / "train_default.sh").read_text()
    assert 'GLIBC_TUNABLES="$(python -m volo_jax.cli glibc-tunables)"' in script


def test_synchronous_cpu_dispatch_switches_off_async_dispatch():
    # In a fresh process: the setting only counts before JAX's first computation.
    code = (
        "import jax; from volo_jax.cli import synchronous_cpu_dispatch; "
        "synchronous_cpu_dispatch(); jax.numpy.ones(2).block_until_ready(); "
        "print(jax.config.values['jax_cpu_enable_async_dispatch'])"
    )
    out = run_python("-c", code, timeout=60, check=True)
    assert out.stdout.split()[-1] == "False"
