#!/usr/bin/env bash
# The test suite (with the PyTorch/timm reference), plus ruff. Extra args go to pytest,
# e.g. scripts/test.sh -m slow  for the long tests. PYTEST_WORKERS=N sets the number of
# pytest-xdist workers (default 2; 0 runs in one process). The torch/timm reference tests
# must run here: VOLO_JAX_REQUIRE_REFERENCE=1 makes a missing package a failure, not a skip.
# --dist loadfile: the tests of one file run in one worker, so a module fixture (a training
# run, the 8-device worker) runs once.
# The suite has its own venv, .venv-test: it holds the references (torch, timm) and the
# compile-only TPU and GPU toolchains (the accel-compile extra: libtpu, the CUDA plugin, whose
# start-up lines on a host without a GPU a training venv should not have).
set -euo pipefail
export VOLO_JAX_VENV="${VOLO_JAX_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv-test}"
source "$(dirname "$0")/env.sh" train,torch,test,accel-compile
export VOLO_JAX_REQUIRE_REFERENCE=1
ruff check volo_jax tests main.py configs benchmarks
ruff format --check volo_jax tests main.py configs benchmarks
python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=25 "$@"
