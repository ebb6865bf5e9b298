#!/usr/bin/env bash
# One-command set-up (docs/design.md, Installation and dependencies): .venv, torch + torchvision
# (pinned), detectron2, this package with its dev extras. Re-running is a no-op once the stamp
# matches setup.py and this file.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
PIP="$VENV/bin/python -m pip"
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
D2_SDIST="pb1-detectron2==0.6"
STAMP="$VENV/.elixir_d2_installed"
want_stamp=$(cat setup.py scripts/install.sh | sha1sum | cut -d' ' -f1)

# Debian packages the tests drive: a headless browser for the case report
# (tests/test_report_html.py) and the DICOM validator dciodvfy (tests/test_dicom_sr.py).
# "command package" pairs; a missing command makes the install out of date, whatever the stamp says.
SYSTEM_TOOLS=("chromium chromium" "chromedriver chromium-driver" "dciodvfy dicom3tools")
missing_packages() {
  local pair
  for pair in "${SYSTEM_TOOLS[@]}"; do
    set -- $pair
    command -v "$1" >/dev/null || echo "$2"
  done
}
[ -z "$(missing_packages)" ] || rm -f "$STAMP"

# The no-op check only looks the packages up: importing them takes seconds, which every `make`
# target (the timed demo included) would pay again before its own imports.
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
   && "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('torch', 'torchvision', 'detectron2', 'elixir_d2')))" 2>/dev/null; then
  exit 0
fi

packages=$(missing_packages | sort -u | tr '\n' ' ')
if [ -n "$packages" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "[install] error: missing Debian packages $packages; installing them needs root: run" \
         "'sudo apt-get update && sudo apt-get install -y --no-install-recommends $packages'," \
         "then this script again" >&2
    exit 1
  fi
  echo "[install] installing $packages(apt)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages
fi

if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PY" >/dev/null || PY=python3
  echo "[install] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')))" 2>/dev/null; then
  echo "[install] installing $TORCH_PIN"
  $PIP install -q $TORCH_PIN
fi

# detectron2 v0.6 imports pkg_resources (setuptools < 81) and uses PIL.Image.LINEAR (Pillow < 10).
$PIP install -q "setuptools<81" "Pillow<10" wheel

# A Python-only build must still answer detectron2.utils.collect_env (used by default_setup).
if "$VENV/bin/python" -c "import detectron2._C as c; c.get_compiler_version" 2>/dev/null; then
  echo "[install] detectron2 already importable: $("$VENV/bin/python" -c 'import detectron2; print(detectron2.__file__)')"
elif [ -n "${DETECTRON2_SPEC:-}" ]; then
  echo "[install] detectron2 from DETECTRON2_SPEC=$DETECTRON2_SPEC"
  $PIP install -q --no-build-isolation "$DETECTRON2_SPEC"
else
  echo "[install] building detectron2 from the PyPI source release $D2_SDIST (Python only, no C++ ops)"
  work=$(mktemp -d)
  $PIP download -q --no-deps --no-build-isolation --no-binary :all: "$D2_SDIST" -d "$work"
  tar -xzf "$work"/*.tar.gz -C "$work"
  src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n 1)
  # The republication ships no C++ sources; an extension module holding only the two version
  # queries of detectron2.utils.collect_env lets setup.py build and default_setup run.
  mkdir -p "$src/detectron2/layers/csrc"
  cat > "$src/detectron2/layers/csrc/vision.cpp" <<'CPP'
#include <torch/extension.h>
#include <string>
static std::string get_compiler_version() { return std::string("GCC ") + __VERSION__; }
static std::string get_cuda_version() { return "not built (Python-only detectron2)"; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("get_compiler_version", &get_compiler_version);
  m.def("get_cuda_version", &get_cuda_version);
}
CPP
  find "$src/detectron2/layers/csrc" -name '*.cu' -delete
  FORCE_CUDA=0 TORCH_CUDA_ARCH_LIST="" $PIP install -q --no-build-isolation "$src"
  rm -rf "$work"
fi


echo "[install] installing elixir_d2 (editable, with dev extras)"
$PIP install -q --no-build-isolation -e ".[dev]"
"$VENV/bin/python" -c "import elixir_d2" 
echo "$want_stamp" > "$STAMP"
echo "[install] done"
