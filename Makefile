# `make run` sets up what is missing, then runs the pipeline; `make test` sets up, then runs the tests.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch. On a CUDA machine: make run TORCH="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
APT_PACKAGES := abcmidi dataset-fashion-mnist
PIP := $(BIN)/python -m pip install -q
QUIET := 2>&1 | sed '/^WARNING: Location/d'  # this machine's pip config names local mirrors that may be absent
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test bench setup system-packages ui screenshots wiring clean-outputs

run: setup
	dvc repro
	PYTHONPATH=src $(BIN)/python -m deepzoo.summary --readme  # the results table = reports/summary.md
	@echo
	@echo "Done. Metrics: .venv/bin/dvc metrics show   Runs: make ui  (then open http://127.0.0.1:5000)"

# Two workers (pytest-xdist): they share the smoke pipeline's one `dvc repro` (tests/conftest.py).
test: setup
	pytest -q -n 2

bench: setup
	dvc repro prepare_images prepare_tunes
	$(BIN)/python benchmarks/run.py

# After adding a family to src/deepzoo/registry.py (or changing what a module imports): dvc.yaml's vars.
wiring: setup
	PYTHONPATH=src $(BIN)/python -m deepzoo.wiring

ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1

# The README's MLflow UI pictures, from this mlflow.db: Debian's Chromium, driven by Playwright (no browser download).
screenshots: setup
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	$(PIP) playwright $(QUIET)
	$(BIN)/python docs/screenshots.py

setup: system-packages $(VENV)/.installed

# Debian packages: abc2midi for the tune checks and Fashion-MNIST's IDX files. Elsewhere (no apt, or
# not root) prepare_images downloads Fashion-MNIST itself and the tune checks report abc2midi missing.
system-packages:
	@missing=""; command -v abc2midi >/dev/null || missing="abcmidi"; \
	[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing="$$missing dataset-fashion-mnist"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: could not install$$missing (needs apt-get as root); see README"; fi; \
	fi

$(VENV)/.installed: pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip $(QUIET)
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)" $(QUIET)
	$(PIP) -e ".[test]" $(QUIET)
	touch $@
