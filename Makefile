# dynalign: `make help` lists every target.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Pinned, CPU-friendly stack. torch is named first and alone: a bare `torch` pulls a
# multi-GB CUDA build on machines without a local CPU wheel.
TORCH := torch==2.13.0
PINS := $(TORCH) transformers==5.19.0 datasets==5.2.0 hydra-core==1.3.8 omegaconf==2.3.1 \
        wandb==0.31.0 accelerate==1.15.0 deepspeed==0.19.8 peft==0.21.2 \
        datasketch==2.0.0 openai==3.57.0 pytest==9.2.0 ruff==0.17.6 mypy==2.4.1
export DS_ACCELERATOR ?= cpu
export WANDB_SILENT ?= true

.DEFAULT_GOAL := help
.PHONY: help install lint typecheck test test-all clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: $(VENV)/.installed ## Create .venv with the pinned stack and dynalign (idempotent)

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install $(PINS) -e '.[dev]'
	@touch $@

lint: install ## Lint with ruff
	$(VENV)/bin/ruff check .

typecheck: install ## Type-check the pure modules with mypy
	$(VENV)/bin/mypy

# pytest exits 5 when it collects nothing: report it rather than fail or pass silently.
PYTEST = $(PY) -m pytest -q $(1) || { rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" || exit $$rc; }

test: install ## Fast CPU test suite (skips `slow` and `gpu` tests)
	$(call PYTEST,-m "not slow and not gpu")

test-all: install lint ## Everything that runs on CPU: lint, fast and slow tests (what CI runs)
	$(call PYTEST,-m "not gpu")

clean: ## Remove caches and build outputs (keeps .venv, outputs/ and data/)
	rm -rf .pytest_cache .ruff_cache .mypy_cache build *.egg-info
