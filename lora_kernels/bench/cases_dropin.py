"""Benchmark rows of issue 13 (drop-in): GPT-2's transformers ``Conv1D`` layout on the fast path.

Group ``layer``, op ``lora_fwd_bwd_conv1d``: LoRA layer forward + backward (dX, dA, dB; frozen W)
at one shape, with the same numbers stored two ways:

``ours_linear``     ``LoRALinear.from_linear(nn.Linear)``: weight ``(out, in)`` contiguous
                    (the baseline every ratio divides by);
``ours_conv1d``     ``LoRALinear.from_linear(Conv1D)``: weight the ``(out, in)`` transposed view of
                    a contiguous ``(in, out)`` buffer (strides ``(1, out)``): a ratio near 1.0
                    shows the view costs no copy or transpose per call;
``peft_conv1d``     PEFT's ``lora.Linear`` over the Conv1D (``fan_in_fan_out=True``), eager;
``peft_patched_conv1d``  the same PEFT layer after ``lora_kernels.patch_peft``;
``eager``           ``x W^T + b + s (x A^T) B^T`` with torch autograd (the reference).

On CUDA the two ``ours_*`` rows also run with ``backend="triton"`` (``*_triton``); those rows are
only as verified as the GPU run that produced them.
Work counts are :func:`lora_kernels.bench.cases.lora_train_counts` (same work in every row).
"""

from __future__ import annotations

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
from .harness import Case, Impl


def _conv_of(d: dict, device):
    """A transformers ``Conv1D`` holding ``d["W"]`` (out, in) as its (in, out) weight."""
    from transformers.pytorch_utils import Conv1D

    N, K = d["W"].shape
    conv = Conv1D(N, K).to(device=device, dtype=d["W"].dtype)
    with torch.no_grad():
        conv.weight.copy_(d["W"].t())
        conv.bias.copy_(d["b"])
    return conv.requires_grad_(False)


def _impl_layer(name: str, conv: bool, backend: str | None) -> Impl:
    def prepare(sets, device):
        layers = lora_layers(sets, device, backend, base=_conv_of if conv else None)
        assert all(m.weight.is_contiguous() != conv for m in layers)  # Conv1D: reads a view
        return layer_train_step(sets, layers)
    what = "Conv1D (transposed view)" if conv else "nn.Linear"
    return Impl(name, prepare, note=f"LoRALinear.from_linear({what}), backend={backend!r}")


def _impl_peft_conv(name: str, patched: bool) -> Impl:
    def prepare(sets, device):
        import warnings

        from peft import LoraConfig, inject_adapter_in_model

        import lora_kernels as lk

        mods = []
        for d in sets:
            holder = nn.Module()
            holder.c = _conv_of(d, device)
            r = d["A"].shape[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                inject_adapter_in_model(LoraConfig(r=r, lora_alpha=d["s"] * r, lora_dropout=0.0,
                                                   target_modules=["c"], fan_in_fan_out=True),
                                        holder)
            with torch.no_grad():
                holder.c.lora_A["default"].weight.copy_(d["A"])
                holder.c.lora_B["default"].weight.copy_(d["B"])
            if patched:
                lk.patch_peft(holder)
            mods.append(holder.c)

        def step(i):
            d, m = sets[i], mods[i]
            return grads(m(d["x"]), (d["x"], m.lora_A["default"].weight,
                                      m.lora_B["default"].weight), d["dy"])
        return step
    return Impl(name, prepare, note="peft lora.Linear over transformers Conv1D"
                + (", after lora_kernels.patch_peft" if patched else " (eager)"))


def _impl_eager() -> Impl:
    def prepare(sets, device):
        import torch.nn.functional as F

        def step(i):
            d = sets[i]
            y = F.linear(d["x"], d["W"], d["b"]) + d["s"] * F.linear(F.linear(d["x"], d["A"]),
                                                                     d["B"])
            return grads(y, (d["x"], d["A"], d["B"]), d["dy"])
        return step
    return Impl("eager", prepare, note="x W^T + b + s (x A^T) B^T with torch autograd")


def conv1d_case(T, K, N, r, dtype, device) -> Case:
    flops, nbytes = lora_train_counts(T, K, N, r, esize(dtype))
    impls = [_impl_layer("ours_linear", False, None), _impl_layer("ours_conv1d", True, None)]
    if device.type == "cuda":
        impls += [_impl_layer("ours_linear_triton", False, "triton"),
                  _impl_layer("ours_conv1d_triton", True, "triton")]
    impls += [_impl_peft_conv("peft_conv1d", False), _impl_peft_conv("peft_patched_conv1d", True),
              _impl_eager()]
    return Case("layer", "lora_fwd_bwd_conv1d", "conv1d-" + train_key(T, K, N, r, dtype),
                dict(T=T, in_features=K, out_features=N, r=r, base="Conv1D"), dtype, flops,
                nbytes, train_inputs(T, K, N, r, dtype, 2.0), impls, ref="eager",
                baseline="ours_linear", grad=True, set_bytes=nbytes)


def dropin_cases(device: torch.device, quick: bool) -> list[Case]:
    """The issue-13 rows for this device (registered by ``cases.build_cases``)."""
    if device.type == "cuda":  # not in --quick: its GPU time budget holds the headline points only
        return [] if quick else [conv1d_case(8192, 4096, 4096, 16, torch.bfloat16, device),
                                 conv1d_case(2048, 768, 2304, 4, torch.bfloat16, device)]
    # GPT-2 small's c_attn (768 -> 2304, the study's r=4) and a square layer
    return [conv1d_case(256, 768, 2304, 4, torch.float32, device)] + (
        [] if quick else [conv1d_case(256, 1024, 1024, 16, torch.float32, device)])
