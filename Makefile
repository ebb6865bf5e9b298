# Every target works on a fresh machine: `install` creates .venv and installs torch, detectron2
# (docs/design.md, Installation and dependencies) and this package; re-running it is a quick no-op.
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1
export OMP_NUM_THREADS ?= 2

.PHONY: install lint test test-cpu-paths demo bench env clean-demo gpu-bundle gpu-check

install:
	@bash scripts/install.sh

env: install
	@$(PY) -c "import elixir_d2; elixir_d2.print_env()"

# ruff's formatter (black's style, as detectron2 formats its code) and ruff's lint rules (ruff.toml).
lint: install
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test: install
	$(PY) -m pytest -q tests

# The suite again on the kernel paths of CPUs below this one (AVX2, SSE4): scripts/test_cpu_paths.sh
test-cpu-paths: install
	@bash scripts/test_cpu_paths.sh

demo: install
	$(PY) projects/quickstart/demo.py --output output/demo

bench: install
	$(PY) projects/benchmarks/run_all.py

# The GPU check (docs/gpu_check.md): gpu-bundle here (PyPI access) fills .gpu_bundle/; gpu-check
# on the GPU machine, which has no network, so it does not depend on `install`.
# GPU_CHECK_ARGS: e.g. --cpu-dry-run, --out DIR, --only speed.
gpu-bundle: install
	@bash scripts/gpu_bundle.sh

gpu-check:
	@bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

clean-demo:
	rm -rf output/demo datasets/synthetic
