#!/usr/bin/env bash
# The test suite (with the PyTorch/timm reference), plus ruff. Extra args go to pytest,
# e.g. scripts/test.sh -m slow  for the long tests. PYTEST_WORKERS=N sets the number of
# pytest-xdist workers (default 2; 0 runs in one process).
set -euo pipefail
source "$(dirname "$0")/env.sh" train,torch,test
ruff check volo_jax tests main.py configs benchmarks
ruff format --check volo_jax tests main.py configs benchmarks
python -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
