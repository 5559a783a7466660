"""PEFT adapter extras in :class:`~lora_kernels.MultiAdapterModel`, per sequence: trainable tokens
(a sequence's lookups of the listed ids take its adapter's rows; a tied ``lm_head``'s columns of
those ids are recomputed from them), ``modules_to_save`` (a sequence's rows go through its
adapter's copy of the module) and aLoRA (the adapter's tokens are those from the last invocation
sequence onward: a per-token mask folded into the batch plan's adapter ids, see
:func:`lora_kernels.peft_extras.alora_mask`).

The copies and rows live in the server's :class:`~lora_kernels.store.AdapterStore`
(``store.extras[name]``) on the model's device with their bytes counted
(``store.extra_bytes``); an adapter whose extras would take the total above the server's
``max_extra_bytes`` is refused. A module an adapter overrides is wrapped by a
:class:`ServingOverride` (installed by the first such adapter, restored by ``unload``); batches
whose sequences do not use it run it unchanged, so adapters with and without extras mix freely
(PEFT's mixed batch raises ``KeyError`` there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import peft_extras as X


class ServingOverride(nn.Module):
    """Wraps one served-model module ``inner``; per call, the sequences whose adapter (the
    server's selection ``state.seq_names``) has an extra for ``module_name`` get it:
    ``("tokens", TokenRows, kind)`` -> :func:`~lora_kernels.peft_extras.apply_tokens` on their
    rows, a module copy -> their rows recomputed through it. Inputs batch-first."""

    def __init__(self, inner: nn.Module, module_name: str, state, store):
        super().__init__()
        self.inner = inner
        self.module_name = module_name
        self._state = state
        self._store = store

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, x, *args, **kwargs):
        y = self.inner(x, *args, **kwargs)
        st = self._state
        if not st.applies():
            return y
        groups: dict[str, list[int]] = {}
        for b, n in enumerate(st.seq_names):
            e = self._store.extras.get(n) if n is not None else None
            if e is not None and (self.module_name in e["tokens"]
                                  or self.module_name in e["modules"]):
                groups.setdefault(n, []).append(b)
        for n, rows in groups.items():
            e = self._store.extras[n]
            it = torch.tensor(rows, device=y.device)
            xs = x.index_select(0, it.to(x.device))
            if self.module_name in e["modules"]:
                new = e["modules"][self.module_name](xs, *args, **kwargs)
            else:
                tr, kind = e["tokens"][self.module_name]
                new = X.apply_tokens(xs, y.index_select(0, it), tr, kind,
                                     getattr(self.inner, "padding_idx", None))
            y = y.index_copy(0, it, new.to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return f"module={self.module_name!r}"


def prepare(server, name: str, adapter) -> dict | None:
    """Validate and build ``adapter``'s extras for ``server`` (nothing changed): the entry to
    :func:`commit` after the store took the adapter, or None when it has none."""
    if not X.has_extras(adapter):
        return None
    built = X.check(server.model, adapter, server._originals)
    for mod in list(built["tokens"]) + list(built["modules"]):
        inside = [m for m in adapter if m == mod or m.startswith(mod + ".")]
        if inside:
            raise ValueError(f"adapter has LoRA factors for {inside[:3]} inside its "
                             f"modules_to_save / trainable-tokens module {mod!r} (not supported)")
    if built["alora"] is not None:
        for mod, entry in adapter.items():
            lay = server.layers.get(mod)
            if getattr(lay, "num_embeddings", None) is not None:
                raise ValueError(f"adapter[{mod!r}]: aLoRA on an embedding is not supported "
                                 "(PEFT applies aLoRA to linears only)")
            if isinstance(entry, (tuple, list)) and len(entry) == 4:
                raise ValueError(f"adapter[{mod!r}]: aLoRA with DoRA is not supported")
        if getattr(adapter, "lora_biases", None) or getattr(adapter, "base_biases", None):
            raise ValueError("adapter: aLoRA with trained biases is not supported")
    limit = server.store.max_extra_bytes
    if limit is not None and server.store.extra_bytes() + built["bytes"] > limit:
        raise ValueError(f"adapter {name!r}: its modules_to_save copies / trainable-token rows "
                         f"take {built['bytes']} bytes; with the {server.store.extra_bytes()} "
                         f"bytes already held that is over max_extra_bytes={limit}")
    return built


def commit(server, name: str, built: dict | None) -> None:
    """Store ``built`` (from :func:`prepare`) under ``name`` and wrap the modules it overrides."""
    if built is None:
        return
    from .inject import set_submodule

    mods = dict(server.model.named_modules())
    for mod in list(built["tokens"]) + list(built["modules"]):
        cur = mods[mod]
        if not isinstance(cur, ServingOverride):
            server._originals.setdefault(mod, cur)
            set_submodule(server.model, mod, ServingOverride(cur, mod, server._state, server.store))
    server.store.extras[name] = built


def tails(server, adapters: Sequence, input_ids) -> list | None:
    """Per sequence: None (all tokens get the adapter) or aLoRA's offset from the end (0: none),
    PEFT's ``alora_offsets`` for the batch; None when no aLoRA adapter is in it."""
    al = {a: server.store.extras[a]["alora"] for a in adapters
          if a is not None and a in server.store.extras and server.store.extras[a]["alora"]}
    if not al:
        return None
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: the batch uses aLoRA adapter(s) {sorted(al)}, whose "
                         "tokens depend on input_ids (batch, length); pass them "
                         "(using(adapters, input_ids=...))")
    if input_ids.shape[0] != len(adapters):
        raise ValueError(f"input_ids has {input_ids.shape[0]} rows for {len(adapters)} adapters")
    out: list = [None] * len(adapters)
    for a, tok in al.items():
        rows = [b for b, n in enumerate(adapters) if n == a]
        offs = X.alora_offsets(input_ids[rows], tok)
        for b, o in zip(rows, offs):
            out[b] = 0 if o is None else o
    return out
