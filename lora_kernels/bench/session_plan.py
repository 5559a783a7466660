"""The GPU session, counted on CPU before any device time is spent.

``python -m lora_kernels.bench.session_plan --limits build=60,correctness=190,...`` (run by
``bash bench/gpu_session.sh --plan``, which passes its own step limits) prints, for each step of
the session, what it will run, how many distinct Triton compiles and autotune trials that takes,
an estimate of its wall time on the GPU machine and its time limit, and as its last line::

    planned: <E> s estimated, <L> s at the step limits, of 600 s

How the steps are counted (nothing is compiled or run on a GPU here):

* **Tests** (steps 2 and 5): the suite is collected as the GPU machine collects it (the
  ``[cuda]`` parametrisations included, :mod:`.pytest_plugin`), and split exactly as the session
  splits it (:func:`select`). Every test of either step that can launch a Triton kernel on CPU
  runs once under ``TRITON_INTERPRET=1`` with every launch recorded as the GPU would compile it
  (the launch recording of :mod:`.static` applied to the interpreter, :mod:`.pytest_plugin`):
  Triton's specialisation of each argument (pointer dtype and 16-byte alignment, integers equal
  to 1 / divisible by 16), the constexprs, and, with tiles fixed (``LORA_KERNELS_AUTOTUNE=0``),
  one compile per distinct key. A new kernel, test or parametrisation is therefore counted
  without any change here. The tests are then scheduled on the session's pytest-xdist workers
  (:func:`simulate`: each test to the first free worker, a compile paid by the first worker that
  needs a key, later ones read Triton's on-disk cache).
* **Memcheck** (step 3): ``bench/memcheck_cases.py --device cpu`` recorded the same way.
* **Headline decisions** (step 4): the launches of the three headline points as
  :func:`.static.headline_launches` records them (the GPU launch paths, autotuning on): each
  autotune candidate is a compile plus a timed trial.
* **Costs** (:class:`Costs`): compile seconds per kernel are the median of the measured compiles
  in ``bench/results/static-sm90.json`` (sm_90, Triton 3.6, this 2-core CPU host: the GPU host's
  cores are not slower, so this errs long); kernel seconds from FLOP and byte counts at the H200
  ceilings KINDS.md measured (788 TFLOP/s bf16, 4.3 TB/s); fixed costs measured here where they
  can be (collection, imports, the build's ninja log), the others are named assumptions.

``--select STEP --out FILE`` (on the GPU machine, inside the session): the test ids of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .pytest_plugin import spec_class

ROOT = Path(__file__).resolve().parents[2]
SESSION_S = 600           # the device tool's limit for one command
LIMITS_BUDGET_S = 540     # the steps' limits together (the rest: start, copying, summary)
SHARE = 0.8               # a step's estimate may use at most this share of its limit
STEP_NAMES = ("build", "correctness", "memcheck", "headline", "suite")
# steps that get SIGINT at a deadline MARGIN seconds before their limit (pytest, the benchmark);
# build and memcheck have only their limit
DEADLINE_STEPS = ("correctness", "headline", "suite")
MARGIN_S = 45
PAIR_BACKENDS = ("triton", "cuda")
# name fragments of tests that go to the broader suite (step 5) even when they test a pair:
# torch.compile / opcheck (Inductor compiles on a GPU: ~10 s each), CPU-emulation and
# interpreter-only tests
SUITE_ONLY = ("compile", "opcheck", "emu", "interpreter")
# files the GPU session leaves out: multi-process gloo tests (CPU), the CPU-host compile checks
# and the hypothesis property suite (each skips its Triton tests on a GPU machine: CPU tensors
# through TRITON_INTERPRET=1 only; recorded here they would count compiles that never happen)
EXCLUDE = ("tests/distributed/", "tests/cuda/test_triton_aot.py", "tests/cuda/test_triton36.py",
           "tests/test_properties.py")
# processes of step 2 on the 16-core GPU host: pytest-xdist workers, plus the warm-up processes
# that compile (Triton's JIT, ``warmup=True``: nothing runs) what steps 3 and 4 will launch
TEST_WORKERS = 13
HEADLINE_WARM_PARTS = 2
HEADLINE_LABELS = ("train fwd", "train bwd", "train-tma", "decode ", "prefill ", "prefill_fused ")


# ----------------------------------------------------------------------------- selection
def test_pair(nodeid: str) -> tuple[str | None, str | None]:
    """(backend | None, op | None) of a pytest node id (``tests/test_lora.py::test_x[triton-..]``),
    by :func:`lora_kernels.check.test_pair`."""
    from .. import check

    return check.test_pair(nodeid)


def select(ids: list[str]) -> dict[str, list[str]]:
    """Split collected test ids into the session's test steps: ``correctness`` (every test of a
    (backend, op) pair with backend triton or cuda, small shapes, no Inductor) and ``suite``
    (the rest), both in collection order."""
    out: dict[str, list[str]] = {"correctness": [], "suite": []}
    for t in ids:
        if any(t.startswith(e) for e in EXCLUDE):
            continue
        be, op = test_pair(t)
        name = t.partition("::")[2].lower()
        if be in PAIR_BACKENDS and op is not None and not any(s in name for s in SUITE_ONLY):
            out["correctness"].append(t)
        else:
            out["suite"].append(t)
    return out


def collect(gpu_like: bool, timeout: float = 300) -> tuple[list[str], float]:
    """Test ids of the suite and the collection's wall seconds. ``gpu_like`` (on CPU): collected
    as the GPU machine would (``[cuda]`` parametrisations too); else as this machine would."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LORA_KERNELS_RESULTS_JSONL", "LORA_KERNELS_SELECT")}
    if gpu_like:
        env.update(LORA_KERNELS_PLAN_FAKE_CUDA="1", TRITON_INTERPRET="1")
        env.pop("LORA_KERNELS_TEST_DEVICE", None)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", "-p", "lora_kernels.bench.pytest_plugin",
                        "tests"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    wall = time.time() - t0
    ids = [ln.strip() for ln in r.stdout.splitlines() if ln.startswith("tests/") and "::" in ln]
    if not ids:
        raise RuntimeError(f"collection found no tests (rc {r.returncode}):\n{r.stdout[-2000:]}"
                           f"\n{r.stderr[-2000:]}")
    return ids, wall


# ----------------------------------------------------------------------------- recording
def record_tests(ids: list[str], workers: int, timeout: float = 900) -> tuple[list[dict], float]:
    """Run ``ids`` on CPU under the interpreter with every Triton launch recorded
    (:mod:`.pytest_plugin`); returns the records and the wall seconds."""
    with tempfile.TemporaryDirectory() as td:
        sel = Path(td) / "select.txt"
        sel.write_text("\n".join(ids) + "\n")
        env = dict(os.environ)
        env.update(TRITON_INTERPRET="1", LORA_KERNELS_RECORD_LAUNCHES=str(Path(td) / "rec"),
                   LORA_KERNELS_SELECT=str(sel), LORA_KERNELS_AUTOTUNE="0")
        env.pop("LORA_KERNELS_TEST_DEVICE", None)
        env.pop("LORA_KERNELS_RESULTS_JSONL", None)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-p", "lora_kernels.bench.pytest_plugin", "--benchmark-disable", "tests"]
        if workers > 1:
            cmd += ["-n", str(workers)]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
        wall = time.time() - t0
        recs = [json.loads(ln) for f in sorted((Path(td) / "rec").glob("*.jsonl"))
                for ln in f.read_text().splitlines() if ln]
    if r.returncode not in (0, 1):  # 1: a test failed (its launches still count)
        raise RuntimeError(f"recording run failed (rc {r.returncode}):\n{r.stdout[-3000:]}")
    return recs, wall


def record_memcheck(timeout: float = 300) -> list[dict]:
    """The launches of ``bench/memcheck_cases.py`` (``--device cpu``, interpreter, recorded)."""
    with tempfile.TemporaryDirectory() as td:
        env = dict(os.environ)
        env.update(TRITON_INTERPRET="1", LORA_KERNELS_AUTOTUNE="0")
        code = ("import sys, runpy; from pathlib import Path; "
                "from lora_kernels.bench.pytest_plugin import install_recorder; "
                f"install_recorder(Path({td!r}), 'memcheck'); "
                "sys.argv = ['memcheck_cases.py', '--device', 'cpu']; "
                "runpy.run_path('bench/memcheck_cases.py', run_name='__main__')")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"memcheck_cases --device cpu failed:\n{r.stdout[-2000:]}"
                               f"\n{r.stderr[-2000:]}")
        return [json.loads(ln) for f in Path(td).glob("*.jsonl")
                for ln in f.read_text().splitlines() if ln]


def _sources_hash() -> str:
    """What the recorded launches depend on: every .py under lora_kernels/ and tests/, the
    memcheck cases, triton's version and the environment knobs the launchers read."""
    import hashlib

    import triton

    h = hashlib.sha256(triton.__version__.encode())
    files = sorted(f for f in [*ROOT.glob("lora_kernels/**/*.py"), *ROOT.glob("tests/**/*.py"),
                               ROOT / "bench" / "memcheck_cases.py"]
                   if f.name not in ("session_plan.py", "check.py", "test_gpu_session_plan.py",
                                     "test_gpu_session_rehearsal.py"))
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def compile_key(rec: dict, config=None) -> str:
    """One compile: kernel, specialisation, constexprs (and the autotune candidate, if any)."""
    return json.dumps([rec["module"], rec["name"], rec["spec"], rec["const"], config],
                      sort_keys=True, default=str)


# ----------------------------------------------------------------------------- costs
@dataclass
class Costs:
    """Seconds each part of the session takes on the GPU machine, with where each number comes
    from (``basis``)."""

    compile_s: dict[str, float] = field(default_factory=dict)
    compile_default_s: float = 5.0
    workers: int = TEST_WORKERS
    collect_s: float = 7.5
    import_s: float = 1.0
    cuda_init_s: float = 3.0
    per_test_s: float = 0.10
    launch_s: float = 20e-6
    inductor_s: float = 15.0
    trial_s: float = 0.15
    build_s: float = 18.0
    wheel_relink_s: float = 18.0
    sanitizer_start_s: float = 15.0
    sanitizer_launch_s: float = 0.05
    bench_row_s: float = 1.0
    peak_flops: float = 788e12
    peak_bw: float = 4.3e12
    basis: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls) -> Costs:
        c = cls()
        c.basis = {
            "compile_s": "median measured sm_90 compile per kernel, bench/results/static-sm90.json "
                         "(Triton 3.6, 2 shared CPU cores here)",
            "workers": "pytest-xdist workers on the 16-core GPU host (3 cores left to the "
                       "warm-up processes of steps 3 and 4)",
            "collect_s": "pytest --collect-only of tests/ measured here: 7.2 s wall on 2 cores",
            "import_s": "python -c 'import torch, lora_kernels' measured here: 0.97 s",
            "cuda_init_s": "assumed: CUDA context per process",
            "per_test_s": "assumed: a small-shape GPU test incl. its float64 reference and syncs",
            "inductor_s": "assumed: one torch.compile (Inductor, cuda) of a small graph",
            "trial_s": "Triton autotuner do_bench per candidate: 25 ms warm-up + 100 ms reps",
            "build_s": "LORA_KERNELS_CUDA_ARCHS=90 pip wheel --no-build-isolation of a fresh "
                       "checkout here (nvcc 13.0, 2 cores, CMake configure included): 18 s",
            "wheel_relink_s": "assumed: the suite's wheel test, at most a second full build",
            "sanitizer_start_s": "assumed: compute-sanitizer start, torch import and CUDA init "
                                 "under it",
            "sanitizer_launch_s": "assumed: memcheck's per-launch cost on tiny kernels",
            "bench_row_s": "harness Budget (25 ms warm-up, 100 ms reps, >= 10 reps) + setup, "
                           "per implementation row",
            "peaks": "KINDS.md, measured on an H200 here: 788 TFLOP/s bf16 GEMM, 4.3 TB/s copy",
        }
        static = ROOT / "bench" / "results" / "static-sm90.json"
        if static.exists():
            rows = json.loads(static.read_text())["rows"]
            by: dict[str, list[float]] = {}
            for r in rows:
                by.setdefault(r["kernel"], []).append(r["compile_s"])
            c.compile_s = {k: statistics.median(v) for k, v in by.items()}
            c.compile_default_s = statistics.median(r["compile_s"] for r in rows)
        return c

    def compile_of(self, kernel: str) -> float:
        return self.compile_s.get(kernel, self.compile_default_s)


def simulate(tests: list[tuple[str, list[str], float]], costs: Costs, cached: set[str],
             workers: int) -> tuple[float, set[str]]:
    """Wall seconds of a pytest-xdist run of ``tests`` (id, compile keys in launch order,
    seconds of its own work) on ``workers`` workers: each test goes to the first free worker;
    a key compiles on the first worker that needs it (others needing it before that compile
    ends compile it too: Triton does not lock its cache), keys in ``cached`` cost nothing.
    Returns (wall, keys compiled)."""
    import heapq

    ready: dict[str, float] = {k: 0.0 for k in cached}
    free = [(0.0, w) for w in range(max(1, workers))]
    heapq.heapify(free)
    compiled: set[str] = set()
    end = 0.0
    for _, keys, own in tests:
        t, w = heapq.heappop(free)
        for k in keys:
            if k in ready and ready[k] <= t:
                continue
            t += costs.compile_of(json.loads(k)[1])
            ready[k] = min(ready.get(k, t), t)
            compiled.add(k)
        t += own
        end = max(end, t)
        heapq.heappush(free, (t, w))
    return end, compiled


# ----------------------------------------------------------------------------- the plan
@dataclass
class StepPlan:
    name: str
    limit_s: float
    estimate_s: float
    detail: str
    counts: dict = field(default_factory=dict)


def _by_test(recs: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in recs:
        d = out.setdefault(r.get("test") or "", {"keys": [], "launches": 0, "inductor": 0,
                                                 "tuned": 0})
        if r.get("torch_compile"):
            d["inductor"] += 1
            continue
        d["launches"] += 1
        d["keys"].append(compile_key(r))
        if r.get("tuned"):
            d["tuned"] += 1
    return out


def plan_tests(name: str, ids: list[str], by_test: dict, costs: Costs, cached: set[str],
               limit: float, extra: dict[str, float] | None = None,
               warm_jobs: list[tuple[str, list[str]]] = ()) -> tuple[StepPlan, set]:
    """A pytest step: collection + worker start + the simulated run, and beside it on their own
    cores the ``warm_jobs`` (name, compile keys) that compile ahead for later steps."""
    extra = extra or {}
    tests = []
    launches = inductor = 0
    longest = (0.0, "")
    for t in ids:
        d = by_test.get(t, {"keys": [], "launches": 0, "inductor": 0})
        own = costs.per_test_s + d["launches"] * costs.launch_s + d["inductor"] * \
            costs.inductor_s + extra.get(t, 0.0)
        tests.append((t, d["keys"], own))
        launches += d["launches"]
        inductor += d["inductor"]
        serial = own + sum(costs.compile_of(json.loads(k)[1]) for k in set(d["keys"]) - cached)
        longest = max(longest, (serial, t))
    wall, compiled = simulate(tests, costs, cached, costs.workers)
    # the step's own collection (--select) and pytest's, then the workers' imports
    fixed = 2 * costs.collect_s + costs.import_s + costs.cuda_init_s
    distinct = {k for t in ids for k in by_test.get(t, {"keys": []})["keys"]} - cached
    warm_walls, warm_keys = [], set()
    for _, keys in warm_jobs:
        new = set(keys) - cached - distinct - warm_keys
        warm_walls.append(costs.import_s + costs.cuda_init_s
                          + sum(costs.compile_of(json.loads(k)[1]) for k in new))
        warm_keys |= set(keys)
    est = fixed + max([wall, *warm_walls])
    detail = (f"{len(ids)} tests on {costs.workers} workers: {launches} Triton launches, "
              f"{len(distinct)} distinct compiles ({len(compiled)} counting duplicates across "
              f"workers), fixed tiles, {inductor} torch.compile calls; {fixed:.0f} s start + "
              f"{wall:.0f} s run; longest test {longest[0]:.0f} s ({longest[1]})")
    if warm_jobs:
        detail += "; beside it " + ", ".join(
            f"{n} ({len(k)} compiles, {w:.0f} s)" for (n, k), w in zip(warm_jobs, warm_walls))
    counts = {"tests": len(ids), "launches": launches, "compiles": len(distinct),
              "compiles_with_duplicates": len(compiled), "inductor": inductor,
              "longest_test_s": round(longest[0], 1), "longest_test": longest[1]}
    return StepPlan(name, limit, est, detail, counts), cached | distinct | warm_keys


def headline_launches() -> list[dict]:
    """The Triton launches of the three headline points (train, decode, prefill), recorded on
    the GPU launch paths with autotuning on (:func:`.static.headline_launches`)."""
    from . import static

    prev = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "LORA_KERNELS_AUTOTUNE")}
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["LORA_KERNELS_AUTOTUNE"] = "1"
    try:
        launches = static.headline_launches()
    finally:
        for k, v in prev.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [ln for ln in launches if (ln["label"] or "").startswith(HEADLINE_LABELS)]


def launch_compiles(launches: list[dict]) -> list[tuple[str, dict, dict, dict]]:
    """``(compile key, launch, constexprs, options)`` of every distinct compile the recorded
    launches make (each autotune candidate is one)."""
    from . import static

    out, seen = [], set()
    for ln in launches:
        for const, opts, _ in static.variants(ln):
            spec = {n: spec_class(v) for n, v in ln["args"].items() if n not in const}
            key = json.dumps([ln["module"], ln["name"], spec, const, opts], sort_keys=True,
                             default=str)
            if key not in seen:
                seen.add(key)
                out.append((key, ln, const, opts))
    return out


def warm(launches: list[dict], part: int = 0, parts: int = 1) -> int:
    """Compile every variant of ``launches`` (share ``part`` of ``parts``) through Triton's own
    JIT path with ``warmup=True`` (specialised and compiled into the Triton cache exactly as the
    launch or the autotuner's trial will ask for it; nothing runs). Returns the count."""
    import importlib

    from triton.runtime.jit import JITFunction

    from . import static

    jobs = launch_compiles(launches)[part::parts]
    for _, ln, const, opts in jobs:
        fn = getattr(importlib.import_module(ln["module"]), ln["name"])
        while not isinstance(fn, JITFunction):  # an Autotuner (or another wrapper)
            fn = fn.fn
        kwargs = {n: static.decode(ln["args"][n]) for n in fn.arg_names if n not in const}
        fn.run(grid=(1,), warmup=True, **kwargs, **const, **opts)
    return len(jobs)


def plan_headline(costs: Costs, cached: set[str], limit: float,
                  launches: list[dict]) -> StepPlan:
    """Step 4: the three headline points (autotuning on), compiled ahead by step 2's warm-up."""
    trials = sum(len(ln["configs"]) for ln in launches if ln.get("configs")
                 and len(ln["configs"]) > 1)
    keys = [k for k, *_ in launch_compiles(launches)]
    new = [k for k in keys if k not in cached]
    compile_s = sum(costs.compile_of(json.loads(k)[1]) for k in new)
    # kernel seconds: each timed row runs its op for the harness budget (>= 10 reps); the
    # training point's fwd+bwd is 3 GEMMs of 2*T*K*N FLOPs, decode reads its weights once per
    # step, prefill is one GEMM
    from .static import DECODE, PREFILL, TRAIN

    T, K, N = TRAIN["T"], TRAIN["K"], TRAIN["N"]
    train_step = 3 * 2 * T * K * N / costs.peak_flops
    decode_step = (K * N * 2 + DECODE["adapters"] * DECODE["r"] * (K + N) * 2) / costs.peak_bw
    Tp = PREFILL["segments"] * PREFILL["seg_len"]
    prefill_step = 2 * Tp * K * N / costs.peak_flops
    # rows: train (base_pair, eager, peft, ours_triton, ours_triton_tma, ours_cuda); decode
    # (base, gather_bmm, peft_loop, ours_triton, ours_cuda); prefill (base, segment_loop,
    # ours_triton, ours_triton_fused, ours_cuda)
    rows = {"train": (6, train_step), "decode": (5, decode_step), "prefill": (5, prefill_step)}
    kernel_s = sum(n * max(10 * s, 0.1) for n, s in rows.values())
    n_rows = sum(n for n, _ in rows.values())
    fixed = costs.import_s + costs.cuda_init_s + 3.0  # + the harness's peak measurement
    est = (fixed + compile_s + trials * costs.trial_s + n_rows * costs.bench_row_s + kernel_s
           + 3.0)
    detail = (f"train / decode / prefill, {n_rows} timed rows: {len(launches)} Triton launches, "
              f"{len(keys)} compiles ({len(new)} not warmed in step 2: {compile_s:.0f} s), "
              f"{trials} autotune trials, kernels {kernel_s:.1f} s at H200 peaks, + decide")
    return StepPlan("headline", limit, est, detail,
                    {"launches": len(launches), "compiles": len(new),
                     "autotune_trials": trials})


def plan_memcheck(costs: Costs, cached: set[str], limit: float, keys: list[str]) -> StepPlan:
    """Step 3: ``bench/memcheck_cases.py`` under compute-sanitizer (its compiles warmed in 2)."""
    new = set(keys) - cached
    compile_s = sum(costs.compile_of(json.loads(k)[1]) for k in new)
    est = costs.sanitizer_start_s + compile_s + len(keys) * costs.sanitizer_launch_s
    detail = (f"bench/memcheck_cases.py under compute-sanitizer, fixed tiles, no caching "
              f"allocator: {len(keys)} Triton launches, {len(new)} compiles not warmed in step 2")
    return StepPlan("memcheck", limit, est, detail, {"launches": len(keys), "compiles": len(new)})


def plan_build(costs: Costs, limit: float) -> StepPlan:
    est = costs.build_s + costs.import_s
    return StepPlan("build", limit, est, "pip install -e . for the local arch only "
                    "(LORA_KERNELS_CUDA_ARCHS=90): 6 CUDA units + bindings", {})


def make_plan(limits: dict[str, float], workers_here: int = 2) -> tuple[list[StepPlan], dict]:
    costs = Costs.load()  # fixed numbers: the plan must not depend on this host's load
    ids, collect_wall = collect(gpu_like=True)
    steps = select(ids)
    # the tests that can launch Triton kernels: those of the triton backend (by id), recorded
    rec_ids = [t for t in steps["correctness"] + steps["suite"] if "triton" in t]
    cache = ROOT / "runs" / "session-plan" / f"recording-{_sources_hash()}.json"
    t0 = time.time()
    cached_run = cache.exists() and os.environ.get("LORA_KERNELS_PLAN_CACHE", "1") != "0"
    if cached_run:
        recs, mem_recs = json.loads(cache.read_text())
    else:
        recs, _ = record_tests(rec_ids, workers_here)
        mem_recs = record_memcheck()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps([recs, mem_recs]))
    by_test = _by_test(recs)
    mem_keys = [compile_key(r) for r in mem_recs if not r.get("torch_compile")]
    head = headline_launches()
    rec_wall = time.time() - t0
    head_keys = [k for k, *_ in launch_compiles(head)]
    warm_jobs = [("memcheck warm-up (memcheck_cases.py, no sanitizer)", mem_keys)]
    warm_jobs += [(f"headline warm-up {i + 1}/{HEADLINE_WARM_PARTS}",
                   head_keys[i::HEADLINE_WARM_PARTS]) for i in range(HEADLINE_WARM_PARTS)]
    plans = [plan_build(costs, limits["build"])]
    p2, cached = plan_tests("correctness", steps["correctness"], by_test, costs, set(),
                            limits["correctness"], warm_jobs=warm_jobs)
    plans.append(p2)
    plans.append(plan_memcheck(costs, cached, limits["memcheck"], mem_keys))
    plans.append(plan_headline(costs, cached, limits["headline"], head))
    # the broader suite: its wheel-building test relinks _C (the build's fixed part again)
    extra = {t: costs.wheel_relink_s for t in steps["suite"] if "wheel" in t}
    p5, _ = plan_tests("suite", steps["suite"], by_test, costs, cached, limits["suite"], extra)
    plans.append(p5)
    meta = {"recorded_tests": len(rec_ids), "recording_s": round(rec_wall, 1),
            "recording_cached": str(cache.relative_to(ROOT)) if cached_run else None,
            "collect_here_s": round(collect_wall, 1),
            "costs": {k: v for k, v in vars(costs).items() if k not in ("compile_s", "basis")},
            "basis": costs.basis}
    return plans, meta


def problems(plans: list[StepPlan], margin: float = MARGIN_S) -> list[str]:
    """What breaks the session's budget (empty: nothing)."""
    out = []
    for p in plans:
        if p.name in DEADLINE_STEPS and p.estimate_s > p.limit_s - margin:
            out.append(f"step {p.name}: estimate {p.estimate_s:.0f} s > its deadline "
                       f"{p.limit_s - margin:.0f} s (limit {p.limit_s:.0f} s - {margin:.0f} s)")
    total = sum(p.limit_s for p in plans)
    if total > LIMITS_BUDGET_S:
        out.append(f"the step limits add up to {total:.0f} s > {LIMITS_BUDGET_S} s")
    for p in plans:
        if p.estimate_s > SHARE * p.limit_s:
            out.append(f"step {p.name}: estimate {p.estimate_s:.0f} s > {SHARE:.0%} of its "
                       f"limit {p.limit_s:.0f} s")
    first = sum(p.estimate_s for p in plans if p.name in ("build", "correctness"))
    if first > 240:
        out.append(f"build + correctness estimated {first:.0f} s > 240 s")
    return out


def render(plans: list[StepPlan], meta: dict) -> str:
    lines = ["GPU session plan (counted on CPU; nothing compiled or run on a GPU)",
             f"{'step':<13}{'estimate':>9}{'limit':>7}{'share':>7}  what"]
    for i, p in enumerate(plans, 1):
        lines.append(f"{i}. {p.name:<10}{p.estimate_s:>8.0f}s{p.limit_s:>6.0f}s"
                     f"{p.estimate_s / p.limit_s:>7.0%}  {p.detail}")
    first = sum(p.estimate_s for p in plans if p.name in ("build", "correctness"))
    lines.append(f"correctness pass alone (steps 1-2): {first:.0f} s estimated")
    how = (f"read from {meta['recording_cached']} (same sources)" if meta.get("recording_cached")
           else f"in {meta['recording_s']} s")
    lines.append(f"recorded on CPU: {meta['recorded_tests']} tests that launch Triton, {how}")
    E = sum(p.estimate_s for p in plans)
    L = sum(p.limit_s for p in plans)
    lines.append(f"planned: {E:.0f} s estimated, {L:.0f} s at the step limits, of {SESSION_S} s")
    return "\n".join(lines)


def parse_limits(s: str) -> dict[str, float]:
    out = {}
    for part in s.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in STEP_NAMES:
            raise SystemExit(f"--limits: unknown step {k!r}; steps are {STEP_NAMES}")
        out[k.strip()] = float(v)
    missing = [s for s in STEP_NAMES if s not in out]
    if missing:
        raise SystemExit(f"--limits: missing {missing}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_kernels.bench.session_plan",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limits", help="step=seconds,... (bench/gpu_session.sh passes its own)")
    ap.add_argument("--margin", type=float, default=MARGIN_S,
                    help="seconds between a step's deadline (SIGINT) and its limit (SIGKILL)")
    ap.add_argument("--json", help="also write the plan here")
    ap.add_argument("--workers", type=int, default=2, help="CPU workers for the recording run")
    ap.add_argument("--select", choices=("correctness", "suite"),
                    help="write the test ids of this step (collected here) to --out")
    ap.add_argument("--out")
    ap.add_argument("--results", help="with --select: the session's tests.jsonl: the step's plan "
                    "is written there (once) and tests it already reports are left out")
    ap.add_argument("--warm-headline", metavar="PART/PARTS",
                    help="compile this share of the headline launches' variants (GPU machine)")
    args = ap.parse_args(argv)
    if args.warm_headline:
        part, parts = (int(x) for x in args.warm_headline.split("/"))
        t0 = time.time()
        n = warm(headline_launches(), part, parts)
        print(f"warm-headline {part}/{parts}: {n} compiles in {time.time() - t0:.0f} s")
        return 0
    if args.select:
        ids, _ = collect(gpu_like=False)
        chosen = select(ids)[args.select]
        if args.results:
            from .. import check

            planned, results = check.read_results(Path(args.results))
            if args.select not in planned:
                with open(args.results, "a") as fh:
                    fh.write(json.dumps({"step": args.select, "planned": chosen}) + "\n")
            chosen = [t for t in chosen if t not in results]
        Path(args.out).write_text("".join(t + "\n" for t in chosen))
        print(f"{args.select}: {len(chosen)} tests to run -> {args.out}")
        return 0
    if not args.limits:
        ap.error("--limits is required (bash bench/gpu_session.sh --plan passes them)")
    plans, meta = make_plan(parse_limits(args.limits), args.workers)
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": [vars(p) for p in plans], **meta},
                                              indent=1))
    bad = problems(plans, args.margin)
    for b in bad:
        print(f"OVER BUDGET: {b}")
    print(render(plans, meta))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
