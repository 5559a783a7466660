"""Benchmark group ``dora``: the DoRA layer fwd+bwd against PEFT's DoRA and our LoRA layer.

Implementations (same x, W, b, A, B, m, dy; gradients to x, A, B and m -- LoRA: x, A, B):

``peft_dora``   PEFT's ``lora.Linear`` with ``use_dora=True`` (the reference of the case)
``ours_*``      :class:`lora_kernels.DoRALinear` (CPU: default backend = torch; GPU: triton, cuda)
``lora_*``      :class:`lora_kernels.LoRALinear` at the same rank (what DoRA costs on top of LoRA)

Peak memory: on CUDA the harness records ``peak_mem_mb``; on CPU each implementation here runs one
extra step under ``torch.profiler`` (``profile_memory=True``) and records the peak of the bytes
allocated during the step over its start (outputs and gradients included: the same for all).

Work counts: LoRA's (``cases.lora_train_counts``) plus the low-rank norm (``A W^T``: 2 r K N flops,
W read once more) and the ``dm`` reduction (2 T N flops, y read once more).

Headline keys (DESIGN.md point, H100-class GPU, bf16): ``dora_train_overhead_vs_lora`` =
time(ours_triton) / time(lora_triton), ``dora_train_speedup_vs_peft`` = time(peft_dora) /
time(ours_triton). On CPU both are null (not the DESIGN.md point);
:func:`dora_cpu_checks` gives the CPU ratios.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .cases import (
    HEAD_TRAIN,
    esize,
    gen,
    grads,
    layer_train_step,
    linear_of,
    lora_layers,
    lora_train_counts,
    randn,
    train_key,
)
from .harness import Case, Impl

GROUP = "dora"


def train_inputs(T, K, N, r, dtype, scaling):
    def make(device, k):
        g = gen(device, 3000 + k)
        W = randn((N, K), dtype, device, g, 1 / math.sqrt(K))
        return dict(x=randn((T, K), dtype, device, g, requires_grad=True),
                    dy=randn((T, N), dtype, device, g),
                    W=W, b=randn((N,), dtype, device, g, 0.1),
                    A=randn((r, K), dtype, device, g, 1 / math.sqrt(K), requires_grad=True),
                    B=randn((N, r), dtype, device, g, 0.1 / math.sqrt(r), requires_grad=True),
                    m=(torch.linalg.vector_norm(W.float(), dim=1)
                       * (1 + 0.1 * torch.rand(N, generator=g, device=device))).to(dtype),
                    s=scaling)
    return make


def cpu_peak_mb(step, device) -> float | None:
    """Peak bytes allocated by ``step(0)`` over its start (MiB), CPU only (torch.profiler)."""
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step(0)
        del out
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


def _measured(step, device):
    step.peak_mem_mb = cpu_peak_mb(step, device)
    return step


def _peft_dora(d):
    from peft import LoraConfig, inject_adapter_in_model

    N, K = d["W"].shape
    r = d["A"].shape[0]
    holder = nn.Module()
    holder.lin = linear_of(d, d["W"].device)
    cfg = LoraConfig(r=r, lora_alpha=float(d["s"]) * r, lora_dropout=0.0, target_modules=["lin"],
                     use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_adapter_in_model(cfg, holder)
    lin = holder.lin
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(d["A"])
        lin.lora_B["default"].weight.copy_(d["B"])
        lin.lora_magnitude_vector["default"].weight.copy_(d["m"])
    for p in lin.base_layer.parameters():
        p.requires_grad_(False)
    return lin


def _impl_peft_dora() -> Impl:
    def prepare(sets, device):
        mods = [_peft_dora(d) for d in sets]

        def step(i):
            d, m = sets[i], mods[i]
            wrt = (d["x"], m.lora_A["default"].weight, m.lora_B["default"].weight,
                   m.lora_magnitude_vector["default"].weight)
            return grads(m(d["x"]), wrt, d["dy"])
        return _measured(step, device)
    return Impl("peft_dora", prepare, note="peft lora.Linear(use_dora=True), eager")


def _impl_ours(name, backend) -> Impl:
    def prepare(sets, device):
        from lora_kernels import DoRALinear

        layers = []
        for d in sets:
            r = d["A"].shape[0]
            layer = DoRALinear.from_linear(linear_of(d, device), r, alpha=d["s"] * r,
                                           backend=backend)
            with torch.no_grad():
                layer.lora_A.copy_(d["A"])
                layer.lora_B.copy_(d["B"])
                layer.magnitude.copy_(d["m"])
            layers.append(layer)

        def step(i):
            d, m = sets[i], layers[i]
            return grads(m(d["x"]), (d["x"], m.lora_A, m.lora_B, m.magnitude), d["dy"])
        return _measured(step, device)
    return Impl(name, prepare, note=f"DoRALinear module, backend={backend!r}")


def _impl_lora(name, backend, flops, nbytes) -> Impl:
    def prepare(sets, device):
        return _measured(layer_train_step(sets, lora_layers(sets, device, backend)), device)
    return Impl(name, prepare, flops=flops, bytes=nbytes, check=False,
                note=f"LoRALinear module at the same rank, backend={backend!r}")


def dora_counts(T, K, N, r, e) -> tuple[float, float]:
    flops, nbytes = lora_train_counts(T, K, N, r, e)
    return flops + 2.0 * r * K * N + 2.0 * T * N, nbytes + e * (N * K + T * N + 2 * N)


def dora_case(T, K, N, r, dtype, device) -> Case:
    e = esize(dtype)
    flops, nbytes = dora_counts(T, K, N, r, e)
    lf, lb = lora_train_counts(T, K, N, r, e)
    impls = [_impl_peft_dora()]
    if device.type == "cuda":
        import lora_kernels

        impls += [_impl_ours("ours_triton", "triton"), _impl_lora("lora_triton", "triton", lf, lb)]
        if lora_kernels.cuda_available():
            impls += [_impl_ours("ours_cuda", "cuda"), _impl_lora("lora_cuda", "cuda", lf, lb)]
        else:
            impls += [Impl("ours_cuda", None, skip="lora_kernels._C not built/usable")]
    else:
        impls += [_impl_ours("ours_default", None), _impl_lora("lora_default", None, lf, lb)]
    return Case(GROUP, "dora_fwd_bwd", train_key(T, K, N, r, dtype),
                dict(T=T, in_features=K, out_features=N, r=r), dtype, flops, nbytes,
                train_inputs(T, K, N, r, dtype, 2.0), impls, ref="peft_dora",
                baseline="peft_dora", grad=True, set_bytes=nbytes)


def dora_cases(device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        return [dora_case(*HEAD_TRAIN, device)]
    f32 = torch.float32
    shapes = [(256, 1024, 1024, 16)]
    if not quick:
        shapes += [(1024, 1024, 1024, 16), (512, 2048, 2048, 16), (256, 2048, 2048, 64)]
    return [dora_case(*s, f32, device) for s in shapes]


DORA_HEADLINE = {
    "dora_train_overhead_vs_lora": dict(
        group=GROUP, key=train_key(*HEAD_TRAIN), num="ours_triton", den="lora_triton",
        goal="<= 1.10", ok=lambda v: v <= 1.10,
        definition="time(DoRALinear triton fwd+bwd) / time(LoRALinear triton fwd+bwd)"),
    "dora_train_speedup_vs_peft": dict(
        group=GROUP, key=train_key(*HEAD_TRAIN), num="peft_dora", den="ours_triton",
        goal=">= 1.5", ok=lambda v: v >= 1.5,
        definition="time(PEFT lora.Linear use_dora=True fwd+bwd) / time(DoRALinear triton)"),
}


def dora_cpu_checks(rows: list[dict]) -> dict:
    """Per CPU case: time and peak-memory ratios of ours (default backend) vs PEFT's DoRA and vs
    our LoRA layer (same run)."""
    by = {(r.get("case"), r.get("impl")): r for r in rows if r.get("group") == GROUP}
    out = {}
    for (case, impl), r in by.items():
        if impl != "ours_default":
            continue
        p, lo = by.get((case, "peft_dora")), by.get((case, "lora_default"))
        ok = [x is not None and x.get("status") == "ok" for x in (r, p, lo)]
        if not all(ok):
            out[case] = {"reason": next((x or {}).get("error") for x in (r, p, lo)
                                        if x is None or x.get("status") != "ok")}
            continue
        out[case] = {"ours_over_peft_time": r["time_ms"] / p["time_ms"],
                     "ours_over_lora_time": r["time_ms"] / lo["time_ms"],
                     "ours_ms": r["time_ms"], "peft_ms": p["time_ms"], "lora_ms": lo["time_ms"],
                     "ours_peak_mb": r.get("peak_mem_mb"), "peft_peak_mb": p.get("peak_mem_mb"),
                     "lora_peak_mb": lo.get("peak_mem_mb"),
                     "rel_err_vs_peft": r.get("rel_err_vs_ref")}
    return {"dora_layer_fwd_bwd": out,
            "definition": "ours = DoRALinear (default backend) fwd+bwd; peft = lora.Linear "
                          "use_dora=True; lora = our LoRALinear; peak = CPU allocations during "
                          "one step (torch.profiler)"}
