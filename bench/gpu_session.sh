#!/usr/bin/env bash
# One prepared GPU session for the `device` tool's machine (H200: torch 2.11 cu130, Triton 3.6,
# nvcc 13, compute-sanitizer, pybind11/cmake/pytest-xdist present, no internet), sized to the
# 15 minutes of device time a task gets (machine start included; one command <= 10 minutes).
#
#   bash bench/gpu_session.sh          # the session: one command, <= 560 s of step time limits
#   bash bench/gpu_session.sh rerun    # on the still-warm machine: bench + decisions only
#
# Steps of the full command, each under its own time limit (seconds; estimate -> limit):
#   1. build lora_kernels._C for the local GPU only (sm_90: 9 CUDA/C++ units on 16 cores)
#      ............................................................  ~60 -> 120
#   2. the test suite on the GPU for every backend (python -m lora_kernels.check --gpu, 8
#      workers; the CPU-only [emu] / gloo / interpreter tests left out). ~150 distinct Triton
#      specialisations compile at ~1-2 s each over 8 workers (~40 s), the tests' own work is
#      small shapes (< 1 s of GPU time in all); pytest interrupted at 185 s ....  ~120 -> 200
#   3. compute-sanitizer memcheck over bench/memcheck_cases.py (2 LoRA shapes x 2 backends +
#      the TMA candidate, multi-LoRA decode / prefill / fused at 2 token counts: ~25 launches,
#      ~12 Triton compiles; memcheck slows kernels ~10-100x, all are tiny) ......  ~35 -> 70
#   4. the benchmark headline points (python -m lora_kernels.bench --quick): training fwd+bwd
#      T=8192 4096x4096 r16 (base pair 1.1 TFLOP ~1.4 ms per step; ~34 autotune compiles of
#      the Triton GEMMs + 3 TMA candidate + ~20 s torch.compile baseline; 8 rows timed),
#      decode 64 tokens x 64 adapters (graph replay, us per step), prefill 4x1024 (~0.2 ms per
#      step, default vs prefill_fused vs CUDA) ........................................  ~130 -> 170
#   5. decisions (python -m lora_kernels.bench.decide): winner per headline point ......  ~2
# Count: ~350 s expected, 560 s at the limits; with ~90 s machine start and transfers the first
# call costs ~7.5 (at most ~10.5) of the 15 device minutes, leaving a warm-machine rerun
# (build kept: ~170 s) inside the budget. Give the run tool timeout_s=600.
#
# Results: bench/results/gpu-session/ (check-<gpu>.json, <gpu>-quick.json + .png,
# decisions.json, memcheck.log, session.log: 6 files, what the device tool can bring back) and
# copied to $OUT when set. Last lines printed: the suite summary, then the decisions table.
# After the run, on this machine: python -m lora_kernels.check --apply <results folder>
# (VERIFIED_ON_GPU and the measured defaults), then commit the results.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
case "$MODE" in full|rerun) ;; *) echo "usage: bash bench/gpu_session.sh [full|rerun]" >&2; exit 2;; esac
RES=${LORA_KERNELS_GPU_RESULTS:-bench/results/gpu-session}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1
PY=${PY:-python3}
if ! cap=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}')" \
      2>/dev/null); then
  echo "gpu_session.sh: no usable CUDA device here; on CPU run 'make test'" >&2
  exit 2
fi
mkdir -p "$RES"
exec > >(tee -a "$RES/session.log") 2>&1
echo "== gpu_session.sh $MODE $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader \
  2>/dev/null || true
step() { echo; echo "== [$(date -u +%T)] $*"; }
copy_out() {
  if [ -n "${OUT:-}" ]; then
    cp "$RES"/*.json "$RES"/*.png "$RES"/*.log "$OUT"/ 2>/dev/null || true
  fi
}
trap copy_out EXIT

t0=$(date +%s)
if [ "$MODE" = full ] || ! "$PY" -c "import lora_kernels._C" 2>/dev/null; then
  step "1. build _C for sm_$cap"
  LORA_KERNELS_CUDA_ARCHS=$cap CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout 120 \
    "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 5
  echo "build: $(( $(date +%s) - t0 )) s; cuda_available=$("$PY" -c \
    'import lora_kernels; print(lora_kernels.cuda_available())')"
fi

if [ "$MODE" = full ]; then
  step "2. test suite on the GPU"
  timeout 200 "$PY" -m lora_kernels.check --gpu --workers 8 --deadline 185 --out "$RES" -- --maxfail=60 \
    -p no:cacheprovider --timeout 150 -k "not emu" --ignore=tests/distributed
  echo "suite rc=$?"

  step "3. compute-sanitizer memcheck"
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  timeout 70 "$SAN" --tool memcheck --error-exitcode 9 --print-limit 20 \
    "$PY" bench/memcheck_cases.py > "$RES/memcheck.log" 2>&1
  echo "memcheck rc=$? (0 clean, 9 memcheck errors, 124 time limit)"; tail -n 4 "$RES/memcheck.log"
fi

step "4. benchmark headline points"
timeout 170 "$PY" -m lora_kernels.bench --quick --no-progress --out "$RES"
echo "bench rc=$?"

step "5. decisions"
BENCH_JSON=$(ls -t "$RES"/*-quick.json 2>/dev/null | head -n 1)
if [ -n "$BENCH_JSON" ]; then
  "$PY" -m lora_kernels.bench.decide "$BENCH_JSON" --out "$RES/decisions.json"
else
  echo "no benchmark result file: nothing to decide"
fi
step "summary"
"$PY" -m lora_kernels.check --summary "$RES" 2>&1 | tail -n 3
[ -f "$RES/decisions.json" ] && "$PY" -c "import json, sys; from lora_kernels.bench.decide import \
table; print(table(json.load(open(sys.argv[1]))))" "$RES/decisions.json"
echo "== done in $(( $(date +%s) - t0 )) s; results in $RES"
