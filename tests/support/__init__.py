"""What several tests share, in one place.

- `REPO`: the repository root; `run_python`: a fresh Python process run from it;
  `without_cuda_plugin_lines`: a command's output without the suite's compile-only CUDA
  plugin's start-up lines.
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

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

#: The repository root.
REPO = Path(__file__).resolve().parents[2]


#: What the compile-only CUDA plugin of the suite's environment (the accel-compile extra,
#: for the deviceless GPU compile tests) prints at every `import jax` on a host without a
#: GPU driver: absl's first-log notice and one line. A user's environment has no plugin
#: without a GPU (scripts/test.sh keeps its own venv).
_COMPILE_ONLY_CUDA_PLUGIN = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    r"STDERR\n[IW]\d{4} [\d:.]+ +\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on "
    r"your machine, GPU will not be used\.\n"
)


def without_cuda_plugin_lines(text: str) -> str:
    """`text` without the exact line pairs the compile-only CUDA plugin prints (when it is
    installed), and nothing else taken out."""
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        return text
    return _COMPILE_ONLY_CUDA_PLUGIN.sub("", text)


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
