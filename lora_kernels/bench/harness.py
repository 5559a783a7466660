"""Timing harness: device events + medians on CUDA, wall-clock medians on CPU.

A :class:`Case` is one op at one shape and dtype: it builds input sets, counts the FLOPs and the
fewest bytes the op must move, and lists :class:`Impl` s (ours and the baselines) that each turn
the input sets into a ``step(i)`` closure running the op on set ``i``. :func:`run_cases` times
every implementation of every case and returns JSON-ready rows.

How times are taken (``/work/.library/device/METHOD.md``):

* CUDA: like ``triton.testing.do_bench``: a short estimate, warm-up by time, then per-iteration
  start/end events and the **median** (p20/p80 kept as the spread). Inputs rotate over enough sets
  that together they exceed the L2 cache several times, so repeated runs do not read a warm cache
  (a real model's next layer has other weights). Cases marked ``graph`` (decode) are captured once
  in a CUDA graph holding one step per input set and timed by graph replays, which removes the
  launch gaps that dominate micro-second kernels; an implementation that cannot be captured (e.g.
  PEFT's host-side loop) is timed eagerly and the row says so.
* CPU: ``time.perf_counter`` median over repetitions after warm-up, same input rotation; a
  case's implementations are timed in interleaved rounds (:func:`time_cpu_interleaved`), so load
  from other processes on a shared machine falls on all of them alike. Ceilings on CPU are the
  best of several runs (load only slows a run down).
* Nothing here is GPU-verified yet: the CUDA paths (events, graphs, peaks) were written without a
  GPU session and are exercised on CPU only through their CPU counterparts.
* Every implementation's output on set 0 is compared with the case's reference implementation
  (``rel_err_vs_ref``, ``||out - ref|| / ||ref||`` per output tensor, the max reported), so a fast
  but wrong kernel shows up in the same row as its time.
* Memory: on CUDA the extra peak allocated by one step (``peak_mem_mb``); not recorded on CPU.
* Floors: ``floor = max(flops / peak_flops[dtype], bytes / peak_bw)`` with peaks measured once per
  run on this device (:class:`Peaks`); ``x_floor = time / floor`` is the distance from it.

An implementation that fails (missing op, PEFT API change, compile error, out of memory) gives a
row with ``status: "error"`` and the exception text; the run goes on. Nothing is hidden: the
printed table and the headline show the reason.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import re
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}


# ----------------------------------------------------------------------------- case definitions
@dataclass
class Impl:
    """One implementation of a case.

    ``prepare(sets, device) -> step`` builds whatever the implementation needs (modules, pools,
    compiled functions) from the list of input sets and returns ``step(i)``, which runs the op on
    set ``i`` and returns its output (a tensor or a tuple of tensors, used for the check).
    ``flops``/``bytes`` override the case's counts when this implementation does different work
    (e.g. the base GEMM alone). ``graph=False`` forbids CUDA-graph capture (host-side loops).
    ``skip`` (a reason) records a row without running; ``check=False`` for implementations that
    compute something else on purpose (the base GEMM alone), so no ``rel_err_vs_ref``.
    ``set_bytes``: the bytes one step of this implementation reads, when that is far less than the
    case's (e.g. the adapter part of a decode alone, without the base weight): it then rotates
    over more input sets (the case builds as many as its most demanding implementation needs and
    each implementation gets the first ``n`` it needs), so its own working set still exceeds the
    cache several times instead of being served from L2.
    """

    name: str
    prepare: Callable[[list[dict], torch.device], Callable[[int], Any]]
    flops: float | None = None
    bytes: float | None = None
    graph: bool = True
    skip: str | None = None
    note: str = ""
    check: bool = True
    set_bytes: float | None = None


@dataclass
class Case:
    """One op at one shape/dtype with its implementations.

    ``key`` is a stable id within ``group`` (the headline refers to it); ``make_inputs(device, k)``
    builds input set ``k`` (a dict); ``ref`` names the implementation every other output is checked
    against; ``baseline`` names the one each row's ``ratio_vs_baseline`` divides by; ``grad`` runs
    steps with autograd enabled; ``graph`` asks for CUDA-graph timing (decode shapes).
    """

    group: str
    op: str
    key: str
    shape: dict
    dtype: torch.dtype
    flops: float
    bytes: float
    make_inputs: Callable[[torch.device, int], dict]
    impls: list[Impl]
    ref: str | None = None
    baseline: str | None = None
    grad: bool = False
    graph: bool = False
    set_bytes: float | None = None
    extra: dict = field(default_factory=dict)
    note: str = ""


# ----------------------------------------------------------------------------- device facts
def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def device_info(device: torch.device) -> dict:
    """Device name, slug, sizes and the versions of everything that shapes the numbers."""
    info: dict[str, Any] = {"type": device.type}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, sm_count=p.multi_processor_count,
                    l2_bytes=getattr(p, "L2_cache_size", None),
                    memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}")
    else:
        n = _cpu_name()
        info.update(name=f"cpu {n}" if not n.lower().startswith("cpu") else n,
                    threads=torch.get_num_threads(), cores=os.cpu_count(),
                    l3_bytes=_cpu_cache_bytes())
    info["slug"] = slug(info["name"])
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda}
    for pkg in ("triton", "peft", "transformers", "lora_kernels"):
        versions[pkg] = _version(pkg)
    if versions["lora_kernels"] is None:
        import lora_kernels

        versions["lora_kernels"] = getattr(lora_kernels, "__version__", None)
    info["versions"] = versions
    return info


def _cpu_cache_bytes() -> int:
    path = "/sys/devices/system/cpu/cpu0/cache/index3/size"
    try:
        with open(path) as f:
            s = f.read().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
        return int(s.rstrip("KMG")) * mult
    except (OSError, ValueError):
        return 32 << 20


def cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return _cpu_cache_bytes()


def check_interpreter(device: torch.device) -> str | None:
    """An error message if Triton would run interpreted on a GPU (times would be meaningless)."""
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return ("TRITON_INTERPRET=1 is set: Triton kernels would run in the CPU interpreter and "
                "the GPU times would be meaningless; run with TRITON_INTERPRET=0 "
                "(make bench does)")
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- timers
@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    method: str
    note: str = ""


def _quantiles(ts: list[float]) -> tuple[float, float, float]:
    ts = sorted(ts)
    q = lambda f: ts[min(len(ts) - 1, max(0, int(round(f * (len(ts) - 1)))))]
    return statistics.median(ts), q(0.2), q(0.8)


@dataclass
class Budget:
    """How long to warm up and repeat (per implementation)."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 10
    max_reps: int = 1000

    @classmethod
    def for_run(cls, device: torch.device, quick: bool) -> Budget:
        if device.type == "cuda":
            # --quick on a GPU times the headline points: same budget as a full run (timing is
            # ~0.2 s per implementation; autotuning and compiles dominate its wall time)
            return cls(25.0, 100.0, 10, 1000)
        # CPU: the time budget (rep_ms) bounds slow steps; max_reps lets sub-millisecond steps
        # take a few hundred samples. With at most 60 (9 per round), six quick runs of the decode
        # case gave ours/gather_bmm ratios of 0.81-1.06 (the first calls after each switch of
        # implementation weigh in); with 400: 0.73-0.86.
        return cls(20.0, 300.0, 7, 400) if quick else cls(50.0, 1000.0, 10, 1000)


def time_cuda(step: Callable[[int], Any], n_sets: int, budget: Budget) -> Timing:
    """``do_bench``-style: warm-up by time, then per-iteration events; median."""
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for i in range(5):
        step(i % n_sets)
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 5, 1e-4)
    for i in range(max(1, int(budget.warmup_ms / est))):
        step(i % n_sets)
    reps = int(min(budget.max_reps, max(budget.min_reps, budget.rep_ms / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        step(i % n_sets)
        ends[i].record()
    torch.cuda.synchronize()
    m, lo, hi = _quantiles([a.elapsed_time(b) for a, b in zip(starts, ends)])
    return Timing(m, lo, hi, reps, "cuda_events")


def time_cuda_graph(step: Callable[[int], Any], n_sets: int, budget: Budget) -> Timing:
    """Capture one step per input set in a CUDA graph; time replays; per-step median."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):            # warm-up off the capture stream (allocator, autotune)
        for _ in range(2):
            for i in range(n_sets):
                step(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_sets):
            step(i)
    torch.cuda.synchronize()
    timing = time_cuda(lambda _i: g.replay(), 1, budget)
    k = float(n_sets)
    note = f"graph of {n_sets} steps (one per input set), replay time / {n_sets}"
    return Timing(timing.median_ms / k, timing.p20_ms / k, timing.p80_ms / k, timing.reps,
                  "cuda_graph", note)


# ----------------------------------------------------------------------------- device peaks
class Peaks:
    """The device's measured ceilings (once per run, lazily per dtype).

    * ``bandwidth()``: bytes/s of a large device-to-device copy, counting bytes read + written.
    * ``matmul(dtype)``: FLOP/s of a large square GEMM on random data (8192^3 on CUDA for half
      types, 4096^3 fp32 with torch's current TF32 setting; 1024^3 on CPU).
    """

    def __init__(self, device: torch.device, quick: bool = False):
        self.device, self.quick = device, quick
        self._bw: float | None = None
        self._flops: dict[str, float] = {}
        self.details: dict[str, Any] = {}

    def _ceiling_ms(self, fn, reps: int) -> float:
        """CUDA: median of event-timed runs. CPU: the best of ``reps`` wall-clock runs (a shared
        CPU's load only ever slows a run down, and a ceiling is what the machine can do)."""
        fn()
        sync(self.device)
        if self.device.type == "cuda":
            return time_cuda(lambda _i: fn(), 1, Budget(20.0, 60.0, reps, 200)).median_ms
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return min(ts)

    def bandwidth(self) -> float:
        if self._bw is None:
            cuda = self.device.type == "cuda"
            nbytes = (1 << 30 if not self.quick else 256 << 20) if cuda else \
                (64 << 20 if self.quick else 256 << 20)
            src = torch.randn(nbytes // 4, device=self.device)
            dst = torch.empty_like(src)
            ms = self._ceiling_ms(lambda: dst.copy_(src), 30 if cuda else 9)
            self._bw = 2 * nbytes / (ms * 1e-3)
            self.details["bandwidth"] = {
                "method": "device-to-device copy, bytes read + written, "
                          + ("median" if cuda else "best of 9"),
                "bytes_each_way": nbytes, "ms": ms}
            del src, dst
        return self._bw

    def matmul(self, dtype: torch.dtype) -> float:
        name = DTYPE_NAMES[dtype]
        if name not in self._flops:
            cuda = self.device.type == "cuda"
            if cuda:
                n = 8192 if dtype != torch.float32 else 4096
            else:
                n = 1024 if dtype == torch.float32 else 512
            a = torch.randn(n, n, device=self.device).to(dtype)
            b = torch.randn(n, n, device=self.device).to(dtype)
            ms = self._ceiling_ms(lambda: a @ b, 20 if cuda else 9)
            self._flops[name] = 2 * n**3 / (ms * 1e-3)
            self.details[f"matmul_{name}"] = {
                "method": f"{n}^3 matmul, random data, " + ("median" if cuda else "best of 9"),
                "ms": ms}
            del a, b
        return self._flops[name]

    def as_dict(self) -> dict:
        return {"bandwidth_GBps": None if self._bw is None else self._bw / 1e9,
                "matmul_TFLOPs": {k: v / 1e12 for k, v in self._flops.items()},
                "details": self.details}


# ----------------------------------------------------------------------------- checks
def _as_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _as_tensors(o)]
    if hasattr(out, "logits"):
        return [out.logits]
    return []


def rel_err(out, ref) -> float | None:
    """max over output tensors of ``||out - ref|| / ||ref||`` (fp32 accumulation, on device)."""
    a, b = _as_tensors(out), _as_tensors(ref)
    if not a or len(a) != len(b):
        return None
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        x, y = x.detach().float(), y.detach().float()
        if not torch.isfinite(x).all():
            return float("inf")
        den = torch.linalg.vector_norm(y).item()
        num = torch.linalg.vector_norm(x - y).item()
        worst = max(worst, num / (den if den > 0 else 1.0))
    return worst


# ----------------------------------------------------------------------------- the runner
def rotation_sets(set_bytes: float, device: torch.device, mem_bytes: float | None = None) -> int:
    """Input sets needed so that together they exceed the last-level cache three times.

    ``set_bytes``: what one step reads; ``mem_bytes`` (default ``set_bytes``): what one set
    occupies, which bounds the count to a quarter of the free device memory."""
    cap = 32 if device.type == "cuda" else 4
    n = max(1, math.ceil(3 * cache_bytes(device) / max(set_bytes, 1.0)))
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        n = min(n, max(1, int(0.25 * free / max(mem_bytes or set_bytes, 1.0))))
    return int(min(n, cap))


def _clean(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _err_text(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg[:400]


def _row_base(case: Case, impl: Impl) -> dict:
    return {"group": case.group, "op": case.op, "case": case.key, "shape": dict(case.shape),
            "dtype": DTYPE_NAMES.get(case.dtype, str(case.dtype)), "impl": impl.name,
            "baseline": case.baseline, "ref": case.ref, **case.extra}


def _fill_rates(row: dict, flops: float, nbytes: float, dtype: torch.dtype, peaks: Peaks) -> None:
    t = row["time_ms"] * 1e-3
    pf, pb = peaks.matmul(dtype), peaks.bandwidth()
    row.update(flops=flops, bytes=nbytes, tflops=flops / t / 1e12, gbps=nbytes / t / 1e9,
               frac_peak_flops=flops / t / pf, frac_peak_bw=nbytes / t / pb,
               peak_TFLOPs=pf / 1e12, peak_bw_GBps=pb / 1e9)
    f_c, f_m = flops / pf, nbytes / pb
    row["floor_ms"] = max(f_c, f_m) * 1e3
    row["floor_bound"] = "compute" if f_c >= f_m else "memory"
    row["x_floor"] = row["time_ms"] / row["floor_ms"] if row["floor_ms"] > 0 else None


def _timing_fields(row: dict, timing: Timing) -> None:
    row.update(status="ok", time_ms=timing.median_ms, p20_ms=timing.p20_ms,
               p80_ms=timing.p80_ms, reps=timing.reps, timing=timing.method)
    row["spread"] = (timing.p80_ms - timing.p20_ms) / timing.median_ms
    if timing.note:
        row["timing_note"] = timing.note


def _fail(row: dict, e: BaseException) -> None:
    row.update(status="error", error=_err_text(e))
    if os.environ.get("LORA_KERNELS_BENCH_TRACEBACK") == "1":
        traceback.print_exc()


def time_cpu_interleaved(steps: dict[str, Callable[[int], Any]], n_sets: int | dict[str, int],
                         budget: Budget, rounds: int | None = None) -> dict[str, Timing]:
    """CPU: time several implementations in alternating rounds (each round in a rotated order), so
    load from other processes on a shared machine falls on all of them alike;
    per-implementation median over all rounds.
    ``n_sets``: input sets each step rotates over (one count, or one per implementation)."""
    rounds = rounds or max(1, min(10, budget.min_reps))
    n_of = n_sets if isinstance(n_sets, dict) else {k: n_sets for k in steps}
    times: dict[str, list[float]] = {k: [] for k in steps}
    est = {}
    for k, step in steps.items():
        t0 = time.perf_counter()
        step(1 % n_of[k])
        est[k] = max(time.perf_counter() - t0, 1e-6) * 1e3
    names = list(steps)
    for r in range(rounds):
        # each round starts at the next implementation, so none always follows the same other
        # one (the predecessor's data in cache; being first after the previous round's last)
        for k in names[r % len(names):] + names[:r % len(names)]:
            step = steps[k]
            reps = int(min(budget.max_reps, max(budget.min_reps, budget.rep_ms / est[k])))
            reps = max(1, -(-reps // rounds))   # ceil: every round times every implementation
            if r == 0:
                for i in range(max(1, int(budget.warmup_ms / est[k]))):
                    step(i % n_of[k])
            for i in range(reps):
                t0 = time.perf_counter()
                step(i % n_of[k])
                times[k].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for k, ts in times.items():
        m, lo, hi = _quantiles(ts)
        out[k] = Timing(m, lo, hi, len(ts), "wall_clock",
                        f"interleaved with the case's other implementations, {rounds} rounds")
    return out


def run_case(case: Case, device: torch.device, peaks: Peaks, budget: Budget,
             progress: Callable[[str], None] | None = None,
             on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Time every implementation of one case; rows in the case's impl order.

    CUDA: each implementation is prepared, checked, timed and freed in turn (one at a time in
    memory), and ``on_rows(rows_done_so_far)`` is called after each, so a run killed by a time
    limit in the middle of a long case (autotuning, torch.compile) keeps the rows it finished.
    CPU: all are prepared and checked first, then timed in interleaved rounds.
    Each implementation rotates over the first ``n_of[name]`` input sets (``Impl.set_bytes``).
    """
    def rates(impl: Impl, row: dict) -> None:
        if row.get("status") == "ok":
            _fill_rates(row, impl.flops if impl.flops is not None else case.flops,
                        impl.bytes if impl.bytes is not None else case.bytes, case.dtype, peaks)

    case_bytes = case.set_bytes or case.bytes
    n_case = rotation_sets(case_bytes, device)
    n_of = {im.name: max(n_case, rotation_sets(im.set_bytes, device, case_bytes))
            if im.set_bytes else n_case for im in case.impls}
    n_sets = max([n_of[im.name] for im in case.impls if not im.skip], default=n_case)
    cuda = device.type == "cuda"
    rows: dict[str, dict] = {}
    ref_out = None
    sets: list[dict] = []
    try:
        with torch.no_grad():
            sets = [case.make_inputs(device, k) for k in range(n_sets)]
    except Exception as e:  # noqa: BLE001 - recorded in every row of the case
        err = "inputs: " + _err_text(e)
        return [{**_row_base(case, im), "status": "error", "error": err} for im in case.impls]
    order = sorted(case.impls, key=lambda im: im.name != case.ref)   # reference first
    cpu_steps: dict[str, Callable[[int], Any]] = {}
    for impl in order:
        row = _row_base(case, impl)
        n = n_of[impl.name]
        row["n_sets"] = n
        if impl.note:
            row["note"] = impl.note
        rows[impl.name] = row
        if progress:
            progress(f"{case.group}:{case.key}:{impl.name}")
        if impl.skip:
            row.update(status="skipped", error=impl.skip)
            continue
        step = None
        try:
            with torch.set_grad_enabled(case.grad):
                step = impl.prepare(sets[:n], device)
                if getattr(step, "peak_mem_mb", None) is not None:   # measured by the case (CPU)
                    row["peak_mem_mb"] = step.peak_mem_mb
                out = step(0)
                sync(device)
                if case.ref is not None:
                    if impl.name == case.ref:
                        ref_out = out
                    elif ref_out is not None and impl.check:
                        row["rel_err_vs_ref"] = rel_err(out, ref_out)
                del out
                if not cuda:
                    cpu_steps[impl.name] = step
                    continue
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                o = step(0)
                torch.cuda.synchronize()
                row["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                del o
                timing = None
                if case.graph and impl.graph:
                    try:
                        timing = time_cuda_graph(step, n, budget)
                    except Exception as e:  # noqa: BLE001 - recorded, then timed eagerly
                        row["graph_error"] = _err_text(e)
                        torch.cuda.synchronize()
                if timing is None:
                    timing = time_cuda(step, n, budget)
            _timing_fields(row, timing)
            rates(impl, row)
        except Exception as e:  # noqa: BLE001 - recorded in the row, the sweep goes on
            _fail(row, e)
        finally:
            del step
            if cuda:
                _clean(device)
        if cuda and on_rows is not None:
            on_rows([rows[im.name] for im in case.impls if im.name in rows])
    if cpu_steps:
        try:
            with torch.set_grad_enabled(case.grad):
                timings = time_cpu_interleaved(cpu_steps, n_of, budget)
            for name, timing in timings.items():
                _timing_fields(rows[name], timing)
            for impl in case.impls:
                if impl.name in cpu_steps:
                    rates(impl, rows[impl.name])
        except Exception as e:  # noqa: BLE001 - recorded in the rows
            for name in cpu_steps:
                _fail(rows[name], e)
    del ref_out, sets, cpu_steps
    _clean(device)
    base_row = rows.get(case.baseline) if case.baseline else None
    for row in rows.values():
        if (base_row is not None and row.get("status") == "ok"
                and base_row.get("status") == "ok"):
            row["ratio_vs_baseline"] = row["time_ms"] / base_row["time_ms"]
    return [rows[im.name] for im in case.impls]


def run_cases(cases: list[Case], device: torch.device, peaks: Peaks, budget: Budget, *,
              show_progress: bool = True,
              on_case: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run every case; ``on_case(rows_so_far)`` after each case and, on CUDA, after each
    implementation (used to write partial results)."""
    total = sum(len(c.impls) for c in cases)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="impl", dynamic_ncols=True, leave=True)
    rows: list[dict] = []

    def progress(label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label[-60:], refresh=False)
            bar.update(1)

    try:
        for case in cases:
            part = None if on_case is None else (lambda case_rows: on_case(rows + case_rows))
            rows.extend(run_case(case, device, peaks, budget, progress, part))
            if on_case is not None:
                on_case(rows)
    finally:
        if bar is not None:
            bar.close()
    return rows
