"""Deep LoRA (deep overparameterised low-rank factorisation) on the shared fused LoRA op.

``dW = F_k @ ... @ F_2 @ F_1`` with ``F_1 (r, in)``, ``F_2 .. F_{k-1} (r, r)``, ``F_k (out, r)``,
``k >= 3``. Once per call the inner ``r x r`` factors fold into one matrix and the chain collapses
to LoRA-equivalent factors of rank r:

    M = F_{k-1} @ ... @ F_2      (r, r)     cost 2 (k-3) r^3 flops
    P = M @ F_1                  (r, in)    cost 2 r^2 in flops
    Q = F_k                      (out, r)   (no copy)

(fp32 for half inputs, then cast to x's dtype); ``y = x W^T + b + s (x P^T) Q^T`` runs in the fused
kernels of :func:`lora_kernels.lora_linear`, whose backward returns ``dP``, ``dQ``; autograd maps
``dP`` back through the fold (``dF_1 = M^T dP``, ``dM = dP F_1^T`` and down the r x r chain).
"""

from __future__ import annotations

import torch

from .. import _validate as V
from .._backend import resolve_backend
from .lora import lora_linear


def _check(x, weight, bias, factors) -> int:
    in_f, out_f = V.linear_args(x, weight, bias)
    if not isinstance(factors, (list, tuple)):
        raise TypeError(f"factors must be a list/tuple of tensors [F1 (r, in), F2 (r, r), ..., "
                        f"Fk (out, r)], got {type(factors).__name__}")
    k = len(factors)
    if k < 3:
        raise ValueError(f"factors must have depth k >= 3 (len(factors)), got {k}; "
                         "use lora_linear for k = 2")
    for i, f in enumerate(factors):
        V.float_tensor(f"factors[{i}]", f, ndim=2)
    r = factors[0].shape[0]
    V.rank("factors[0].shape[0] (rank r)", r, max_rank=min(in_f, out_f),
           what="min(in_features, out_features)")
    V.shape("factors[0]", factors[0], (r, in_f), "(r, in_features)")
    for i in range(1, k - 1):
        V.shape(f"factors[{i}]", factors[i], (r, r), "(r, r)")
    V.shape(f"factors[{k - 1}]", factors[-1], (out_f, r), "(out_features, r)")
    V.same_dtype("x", x, **{f"factors[{i}]": f for i, f in enumerate(factors)})
    V.same_device("x", x, **{f"factors[{i}]": f for i, f in enumerate(factors)})
    return r


def deep_factors(factors) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-equivalent ``(P (r, in), Q (out, r))`` with ``Q @ P == F_k ... F_1``; differentiable."""
    dt = factors[0].dtype
    ct = torch.promote_types(dt, torch.float32)
    m = factors[1].to(ct)
    for f in factors[2:-1]:
        m = f.to(ct) @ m
    P = (m @ factors[0].to(ct)).to(dt)
    return P, factors[-1]


def deep_lora_linear(x, weight, bias, factors, scaling=1.0, *, backend=None):
    """Deep LoRA linear: ``y = x W^T + b + scaling * x (F_k ... F_2 F_1)^T``.

    Args:
        x: ``(..., in)``, any strides.
        weight: ``(out, in)``; bias: ``(out,)`` or ``None``.
        factors: ``[F1 (r, in), F2 (r, r), ..., F_{k-1} (r, r), Fk (out, r)]``, ``k >= 3``,
            ``1 <= r <= min(in, out)``, all in x's dtype.
        scaling: float multiplier of the adapter branch.
        backend: ``None | "torch" | "triton" | "cuda"``, passed to the fused LoRA op.
    Returns:
        ``(..., out)`` in x's dtype; gradients to every factor that requires them.
    """
    _check(x, weight, bias, factors)
    scaling = V.scalar("scaling", scaling)
    be = resolve_backend(backend, x.device, "deep_lora_linear")
    P, Q = deep_factors(factors)
    return lora_linear(x, weight, bias, P, Q, scaling, backend=be)
