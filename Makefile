# make test   - create/reuse .venv, install deps, build pathsgd._C, run the test suite
# make bench  - same set-up, then the benchmark suite (writes benchmarks/results/)
# The extension is rebuilt when csrc/ or setup.py change (or after `make clean`); the
# package itself is installed editable, so Python changes need no rebuild.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
BENCH_ARGS ?=
BUILD_STAMP := $(VENV)/.build-stamp

.PHONY: test bench build venv env clean

$(VENV)/.deps-stamp: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.deps-stamp

$(BUILD_STAMP): $(VENV)/.deps-stamp setup.py $(shell find csrc -type f)
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)
	$(PY) -m pathsgd.env

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m benchmarks.run $(BENCH_ARGS)

env: build

clean:
	rm -rf build *.egg-info pathsgd/_C*.so pathsgd/_build_info.py $(BUILD_STAMP)
