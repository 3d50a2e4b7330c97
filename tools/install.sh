#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv from the pinned requirements.lock and install
# this repo into it in editable mode. Idempotent: a venv built from the same lock is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CONCEPT_VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x "$VENV/bin/python" ] || ! cmp -s requirements.lock "$VENV/.requirements.lock"; then
  echo "[install] building $VENV from requirements.lock (torch wheels are large: a few minutes)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r requirements.lock
  cp requirements.lock "$VENV/.requirements.lock"
fi
# setuptools is chatty about deprecations while building the editable install: keep its log
if ! "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . > "$VENV/.editable-install.log" 2>&1; then
  cat "$VENV/.editable-install.log"
  exit 1
fi
echo "[install] ready: $VENV"
