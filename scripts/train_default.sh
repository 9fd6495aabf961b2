#!/usr/bin/env bash
# The main job on the embedded default: trains a small VOLO on scikit-learn's digits.
# Usage: scripts/train_default.sh [WORKDIR] [extra main.py flags...]
set -euo pipefail
source "$(dirname "$0")/env.sh" train
WORKDIR="${1:-workdir/default}"
shift || true
python main.py --config=configs/default.py --workdir="$WORKDIR" "$@"
