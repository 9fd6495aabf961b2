#!/usr/bin/env bash
# The main job on the embedded default: trains a small VOLO on scikit-learn's digits.
# Usage: scripts/train_default.sh [WORKDIR] [extra main.py flags...]
# On Linux, Python starts with glibc's malloc tunables for XLA:CPU's large step buffers
# (volo_jax.cli.MALLOC_TUNABLES, docs/performance.md); VOLO_JAX_MALLOC_TUNABLES=0 leaves
# the environment as it is.
set -euo pipefail
source "$(dirname "$0")/env.sh" train
WORKDIR="${1:-workdir/default}"
shift || true
GLIBC_TUNABLES="$(python -m volo_jax.cli glibc-tunables)"
export GLIBC_TUNABLES
python main.py --config=configs/default.py --workdir="$WORKDIR" "$@"
