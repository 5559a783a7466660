"""Composition of LoRA adapters without materialising dense ``out x in`` deltas.

An adapter is ``(lora_A (r, in), lora_B (out, r), scaling)`` with ``delta = scaling * B @ A``
(PEFT layout). A model-level adapter is a dict ``{module name: (lora_A, lora_B, scaling)}`` (e.g.
from :func:`lora_kernels.load_peft_adapter`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from . import _validate as V


def sum_loras(adapters: Sequence) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact sum of LoRA deltas as one LoRA: ``(cat_k A_k, cat_k s_k B_k, 1.0)``.

    ``sum_k s_k B_k A_k = [s_1 B_1 | s_2 B_2 | ...] @ [A_1; A_2; ...]``: rank ``sum_k r_k``, no
    truncation (the only rounding is ``s_k * B_k`` in the factors' dtype; float64 inputs are
    exact to float64). All adapters must share (in, out) and device; the result has the
    promoted dtype of all factors.
    """
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence) or not adapters:
        raise TypeError("adapters must be a non-empty list of (lora_A, lora_B, scaling)")
    fs = [V.lora_triple(f"adapters[{k}]", ad) for k, ad in enumerate(adapters)]
    A0, B0, _ = fs[0]
    dtype = A0.dtype
    for k, (A, B, _) in enumerate(fs):
        if A.shape[1] != A0.shape[1] or B.shape[0] != B0.shape[0]:
            raise ValueError(f"adapters[{k}] maps {A.shape[1]} -> {B.shape[0]} features, "
                             f"adapters[0] maps {A0.shape[1]} -> {B0.shape[0]}")
        V.same_device("adapters[0].lora_A", A0, **{f"adapters[{k}].lora_A": A})
        dtype = torch.promote_types(dtype, torch.promote_types(A.dtype, B.dtype))
    A = torch.cat([a.to(dtype) for a, _, _ in fs], 0)
    B = torch.cat([(b.to(torch.float64) * s).to(dtype) for _, b, s in fs], 1)
    return A, B, 1.0


def _gram(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return X.to(torch.float64) @ Y.to(torch.float64).t()


def lora_inner(a, b) -> float:
    """Frobenius inner product ``<s_a B_a A_a, s_b B_b A_b>`` from r x r products:
    ``s_a s_b sum((B_a^T B_b) * (A_a A_b^T))`` (float64; never forms an out x in matrix)."""
    A1, B1, s1 = V.lora_triple("a", a)
    A2, B2, s2 = V.lora_triple("b", b)
    if A1.shape[1] != A2.shape[1] or B1.shape[0] != B2.shape[0]:
        raise ValueError(f"a maps {A1.shape[1]} -> {B1.shape[0]} features but b maps "
                         f"{A2.shape[1]} -> {B2.shape[0]}")
    V.same_device("a.lora_A", A1, **{"b.lora_A": A2})
    return float(s1 * s2 * (_gram(B1.t(), B2.t()) * _gram(A1, A2)).sum())


def lora_cosine(a, b) -> float:
    """Frobenius cosine of two LoRA deltas, ``<dW_a, dW_b> / (|dW_a| |dW_b|)``, computed from
    r x r Gram products in float64 (O(r^2 (in + out)) work, no out x in matrix). Returns 0.0 when
    either delta is exactly zero (e.g. a freshly initialised LoRA with B = 0), NaN when either
    has a non-finite entry (never a clamped 1.0)."""
    ab = lora_inner(a, b)
    na = lora_inner(a, a)
    nb = lora_inner(b, b)
    if not (math.isfinite(ab) and math.isfinite(na) and math.isfinite(nb)):
        return math.nan
    if na <= 0.0 or nb <= 0.0:
        return 0.0
    return max(-1.0, min(1.0, ab / math.sqrt(na * nb)))


def rms_cosine(adapter1: Mapping, adapter2: Mapping) -> float:
    """Root-mean-square of :func:`lora_cosine` over the modules both adapters define
    (``sqrt(mean_m cos_m^2)``; sign-free similarity in [0, 1]). ``ValueError`` if they share no
    module."""
    for n, ad in (("adapter1", adapter1), ("adapter2", adapter2)):
        if not isinstance(ad, Mapping):
            raise TypeError(f"{n} must be a dict {{module name: (lora_A, lora_B, scaling)}}, got "
                            f"{type(ad).__name__}")
    shared = [k for k in adapter1 if k in adapter2]
    if not shared:
        raise ValueError("adapter1 and adapter2 share no module: rms_cosine is undefined")
    cos = [lora_cosine(adapter1[k], adapter2[k]) for k in shared]
    return math.sqrt(sum(c * c for c in cos) / len(cos))


def sum_adapters(adapters: Sequence[Mapping]) -> dict:
    """Model-level :func:`sum_loras`: module-wise exact sum of several adapter dicts (a module
    present in only some of them sums those)."""
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence) or not adapters:
        raise TypeError("adapters must be a non-empty list of adapter dicts")
    for k, ad in enumerate(adapters):
        if not isinstance(ad, Mapping):
            raise TypeError(f"adapters[{k}] must be a dict, got {type(ad).__name__}")
    out = {}
    for mod in dict.fromkeys(m for ad in adapters for m in ad):
        out[mod] = sum_loras([ad[mod] for ad in adapters if mod in ad])
    return out
