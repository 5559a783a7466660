"""The GPU session's counted plan (``bash bench/gpu_session.sh --plan``, issue 19) and the pieces it
rests on: the test-step split, the xdist schedule it simulates, the fixed-tiles switch
(``LORA_KERNELS_AUTOTUNE=0``) and the warm-up compile through Triton's own JIT (on CPU with a
stand-in driver: the cubin lands in Triton's cache, nothing runs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lora_kernels.bench import session_plan as SP
from lora_kernels.ops import _triton as TR

ROOT = Path(__file__).resolve().parents[1]

OVER_BUDGET_HELP = """
The GPU session no longer fits its 15 minutes (bash bench/gpu_session.sh --plan, output above).
Something you added (a Triton kernel, a test or parametrisation that launches one, a benchmark
row) costs more device time than the session has. Each distinct Triton compile costs ~5 s on the
GPU host's CPU: every new pointer dtype, integer class (== 1, multiple of 16, other) and
constexpr value a test launches a kernel with is one more compile. What to do:
  1. Read the step lines: 'distinct compiles' and 'longest test' say where the time goes
     (python -m lora_kernels.bench.session_plan --json plan.json ... has the counts).
  2. Cut Triton specialisations your tests create: parametrise the kernel-level tests over the
     cases that change the compiled code, and keep the rest of the sweep on the torch backend.
  3. A new autotuned kernel: launch it through lora_kernels.ops._triton.tuned (and give it a
     FIXED_TILES entry), so the correctness steps compile one config per specialisation.
  4. Slow integration tests (torch.compile / opcheck) belong in the suite step: their names
     contain 'compile' or 'opcheck'.
  5. Only when the work is worth the device time: move seconds between steps with LIMIT_* in
     bench/gpu_session.sh (their sum stays <= 540 s, each step's estimate <= 80 % of its limit).
"""


@pytest.mark.timeout(1500)  # the recording runs ~230 Triton tests under the interpreter
def test_plan_fits_the_session():
    """The plan, counted on CPU, fits: step limits <= 540 s in all, each step's estimate <= 80 %
    of its limit, build + correctness < 4 minutes; the last line has the promised form."""
    env = dict(os.environ, PY=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), "--plan"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert lines, out
    m = re.fullmatch(r"planned: (\d+) s estimated, (\d+) s at the step limits, of 600 s",
                     lines[-1])
    assert m, f"last line not in the promised form:\n{out}"
    E, L = int(m.group(1)), int(m.group(2))
    steps = [re.match(r"\d\. (\w+)\s+(\d+)s\s+(\d+)s", ln) for ln in lines]
    steps = [(s.group(1), int(s.group(2)), int(s.group(3))) for s in steps if s]
    assert [s[0] for s in steps] == list(SP.STEP_NAMES), out
    assert sum(s[2] for s in steps) == L and abs(sum(s[1] for s in steps) - E) <= len(steps)
    over = [s for s in steps if s[1] > SP.SHARE * s[2]]
    first = sum(s[1] for s in steps if s[0] in ("build", "correctness"))
    ok = r.returncode == 0 and L <= 540 and not over and first < 240
    assert ok, f"{out}\n{OVER_BUDGET_HELP}"


def test_select_splits_pairs_from_the_rest():
    ids = ["tests/test_lora.py::test_fwd[triton-bf16]",
           "tests/test_lora.py::test_fwd[cuda-bf16]",
           "tests/test_lora.py::test_fwd[torch-bf16]",
           "tests/test_lora.py::test_compile_fullgraph[triton]",
           "tests/test_library.py::test_opcheck_lora[0.2-triton]",
           "tests/test_summation.py::test_x",
           "tests/distributed/test_distributed.py::test_gloo[triton]",
           "tests/cuda/test_triton_aot.py::test_all_kernels_compile_for_sm80_sm90"]
    s = SP.select(ids)
    assert s["correctness"] == ids[:2]
    assert s["suite"] == [ids[2], ids[3], ids[4], ids[5]]


def test_simulated_schedule_compiles_each_key_once_when_it_can():
    costs = SP.Costs(compile_s={"k": 5.0}, per_test_s=1.0)
    key = SP.compile_key({"module": "m", "name": "k", "spec": {}, "const": {}})
    other = SP.compile_key({"module": "m", "name": "k", "spec": {"x": 1}, "const": {}})
    # one worker: the second test reads the cache
    wall, done = SP.simulate([("a", [key], 1.0), ("b", [key], 1.0)], costs, set(), 1)
    assert wall == 7.0 and done == {key}
    # two workers at once: both compile (Triton does not lock its cache), in parallel
    wall, _ = SP.simulate([("a", [key], 1.0), ("b", [key], 1.0)], costs, set(), 2)
    assert wall == 6.0
    # a key already cached by an earlier step costs nothing; distinct keys are serial in a test
    wall, done = SP.simulate([("a", [key, other], 1.0)], costs, {key}, 4)
    assert wall == 6.0 and done == {other}


def test_fixed_tiles_switch(monkeypatch):
    """LORA_KERNELS_AUTOTUNE=0: the plain kernel with its FIXED_TILES entry, which is one of its
    autotuner's own candidates; default: the autotuner."""
    from lora_kernels.kernels import glora, lora, quant

    for plain, tuner in ((lora.gemm_lowrank_kernel, lora.gemm_lowrank_autotuned),
                         (glora.glora_gemm_kernel, glora.glora_gemm_autotuned),
                         (quant.qgemm_lowrank_kernel, quant.qgemm_lowrank_autotuned)):
        monkeypatch.delenv("LORA_KERNELS_AUTOTUNE", raising=False)
        assert TR.tuned(plain, tuner) == (tuner, {})
        monkeypatch.setenv("LORA_KERNELS_AUTOTUNE", "0")
        kernel, cfg = TR.tuned(plain, tuner)
        assert kernel is plain
        cands = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                 for c in tuner.configs]
        assert cfg in cands, (plain.fn.__name__, cfg)


def test_fixed_tiles_reach_every_headline_launcher():
    """Under LORA_KERNELS_AUTOTUNE=0 no launch of the headline workloads (training, DoRA,
    QLoRA, GLoRA, multi-LoRA) goes through an autotuner: each compiles one config. (A process
    of its own: the GPU launch paths need TRITON_INTERPRET=0 before triton is imported.)"""
    code = """
import json, os
from lora_kernels.bench import static
out = {}
for flag in ("0", "1"):
    os.environ["LORA_KERNELS_AUTOTUNE"] = flag
    out[flag] = [ln["label"] for ln in static.headline_launches() if ln.get("configs")]
out["n"] = len(static.headline_launches())
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, TRITON_INTERPRET="0",
                                             PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["n"] > 10 and got["0"] == [], got["0"]
    assert got["1"], "autotuning on: the training GEMMs go through their autotuner"


def test_warm_up_compiles_through_the_jit_into_the_cache(tmp_path, monkeypatch):
    """Step 2's headline warm-up: one autotune candidate compiled by Triton's JIT (warmup=True)
    for sm_90 on CPU (a stand-in driver names the target), its cubin in TRITON_CACHE_DIR."""
    code = f"""
import os
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_CACHE_DIR"] = {str(tmp_path / "cache")!r}
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

class StandIn:
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)

driver.set_active(StandIn())
from lora_kernels.bench import session_plan as SP
launches = SP.headline_launches()
small = [ln for ln in launches if ln["name"] == "tn_kernel"][:1]
assert SP.warm(small, 0, 1) == 1
print("warmed")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0 and "warmed" in r.stdout, r.stdout + r.stderr
    assert list((tmp_path / "cache").glob("*/*.cubin")), "no cubin in the Triton cache"


@pytest.mark.parametrize("torn", [False, True])
def test_recorded_plan_lines_and_results_round_trip(tmp_path, torn):
    """The result plugin's lines (as check.read_results reads them) survive a torn last line."""
    from lora_kernels import check

    p = tmp_path / "tests.jsonl"
    lines = [{"step": "correctness", "planned": ["a::x", "a::y"]},
             {"step": "correctness", "test": "a::x", "when": "call", "outcome": "passed"},
             {"step": "correctness", "test": "a::x", "when": "teardown", "outcome": "error"}]
    p.write_text("".join(json.dumps(x) + "\n" for x in lines) + ('{"step": "co' if torn else ""))
    planned, results = check.read_results(p)
    assert planned == {"correctness": ["a::x", "a::y"]}
    assert results["a::x"]["outcome"] == "error" and "a::y" not in results


@pytest.mark.parametrize("workers", [0, 2])
def test_result_plugin_flushes_every_result_and_the_plan(tmp_path, workers):
    """The session's pytest plugin (lora_kernels.bench.pytest_plugin), in a real pytest run,
    with and without xdist: the plan line first, then one line per result as it finishes (the
    controller writes), LORA_KERNELS_SELECT keeps only the listed tests, a failed setup is an
    error."""
    from lora_kernels import check

    (tmp_path / "test_fake.py").write_text(
        "import pytest\n"
        "@pytest.fixture\ndef broken():\n    raise RuntimeError('setup')\n"
        "def test_pass(): pass\n"
        "def test_fail(): assert 0\n"
        "def test_skip(): pytest.skip('no')\n"
        "def test_setup(broken): pass\n"
        "def test_left_out(): pass\n")
    sel = tmp_path / "select.txt"
    ids = [f"test_fake.py::{n}" for n in ("test_pass", "test_fail", "test_skip", "test_setup")]
    sel.write_text("\n".join(ids) + "\n")
    out = tmp_path / "tests.jsonl"
    env = dict(os.environ, LORA_KERNELS_RESULTS_JSONL=str(out), LORA_KERNELS_SELECT=str(sel),
               LORA_KERNELS_STEP="correctness", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
           "lora_kernels.bench.pytest_plugin", "--rootdir", str(tmp_path), "-c", "/dev/null",
           str(tmp_path / "test_fake.py")] + (["-n", str(workers)] if workers else [])
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    planned, results = check.read_results(out)
    assert sorted(planned["correctness"]) == sorted(ids)
    assert {t: v["outcome"] for t, v in results.items()} == {
        ids[0]: "passed", ids[1]: "failed", ids[2]: "skipped", ids[3]: "error"}
    assert all(v["step"] == "correctness" for v in results.values())
    first = json.loads(out.read_text().splitlines()[0])
    assert "planned" in first
