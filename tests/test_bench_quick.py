"""The benchmark harness end to end on tiny CPU cases: JSON schema, headline keys, README table.

No timed assertions: speed is shown by ratios in the benchmark's own output, never asserted here.
"""

import json

import torch

from lora_kernels.bench import cases as C
from lora_kernels.bench import report
from lora_kernels.bench.harness import Budget, Peaks, device_info, run_cases, slug

CPU = torch.device("cpu")
TINY = Budget(warmup_ms=0.0, rep_ms=1.0, min_reps=2, max_reps=3)


def _run(tmp_path):
    cases = [C.train_case(8, 32, 24, 4, torch.float32, CPU, group="layer"),
             C.train_case(8, 32, 24, 4, torch.float32, CPU, compile_skip="not in this test"),
             C.decode_case(4, 32, 24, 4, 4, "distinct", torch.float32, CPU),
             C.prefill_case(2, 3, 32, 24, 4, torch.float32, CPU)]
    peaks = Peaks(CPU, quick=True)
    rows = run_cases(cases, CPU, peaks, TINY, show_progress=False)
    info = device_info(CPU)
    doc = report.results_doc(info, peaks, rows, quick=True, only=None, complete=True, wall_s=0.0)
    path = tmp_path / f"{info['slug']}.json"
    path.write_text(json.dumps(doc, default=str))
    return json.loads(path.read_text()), path, rows


def test_schema_headline_and_readme(tmp_path):
    doc, path, rows = _run(tmp_path)
    for k in report.RESULT_KEYS:
        assert k in doc, k
    assert doc["device"] and doc["versions"]["torch"] == torch.__version__
    assert doc["peaks"]["bandwidth_GBps"] > 0 and doc["peaks"]["matmul_TFLOPs"]["fp32"] > 0
    # exactly the DESIGN.md headline keys; the GPU headline point is not in a CPU run:
    # null + reason
    assert tuple(doc["headline"]) == report.HEADLINE_KEYS
    assert report.HEADLINE_KEYS[:5] == (
        "lora_train_overhead_vs_base", "lora_train_speedup_vs_peft", "decode_hbm_bandwidth_util",
        "decode_speedup_vs_peft_loop", "prefill_overhead_vs_base")
    assert "decode_overhead_at_90pct_hits" in report.HEADLINE_KEYS
    for k in report.HEADLINE_KEYS:
        assert doc["headline"][k] is None and doc["headline_detail"][k]["reason"]
    assert {r["group"] for r in doc["rows"]} == {"layer", "train", "decode", "prefill"}
    for r in doc["rows"]:
        for k in report.ROW_KEYS:
            assert k in r, (k, r)
        assert r["status"] in ("ok", "error", "skipped")
        if r["status"] == "ok":
            for k in report.ROW_OK_KEYS:
                assert r[k] is not None, (k, r)
            assert r["time_ms"] > 0 and r["floor_ms"] > 0 and r["x_floor"] > 0
        else:
            assert r["error"]
    by = {(r["group"], r["impl"]): r for r in doc["rows"]}
    # baselines that need nothing beyond torch + peft always run, and agree with the reference
    for key in [("layer", "ours_default"), ("layer", "peft"), ("layer", "eager"),
                ("train", "ours_default"), ("train", "base_pair"), ("decode", "gather_bmm"),
                ("decode", "peft_loop"), ("decode", "base"), ("prefill", "segment_loop"),
                ("prefill", "peft_loop"), ("prefill", "base")]:
        assert by[key]["status"] == "ok", by[key]
    for key in [("layer", "ours_default"), ("layer", "peft"), ("decode", "peft_loop"),
                ("prefill", "peft_loop")]:
        assert by[key]["rel_err_vs_ref"] < 1e-5, by[key]
    # ours: correct wherever it ran (serving pieces may land after this harness)
    for key in [("decode", "ours_default"), ("prefill", "ours_default")]:
        if by[key]["status"] == "ok":
            assert by[key]["rel_err_vs_ref"] < 1e-5, by[key]
    # the adapter part of the decode alone: its own (smaller) work counts, at least as many
    # rotated input sets as the case's other rows
    ad = by[("decode", "ours_default_adapters")]
    if ad["status"] == "ok":
        assert ad["bytes"] < by[("decode", "base")]["bytes"] + ad["adapter_bytes"]
        assert ad["n_sets"] >= by[("decode", "gather_bmm")]["n_sets"]
    assert by[("train", "compile")]["status"] == "skipped"
    assert by[("layer", "peft")]["ratio_vs_baseline"] == 1.0
    cc = doc["cpu_checks"]["lora_layer_fwd_bwd_vs_peft"]
    assert list(cc) == [C.train_key(8, 32, 24, 4, torch.float32)]
    assert cc[list(cc)[0]]["ours_over_peft"] > 0
    md = report.readme_table(path)
    assert "| headline | value | goal | met |" in md and "lora_train_overhead_vs_base" in md
    assert "**decode**" in md
    print(report.format_table(rows))


def test_headline_from_rows():
    """Headline math on synthetic rows at the DESIGN.md points (no timing involved)."""
    tk, dk, pk = (C.train_key(*C.HEAD_TRAIN), C.decode_key(*C.HEAD_DECODE),
                  C.prefill_key(*C.HEAD_PREFILL))
    ok = dict(status="ok")
    rows = [dict(group="train", case=tk, impl="base_pair", time_ms=1.0, **ok),
            dict(group="train", case=tk, impl="ours_triton", time_ms=1.1, **ok),
            dict(group="train", case=tk, impl="peft", time_ms=2.2, **ok),
            dict(group="decode", case=dk, impl="ours_triton", time_ms=0.02, frac_peak_bw=0.85,
                 adapter_bytes=1e6, peak_bw_GBps=1000.0, **ok),
            dict(group="decode", case=dk, impl="ours_triton_adapters", time_ms=0.001,
                 adapter_bytes=1e6, peak_bw_GBps=1000.0, **ok),
            dict(group="decode", case=dk, impl="peft_loop", time_ms=1.0, **ok),
            dict(group="decode", case=dk, impl="base", time_ms=0.01, **ok),
            dict(group="prefill", case=pk, impl="ours_triton", status="error", error="boom"),
            dict(group="prefill", case=pk, impl="base", time_ms=1.0, **ok)]
    values, detail = report.headline(rows)
    assert abs(values["lora_train_overhead_vs_base"] - 1.1) < 1e-12
    assert detail["lora_train_overhead_vs_base"]["met"] is False
    assert abs(values["lora_train_speedup_vs_peft"] - 2.0) < 1e-12
    assert detail["lora_train_speedup_vs_peft"]["met"] is True
    # adapter bytes / time of the adapter part alone / bandwidth: 1e6 B / 1 us / 1e12 B/s
    assert abs(values["decode_hbm_bandwidth_util"] - 1.0) < 1e-9
    assert detail["decode_hbm_bandwidth_util"]["met"] is True
    assert detail["decode_hbm_bandwidth_util"]["fused_frac_peak_bw"] == 0.85
    assert abs(detail["decode_hbm_bandwidth_util"]["adapter_increment_util"] - 0.1) < 1e-9
    assert abs(values["decode_speedup_vs_peft_loop"] - 50.0) < 1e-9
    assert values["prefill_overhead_vs_base"] is None
    assert "boom" in detail["prefill_overhead_vs_base"]["reason"]


def test_slug():
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_check_refuses_without_gpu(tmp_path, capsys):
    from lora_kernels import check

    if not torch.cuda.is_available():
        assert check.main(["--gpu", "--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
