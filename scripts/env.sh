#!/usr/bin/env bash
# Sourced by the other scripts: makes .venv (once per requirements change) and activates it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUIREMENTS="${1:-requirements.txt}"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
STAMP="$VENV/.installed-$(cat "$ROOT/$REQUIREMENTS" "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)-$(basename "$REQUIREMENTS")"
if [ ! -f "$STAMP" ]; then
  echo "Installing $REQUIREMENTS into $VENV ..." >&2
  "$VENV/bin/python" -m pip install --quiet -r "$ROOT/$REQUIREMENTS"
  "$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT"
  touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$ROOT"
