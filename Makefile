# make test   - create/reuse .venv, install deps, build pathsgd._C, run the test suite
# make bench  - same set-up, then the benchmark suite (writes benchmarks/results/)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
BENCH_ARGS ?=

.PHONY: test bench build venv env clean

$(VENV)/.deps-stamp: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.deps-stamp

build: venv
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m pathsgd.env

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m benchmarks.run $(BENCH_ARGS)

env: build

clean:
	rm -rf build *.egg-info pathsgd/_C*.so pathsgd/_build_info.py
