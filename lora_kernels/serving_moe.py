"""Serving LoRA adapters on MoE experts (``MultiAdapterModel(..., target_parameters=[...])``).

:class:`ServingExperts` replaces a transformers 5 experts module: per served expert parameter p
(``gate_up_proj`` / ``down_proj``) it keeps E :class:`~lora_kernels.pool.AdapterPool`\\ s (pool e:
expert e's factors of every slot, real ranks), registered in the server's
:class:`~lora_kernels.store.AdapterStore` as modules ``"<experts module>.<p>.<e>"`` so the store
swaps MoE adapters in and out of the slots like any other (more adapters than slots, LRU,
prefetch). Per call, each row (token t, choice i) gets the factor set of its sequence's slot and
its expert (:mod:`lora_kernels.ops.multi_moe_lora`) on :func:`lora_kernels.moe.experts_forward`:
both expert GEMMs of the block with per-row factors, the model's own router and top-k.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .moe import EXPERT_PARAMS, ExpertFactors, check_factors, expert_dims, experts_forward
from .ops.moe_lora import expert_plan
from .ops.multi_moe_lora import row_factor_ids, stacked_factors
from .pool import AdapterPool


def pool_key(module: str, param: str, expert: int) -> str:
    """The store's module name of expert ``expert`` of parameter ``param`` of ``module``."""
    return f"{module}.{param}.{expert}"


class ServingExperts(nn.Module):
    """A served transformers experts module (module docstring). ``base_layer``: the original
    module (used as it is); ``pools[p]``: its E per-expert pools of parameter p."""

    def __init__(self, base: nn.Module, params, state, max_adapters: int, max_rank: int,
                 backend: str | None = None):
        super().__init__()
        self.base_layer = base
        self._state = state
        self.backend = backend
        self.pools: dict[str, list[AdapterPool]] = {}
        w = base.gate_up_proj
        for p in params:
            E, in_f, out_f = expert_dims(base, p)
            self.pools[p] = [AdapterPool(in_f, out_f, max_adapters, max_rank, dtype=w.dtype,
                                         device=w.device) for _ in range(E)]
        self.dora_g: dict = {}          # the server's per-layer maps (no DoRA / bias on experts)
        self.bias_delta: dict = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.gate_up_proj

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        st = self._state
        if not st.applies() or not any(len(p) for ps in self.pools.values() for p in ps):
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        if st.seq_ids.shape[0] != 1:
            raise ValueError("summed adapters (add_sum) are not served on MoE experts")
        batch = st.seq_ids.shape[1]
        T = hidden_states.shape[0]
        if T % batch:
            raise ValueError(f"the experts' {T} tokens do not split into the batch of {batch} "
                             "sequences")
        if hidden_states.dtype != self.weight.dtype:
            raise TypeError(f"hidden_states must have the experts' dtype {self.weight.dtype}, "
                            f"got {hidden_states.dtype}")
        E = self.base_layer.gate_up_proj.shape[0]
        k = top_k_index.shape[-1]
        # token t is token t % (T / batch) of sequence t // (T / batch) (the block flattens
        # (batch, seq, H) row-major); row j = t k + i
        slots = st.seq_ids[0].to(hidden_states.device).repeat_interleave((T // batch) * k)
        ids = top_k_index.reshape(-1).to(torch.int64)
        lids = row_factor_ids(torch.where(ids == E, -1, ids), slots, E)
        # one factor plan (rows sorted by slot * E + expert) for both expert GEMMs
        lplan = expert_plan(lids, st.max_adapters * E)
        factors = {p: (*stacked_factors(ps), 1.0, lplan) for p, ps in self.pools.items()}
        return experts_forward(self.base_layer, factors, hidden_states, top_k_index,
                               top_k_weights, backend=self.backend)

    def extra_repr(self) -> str:
        return f"params={list(self.pools)}, experts={len(next(iter(self.pools.values())))}"


def expand_expert_entries(adapter: Mapping, layers: Mapping) -> dict:
    """``adapter`` with each ``ExpertFactors`` entry ``"<module>.<p>"`` replaced by its E
    per-expert entries ``"<module>.<p>.<e>": (A_e (r, in), B_e (out, r), scaling)`` for the
    store (other entries unchanged). ``ValueError`` naming the entry for a parameter the server
    does not serve or factors of another expert count / layout (nothing is stored here)."""
    if not isinstance(adapter, Mapping):
        return adapter
    out = {}
    for key, entry in adapter.items():
        if not isinstance(entry, ExpertFactors):
            out[key] = entry
            continue
        mod, _, p = key.rpartition(".")
        lay = layers.get(mod)
        if lay is None or p not in lay.pools:
            served = [f"{m}.{q}" for m, la in layers.items() for q in la.pools][:4]
            raise ValueError(f"adapter names expert parameter {key!r}, which this server does "
                             f"not serve (target_parameters; served: {served}"
                             f"{', ...' if len(served) == 4 else ''}; parameters "
                             f"{list(EXPERT_PARAMS)})")
        A, B, s = check_factors(f"adapter[{key!r}]", lay.base_layer, p, entry)
        for e in range(A.shape[0]):
            out[pool_key(mod, p, e)] = (A[e], B[e], s)
    return out
