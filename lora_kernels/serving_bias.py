"""Per-adapter bias deltas in :class:`~lora_kernels.MultiAdapterModel`: PEFT's ``lora_bias=True``
(``scaling * lora_B.bias``) and ``bias="lora_only" | "all"`` (trained base biases) served as a
per-row bias delta on the rows of the sequences using that adapter.

For a served module with base bias ``b`` and an adapter carrying a trained bias ``b'`` and / or a
LoRA bias ``c`` with scaling ``s``: ``delta = (b' - b) + s c`` (out,), added to that adapter's rows
after the multi-LoRA op (the base rows and other adapters' rows are left bit-identical).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def bias_deltas(model: nn.Module, adapter: Mapping, layers: Mapping) -> dict[str, torch.Tensor]:
    """``{module: delta (out,) fp32}`` for ``adapter`` (a loaded PEFT adapter's ``lora_biases`` /
    ``base_biases``; none for a plain dict) against the served ``layers``. A trained bias of a
    module the server does not serve must equal the model's (else ``ValueError`` naming it: the
    server cannot change a module it does not serve); nothing is stored here."""
    lora_b = getattr(adapter, "lora_biases", None) or {}
    base_b = getattr(adapter, "base_biases", None) or {}
    mods = None
    out = {}
    for mod in sorted(set(lora_b) | set(base_b)):
        lay = layers.get(mod)
        if lay is None or not hasattr(lay, "dora_g") or getattr(lay, "num_embeddings", None):
            if mod in lora_b:
                raise ValueError(f"adapter has a LoRA bias for {mod!r}, which this server does "
                                 "not serve as a linear (add it to target_modules)")
            mods = mods if mods is not None else dict(model.named_modules())
            b = getattr(mods.get(mod), "bias", None)
            if not (isinstance(b, torch.Tensor) and b.shape == base_b[mod].shape
                    and torch.equal(base_b[mod].to(b.device, b.dtype), b)):
                raise ValueError(f"adapter trains the bias of {mod!r} (PEFT bias='all'), which "
                                 "this server does not serve: add it to target_modules (a "
                                 "norm's bias cannot be served per sequence)")
            continue
        entry = adapter.get(mod)
        if isinstance(entry, (tuple, list)) and len(entry) == 4:
            raise ValueError(f"adapter[{mod!r}]: a DoRA adapter with biases is not supported")
        d = torch.zeros(lay.out_features, dtype=torch.float32, device=lay.weight.device)
        if mod in base_b:
            nb = base_b[mod]
            if nb.shape != (lay.out_features,):
                raise ValueError(f"adapter's bias for {mod!r} has shape {tuple(nb.shape)}; "
                                 f"expected ({lay.out_features},)")
            d += nb.to(d)
            if lay.bias is not None:
                d -= lay.bias.detach().to(d)
        if mod in lora_b:
            if entry is None:
                raise ValueError(f"adapter has a LoRA bias for {mod!r} but no factors there")
            cb = lora_b[mod]
            if cb.shape != (lay.out_features,):
                raise ValueError(f"adapter's LoRA bias for {mod!r} has shape "
                                 f"{tuple(cb.shape)}; expected ({lay.out_features},)")
            d += float(entry[2]) * cb.to(d)
        out[mod] = d
    return out


def add_bias_rows(y: torch.Tensor, batch: int, seq_names, deltas: Mapping) -> torch.Tensor:
    """``y (batch*L, out)`` with ``deltas[name]`` added to the rows of every sequence served by
    ``name`` (``seq_names[b]``); other rows unchanged. In place unless autograd records ``y``."""
    idx = [i for i, n in enumerate(seq_names) if n in deltas]
    if not idx:
        return y
    y3 = y.view(batch, -1, y.shape[-1])
    it = torch.tensor(idx, device=y.device)
    d = torch.stack([deltas[seq_names[i]] for i in idx]).to(y.dtype)[:, None, :]
    if torch.is_grad_enabled() and y.requires_grad:
        return y3.index_add(0, it, d.expand(-1, y3.shape[1], -1)).reshape(y.shape)
    return y3.index_add_(0, it, d.expand(-1, y3.shape[1], -1).contiguous()).reshape(y.shape)
