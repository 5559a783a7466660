# lora_kernels — developer entry points. Everything runs on CPU unless a GPU is present.
PY ?= python
export TRITON_INTERPRET ?= 1

.PHONY: install demo demo-reference test test-gpu bench bench-quick lint check-gpu

# Build requirements first, then an editable install without build isolation: the CMake build
# directory (build/cmake-<config hash>) is then shared with later builds (`pip wheel .` in the
# tests only relinks instead of recompiling every kernel: ~60 s saved on 2 cores).
install:
	$(PY) -m pip install -q "setuptools>=64" wheel "pybind11>=2.11" "cmake>=3.24"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,peft,plot,progress,quant]"

# The main job: fine-tune, merge and serve adapters on a tiny model (CPU by default).
# Outputs go to runs/ (untracked); `make demo-reference` refreshes the committed bench/results/.
demo: install
	TRITON_INTERPRET=0 $(PY) -m lora_kernels.demo

demo-reference: install
	TRITON_INTERPRET=0 $(PY) -m lora_kernels.demo --out bench/results

# CPU suite; Triton kernels run through the interpreter (TRITON_INTERPRET=1).
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 --benchmark-disable --durations=15 tests

# On a GPU machine: the whole suite on CUDA for every backend, results under bench/results/.
check-gpu:
	TRITON_INTERPRET=0 $(PY) -m lora_kernels.check --gpu

# Full sweep: the reference results under bench/results/. Quick sweep: runs/ (untracked).
bench:
	TRITON_INTERPRET=0 $(PY) -m lora_kernels.bench

bench-quick:
	TRITON_INTERPRET=0 $(PY) -m lora_kernels.bench --quick

lint:
	$(PY) -m ruff check lora_kernels tests bench
