"""pytest plugin of the GPU session (``-p lora_kernels.bench.pytest_plugin``), driven by two
environment variables; with neither set it does nothing.

``LORA_KERNELS_RESULTS_JSONL=PATH`` (the GPU session's steps): one JSON line per finished test
phase is appended to PATH and flushed at once (``{"test", "when", "outcome", "time_s",
"message"}``), written by the controlling process only (xdist workers report to it), so a step
killed at any moment leaves every result it had. ``python -m lora_kernels.check`` reads it.

``LORA_KERNELS_RECORD_LAUNCHES=DIR`` (the session plan, on CPU under ``TRITON_INTERPRET=1``):
every Triton kernel launch (``InterpretedFunction.run``) is recorded with the test that made it,
as the GPU would specialise it (:func:`launch_record`), into ``DIR/launches-<worker>.jsonl``;
the kernel still runs in the interpreter, so each test runs to its end as in CI and every launch
it makes on the way is seen.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

# constexprs that the launchers choose differently under the interpreter (tiles: interpreter
# tiles vs the GPU's fixed tiles / autotune candidates; UPCAST: an interpreter workaround, off
# on a GPU): left out of a recorded launch's compile key, the GPU's tile choice is counted per
# key instead (lora_kernels.bench.session_plan)
TILE_CONSTEXPRS = frozenset({"BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_T", "GROUP_M", "UPCAST"})

_STATE: dict = {"test": None, "out": None, "autotuners": None}


def spec_class(v):
    """What Triton's specialiser distinguishes in an argument encoded by
    :func:`lora_kernels.bench.static.encode` (see ``static.jit_specialization``): pointers by
    dtype and 16-byte alignment, integers as 1 / multiple of 16 / other (and width), floats and
    bools by type. Two launches with equal classes compile to the same kernel."""
    if isinstance(v, dict) and "tensor" in v:
        return ["*" + v["tensor"], v["align16"]]
    if isinstance(v, dict) and "float" in v:
        return "fp32"
    if isinstance(v, dict) and "tdesc" in v:
        return ["tdesc", v["tdesc"], v["block"]]
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v if not isinstance(v, bool) else "u1"
    if isinstance(v, int):
        return 1 if v == 1 else ["i32" if -(2**31) <= v < 2**31 else "i64", v % 16 == 0]
    return v


def _constexpr_names(fn) -> frozenset[str]:
    import inspect

    out = set()
    for p in inspect.signature(fn).parameters.values():
        ann = p.annotation
        if ann is not inspect.Parameter.empty and "constexpr" in (
                ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))):
            out.add(p.name)
    return frozenset(out)


def _autotuners() -> dict[int, object]:
    """id(plain kernel) -> the Autotuner wrapping it, over the loaded lora_kernels modules."""
    import sys

    from triton.runtime.autotuner import Autotuner

    found = {}
    for name, mod in list(sys.modules.items()):
        if not name.startswith("lora_kernels.") or mod is None:
            continue
        for v in list(vars(mod).values()):
            if isinstance(v, Autotuner):
                found[id(v.fn)] = v
    return found


def launch_record(kernel, args: tuple, kwargs: dict) -> dict:
    """A launch of ``kernel`` (an ``InterpretedFunction``) as the GPU compiles it: its compile key
    (module, name, Triton's specialisation class of every runtime argument — pointer dtype and
    16-byte alignment, integer 1 / multiple of 16 / other — and its constexprs without
    :data:`TILE_CONSTEXPRS`), and, when an autotuner wraps the kernel, the autotune key and the
    candidates its ``early_config_prune`` keeps at these arguments."""
    from .static import encode

    fn = kernel.fn
    names = kernel.arg_names
    const = _constexpr_names(fn)
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    spec = {n: spec_class(encode(bound.get(n))) for n in names if n not in const}
    consts = {n: (bound.get(n) if isinstance(bound.get(n), (int, float, str, bool, type(None)))
                  else repr(bound.get(n)))
              for n in names if n in const and n not in TILE_CONSTEXPRS}
    rec = {"module": fn.__module__, "name": fn.__name__, "spec": spec, "const": consts,
           "tuned": None}
    if _STATE["autotuners"] is None:
        _STATE["autotuners"] = _autotuners()
    tuner = _STATE["autotuners"].get(id(kernel))
    if tuner is not None:
        configs = tuner.configs
        if tuner.early_config_prune:
            named = {k: v for k, v in bound.items()}
            extra = {k: v for k, v in kwargs.items() if k not in names}
            configs = tuner.early_config_prune(configs, named, **{**consts, **extra})
        rec["tuned"] = {
            "key": [bound.get(k) if not hasattr(bound.get(k), "dtype") else str(bound[k].dtype)
                    for k in tuner.keys],
            "configs": [[sorted(c.kwargs.items()), c.num_warps, c.num_stages] for c in configs]}
    return rec


def install_recorder(out_dir: Path, worker: str) -> None:
    """Record every launch from now on into ``out_dir/launches-<worker>.jsonl`` (see module doc)."""
    from triton.runtime.interpreter import InterpretedFunction

    out_dir.mkdir(parents=True, exist_ok=True)
    fh = open(out_dir / f"launches-{worker}.jsonl", "a", buffering=1)  # noqa: SIM115
    _STATE["out"] = fh
    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            rec = launch_record(self, args, kwargs)
            rec["test"] = _STATE["test"]
            fh.write(json.dumps(rec, default=str) + "\n")
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run

    import torch

    def compile_(model=None, **kw):
        # Inductor on the GPU: counted by the plan as a fixed cost; here the model runs eagerly
        # (the same registered ops, so the same Triton launches, without a CPU Inductor build)
        fh.write(json.dumps({"test": _STATE["test"], "torch_compile": 1}) + "\n")
        if model is None:
            return lambda m: m
        return model

    torch.compile = compile_


def pytest_configure(config):
    # an xdist worker reports to the controller, which writes (the environment variable
    # PYTEST_XDIST_WORKER would also be inherited by a pytest started from inside a worker)
    _STATE["worker"] = hasattr(config, "workerinput")
    rec = os.environ.get("LORA_KERNELS_RECORD_LAUNCHES")
    if rec:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError("LORA_KERNELS_RECORD_LAUNCHES needs TRITON_INTERPRET=1")
        worker = getattr(config, "workerinput", {}).get("workerid", "main")
        install_recorder(Path(rec), worker)


def pytest_collection_modifyitems(config, items):
    """``LORA_KERNELS_SELECT=FILE``: run only the test ids listed in FILE (one per line; the
    session's step selections and the rerun's "not yet run"), in collection order."""
    path = os.environ.get("LORA_KERNELS_SELECT")
    if not path:
        return
    want = {ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()}
    keep = [i for i in items if i.nodeid in want]
    drop = [i for i in items if i.nodeid not in want]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def _write_plan(ids: list[str]) -> None:
    """The step's planned ids, before any result (``check.read_results``: the first plan of a
    step counts, so the session's own, written ahead by ``session_plan --select``, wins)."""
    path = os.environ.get("LORA_KERNELS_RESULTS_JSONL")
    if not path or _STATE.get("worker") or _STATE.get("planned"):
        return
    _STATE["planned"] = True
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": os.environ.get("LORA_KERNELS_STEP"),
                             "planned": list(ids)}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def pytest_collection_finish(session):
    _write_plan([i.nodeid for i in session.items])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    _write_plan(ids)


def pytest_runtest_setup(item):
    _STATE["test"] = item.nodeid


def pytest_runtest_logreport(report):
    path = os.environ.get("LORA_KERNELS_RESULTS_JSONL")
    if not path or report.when == "teardown" and report.passed:
        return
    if _STATE.get("worker"):
        return  # the controller writes (it receives every worker's reports)
    if report.when == "setup" and report.passed:
        return
    outcome = report.outcome
    if report.when != "call" and report.failed:
        outcome = "error"
    msg = None
    if report.failed:
        msg = str(report.longrepr)[-800:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        msg = str(report.longrepr[2])[:300]
    line = {"step": os.environ.get("LORA_KERNELS_STEP"), "test": report.nodeid,
            "when": report.when, "outcome": outcome,
            "time_s": round(report.duration, 3), "message": msg, "at": round(time.time(), 1)}
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")
        fh.flush()
        os.fsync(fh.fileno())



def pytest_collection(session):
    """``LORA_KERNELS_PLAN_FAKE_CUDA=1`` (the session plan's collection, on CPU): the suite's
    ``backends()`` (tests/conftest.py) also lists ``cuda``, so the ids are those the GPU machine
    collects (its ``[cuda]`` parametrisations included) while every tensor stays on the CPU."""
    if os.environ.get("LORA_KERNELS_PLAN_FAKE_CUDA") != "1":
        return
    import sys

    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None) or ""
        if f.endswith(os.path.join("tests", "conftest.py")) and hasattr(mod, "backends"):
            real = mod.backends

            def with_cuda(real=real):
                out = list(real())
                return out if "cuda" in out else out + ["cuda"]

            mod.backends = with_cuda
