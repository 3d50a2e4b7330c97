#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv from the lock of its Python version
# (requirements-py3.X.lock: 3.11, 3.12 or 3.13; with CONCEPT_LEAN=1 the runtime lock,
# requirements-runtime-py3.X.lock) and install this repo into it in editable mode.
#
# Interpreter: $PYTHON, a command, a path or a bare version ("3.13"); unset, Python 3.12 (what
# users run and what CI runs the whole suite on), else 3.13, else 3.11, whichever is found first.
# A version is looked for on PATH, then among pyenv's versions (pyenv's shims answer only for the
# selected versions, so every candidate is run, not just looked up), then uv's.
# Venv: $CONCEPT_VENV, else .venv. Idempotent: a venv built by the same interpreter from the same
# lock is reused; a change of either rebuilds it.
#
#   tools/install.sh                  # install (or reuse) the venv
#   tools/install.sh --print-python   # print the interpreter it would use, or fail saying why
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CONCEPT_VENV:-.venv}"
PREFERRED="3.12 3.13 3.11"      # without $PYTHON, the first of these found is used

die() { echo "[install] $*" >&2; exit 1; }

version_of() {   # X.Y of interpreter $1, or nothing when it does not run
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

find_version() {   # prints an interpreter of version $1 (X.Y), or nothing
  local v=$1 cand root
  local -a cands=("python$v")
  if command -v pyenv >/dev/null 2>&1; then
    cand=$(pyenv prefix "$v" 2>/dev/null | head -n1 || true)
    [ -n "$cand" ] && cands+=("$cand/bin/python$v")
    root=$(pyenv root 2>/dev/null || true)
  fi
  root=${root:-${PYENV_ROOT:-$HOME/.pyenv}}
  # newest patch release first (3.12.10 before 3.12.9)
  while IFS= read -r cand; do cands+=("$cand/bin/python$v"); done \
    < <(ls -d "$root/versions/$v".* 2>/dev/null | sort -rV)
  if command -v uv >/dev/null 2>&1; then
    cand=$(uv python find "$v" 2>/dev/null || true)
    [ -n "$cand" ] && cands+=("$cand")
  fi
  for cand in "${cands[@]}"; do
    # the interpreter itself, not a pyenv shim
    if [ "$(version_of "$cand")" = "$v" ]; then "$cand" -c 'import sys; print(sys.executable)'; return; fi
  done
}

# CONCEPT_LEAN=1 (make install LEAN=1): the runtime lock (what `pip install '.[eval]'` needs: no test tools,
# lamindb or wandb), else the full lock the suite runs in
lock_for() {
  if [ -n "${CONCEPT_LEAN:-}" ] && [ "${CONCEPT_LEAN}" != 0 ]; then echo "requirements-runtime-py$1.lock"
  else echo "requirements-py$1.lock"; fi
}

pick_python() {
  local v
  if [ -n "${PYTHON:-}" ]; then
    if [[ "$PYTHON" =~ ^(python)?(3\.[0-9]+)$ ]]; then     # 3.12 or python3.12: looked for
      v=${BASH_REMATCH[2]}
      [ -f "$(lock_for "$v")" ] || die "Python $v is not supported (PYTHON=$PYTHON): use 3.11, 3.12 or 3.13"
      PY=$(find_version "$v")
      [ -n "$PY" ] || die "no Python $v found (PYTHON=$PYTHON; looked on PATH, in pyenv's versions and uv's): install it (e.g. 'pyenv install $v') or set PYTHON to its path"
    else
      PY=$PYTHON
      [ -n "$(version_of "$PY")" ] || die "PYTHON=$PYTHON does not run: set it to a Python 3.11, 3.12 or 3.13 interpreter (a command, a path or a version like 3.12)"
      v=$(version_of "$PY")
      [ -f "$(lock_for "$v")" ] || die "PYTHON=$PYTHON is Python $v, which is not supported: use 3.11, 3.12 or 3.13"
      PY=$("$PY" -c 'import sys; print(sys.executable)')
    fi
  else
    for v in $PREFERRED; do
      PY=$(find_version "$v")
      [ -n "$PY" ] && break
    done
    [ -n "$PY" ] || die "no Python 3.12, 3.13 or 3.11 found (looked on PATH, in pyenv's versions and uv's): install one (e.g. 'pyenv install 3.12') or set PYTHON to an interpreter's path"
  fi
}

PY=""
pick_python
if [ "${1:-}" = "--print-python" ]; then echo "$PY"; exit 0; fi

PYV=$(version_of "$PY")
LOCK=$(lock_for "$PYV")
# one build of a venv at a time: a second `make` (another terminal, a parallel job) waits, then reuses it
exec 9>"$VENV.lock"
flock 9
# what the venv was built from: interpreter (version and real path) and the lock's content
STAMP=$("$PY" -c 'import os, platform, sys; print("python", platform.python_version(), os.path.realpath(sys.executable))'; cat "$LOCK")
STAMP_FILE="$VENV/.concept-install"
# a venv built by the previous install.sh (3.11, one requirements.lock) is reused when it matches
if [ ! -f "$STAMP_FILE" ] && [ -f "$VENV/.requirements.lock" ] \
   && cmp -s <(grep -v '^#' "$LOCK") "$VENV/.requirements.lock" \
   && [ "$(version_of "$VENV/bin/python")" = "$PYV" ]; then
  printf '%s\n' "$STAMP" > "$STAMP_FILE"
fi
if [ ! -f "$STAMP_FILE" ] || [ "$(cat "$STAMP_FILE")" != "$STAMP" ] || [ -z "$(version_of "$VENV/bin/python")" ]; then
  if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then
    die "$VENV exists and is not a virtualenv: refusing to delete it (set CONCEPT_VENV to another directory)"
  fi
  if [ -f "$STAMP_FILE" ]; then
    echo "[install] rebuilding $VENV: it was built by $(head -n1 "$STAMP_FILE" | cut -d' ' -f2) or from another lock"
  fi
  # torch with its CUDA libraries makes a venv of ~8 GB: say so before pip fills the disk halfway
  NEED_GB="${CONCEPT_INSTALL_MIN_FREE_GB:-9}"
  FREE_KB=$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 { print $4 }')
  OLD_KB=$(du -sk "$VENV" 2>/dev/null | awk 'END { print $1 + 0 }' || true)   # the venv replaced
  FREE_GB=$(( (FREE_KB + OLD_KB) / 1048576 ))
  if [ "$FREE_GB" -lt "$NEED_GB" ]; then
    die "building $VENV needs about $NEED_GB GB free (torch and its CUDA libraries); $(cd "$(dirname "$VENV")" && pwd) has $FREE_GB GB: free some space, or set CONCEPT_VENV to a directory on a larger disk"
  fi
  echo "[install] building $VENV with Python $PYV ($PY) from $LOCK (torch wheels are large: a few minutes)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r "$LOCK"
  printf '%s\n' "$STAMP" > "$STAMP_FILE"
fi
# setuptools is chatty about deprecations while building the editable install: keep its log
if ! "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . > "$VENV/.editable-install.log" 2>&1; then
  cat "$VENV/.editable-install.log"
  exit 1
fi
echo "[install] ready: $VENV (Python $PYV)"
