"""Reference formulas for multi-adapter serving and composition (dense, per token, any dtype;
run them in float64 on CPU to check every backend)."""

from __future__ import annotations

import torch


def multi_lora_linear(x, weight, bias, adapters, adapter_ids):
    """Per-token loop: ``y[t] = x[t] W^T + b + s_i x[t] A_i^T B_i^T``, ``i = adapter_ids[t]``.

    ``adapters`` maps an id to ``(lora_A (r, in), lora_B (out, r), scaling)`` (a dict or a list
    indexed by slot); id -1 adds nothing. ``weight=None`` gives the delta alone.
    """
    x2 = x.reshape(-1, x.shape[-1])
    out_f = weight.shape[0] if weight is not None else next(
        iter(adapters.values() if isinstance(adapters, dict) else adapters))[1].shape[0]
    rows = []
    for t, i in enumerate(adapter_ids.tolist()):
        y = x2[t] @ weight.t() if weight is not None else x2.new_zeros(out_f)
        if bias is not None:
            y = y + bias
        if i >= 0:
            A, B, s = adapters[i]
            y = y + s * ((x2[t] @ A.t()) @ B.t())
        rows.append(y)
    y = torch.stack(rows) if rows else x2.new_zeros((0, out_f))
    return y.reshape(*x.shape[:-1], out_f)


def delta(lora_A, lora_B, scaling):
    """The dense ``(out, in)`` delta ``scaling * B @ A``."""
    return scaling * (lora_B @ lora_A)


def cosine(d1, d2):
    """Frobenius cosine of two dense matrices."""
    return float((d1 * d2).sum() / (d1.norm() * d2.norm()))
