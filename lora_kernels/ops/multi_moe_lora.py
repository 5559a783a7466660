"""Multi-adapter MoE-LoRA (serving): many adapters' per-expert factors on one expert GEMM.

Each served adapter occupies one slot ``s`` of ``S`` in E per-expert
:class:`~lora_kernels.pool.AdapterPool`\\ s of one expert parameter (pool e holds expert e's
factors of every slot: ``lora_A (S, R, in)``, ``lora_Bt (S, R, out)``, ``scalings (S,)``; rows
past a slot's real rank are zero). The factor set of (slot s, expert e) is ``l = s E + e``:

    A_l = pool_e.lora_A[s, :R]                       (R, in)
    B_l = scalings_e[s] * pool_e.lora_Bt[s, :R]^T    (out, R)   (the adapter's scaling folded in)

with ``R`` the largest loaded rank (zero-padded rows add exact zeros). Row j (token t, choice i,
expert e_j) of a sequence served by slot ``s_t`` uses ``l_j = s_t E + e_j`` (``-1``: base only:
a ``None`` sequence, or a skipped choice); :func:`lora_kernels.moe_lora_linear` with
``lora_ids`` then computes each row with its own factor set only (a row never reads another
adapter's factors, so a NaN in one adapter stays in its rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..pool import AdapterPool


def stacked_factors(pools: Sequence[AdapterPool]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (S E, R, in), B (S E, out, R))`` of the per-expert pools (module docstring; R >= 1)."""
    R = max(1, max(p.max_active_rank for p in pools))
    A = torch.stack([p.lora_A[:, :R] for p in pools], dim=1)           # (S, E, R, in)
    Bt = torch.stack([p.lora_Bt[:, :R] * p.scalings.to(p.dtype)[:, None, None]
                      for p in pools], dim=1)                           # (S, E, R, out)
    S, E = A.shape[:2]
    return A.reshape(S * E, R, A.shape[-1]), Bt.transpose(2, 3).reshape(S * E, Bt.shape[-1], R)


def row_factor_ids(expert_ids: torch.Tensor, row_slots: torch.Tensor,
                   num_experts: int) -> torch.Tensor:
    """``l_j = row_slots[j] * E + expert_ids[j]``, ``-1`` where either is ``-1`` (module
    docstring). ``expert_ids``, ``row_slots``: ``(M,)`` int64."""
    return torch.where((expert_ids < 0) | (row_slots < 0), -1,
                       row_slots * num_experts + expert_ids)
