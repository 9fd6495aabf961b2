"""What several tests share, in one place.

- `REPO`: the repository root; `run_python`: a fresh Python process run from it.
- `small`: the tiny VOLO and the small training config most tests build.
- `timm_pairs`: timm's registered models and ours, built alike, with randomized weights.
- `trees`: leaf-by-leaf comparisons of parameter trees, each leaf against its own size.
- `programs`: the compiled program of a function, for checks on what XLA runs.
- `gcs_emulator`: a `gs://` server on loopback (its own process).
- Subprocess workers, run with `python -m tests.support.<name>`: `sharding_worker` (8 CPU
  devices), `multiprocess_worker` (one of several `jax.distributed` processes),
  `official_token_labeling_worker` (the official token-labeling code, with torch).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: The repository root.
REPO = Path(__file__).resolve().parents[2]


def run_python(
    *args: str, env: dict[str, str | None] | None = None, timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess:
    """`python *args` in a fresh process run from the repository (stdout and stderr as text),
    with this process's environment updated by `env` (a None value removes the variable)."""
    environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={k: v for k, v in environ.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )
