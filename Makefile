# Two commands are the contract:  `make run` (the default pipeline) and `make test` (the suite).
# Both set everything up first on a fresh machine: venv, pinned torch, the package, the dataset.
PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
PIPELINE ?= pipelines/distill.yaml
TORCH    := torch==2.13.0
FMNIST   := /usr/share/datasets/fashion-mnist

.PHONY: setup data run test lint clean gpu-wheels gpu-check

setup: $(VENV)/.installed data

# torch first and pinned: a range that admits a newer release would pull several GB of CUDA.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist where we can; otherwise compress downloads
# the four IDX files to ~/.cache/compress on first use (MD5-checked).
data:
	@if [ -d $(FMNIST) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "warning: could not install dataset-fashion-mnist; compress will download Fashion-MNIST"; \
	else echo "note: $(FMNIST) not found; compress will download Fashion-MNIST to ~/.cache/compress"; fi

run: setup
	$(BIN)/compress run $(PIPELINE)

# pytest exits 5 when it collects no tests: treat that as a failure to find the suite, with a message.
# Lint first: a name that does not exist fails in a second, not after the suite.
test: setup lint
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): is tests/ there?"; exit 1; fi; exit $$rc

lint: $(VENV)/.installed
	$(BIN)/ruff check compress tests teachers students benchmarks scripts

clean:
	rm -rf runs .pytest_cache

# The GPU day (scripts/gpu_check.py). On a networked machine: the wheels an air-gapped GPU image
# lacks, for its Python (GPU_PYTHON), into .gpu-wheels/ (ignored, kept under 56 MiB). On the GPU
# machine, with .gpu-wheels/ brought along: set up offline over the machine's own PyTorch, run every
# test that skips without a GPU and a short GPU pipeline, write .gpu-check/gpu-check.json; exit 1 if
# a check failed, 3 on a machine with no CUDA GPU.
GPU_PYTHON ?= 3.12
GPU_WHEELS ?= .gpu-wheels
gpu-wheels: $(VENV)/.installed
	$(BIN)/python scripts/gpu_check.py prepare --wheels $(GPU_WHEELS) --python $(GPU_PYTHON)

# The summary goes to GPU_CHECK_OUT (commit it as benchmarks/results/gpu-check-<GPU>.json). make turns
# every failing exit code into its own 2: `python3 scripts/gpu_check.py run` gives 1 or 3 directly.
GPU_CHECK_OUT ?= .gpu-check/gpu-check.json
gpu-check:
	@$(PYTHON) scripts/gpu_check.py run --wheels $(GPU_WHEELS) --out $(GPU_CHECK_OUT)
