"""transformers' ``Conv1D`` (GPT-2 and its relatives) seen as an ``nn.Linear``.

``Conv1D(nf=out, nx=in)`` computes ``y = x @ weight + bias`` with ``weight (in, out)``: the
transpose of ``nn.Linear``'s ``(out, in)`` layout (PEFT calls this ``fan_in_fan_out=True``; PEFT
still stores ``lora_A (r, in)`` / ``lora_B (out, r)`` for it). Everything here works on the
``(out, in)`` *view* ``weight.t()`` (strides ``(1, out)``): no copy, no per-call transpose; the
kernels take strides (the torch path's ``F.linear(x, W)`` with ``W = weight.t()`` is one GEMM on the
contiguous ``(in, out)`` buffer, and the Triton GEMMs read ``W`` through its strides).

Recognising a ``Conv1D`` never imports transformers (a model can only hold one if transformers is
loaded, so the class is looked up in ``sys.modules``); only :func:`to_conv1d`, which builds one,
imports it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def conv1d_class():
    """transformers' ``Conv1D`` class if transformers is loaded, else None."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def is_conv1d(module) -> bool:
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_linear_like(module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def as_linear(module) -> nn.Linear:
    """An ``nn.Linear`` whose ``weight`` is the ``(out, in)`` transposed view of a ``Conv1D``'s
    ``(in, out)`` weight (same storage, detached: adapter layers copy the frozen base anyway)
    and whose ``bias`` is the Conv1D's bias; an ``nn.Linear`` is returned as is."""
    if isinstance(module, nn.Linear):
        return module
    if not is_conv1d(module):
        raise TypeError(f"linear must be an nn.Linear or transformers' Conv1D, got "
                        f"{type(module).__name__}")
    w = module.weight
    lin = nn.Linear(w.shape[0], w.shape[1], bias=False, device="meta")
    lin.weight = nn.Parameter(w.detach().t(), requires_grad=False)
    lin.bias = (nn.Parameter(module.bias.detach(), requires_grad=False)
                if module.bias is not None else None)
    return lin


@torch.no_grad()
def to_conv1d(linear: nn.Linear) -> nn.Module:
    """A ``Conv1D`` computing what ``linear`` computes (weight stored ``(in, out)``, contiguous).
    A missing bias becomes a zero bias (``Conv1D`` always has one)."""
    from transformers.pytorch_utils import Conv1D as cls  # building one needs transformers

    out_f, in_f = linear.weight.shape
    conv = cls(out_f, in_f)
    w = linear.weight
    conv.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    b = linear.bias if linear.bias is not None else torch.zeros(out_f, dtype=w.dtype,
                                                                device=w.device)
    conv.bias = nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
    return conv
