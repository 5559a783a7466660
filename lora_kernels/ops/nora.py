"""NoRA (Nested Low-Rank Adaptation) on the shared fused LoRA op.

``dW = outer_B @ inner_B @ inner_A @ outer_A`` with

    outer_A (r_o, in)   frozen (truncated SVD of W, singular values folded in)
    inner_A (r_i, r_o)  trainable
    inner_B (r_o, r_i)  trainable (zero-initialised by ``NoRALinear``)
    outer_B (out, r_o)  frozen

Once per call the nest collapses to LoRA-equivalent factors of rank ``r_i``

    P = inner_A @ outer_A   (r_i, in)    cost 2 r_i r_o in  flops
    Q = outer_B @ inner_B   (out, r_i)   cost 2 r_i r_o out flops

(computed in fp32 for half inputs, then cast to x's dtype) and ``y = x W^T + b + s (x P^T) Q^T``
runs in the same fused kernels as :func:`lora_kernels.lora_linear` (no copy of them). The fused
op's backward returns ``dP (r_i, in)``, ``dQ (out, r_i)``; autograd maps them back with two more
small matmuls: ``d inner_A = dP outer_A^T``, ``d inner_B = outer_B^T dQ`` (O(r_i r_o (in+out))).
"""

from __future__ import annotations

import torch

from .. import _validate as V
from .._backend import resolve_backend
from .lora import lora_linear


def _ct(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the small collapse matmuls: fp32 for half inputs, the input's dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def _check(x, weight, bias, outer_A, inner_A, inner_B, outer_B):
    in_f, out_f = V.linear_args(x, weight, bias)
    for name, t in (("outer_A", outer_A), ("inner_A", inner_A), ("inner_B", inner_B),
                    ("outer_B", outer_B)):
        V.float_tensor(name, t, ndim=2)
    r_o = outer_A.shape[0]
    V.rank("outer_A.shape[0] (outer rank r_o)", r_o, max_rank=min(in_f, out_f),
           what="min(in_features, out_features)")
    V.shape("outer_A", outer_A, (r_o, in_f), "(r_o, in_features)")
    r_i = inner_A.shape[0]
    V.rank("inner_A.shape[0] (inner rank r_i)", r_i, max_rank=r_o, what="outer rank r_o")
    V.shape("inner_A", inner_A, (r_i, r_o), "(r_i, r_o)")
    V.shape("inner_B", inner_B, (r_o, r_i), "(r_o, r_i)")
    V.shape("outer_B", outer_B, (out_f, r_o), "(out_features, r_o)")
    V.same_dtype("x", x, outer_A=outer_A, inner_A=inner_A, inner_B=inner_B, outer_B=outer_B)
    V.same_device("x", x, outer_A=outer_A, inner_A=inner_A, inner_B=inner_B, outer_B=outer_B)
    return r_o, r_i


def nora_factors(outer_A, inner_A, inner_B, outer_B) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-equivalent ``(P (r_i, in), Q (out, r_i))`` with ``Q @ P == outer_B inner_B inner_A
    outer_A``; differentiable, computed in fp32 for half inputs and cast back."""
    dt, ct = inner_A.dtype, _ct(inner_A.dtype)
    P = (inner_A.to(ct) @ outer_A.to(ct)).to(dt)
    Q = (outer_B.to(ct) @ inner_B.to(ct)).to(dt)
    return P, Q


def nora_linear(x, weight, bias, outer_A, inner_A, inner_B, outer_B, scaling=1.0, *,
                backend=None):
    """NoRA linear: ``y = x W^T + b + scaling * x (outer_B inner_B inner_A outer_A)^T``.

    Args:
        x: ``(..., in)``, any strides.
        weight: ``(out, in)``; bias: ``(out,)`` or ``None``.
        outer_A: ``(r_o, in)``; inner_A: ``(r_i, r_o)``; inner_B: ``(r_o, r_i)``;
            outer_B: ``(out, r_o)``; ``1 <= r_i <= r_o <= min(in, out)``; all in x's dtype.
        scaling: float multiplier of the adapter branch.
        backend: ``None | "torch" | "triton" | "cuda"``, passed to the fused LoRA op.
    Returns:
        ``(..., out)`` in x's dtype; gradients to every tensor that requires them.
    """
    _check(x, weight, bias, outer_A, inner_A, inner_B, outer_B)
    scaling = V.scalar("scaling", scaling)
    be = resolve_backend(backend, x.device, "nora_linear")
    P, Q = nora_factors(outer_A, inner_A, inner_B, outer_B)
    return lora_linear(x, weight, bias, P, Q, scaling, backend=be)
