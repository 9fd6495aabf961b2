"""What several tests share, in one place.

- `REPO`: the repository root (subprocess tests run from it).
- `timm_pairs`: timm's registered models and ours, built alike, with randomized weights.
- `trees`: leaf-by-leaf comparisons of parameter trees, each leaf against its own size.
- `programs`: the compiled program of a function, for checks on what XLA runs.
- `gcs_emulator`: a `gs://` server on loopback (its own process).
- Subprocess workers, run with `python -m tests.support.<name>`: `sharding_worker` (8 CPU
  devices), `multiprocess_worker` (one of several `jax.distributed` processes),
  `official_token_labeling_worker` (the official token-labeling code, with torch).
"""

from __future__ import annotations

from pathlib import Path

#: The repository root.
REPO = Path(__file__).resolve().parents[2]
