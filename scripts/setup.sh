#!/usr/bin/env bash
# Create the virtual environment and install edgeia3 with everything it uses, at the
# versions the test suite last passed with (requirements/lock.txt, pip constraints).
# torch==2.13.0 goes first: an unpinned torch would pull a multi-GB CUDA build.
# llama-cpp-python compiles llama.cpp from source the first time (~6 min on
# 2 cores); pip caches the wheel afterwards.
#   EDGEIA3_UNLOCKED=1  install the newest releases pyproject.toml allows instead
#                       (what scripts/drift.sh does; a library user's `pip install`)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
LOCK=requirements/lock.txt
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
CONSTRAINTS=(-c "$LOCK")
if [ "${EDGEIA3_UNLOCKED:-}" = 1 ]; then
  CONSTRAINTS=()
fi
# pip itself is locked too: its resolver decides what a constraint admits
"$VENV/bin/python" -m pip install --quiet --upgrade "${CONSTRAINTS[@]}" pip
"$VENV/bin/python" -m pip install --quiet "${CONSTRAINTS[@]}" "torch==2.13.0"
# setuptools warns about every editable install in the build subprocess; keep the output readable
PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install --quiet "${CONSTRAINTS[@]}" -e ".[test]"
echo "edgeia3 installed in $VENV ($("$VENV/bin/python" -c 'import edgeia3; print(edgeia3.__version__)'))"
