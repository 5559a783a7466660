"""Benchmark rows of issue 11 (QLoRA, quantized bases), group ``qlora``.

``qlora_fwd_bwd`` (LoRA layer forward + backward: dX, dA, dB; frozen base), one shape:

``ours_nf4``        ``LoRALinear.from_linear(linear, quantize="nf4")`` (blocksize 64, double
                    quantisation), default backend (CPU: torch = dequantise then GEMM);
``ours_nf4_triton`` the same on ``backend="triton"`` (CUDA only: tiles dequantised in registers);
``ours_nf4_cuda``   the same on ``backend="cuda"`` (CUDA only: dequantise into a reused workspace,
                    then the CUDA LoRA kernels; an error row when ``lora_kernels._C`` is absent);
``dense``           our ``LoRALinear`` on the dense weight (default backend; the baseline);
``dense_triton``    the same on ``backend="triton"`` (CUDA only);
``peft_bnb``        PEFT's ``lora.Linear4bit`` over a bitsandbytes ``Linear4bit`` (same NF4 codes);
``eager_deq``       ``x deq(W)^T + b + s (x A^T) B^T`` with torch autograd on the dense deq(W)
                    (the reference every ``rel_err_vs_ref`` is against; ``dense`` is not checked:
                    it computes on W, not on deq(W)).

``nf4_decode`` (inference forward, T tokens): ``ours_nf4`` / ``dense`` (and ``*_triton`` on CUDA),
``peft_bnb``; ratio ``dense / ours_nf4`` > 1 means the 4-bit base is faster.

Peak memory: on CPU each implementation runs one extra step under ``torch.profiler``
(``bench.cases_dora.cpu_peak_mb``: bytes allocated during the step over its start).

Headline keys (DESIGN.md points, H100-class GPU, bf16): ``qlora_train_overhead_vs_dense`` =
time(ours_nf4_triton) / time(dense_triton) at T=8192, 4096x4096, r=16 (goal <= 1.10);
``nf4_decode_speedup_vs_bf16`` = time(dense_triton) / time(ours_nf4_triton) at T=16, 4096x4096,
r=16 (goal >= 2.5). On CPU both are null (those rows only run on a GPU); :func:`qlora_cpu_checks`
gives the CPU ratios.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from .cases import (
    esize,
    grads,
    layer_train_step,
    lora_layers,
    lora_train_counts,
    train_inputs,
    train_key,
)
from .cases_dora import cpu_peak_mb
from .harness import Case, Impl

GROUP = "qlora"
HEAD_TRAIN = (8192, 4096, 4096, 16, torch.bfloat16)
HEAD_DECODE = (16, 4096, 4096, 16, torch.bfloat16)


def _measured(step, device):
    step.peak_mem_mb = cpu_peak_mb(step, device)
    return step


def _nf4(d):
    from lora_kernels.quant import NF4Weight

    return NF4Weight.from_float(d["W"], 64, compress_statistics=True)


def _impl_ours(name: str, quant: bool, backend: str | None, train: bool) -> Impl:
    def prepare(sets, device):
        layers = lora_layers(sets, device, backend, quantize="nf4" if quant else None)
        if train:
            return _measured(layer_train_step(sets, layers), device)

        def step(i):
            with torch.no_grad():
                return layers[i](sets[i]["x"].detach())
        return _measured(step, device)
    base = "NF4 (blocksize 64, double quant)" if quant else "dense"
    return Impl(name, prepare, check=quant, note=f"LoRALinear on a {base} base, "
                f"backend={backend!r}")


def _impl_peft_bnb(train: bool) -> Impl:
    def prepare(sets, device):
        import warnings

        import bitsandbytes as bnb
        from peft import LoraConfig, inject_adapter_in_model

        mods = []
        for d in sets:
            N, K = d["W"].shape
            r = d["A"].shape[0]
            holder = nn.Module()
            q = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=d["W"].dtype,
                                  compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(d["W"].detach().cpu().clone(), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
            q.bias = nn.Parameter(d["b"].detach().clone(), requires_grad=False)
            holder.lin = q.to(device)
            holder.is_loaded_in_4bit = True
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                inject_adapter_in_model(LoraConfig(r=r, lora_alpha=d["s"] * r, lora_dropout=0.0,
                                                   target_modules=["lin"]), holder)
            m = holder.lin
            with torch.no_grad():
                m.lora_A["default"].weight.copy_(d["A"])
                m.lora_B["default"].weight.copy_(d["B"])
            m.train()   # eval on CPU repacks the weight for bnb's bf16 inference kernel
            mods.append(m)

        def step(i):
            d, m = sets[i], mods[i]
            if not train:
                with torch.no_grad():
                    return m(d["x"].detach())
            return grads(m(d["x"]), (d["x"], m.lora_A["default"].weight,
                                      m.lora_B["default"].weight), d["dy"])
        return _measured(step, device)
    skip = None if importlib.util.find_spec("bitsandbytes") else "bitsandbytes not installed"
    return Impl("peft_bnb", prepare, skip=skip,
                note="PEFT lora.Linear4bit over bitsandbytes Linear4bit (nf4, double quant)")


def _impl_eager_deq(train: bool) -> Impl:
    def prepare(sets, device):
        import torch.nn.functional as F

        deq = [_nf4(d).dequantize(d["W"].dtype) for d in sets]

        def step(i):
            d = sets[i]
            x = d["x"] if train else d["x"].detach()
            with torch.set_grad_enabled(train):
                y = F.linear(x, deq[i], d["b"]) + d["s"] * F.linear(F.linear(x, d["A"]), d["B"])
                return grads(y, (d["x"], d["A"], d["B"]), d["dy"]) if train else y
        return step
    return Impl("eager_deq", prepare, note="x deq(W)^T + b + s (x A^T) B^T, torch autograd")


def _impls(device, train: bool) -> list[Impl]:
    impls = [_impl_ours("dense", False, None, train), _impl_ours("ours_nf4", True, None, train)]
    if device.type == "cuda":
        impls += [_impl_ours("dense_triton", False, "triton", train),
                  _impl_ours("ours_nf4_triton", True, "triton", train),
                  _impl_ours("ours_nf4_cuda", True, "cuda", train)]
    return impls + [_impl_peft_bnb(train), _impl_eager_deq(train)]


def qlora_train_case(T, K, N, r, dtype, device) -> Case:
    flops, nbytes = lora_train_counts(T, K, N, r, esize(dtype))
    return Case(GROUP, "qlora_fwd_bwd", "train-" + train_key(T, K, N, r, dtype),
                dict(T=T, in_features=K, out_features=N, r=r, base="nf4"), dtype, flops, nbytes,
                train_inputs(T, K, N, r, dtype, 2.0), _impls(device, True), ref="eager_deq",
                baseline="dense", grad=True, set_bytes=nbytes)


def qlora_decode_case(T, K, N, r, dtype, device) -> Case:
    e = esize(dtype)
    flops = 2.0 * T * N * K + 2.0 * T * r * (K + N)
    nbytes = e * (N * K + T * (K + N) + r * (K + N))   # the dense row's bytes (W read once)
    return Case(GROUP, "nf4_decode", "decode-" + train_key(T, K, N, r, dtype),
                dict(T=T, in_features=K, out_features=N, r=r, base="nf4"), dtype, flops, nbytes,
                train_inputs(T, K, N, r, dtype, 2.0), _impls(device, False), ref="eager_deq",
                baseline="dense", grad=False, graph=False, set_bytes=nbytes)


def quant_cases(device: torch.device, quick: bool) -> list[Case]:
    """The issue-11 rows for this device (registered by ``cases.build_cases``)."""
    if device.type == "cuda":
        return [qlora_train_case(*HEAD_TRAIN, device), qlora_decode_case(*HEAD_DECODE, device)]
    f32 = torch.float32
    cases = [qlora_train_case(256, 1024, 1024, 16, f32, device),
             qlora_decode_case(1, 2048, 2048, 16, f32, device)]
    if not quick:
        cases += [qlora_train_case(1024, 2048, 2048, 16, f32, device),
                  qlora_decode_case(16, 2048, 2048, 16, f32, device)]
    return cases


QUANT_HEADLINE = {
    "qlora_train_overhead_vs_dense": dict(
        group=GROUP, key="train-" + train_key(*HEAD_TRAIN), num="ours_nf4_triton",
        den="dense_triton", goal="<= 1.10", ok=lambda v: v <= 1.10,
        definition="time(LoRALinear on NF4 triton fwd+bwd) / time(LoRALinear on bf16 triton)"),
    "nf4_decode_speedup_vs_bf16": dict(
        group=GROUP, key="decode-" + train_key(*HEAD_DECODE), num="dense_triton",
        den="ours_nf4_triton", goal=">= 2.5", ok=lambda v: v >= 2.5,
        definition="time(LoRA forward, T=16, bf16 base, triton) / time(same on an NF4 base)"),
}


def qlora_cpu_checks(rows: list[dict]) -> dict:
    """Per CPU case: time and peak-memory ratios of ours_nf4 vs PEFT + bitsandbytes and vs our
    dense-base LoRA (same run)."""
    by = {(r.get("case"), r.get("impl")): r for r in rows if r.get("group") == GROUP}
    out = {}
    for (case, impl), r in by.items():
        if impl != "ours_nf4":
            continue
        p, de = by.get((case, "peft_bnb")), by.get((case, "dense"))
        ok = [x is not None and x.get("status") == "ok" for x in (r, p, de)]
        if not all(ok):
            out[case] = {"reason": next((x or {}).get("error") or (x or {}).get("skip")
                                        for x in (r, p, de)
                                        if x is None or x.get("status") != "ok")}
            continue
        out[case] = {"ours_over_peft_bnb_time": r["time_ms"] / p["time_ms"],
                     "ours_over_dense_time": r["time_ms"] / de["time_ms"],
                     "ours_ms": r["time_ms"], "peft_bnb_ms": p["time_ms"],
                     "dense_ms": de["time_ms"], "ours_peak_mb": r.get("peak_mem_mb"),
                     "peft_bnb_peak_mb": p.get("peak_mem_mb"),
                     "dense_peak_mb": de.get("peak_mem_mb"),
                     "rel_err_vs_ref": r.get("rel_err_vs_ref")}
    return {"qlora": out,
            "definition": "ours = LoRALinear(quantize='nf4') default backend; peft_bnb = PEFT "
                          "lora.Linear4bit on bitsandbytes; dense = our LoRALinear on the dense "
                          "weight; peak = CPU allocations during one step (torch.profiler)"}
