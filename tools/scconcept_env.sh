#!/usr/bin/env bash
# A side environment with scConcept's own package (sc-concept, which pins its own torch), for
# tools/make_scconcept_models.py and tools/check_scconcept_export.py: .venv-scconcept, Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SCCONCEPT_VENV:-.venv-scconcept}"
PY=$(PYTHON=3.12 bash tools/install.sh --print-python)
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import concept' 2>/dev/null; then
  echo "[scconcept-env] building $VENV with sc-concept==0.2.5 (a CUDA build of torch: ~7 GB, a few minutes)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q sc-concept==0.2.5
fi
echo "[scconcept-env] ready: $VENV"
