"""Benchmark group ``moe``: one MoE-LoRA expert GEMM (``moe_lora_linear``) fwd+bwd.

Inputs: ``T`` tokens routed top-``k`` among ``E`` experts (``M = T k`` rows, ids drawn uniformly,
every expert hit), ``x (M, K)``, frozen experts ``W (E, N, K)``, adapters ``A (E, r, K)``,
``B (E, N, r)``, ``dy (M, N)``; gradients to x, A, B.

Implementations (same inputs, same outputs and gradients):

``hf_loop_lora``   transformers 5's eager experts loop (``for e in hit experts: rows =
                   where(ids == e); out.index_add_(rows, x[rows] W_e^T)``) with an unfused LoRA
                   term per expert (``+ s (x A_e^T) B_e^T``): the reference of the case
``peft_dense``     PEFT's ``target_parameters`` approach (its ``ParamWrapper``), at the op level:
                   the dense ``W_e + s B_e A_e`` of *every* expert built on each forward, then the
                   same loop; the adapter gradients flow back through the dense delta
``base_grouped``   the base expert GEMMs alone (rows sorted once, per-expert GEMMs, autograd for
                   dx): the floor any adapter op is measured against
``ours_default``   ``lora_kernels.moe_lora_linear`` (CPU: backend torch; GPU: ``ours_triton``)

Work (useful FLOPs; fewest bytes, element size e):
  FLOPs = 4 M N K (forward + dX expert GEMMs) + 6 M r (K + N) (shrink, expand, dy B, G A, dA, dB)
  bytes = e (3 M K + 2 M N) (x twice, dx, y, dy) + 2 e E N K (every expert's W read by the
          forward and the dX GEMM) + 3 e E r (K + N) (A, B, their gradients) + 8 M r (S fp32)

GPU point (Qwen3-30B-A3B-like layer; :func:`qwen3_moe_point_counts`): E=128, top-8, H=2048,
I=768, r=16, T=8192 -> M = 65,536 rows; gate_up (K=2048, N=2I=1536) + down (K=768, N=2048),
bf16: 1,237.0 GFLOP of base expert GEMMs fwd+bwd(dx) + 40.3 GFLOP of LoRA (3.3 %) and
4.56 GB moved (``moe_counts``); at an H100/H200's 989 TFLOP/s dense bf16 the compute floor is
1.29 ms against 0.95 ms for the bytes at 4.8 TB/s (H200): compute-bound, floor 1.29 ms. The goal
(<= 1.15x the base grouped GEMMs) leaves the LoRA terms ~12 % of time over their 3.3 % FLOP share.
PEFT's dense approach adds the deltas' 2 E N K r FLOPs per forward and a dense ``(E, N, K)``
weight gradient per GEMM (2 M N K more: +50 % of the base forward), plus E N K e bytes of delta
written and read.
Not measured on a GPU here (no GPU in this project's CI).
"""

from __future__ import annotations

import torch

from .cases import dt, esize, gen, grads, randn
from .harness import Case, Impl

GROUP = "moe"


def moe_counts(M, K, N, E, r, e) -> tuple[float, float]:
    """(FLOPs, bytes) of one MoE-LoRA expert GEMM fwd+bwd over M rows (module doc)."""
    flops = 4.0 * M * N * K + 6.0 * M * r * (K + N)
    nbytes = (e * (3.0 * M * K + 2.0 * M * N) + 2.0 * e * E * N * K
              + 3.0 * e * E * r * (K + N) + 8.0 * M * r)
    return flops, nbytes


def qwen3_moe_point_counts(T=8192, k=8, E=128, H=2048, inter=768, r=16, e=2) -> dict:
    """FLOPs and bytes of the Qwen3-30B-A3B-like MoE layer (gate_up + down, fwd+bwd;
    ``inter`` = I, the expert intermediate size)."""
    M = T * k
    gu = moe_counts(M, H, 2 * inter, E, r, e)
    dn = moe_counts(M, inter, H, E, r, e)
    base = 4.0 * M * (2 * inter) * H + 4.0 * M * H * inter
    return {"rows": M, "flops": gu[0] + dn[0], "base_flops": base,
            "lora_flops": gu[0] + dn[0] - base, "bytes": gu[1] + dn[1]}


def moe_key(T, k, E, K, N, r, dtype) -> str:
    return f"T{T}-top{k}-E{E}-{K}x{N}-r{r}-{dt(dtype)}"


def _inputs(T, k, E, K, N, r, dtype, scaling):
    def make(device, i):
        g = gen(device, 5000 + i)
        M = T * k
        ids = torch.stack([torch.randperm(E, generator=g, device=device)[:k] for _ in range(T)])
        return dict(x=randn((M, K), dtype, device, g, requires_grad=True),
                    ids=ids.reshape(-1), dy=randn((M, N), dtype, device, g),
                    W=randn((E, N, K), dtype, device, g, K ** -0.5),
                    A=randn((E, r, K), dtype, device, g, K ** -0.5, requires_grad=True),
                    B=randn((E, N, r), dtype, device, g, 0.1 / r ** 0.5, requires_grad=True),
                    s=scaling)
    return make


def _loop(x, W, ids, A=None, B=None, s=1.0):
    """transformers 5's eager experts loop (``Qwen3MoeExperts.forward``'s per-expert pattern)
    with an optional unfused LoRA term; ``W`` (E, N, K)."""
    out = x.new_zeros((x.shape[0], W.shape[1]))
    hit = torch.unique(ids[ids >= 0]).tolist()
    for e in hit:
        rows = torch.where(ids == e)[0]
        xe = x[rows]
        h = xe @ W[e].t()
        if A is not None:
            h = h + s * ((xe @ A[e].t()) @ B[e].t())
        out.index_add_(0, rows, h)
    return out


def _impl_loop() -> Impl:
    def prepare(sets, device):
        def step(i):
            d = sets[i]
            y = _loop(d["x"], d["W"], d["ids"], d["A"], d["B"], d["s"])
            return grads(y, (d["x"], d["A"], d["B"]), d["dy"])
        return step
    return Impl("hf_loop_lora", prepare, note="transformers' per-expert loop + unfused LoRA")


def _impl_peft_dense() -> Impl:
    def prepare(sets, device):
        def step(i):
            d = sets[i]
            w_eff = d["W"] + d["s"] * torch.bmm(d["B"], d["A"])     # (E, N, K) every forward
            y = _loop(d["x"], w_eff, d["ids"])
            return grads(y, (d["x"], d["A"], d["B"]), d["dy"])
        return step
    return Impl("peft_dense", prepare,
                note="PEFT target_parameters approach: dense W + s B A per expert per forward")


def _impl_base(flops, nbytes) -> Impl:
    def prepare(sets, device):
        import lora_kernels

        def grouped(a, w_of, rows, off, n_out):
            """``out[rows[p]] = a[rows[p]] @ w_of(e)^T`` per expert segment; other rows 0."""
            src = a.index_select(0, rows)
            dst = a.new_empty((src.shape[0], n_out))
            for e in range(len(off) - 1):
                if off[e + 1] > off[e]:
                    torch.mm(src[off[e]:off[e + 1]], w_of(e).t(), out=dst[off[e]:off[e + 1]])
            return a.new_zeros((a.shape[0], n_out)).index_copy_(0, rows, dst)

        def step(i):   # forward GEMMs and dX GEMMs, explicitly (no autograd bookkeeping)
            d = sets[i]
            W, E = d["W"], d["W"].shape[0]
            plan = lora_kernels.expert_plan(d["ids"], E)
            off = plan.offsets.tolist()
            rows = plan.order[:off[E]]
            x = d["x"].detach()
            y = grouped(x, lambda e: W[e], rows, off, W.shape[1])
            dx = grouped(d["dy"], lambda e: W[e].t(), rows, off, W.shape[2])
            return y, dx
        return step
    return Impl("base_grouped", prepare, flops=flops, bytes=nbytes, check=False,
                note="base expert GEMMs only (rows sorted once, per-expert GEMMs): fwd + dX")


def _impl_ours(name, backend) -> Impl:
    def prepare(sets, device):
        import lora_kernels

        def step(i):
            d = sets[i]
            y = lora_kernels.moe_lora_linear(d["x"], d["W"], None, d["A"], d["B"], d["ids"],
                                             d["s"], backend=backend)
            return grads(y, (d["x"], d["A"], d["B"]), d["dy"])
        return step
    return Impl(name, prepare, note=f"moe_lora_linear, backend={backend!r}")


def moe_case(T, k, E, K, N, r, dtype, device) -> Case:
    e = esize(dtype)
    flops, nbytes = moe_counts(T * k, K, N, E, r, e)
    bf = 4.0 * T * k * N * K
    bb = e * (3.0 * T * k * K + 2.0 * T * k * N) + 2.0 * e * E * N * K
    impls = [_impl_loop(), _impl_peft_dense(), _impl_base(bf, bb)]
    impls += ([_impl_ours("ours_triton", "triton")] if device.type == "cuda"
              else [_impl_ours("ours_default", None)])
    return Case(GROUP, "moe_lora_fwd_bwd", moe_key(T, k, E, K, N, r, dtype),
                dict(T=T, top_k=k, E=E, in_features=K, out_features=N, r=r), dtype, flops,
                nbytes, _inputs(T, k, E, K, N, r, dtype, 2.0), impls, ref="hf_loop_lora",
                baseline="hf_loop_lora", grad=True, set_bytes=nbytes)


def moe_cases(device, quick: bool) -> list[Case]:
    if device.type == "cuda":   # the Qwen3-30B-A3B-like gate_up and down GEMMs
        bf16 = torch.bfloat16
        return [moe_case(8192, 8, 128, 2048, 1536, 16, bf16, device),
                moe_case(8192, 8, 128, 768, 2048, 16, bf16, device)]
    f32 = torch.float32
    shapes = [(256, 2, 8, 512, 384, 16)]
    if not quick:
        shapes += [(128, 8, 64, 512, 384, 16)]
    return [moe_case(*s, f32, device) for s in shapes]


def moe_cpu_checks(rows: list[dict]) -> dict:
    """Per CPU case: time ratios of ours (default backend) vs the transformers loop + LoRA, vs
    PEFT's dense approach and vs the base expert GEMMs alone (same run)."""
    by = {(r.get("case"), r.get("impl")): r for r in rows if r.get("group") == GROUP}
    out = {}
    for (case, impl), r in by.items():
        if impl != "ours_default":
            continue
        others = {n: by.get((case, n)) for n in ("hf_loop_lora", "peft_dense", "base_grouped")}
        bad = [n for n, x in others.items() if x is None or x.get("status") != "ok"]
        if r.get("status") != "ok" or bad:
            out[case] = {"reason": r.get("error") or f"missing/failed: {bad}"}
            continue
        out[case] = {"ours_ms": r["time_ms"],
                     **{f"{n}_ms": x["time_ms"] for n, x in others.items()},
                     "speedup_vs_hf_loop_lora": others["hf_loop_lora"]["time_ms"] / r["time_ms"],
                     "speedup_vs_peft_dense": others["peft_dense"]["time_ms"] / r["time_ms"],
                     "ours_over_base": r["time_ms"] / others["base_grouped"]["time_ms"],
                     "rel_err_vs_ref": r.get("rel_err_vs_ref")}
    return {"moe_lora_fwd_bwd": out,
            "definition": "ours = moe_lora_linear (default backend) fwd+bwd (dx, dA, dB); "
                          "hf_loop_lora = transformers' per-expert loop + unfused LoRA; "
                          "peft_dense = dense W + s B A per expert per forward; base_grouped = "
                          "the base expert GEMMs alone"}
