"""Which candidate wins at each headline point, from one GPU benchmark file.

``python -m lora_kernels.bench.decide BENCH_JSON [--out decisions.json]`` reads a
``python -m lora_kernels.bench --quick`` result (rows of one run, so ratios compare like with
like) and writes, per DESIGN.md headline point, the candidates' median times, the winner, its
ratio against the point's baseline and whether the goal is met; then prints a compact table.

Candidates (rows of ``lora_kernels.bench.cases``):

* training fwd+bwd, T=8192, 4096x4096, r=16: ``ours_triton`` (Triton GEMMs with the fused
  low-rank epilogue), ``ours_triton_tma`` (the persistent TMA-descriptor candidate),
  ``ours_cuda`` (cuBLAS + our low-rank kernels); baseline ``base_pair``, goal <= 1.05x.
* decode, 64 tokens with 64 distinct adapters: ``ours_triton_adapters`` vs
  ``ours_cuda_adapters`` (the adapter part alone); goal >= 80 % of HBM bandwidth on the adapter
  bytes (``frac_peak_bw`` of the row: its bytes over the measured copy bandwidth).
* prefill, 4 adapters x 1024 tokens: ``ours_triton`` (cuBLAS + sgmv), ``ours_triton_fused``
  (``path="prefill_fused"``), ``ours_cuda``; baseline ``base``, goal <= 1.10x.

A row counts only with ``status == "ok"`` and, where the harness compared it with the reference,
``rel_err_vs_ref <= 2e-2`` (bf16 tolerance with margin): a fast wrong kernel never wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cases import HEAD_DECODE, HEAD_PREFILL, HEAD_TRAIN, decode_key, prefill_key, train_key

# winner row name -> (backend=..., path=...) it stands for
IMPL_CHOICE = {
    "ours_triton": {"backend": "triton"}, "ours_cuda": {"backend": "cuda"},
    "ours_triton_tma": {"backend": "triton", "candidate": "tma"},
    "ours_triton_fused": {"backend": "triton", "path": "prefill_fused"},
    "ours_triton_adapters": {"backend": "triton"}, "ours_cuda_adapters": {"backend": "cuda"},
}
POINTS = {
    "train": dict(group="train", case=train_key(*HEAD_TRAIN),
                  candidates=["ours_triton", "ours_triton_tma", "ours_cuda"],
                  baseline="base_pair", goal=("ratio_max", 1.05), op="lora_linear"),
    "decode": dict(group="decode", case=decode_key(*HEAD_DECODE),
                   candidates=["ours_triton_adapters", "ours_cuda_adapters"], baseline=None,
                   goal=("bw_min", 0.80), op="multi_lora_linear"),
    "prefill": dict(group="prefill", case=prefill_key(*HEAD_PREFILL),
                    candidates=["ours_triton", "ours_triton_fused", "ours_cuda"],
                    baseline="base", goal=("ratio_max", 1.10), op="multi_lora_prefill"),
}


def _usable(row: dict) -> bool:
    err = row.get("rel_err_vs_ref")
    return row.get("status") == "ok" and (err is None or err <= 2e-2)


def _rows_of(doc: dict, spec: dict) -> list[dict]:
    out = []
    for r in doc.get("rows", []):
        if r.get("group") != spec["group"]:
            continue
        if r.get("case") != spec["case"]:
            continue
        out.append(r)
    return out


def decide(doc: dict) -> dict:
    """The decisions document for one benchmark result (see module doc)."""
    out = {"device": doc.get("device"), "date": doc.get("date"),
           "versions": doc.get("versions"), "points": {}}
    for name, spec in POINTS.items():
        rows = {r["impl"]: r for r in _rows_of(doc, spec)}
        cands = {}
        for c in spec["candidates"]:
            r = rows.get(c)
            if r is None:
                cands[c] = {"status": "missing"}
            elif not _usable(r):
                st = r.get("status")
                cands[c] = {"status": "wrong_result" if st == "ok" else st, "error": r.get("error"),
                            "rel_err_vs_ref": r.get("rel_err_vs_ref")}
            else:
                cands[c] = {"status": "ok", "time_ms": r["time_ms"],
                            "frac_peak_bw": r.get("frac_peak_bw"), "spread": r.get("spread")}
        ok = {c: v for c, v in cands.items() if v["status"] == "ok"}
        point = {"case": next(iter(rows.values()))["case"] if rows else None,
                 "candidates": cands, "winner": None, "op": spec["op"]}
        base = rows.get(spec["baseline"]) if spec["baseline"] else None
        if base is not None and base.get("status") == "ok":
            point["baseline"] = {"impl": spec["baseline"], "time_ms": base["time_ms"]}
        if ok:
            win = min(ok, key=lambda c: ok[c]["time_ms"])
            point["winner"] = win
            point["choice"] = IMPL_CHOICE.get(win, {})
            kind, goal = spec["goal"]
            if kind == "ratio_max" and "baseline" in point:
                ratio = ok[win]["time_ms"] / point["baseline"]["time_ms"]
                point.update(value=ratio, goal=f"<= {goal}x {spec['baseline']}",
                             met=ratio <= goal)
            elif kind == "bw_min" and ok[win].get("frac_peak_bw") is not None:
                bw = ok[win]["frac_peak_bw"]
                point.update(value=bw, goal=f">= {goal:.0%} of HBM on adapter bytes",
                             met=bw >= goal)
            times = sorted(v["time_ms"] for v in ok.values())
            point["margin"] = times[1] / times[0] if len(times) > 1 else None
        out["points"][name] = point
    return out


def table(dec: dict) -> str:
    lines = ["point    winner                 value    goal                          met  "
             "candidates (ms)"]
    for name, p in dec["points"].items():
        cands = ", ".join(f"{c} {v['time_ms']:.3f}" if v["status"] == "ok" else f"{c} {v['status']}"
                          for c, v in p["candidates"].items())
        val = p.get("value")
        vs = "-" if val is None else (f"{val:.2f}x" if "x" in p.get("goal", "") else f"{val:.0%}")
        lines.append(f"{name:<8} {str(p['winner']):<22} {vs:<8} {p.get('goal', '-'):<29} "
                     f"{str(p.get('met', '-')):<4} {cands}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_kernels.bench.decide", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json")
    ap.add_argument("--out", help="decisions JSON (default: decisions.json beside the input)")
    a = ap.parse_args(argv)
    src = Path(a.bench_json)
    dec = decide(json.loads(src.read_text()))
    out = Path(a.out) if a.out else src.parent / "decisions.json"
    out.write_text(json.dumps(dec, indent=1))
    print(f"decisions: {out}")
    print(table(dec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
