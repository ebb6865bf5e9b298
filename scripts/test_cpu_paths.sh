#!/usr/bin/env bash
# Runs the test suite again on each x86-64 kernel path below this CPU's own, so that a test that
# holds only on one CPU's rounding fails here rather than on a user's machine (docs/reliability.md,
# "Other CPUs"). torch, oneDNN and MKL each pick their kernels at run time from the CPU's
# instruction sets; their environment variables cap that choice, which reproduces what a CPU
# without the capped sets computes (an AVX512 machine capped to AVX2 gives an AVX2-only EPYC's
# losses to the last digit).
#
#   scripts/test_cpu_paths.sh [pytest args...]     default: -q tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-q tests)

# Lower paths first-to-last; the native one is what `make test` already ran.
paths=(AVX512 AVX2 DEFAULT)
declare -A aten=([AVX2]=avx2 [DEFAULT]=default)
declare -A onednn=([AVX2]=AVX2 [DEFAULT]=SSE41)
declare -A mkl=([AVX2]=AVX2 [DEFAULT]=SSE4_2)

native=$("$PY" -c "import torch; print(torch.backends.cpu.get_cpu_capability())" 2>/dev/null)
below=0
ran=0
for p in "${paths[@]}"; do
  if [ "$p" = "$native" ]; then below=1; continue; fi
  [ "$below" = 1 ] || continue
  export ATEN_CPU_CAPABILITY=${aten[$p]} ONEDNN_MAX_CPU_ISA=${onednn[$p]} MKL_ENABLE_INSTRUCTIONS=${mkl[$p]}
  got=$("$PY" -c "import torch; print(torch.backends.cpu.get_cpu_capability())" 2>/dev/null)
  if [ "$got" != "$p" ]; then
    echo "test_cpu_paths: error: asked torch for the $p path, it runs $got" >&2
    exit 1
  fi
  # One thread: a second reduction order beside make test's two threads.
  echo "[test_cpu_paths] $p kernels (this CPU: $native), OMP_NUM_THREADS=1"
  OMP_NUM_THREADS=1 "$PY" -m pytest "${args[@]}"
  ran=$((ran + 1))
done
if [ "$below" = 0 ]; then
  echo "test_cpu_paths: error: unknown CPU capability '$native' (expected one of ${paths[*]})" >&2
  exit 1
fi
echo "[test_cpu_paths] $ran kernel path(s) below $native tested"
