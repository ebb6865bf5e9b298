#!/usr/bin/env bash
# Fill .gpu_bundle/ (ignored by git) with the wheels the GPU check needs and the lent GPU machine
# lacks: run here, with PyPI access, before carrying .gpu_bundle to that machine (docs/gpu_check.md).
# `scripts/gpu_bundle.sh -h` for the options.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
command -v "$PY" >/dev/null 2>&1 || { echo "[gpu_bundle] error: $PY not found: run 'make install' first, or set PYTHON" >&2; exit 2; }
exec "$PY" scripts/gpu_bundle.py "$@"
