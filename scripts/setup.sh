#!/usr/bin/env bash
# Create the virtual environment and install edgeia3 with everything it uses.
# torch==2.13.0 goes first: an unpinned torch would pull a multi-GB CUDA build.
# llama-cpp-python compiles llama.cpp from source the first time (~6 min on
# 2 cores); pip caches the wheel afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
# setuptools warns about every editable install in the build subprocess; keep the output readable
PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install --quiet -e ".[test]"
echo "edgeia3 installed in $VENV ($("$VENV/bin/python" -c 'import edgeia3; print(edgeia3.__version__)'))"
