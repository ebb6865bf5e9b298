#!/usr/bin/env bash
# The GPU check (issue 35; docs/gpu_check.md): tests on CUDA, float16 AMP training of the
# quickstart and R-50 configs, ms/image of FPN and ElixirNet at 512x512, peak GPU memory, in at
# most 460 s. Refuses without CUDA (exit code 3) unless --cpu-dry-run. `scripts/gpu_check.sh -h`.
# Python: $PYTHON, else this checkout's .venv, else the lent GPU machine's /opt/torch/.venv,
# else python3; packages it lacks come from .gpu_bundle/ (scripts/gpu_bundle.sh), offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in .venv/bin/python /opt/torch/.venv/bin/python3 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
[ -n "$PY" ] || { echo "[gpu_check] error: no Python found (set PYTHON)" >&2; exit 2; }
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
exec "$PY" scripts/gpu_check.py "$@"
