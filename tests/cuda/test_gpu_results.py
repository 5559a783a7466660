"""After a GPU run: the decisions (lora_kernels.bench.decide) and ``check --apply``, which writes
lora_kernels/verified_gpu.json (read by lora_kernels._backend at import) — tested on FABRICATED
result files written here (tool input only: nothing in them ran, nothing is claimed verified).
Also the session script's refusal without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import torch

from lora_kernels import _backend, check
from lora_kernels.bench.cases import (
    HEAD_DECODE,
    HEAD_PREFILL,
    HEAD_TRAIN,
    decode_key,
    prefill_key,
    train_key,
)
from lora_kernels.bench.decide import decide, table

ROOT = Path(__file__).resolve().parents[2]


PLANNED = [
    "tests/test_lora.py::test_forward[triton-dtype2]",
    "tests/test_lora.py::test_forward[cuda-dtype2]",
    "tests/test_lora.py::test_backward[cuda-dtype1]",
    "tests/test_multi_lora.py::test_paths[triton-decode]",
    "tests/test_multi_lora.py::test_paths[cuda-None]",
    "tests/test_glora.py::test_fwd[triton-dtype0]",
    "tests/cuda/test_cuda_build.py::test_multi_lora_vs_float64[cuda-decode-s0]",
    "tests/test_variants.py::test_nora_grad[triton]",
]


def _line(test, outcome, when="call", step="correctness"):
    return {"step": step, "test": test, "when": when, "outcome": outcome, "time_s": 0.1,
            "message": None}


def _fake_results() -> list[dict]:
    """tests.jsonl of a FABRICATED session: the correctness step's plan, then results."""
    return [{"step": "correctness", "planned": PLANNED},
            _line(PLANNED[0], "passed"),
            _line(PLANNED[1], "passed"),
            _line(PLANNED[2], "failed"),                                  # blocks cuda lora
            _line(PLANNED[3], "passed"),
            _line(PLANNED[4], "passed"),
            _line(PLANNED[5], "passed"),
            _line("tests/test_glora.py::test_fwd[torch-dtype0]", "error", "setup",
                  step="suite"),                                          # blocks every glora
            _line(PLANNED[6], "passed"),
            _line(PLANNED[7], "skipped", "setup")]                        # not a pass


def _write(folder: Path, lines: list[dict], torn: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(x) + "\n" for x in lines)
    (folder / "tests.jsonl").write_text(text + ('{"step": "corr' if torn else ""))


def _row(group, case, impl, ms, **kw):
    return {"group": group, "case": case, "impl": impl, "status": "ok", "time_ms": ms, **kw}


def _fake_bench() -> dict:
    tr, de, pr = train_key(*HEAD_TRAIN), decode_key(*HEAD_DECODE), prefill_key(*HEAD_PREFILL)
    return {"device": "FAKE", "rows": [
        _row("train", tr, "base_pair", 1.0),
        _row("train", tr, "ours_triton", 1.30, rel_err_vs_ref=3e-3),
        _row("train", tr, "ours_triton_tma", 1.02, rel_err_vs_ref=0.5),   # wrong: never wins
        _row("train", tr, "ours_cuda", 1.10, rel_err_vs_ref=3e-3),
        _row("decode", de, "ours_triton_adapters", 0.010, frac_peak_bw=0.7),
        _row("decode", de, "ours_cuda_adapters", 0.008, frac_peak_bw=0.85),
        _row("prefill", pr, "base", 0.20),
        _row("prefill", pr, "ours_triton", 0.24),
        _row("prefill", pr, "ours_triton_fused", 0.21),
        {"group": "prefill", "case": pr, "impl": "ours_cuda", "status": "error", "error": "x"},
    ]}


def test_decide_picks_the_fastest_correct_candidate():
    dec = decide(_fake_bench())
    tr, de, pr = (dec["points"][k] for k in ("train", "decode", "prefill"))
    assert tr["winner"] == "ours_cuda" and abs(tr["value"] - 1.10) < 1e-9 and not tr["met"]
    assert tr["candidates"]["ours_triton_tma"]["status"] == "wrong_result"
    assert de["winner"] == "ours_cuda_adapters" and de["met"]
    assert pr["winner"] == "ours_triton_fused" and pr["choice"]["path"] == "prefill_fused"
    assert pr["met"] and pr["candidates"]["ours_cuda"]["status"] == "error"
    assert "ours_cuda" in table(dec)


def test_apply_results_writes_exactly_the_passed_pairs(tmp_path):
    res = tmp_path / "results"
    _write(res, _fake_results(), torn=True)  # a kill mid-write leaves a torn last line
    (res / "decisions.json").write_text(json.dumps(decide(_fake_bench())))
    target = tmp_path / "verified_gpu.json"
    pairs, defaults = check.apply_results(res, target)
    want = {("triton", "lora_linear"), ("triton", "multi_lora_linear"),
            ("cuda", "multi_lora_linear")}
    assert pairs == want
    status = check.pair_status(*check.read_results(res / "tests.jsonl"))
    assert status[("cuda", "lora_linear")].startswith("failed")
    assert status[("triton", "glora_linear")].startswith("error")
    assert "skipped" in status[("triton", "nora_linear")]
    # train winner cuda is not verified for lora_linear -> no default; decode -> cuda; prefill
    assert defaults == {"multi_lora_linear": "cuda", "multi_lora_prefill_path": "prefill_fused"}
    doc = json.loads(target.read_text())
    assert {tuple(p) for p in doc["verified"]} == want and doc["defaults"] == defaults
    assert _backend.VERIFIED_ON_GPU == frozenset()  # the package's own file is untouched
    # the written file steers resolve_backend when _backend reads it
    spec = importlib.util.spec_from_file_location("fake_backend", target.with_name("_backend.py"))
    target.with_name("_backend.py").write_text(Path(_backend.__file__).read_text())
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.VERIFIED_ON_GPU == frozenset(want) and mod.MEASURED_DEFAULTS == defaults
    mod.cuda_available = lambda: True
    assert mod.resolve_backend(None, torch.device("cuda"), "multi_lora_linear") == "cuda"
    mod.MEASURED_DEFAULTS = {"multi_lora_linear": "triton"}
    assert mod.resolve_backend(None, torch.device("cuda"), "multi_lora_linear") == "triton"
    assert mod.resolve_backend(None, torch.device("cuda"), "glora_linear") == "torch"


def test_partial_results_verify_exactly_the_finished_pairs(tmp_path):
    """A step cut after some tests: the pairs whose planned tests all ran and passed are
    verified, the others are not, whatever was cut."""
    lines = _fake_results()
    cut = [ln for ln in lines if ln.get("test") != PLANNED[3]]  # triton multi-LoRA never ran
    _write(tmp_path, cut)
    planned, results = check.read_results(tmp_path / "tests.jsonl")
    assert check.verified_pairs(planned, results) == {("triton", "lora_linear"),
                                                      ("cuda", "multi_lora_linear")}
    status = check.pair_status(planned, results)
    assert status[("triton", "multi_lora_linear")] == "1 of 1 planned tests did not run"
    # a later plan of the same step (a rerun plans only what is left) does not shrink the first
    with open(tmp_path / "tests.jsonl", "a") as fh:
        fh.write(json.dumps({"step": "correctness", "planned": [PLANNED[3]]}) + "\n")
    assert check.read_results(tmp_path / "tests.jsonl")[0]["correctness"] == PLANNED


def test_gpu_session_script_refuses_without_gpu(tmp_path):
    r = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_session.sh")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if torch.cuda.is_available():
        return
    env = {"PATH": "/usr/bin:/bin", "LORA_KERNELS_GPU_RESULTS": str(tmp_path / "r"),
           "PY": __import__("sys").executable}
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and "no usable CUDA device" in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()
