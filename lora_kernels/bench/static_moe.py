"""Static profile of the MoE-LoRA Triton kernels (``kernels.moe``) at the Qwen3-30B-A3B-like GPU
point, with :mod:`lora_kernels.bench.static`'s recorder, specialiser and SASS reader (no GPU).

``python -m lora_kernels.bench.static_moe [--archs 90] [--out bench/results]`` writes
``static-moe-sm90.json``: one row per launch (forward shrink + grouped GEMM, backward G shrink,
dX grouped GEMM, dA / dB segmented reductions) of the gate_up (K=2048, N=1536) and down (K=768,
N=2048) expert GEMMs, E=128, top-8 over T=8192 tokens (M = 65,536 rows, uniform routing), r=16,
bf16, with registers, spills, shared memory, the matrix instruction and the widest global load.
Kept apart from ``static-sm*.json`` (the DESIGN.md headline profile). Compiled is not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from . import static as S

POINT = dict(T=8192, top_k=8, E=128, H=2048, I=768, r=16)


def moe_launches(dtype=torch.bfloat16) -> list[dict]:
    """Every Triton launch of the MoE point's two expert GEMMs, fwd + bwd (nothing runs)."""
    from ..ops import _triton as TR
    from ..ops import moe_lora as ML

    if TR.triton_interpret():
        raise RuntimeError("moe_launches needs TRITON_INTERPRET=0 (GPU launch paths)")
    T, k, E, H, inter, r = (POINT[n] for n in ("T", "top_k", "E", "H", "I", "r"))
    M = T * k
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).reshape(-1)
    plan = ML.expert_plan(ids, E)
    rt = ML.Routing(plan.order, plan.offsets)
    out, label = [], [None]

    def e(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt)

    with S.dry_run_launches(out, label), torch.no_grad():
        for name, K, N in (("gate_up", H, 2 * inter), ("down", inter, H)):
            x, w, A, B, dy = e(M, K), e(E, N, K), e(E, r, K), e(E, N, r), e(M, N)
            label[0] = f"moe {name} fwd M{M} E{E} {K}x{N} r{r}"
            _, s = ML.triton_fwd(x, w, None, A, B, rt, 2.0)
            label[0] = f"moe {name} bwd M{M} E{E} {K}x{N} r{r}"
            ML.triton_bwd(dy, ML.Saved(x, w, A, B, s, rt, 2.0),
                          ML.Needs(True, False, False, True, True))
    return out


def check_rows(rows: list[dict]) -> list[str]:
    """Problems: a grouped GEMM row (``moe_gemm_kernel``) on sm_90 without a tensor-core
    instruction or 16-byte global loads; any spill."""
    bad = []
    for r in rows:
        name = f"{r['arch']} {r['kernel']} ({r['launch']})"
        if r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{name}: spills ({r['spill_stores']} STL / {r['spill_loads']} LDL)")
        if r["kernel"] == "moe_gemm_kernel" and r["arch"] == "sm_90":
            if not (r["hgmma"] or r["hmma"]):
                bad.append(f"{name}: no tensor-core instruction (HGMMA/HMMA)")
            if r["global_load_bytes_max"] < 16:
                bad.append(f"{name}: widest global load {r['global_load_bytes_max']} B < 16 B")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_kernels.bench.static_moe",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="90")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0 (the GPU launch paths are recorded)")
    import triton

    launches = moe_launches()
    archs = tuple(int(a) for a in args.archs.split(","))
    rows = S.profile(launches, archs, log=lambda s: print(s, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = []
    for arch, rs in rows.items():
        doc = {"what": "static profile: the MoE-LoRA Triton kernels compiled as the JIT "
                       "specialises them at the Qwen3-30B-A3B-like point; SASS read with "
                       "cuobjdump; nothing was run",
               "triton": triton.__version__, "torch": torch.__version__, "arch": f"sm_{arch}",
               "point": POINT, "rows": rs}
        (out / f"static-moe-sm{arch}.json").write_text(json.dumps(doc, indent=1))
        print(S.summary_table(rs))
        problems += check_rows(rs)
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
