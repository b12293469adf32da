# Two commands are the contract:  `make run` (the default pipeline) and `make test` (the suite).
# Both set everything up first on a fresh machine: venv, pinned torch, the package, the dataset.
PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
PIPELINE ?= pipelines/distill.yaml
TORCH    := torch==2.13.0
FMNIST   := /usr/share/datasets/fashion-mnist

.PHONY: setup data run test lint clean

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
test: setup
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): is tests/ there?"; exit 1; fi; exit $$rc

clean:
	rm -rf runs .pytest_cache
