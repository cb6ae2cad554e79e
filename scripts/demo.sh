#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the end-to-end demo on the embedded
# SmolLM2-135M-Instruct, offline. Outputs go to ${OUT:-demo-out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV="${VENV:-.venv}"
exec "$VENV/bin/python" examples/demo.py --out "${OUT:-demo-out}" "$@"
