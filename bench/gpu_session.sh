#!/usr/bin/env bash
# The GPU session: one prepared command for the `device` tool's machine (H200, torch 2.11 cu130,
# Triton 3.6, nvcc 13, compute-sanitizer, pytest-xdist / pytest-timeout, 16 cores, no network),
# sized to the 15 minutes of device time a task gets (machine start included; one command <= 10
# minutes: give the run tool timeout_s=600).
#
#   bash bench/gpu_session.sh --plan   # on CPU, no GPU: the counted plan of the steps below
#   bash bench/gpu_session.sh          # the session
#   bash bench/gpu_session.sh rerun    # the warm machine again: continues where a cut one stopped
#
# Steps, correctness before speed, each under its own limit (LIMIT_*; the plan checks them):
#   1. build lora_kernels._C for the local GPU's arch only
#   2. correctness: every (backend, op) pair's tests on small shapes, tiles fixed
#      (LORA_KERNELS_AUTOTUNE=0), 13 pytest-xdist workers; beside them, on their own cores,
#      the warm-up compiles of steps 3 and 4 (memcheck_cases.py without the sanitizer, and the
#      headline launches' autotune candidates through Triton's JIT with warmup=True)
#   3. compute-sanitizer memcheck of the headline ops (bench/memcheck_cases.py), tiles fixed,
#      PYTORCH_NO_CUDA_MEMORY_CACHING=1 (the caching allocator would hide out-of-bounds accesses)
#   4. the three headline decisions only (python -m lora_kernels.bench --headline: train,
#      decode, prefill; autotuning on), then lora_kernels.bench.decide
#   5. the broader suite with the time left (tiles fixed)
# Pytest and the benchmark get SIGINT at their deadline, MARGIN (45) s before their limit, and
# SIGKILL at the limit; every test result is appended and flushed as it finishes
# (lora_kernels.bench.pytest_plugin), every benchmark row as it is measured, so a step cut at any
# moment keeps what it finished; a hung test is cut after TEST_TIMEOUT s (pytest-timeout, thread
# method: the worker exits, xdist reports the test failed and starts another worker).
#
# Results: at most 8 files, in $OUT/gpu-session/ when OUT is set (the device tool brings them
# back even after a kill), else bench/results/gpu-session/: session.log, steps.jsonl (each step's
# start / end / rc), tests.jsonl (each step's planned test ids, then one line per result),
# memcheck.log, <gpu>-headline.json (+ .png), decisions.json, summary.txt. A copy for `rerun`
# stays in build/gpu-session/ (ignored by git, kept on the warm machine between calls).
# After the run, on this machine: python -m lora_kernels.check --apply <results folder>
# (writes lora_kernels/verified_gpu.json: a (backend, op) pair is verified exactly when all of
# its planned tests ran and passed), then commit the results.
#
# Rehearsal (tests/test_gpu_session_rehearsal.py, CPU): GS_STANDIN=PROGRAM replaces each step's
# command by `PROGRAM <step>` and skips the GPU check; GS_LIMIT_<step>, GS_MARGIN and
# GS_TEST_TIMEOUT shrink the times.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

LIMIT_build=${GS_LIMIT_build:-35}
LIMIT_correctness=${GS_LIMIT_correctness:-265}
LIMIT_memcheck=${GS_LIMIT_memcheck:-35}
LIMIT_headline=${GS_LIMIT_headline:-85}
LIMIT_suite=${GS_LIMIT_suite:-120}
MARGIN=${GS_MARGIN:-45}
TEST_TIMEOUT=${GS_TEST_TIMEOUT:-120}
WORKERS=${GS_WORKERS:-13}
STEPS="build correctness memcheck headline suite"
PY=${PY:-python3}

MODE=${1:-full}
case "$MODE" in
  full|rerun) ;;
  --plan)
    exec "$PY" -m lora_kernels.bench.session_plan --limits "build=$LIMIT_build,correctness=\
$LIMIT_correctness,memcheck=$LIMIT_memcheck,headline=$LIMIT_headline,suite=$LIMIT_suite" \
      --margin "$MARGIN" ;;
  *) echo "usage: bash bench/gpu_session.sh [--plan|rerun]" >&2; exit 2 ;;
esac

# the whole session: this GPU's arch only, no network, one Triton cache for every step and rerun
if [ -n "${GS_STANDIN:-}" ]; then
  cap=90
elif ! cap=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); \
print(f'{c[0]}{c[1]}')" 2>/dev/null); then
  echo "gpu_session.sh: no usable CUDA device here; on CPU run 'make test', or" \
       "'bash bench/gpu_session.sh --plan' for the counted plan" >&2
  exit 2
fi
export LORA_KERNELS_CUDA_ARCHS=$cap PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export TRITON_DEFAULT_FP_FUSION=1 LORA_KERNELS_TEST_DEVICE=cuda
STATE=${GS_STATE:-$REPO/build/gpu-session}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$STATE/triton-cache}
if [ -n "${OUT:-}" ]; then RES=$OUT/gpu-session; else RES=${GS_RESULTS:-$REPO/bench/results/gpu-session}; fi
mkdir -p "$RES" "$STATE" "$TRITON_CACHE_DIR"
if [ "$MODE" = full ]; then
  rm -f "$STATE"/*.jsonl "$STATE"/*.json "$STATE"/*.log "$STATE"/*.ids "$STATE"/summary.txt
  rm -f "$RES"/*.jsonl "$RES"/*.json "$RES"/*.png "$RES"/memcheck.log "$RES"/summary.txt
else  # rerun: $OUT is emptied between calls; the first command's results live on in $STATE
  for f in "$STATE"/*.jsonl "$STATE"/*.json "$STATE"/memcheck.log; do
    [ -f "$f" ] && [ ! -f "$RES/$(basename "$f")" ] && cp "$f" "$RES/"
  done
fi
export LORA_KERNELS_RESULTS_JSONL=$RES/tests.jsonl

# keep $STATE in step with $RES (not session.log: tee writes it until the very end)
sync_state() {
  for f in "$RES"/*.jsonl "$RES"/*.json "$RES"/memcheck.log "$RES"/summary.txt; do
    [ -f "$f" ] && cp "$f" "$STATE/" 2>/dev/null
  done
  return 0
}
# at most 8 files come back from $OUT: anything beyond the known ones (a benchmark's .tmp left by
# a kill, say) moves to $STATE
KEEP="session.log steps.jsonl tests.jsonl summary.txt decisions.json memcheck.log"
trim_out() {
  local f b
  for f in "$RES"/* "$RES"/.[!.]*; do
    [ -e "$f" ] || continue
    b=$(basename "$f")
    case " $KEEP " in *" $b "*) continue ;; esac
    case $b in *-headline.json|*-headline.png) continue ;; esac
    mv -f "$f" "$STATE/" 2>/dev/null || rm -rf "$f"
  done
  return 0
}
note() { printf '{"step": "%s", "event": "%s", "at": %s%s}\n' "$1" "$2" "$(date +%s)" "${3:-}" \
           >> "$RES/steps.jsonl"; }
step_done() {  # finished (whatever its result) in an earlier command of this session
  "$PY" - "$RES/steps.jsonl" "$1" <<'EOF'
import json, sys
from pathlib import Path
p = Path(sys.argv[1])
ends = [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []
sys.exit(0 if any(e["step"] == sys.argv[2] and e["event"] == "end" and not e.get("cut")
                  for e in ends) else 1)
EOF
}

# run_step NAME LIMIT DEADLINE CMD...: SIGINT at DEADLINE (0: none), SIGKILL at LIMIT, to the
# step's whole process group (pytest workers and warm-ups included)
run_step() {
  local name=$1 limit=$2 deadline=$3; shift 3
  if [ "$MODE" = rerun ] && step_done "$name"; then
    echo "== $name: finished in the first command, not repeated"; return 0
  fi
  echo; echo "== [$(date -u +%T)] $name (limit ${limit} s, deadline ${deadline} s)"
  note "$name" start ", \"limit\": $limit, \"deadline\": $deadline"
  local t0 rc cut=false
  t0=$(date +%s)
  if [ -n "${GS_STANDIN:-}" ]; then set -- "$GS_STANDIN" "$name"; fi
  # (functions reach timeout's child through export -f and bash -c)
  if [ "$deadline" -gt 0 ]; then
    timeout -s INT -k $((limit - deadline)) "$deadline" bash -o pipefail -c '"$@"' _ "$@"
  else
    timeout -s KILL "$limit" bash -o pipefail -c '"$@"' _ "$@"
  fi
  rc=$?
  # 124: the deadline's SIGINT (or the limit's KILL) ended it; 130 / 137: interrupted / killed
  case $rc in 124|130|137) cut=true ;; esac
  if [ $(( $(date +%s) - t0 )) -ge "$deadline" ] && [ "$deadline" -gt 0 ]; then cut=true; fi
  note "$name" end ", \"rc\": $rc, \"cut\": $cut, \"wall_s\": $(( $(date +%s) - t0 ))"
  echo "== $name: rc=$rc cut=$cut in $(( $(date +%s) - t0 )) s"
  trim_out
  sync_state
  return 0
}

pytest_step() {  # pytest_step STEP: the step's tests not yet reported, with the result plugin
  local step=$1 ids="$STATE/$1.ids"
  "$PY" -m lora_kernels.bench.session_plan --select "$step" --out "$ids" \
    --results "$RES/tests.jsonl" || return 3
  [ -s "$ids" ] || { echo "$step: nothing left to run"; return 0; }
  LORA_KERNELS_STEP=$step LORA_KERNELS_SELECT=$ids LORA_KERNELS_AUTOTUNE=0 \
    "$PY" -m pytest -q -p no:cacheprovider -p lora_kernels.bench.pytest_plugin \
    --benchmark-disable -n "$WORKERS" --timeout "$TEST_TIMEOUT" --timeout-method thread \
    --max-worker-restart 20 -rfE tests
}

step_build() {
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PY" -m pip install -q --no-build-isolation --no-deps \
    -e . 2>&1 | tail -n 5
  "$PY" -c "import lora_kernels; print('cuda_available:', lora_kernels.cuda_available())"
}

step_correctness() {
  # beside the tests, on their own cores: the compiles steps 3 and 4 will need
  LORA_KERNELS_AUTOTUNE=0 "$PY" bench/memcheck_cases.py > "$STATE/warm-memcheck.log" 2>&1 &
  local i parts=2
  for i in $(seq 0 $((parts - 1))); do
    "$PY" -m lora_kernels.bench.session_plan --warm-headline "$i/$parts" \
      > "$STATE/warm-headline-$i.log" 2>&1 &
  done
  pytest_step correctness
  local rc=$?
  wait
  tail -n 1 "$STATE/warm-memcheck.log" "$STATE"/warm-headline-*.log 2>/dev/null
  return $rc
}

step_memcheck() {
  local san
  san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 LORA_KERNELS_AUTOTUNE=0 "$san" --tool memcheck \
    --error-exitcode 9 --print-limit 20 "$PY" bench/memcheck_cases.py > "$RES/memcheck.log" 2>&1
  local rc=$?
  echo "memcheck rc=$rc (0 clean, 9 memcheck errors)"; tail -n 4 "$RES/memcheck.log"
  return $rc
}

step_headline() {
  "$PY" -m lora_kernels.bench --headline --no-progress --out "$RES"
  local rc=$? bench
  bench=$(ls -t "$RES"/*-headline.json 2>/dev/null | head -n 1)
  if [ -n "$bench" ]; then
    "$PY" -m lora_kernels.bench.decide "$bench" --out "$RES/decisions.json"
  else
    echo "no benchmark result file: nothing to decide"
  fi
  return $rc
}

step_suite() { pytest_step suite; }

session() {
  echo "== gpu_session.sh $MODE $(date -u +%FT%TZ) sm_$cap; results in $RES"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader \
    2>/dev/null || true
  local t0 s limit
  t0=$(date +%s)
  if [ "$MODE" = rerun ] && [ -z "${GS_STANDIN:-}" ] && "$PY" -c "import lora_kernels._C" \
      2>/dev/null; then
    note build end ', "rc": 0, "cut": false, "wall_s": 0'
  fi
  for s in $STEPS; do
    limit=LIMIT_$s
    case $s in
      build|memcheck) run_step "$s" "${!limit}" 0 "step_$s" ;;
      *) run_step "$s" "${!limit}" $(( ${!limit} - MARGIN )) "step_$s" ;;
    esac
  done
  echo; echo "== [$(date -u +%T)] summary ($(( $(date +%s) - t0 )) s)"
  "$PY" -m lora_kernels.check --summary "$RES" 2>&1 | tee "$RES/summary.txt"
  sync_state
}

export -f step_build step_correctness step_memcheck step_headline step_suite pytest_step note
export PY RES STATE WORKERS TEST_TIMEOUT
session 2>&1 | tee -a "$RES/session.log"
