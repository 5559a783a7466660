"""After a GPU run: the decisions (lora_kernels.bench.decide) and ``check --apply``, which writes
VERIFIED_ON_GPU / MEASURED_DEFAULTS into lora_kernels/_backend.py — tested on FABRICATED result
files written here (tool input only: nothing in them ran, nothing is claimed verified). Also the
session script's refusal without a GPU.
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


def _t(test, outcome):
    return {"test": test, "outcome": outcome, "time_s": 0.1, "message": None}


def _fake_check() -> dict:
    return {"device": "FAKE (fabricated for a unit test)", "ok": False, "passes": [{
        "label": "default", "tests": [
            _t("tests.test_lora::test_forward[triton-dtype2]", "passed"),
            _t("tests.test_lora::test_forward[cuda-dtype2]", "passed"),
            _t("tests.test_lora::test_backward[cuda-dtype1]", "failed"),   # blocks cuda
            _t("tests.test_multi_lora::test_paths[triton-decode]", "passed"),
            _t("tests.test_multi_lora::test_paths[cuda-None]", "passed"),
            _t("tests.test_glora::test_fwd[triton-dtype0]", "passed"),
            _t("tests.test_glora::test_fwd[torch-dtype0]", "error"),       # blocks every one
            _t("tests.cuda.test_cuda_build::test_multi_lora_vs_float64[cuda-decode-s0]",
               "passed"),
            _t("tests.test_variants::test_nora_grad[triton]", "skipped"),  # not a pass
        ]}]}


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
    res.mkdir()
    (res / "check-fake.json").write_text(json.dumps(_fake_check()))
    (res / "decisions.json").write_text(json.dumps(decide(_fake_bench())))
    target = tmp_path / "_backend.py"
    target.write_text(Path(_backend.__file__).read_text())
    pairs, defaults = check.apply_results(res, target)
    want = {("triton", "lora_linear"), ("triton", "multi_lora_linear"),
            ("cuda", "multi_lora_linear")}
    assert pairs == want
    # train winner cuda is not verified for lora_linear -> no default; decode -> cuda; prefill
    assert defaults == {"multi_lora_linear": "cuda", "multi_lora_prefill_path": "prefill_fused"}
    spec = importlib.util.spec_from_file_location("fake_backend", target)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.VERIFIED_ON_GPU == frozenset(want)
    assert mod.MEASURED_DEFAULTS == defaults
    assert _backend.VERIFIED_ON_GPU == frozenset()  # the package's own file is untouched
    # the written defaults steer resolve_backend: both verified, MEASURED says cuda first
    mod.cuda_available = lambda: True
    assert mod.resolve_backend(None, torch.device("cuda"), "multi_lora_linear") == "cuda"
    mod.MEASURED_DEFAULTS = {"multi_lora_linear": "triton"}
    assert mod.resolve_backend(None, torch.device("cuda"), "multi_lora_linear") == "triton"
    assert mod.resolve_backend(None, torch.device("cuda"), "glora_linear") == "torch"


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


def test_interrupted_pass_verifies_nothing():
    doc = _fake_check()
    doc["passes"][0]["interrupted"] = True
    assert check.verified_pairs([doc]) == frozenset()
