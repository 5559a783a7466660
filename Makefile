# lora_kernels — developer entry points. Everything runs on CPU unless a GPU is present.
PY ?= python
export TRITON_INTERPRET ?= 1

.PHONY: install demo demo-reference test test-gpu bench bench-quick lint check-gpu gpu-plan \
	test-gpu-image

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

# The GPU session (bench/gpu_session.sh) counted on CPU: per-step estimate and limit.
gpu-plan:
	bash bench/gpu_session.sh --plan

# The CPU suite under the GPU image's versions (torch 2.11 cu130 wheel, Triton 3.6,
# transformers 5.17, numpy < 2.4 for Triton 3.6's interpreter; no bitsandbytes), from a copy of
# the tracked files in a throw-away venv, network cut (unshare -n; loopback up for the gloo
# tests) as on the GPU machine. Not in
# CI (~4 GB of wheels, the suite once more). Outputs under build/gpu-image/ (ignored).
GPU_IMAGE := build/gpu-image
GPU_IMAGE_PINS := torch==2.11.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4" peft==0.21.2 \
	safetensors pytest pytest-xdist pytest-timeout pytest-benchmark hypothesis pybind11 \
	"cmake>=3.24" "setuptools>=64" wheel matplotlib
test-gpu-image:
	rm -rf $(GPU_IMAGE)/src && mkdir -p $(GPU_IMAGE)/src
	git ls-files -z | xargs -0 cp --parents -t $(GPU_IMAGE)/src
	test -x $(GPU_IMAGE)/venv/bin/python || python3 -m venv $(GPU_IMAGE)/venv
	$(GPU_IMAGE)/venv/bin/python -m pip install -q $(GPU_IMAGE_PINS)
	cd $(GPU_IMAGE)/src && ../venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	cd $(GPU_IMAGE)/src && ../venv/bin/python -c "import torch, triton, transformers; \
	print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', \
	transformers.__version__)"
	cd $(GPU_IMAGE)/src && unshare -n sh -c 'ip link set lo up && TRITON_INTERPRET=1 \
	HF_HUB_OFFLINE=1 ../venv/bin/python -m pytest -q -n 2 --benchmark-disable \
	-p no:cacheprovider tests' 

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
