# make test   - create/reuse .venv, install deps, build pathsgd._C, run the test suite
# make bench  - same set-up, then the benchmark suite (writes benchmarks/results/)
# make test-cuda-emu - the CUDA kernels' tests on the CPU emulation of CUDA (no GPU needed):
#               builds build/cuda-emu/libpathsgd_emu.so with $(CUDA_EMU_DIR)/build.sh (HIP-CPU;
#               needs `apt-get install -y libtbb-dev`), runs the cuda-emu cases of tests/test_kernels.py
#               (its cpu cases run in `make test`) and tests/test_dense_chain_step.py against it, and
#               the optimizer-level oracle tests with PATHSGD_BACKEND=cuda-emu
# The extension is rebuilt when csrc/ or setup.py change (or after `make clean`); the
# package itself is installed editable, so Python changes need no rebuild.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
BENCH_ARGS ?=
BUILD_STAMP := $(VENV)/.build-stamp
CUDA_EMU_DIR ?= ../shared/cuda-emu
CUDA_EMU_LIB := build/cuda-emu/libpathsgd_emu.so
# The optimizer-level tests that also run through the emulated CUDA kernels: SGD parity against
# the brute-force oracles, rescaling invariance and its negative control, clamp, determinism, the step
# plans against the general path, the reference backend against this one.
CUDA_EMU_STEP_TESTS := sgd_parity or rescaling or clamp_matches_oracle or kappa_recomputed or \
	deterministic_training or linear_in_dag or dense_head_step or kappa_every or one_op_call or \
	trunk_plan or reference_backend_env_var

.PHONY: test bench build venv env clean cuda-emu test-cuda-emu

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

$(CUDA_EMU_LIB): $(BUILD_STAMP) $(shell find csrc -type f)
	@test -x $(CUDA_EMU_DIR)/build.sh || { echo "make cuda-emu: no CUDA emulation at CUDA_EMU_DIR=$(CUDA_EMU_DIR) (set CUDA_EMU_DIR to the folder holding its build.sh)" >&2; exit 1; }
	PYTHON=$(PY) $(CUDA_EMU_DIR)/build.sh .

cuda-emu: $(CUDA_EMU_LIB)

test-cuda-emu: build $(CUDA_EMU_LIB)
	PATHSGD_CUDA_EMU=$(abspath $(CUDA_EMU_LIB)) $(PY) -m pytest -q tests/test_kernels.py tests/test_dense_chain_step.py tests/test_trunk_chain_step.py \
		-k "cuda or test_dense_chain_step.py or test_trunk_chain_step.py"
	PATHSGD_CUDA_EMU=$(abspath $(CUDA_EMU_LIB)) PATHSGD_BACKEND=cuda-emu $(PY) -m pytest -q \
		tests/test_cuda_emu_backend.py tests/test_optimizer.py tests/test_general_graphs.py tests/test_kappa_schedule.py \
		tests/test_step_plan.py -k "$(CUDA_EMU_STEP_TESTS)"

bench: build
	$(PY) -m benchmarks.run $(BENCH_ARGS)

env: build

clean:
	rm -rf build *.egg-info pathsgd/_C*.so pathsgd/_build_info.py $(BUILD_STAMP)
