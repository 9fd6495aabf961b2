#!/usr/bin/env bash
# Sourced by the other scripts: makes .venv (or $VOLO_JAX_VENV), installs the project in it
# (editable) with the extras given as the first argument (default: train) at the versions
# of constraints.txt (again whenever pyproject.toml, constraints.txt or the extras change),
# and activates it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-train}"
VENV="${VOLO_JAX_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: volo-jax needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1)." \
    "Run with PYTHON=python3.11 (or newer)." >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
STAMP="$VENV/.installed-$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha1sum | cut -c1-12)-${EXTRAS//,/-}"
if [ ! -f "$STAMP" ]; then
  echo "Installing volo-jax[$EXTRAS] into $VENV (versions of constraints.txt) ..." >&2
  "$VENV/bin/python" -m pip install --quiet -c "$ROOT/constraints.txt" -e "$ROOT[$EXTRAS]"
  touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$ROOT"
