#!/usr/bin/env bash
# One prepared GPU session (the `device` tool's machine: torch 2.11 cu130, Triton 3.6, nvcc 13,
# pybind11/cmake/pytest-xdist present, no internet), bounded to fit a 15-minute device budget:
#   1. build lora_kernels._C for the local GPU only (no build isolation: nothing to download);
#   2. the whole test suite on the GPU for every backend (python -m lora_kernels.check --gpu);
#   3. the benchmark headline points (python -m lora_kernels.bench --quick on the GPU).
# Results land in bench/results/ and, when $OUT is set (the device tool), are copied there.
# Usage (from the repo root):  bash bench/gpu_session.sh [suite_timeout_s] [bench_timeout_s]
set -uo pipefail
cd "$(dirname "$0")/.."
SUITE_S=${1:-330}
BENCH_S=${2:-150}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

if ! cap=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')" \
      2>/dev/null); then
  echo "gpu_session.sh: no usable CUDA device here; on CPU run 'make test'" >&2
  exit 2
fi
t0=$(date +%s)
LORA_KERNELS_CUDA_ARCHS=$cap CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 5
echo "build: $(( $(date +%s) - t0 )) s, sm_$cap; cuda_available=$("$PY" -c \
  'import lora_kernels; print(lora_kernels.cuda_available())')"

# CPU-only parts already run in CI are left out: the CUDA-emulation variants ([emu]) and the
# gloo process-group tests.
timeout "$SUITE_S" "$PY" -m lora_kernels.check --gpu --workers 8 -- --maxfail=40 \
  -p no:cacheprovider --timeout 240 -k "not emu" --ignore=tests/test_distributed.py
echo "suite rc=$?"

timeout "$BENCH_S" "$PY" -m lora_kernels.bench --quick --no-progress
echo "bench rc=$?"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results" && cp -r bench/results/. "$OUT/results/"
fi
