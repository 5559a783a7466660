"""``NoRALinear``: nested LoRA with SVD-initialised frozen outer factors (one fused LoRA op)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _validate as V
from ..ops.nora import nora_factors
from .base import AdapterLinear, same


@torch.no_grad()
def svd_outer_factors(weight: torch.Tensor, outer_rank: int, calib_x: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen NoRA outer factors from a truncated SVD of ``weight (out, in)``.

    ``W ~= U_r S_r V_r^T``; the singular values are split evenly into both factors:
    ``outer_B = U_r S_r^(1/2) (out, r_o)``, ``outer_A = S_r^(1/2) V_r^T (r_o, in)``.

    Activation-aware (``calib_x (..., in)`` given): with ``s = mean_t |x_t| (in,)`` the SVD is
    taken of ``W diag(s)`` (columns that see large activations are approximated first) and undone
    after: ``outer_A = S_r^(1/2) V_r^T diag(1/s)``. Zero-activation columns use ``s`` clamped
    to ``1e-6 * max(s)``. Computed in float64, returned in weight's dtype/device.
    """
    V.float_tensor("weight", weight, ndim=2)
    out_f, in_f = weight.shape
    V.rank("outer_rank", outer_rank, max_rank=min(in_f, out_f),
           what="min(in_features, out_features)")
    w = weight.detach().to(torch.float64)
    s = None
    if calib_x is not None:
        V.float_tensor("calib_x", calib_x, min_ndim=1)
        if calib_x.shape[-1] != in_f or calib_x.numel() == 0:
            raise ValueError(f"calib_x must have shape (..., in_features={in_f}) with at least "
                             f"one token, got {tuple(calib_x.shape)}")
        s = calib_x.detach().to(device=w.device, dtype=torch.float64).reshape(-1, in_f)
        s = s.abs().mean(0)
        if not torch.isfinite(s).all() or s.max() <= 0:
            raise ValueError("calib_x must be finite and not all zero")
        s = s.clamp_min(1e-6 * s.max())
        w = w * s[None, :]
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    root = S[:outer_rank].sqrt()
    outer_B = U[:, :outer_rank] * root[None, :]
    outer_A = root[:, None] * Vh[:outer_rank]
    if s is not None:
        outer_A = outer_A / s[None, :]
    return outer_A.to(weight.dtype), outer_B.to(weight.dtype)


class NoRALinear(AdapterLinear):
    """``y = x W^T + b + scaling * x (outer_B inner_B inner_A outer_A)^T``.

    Buffers (frozen, in the state dict): ``outer_A (r_o, in)``, ``outer_B (out, r_o)`` from
    :func:`svd_outer_factors`. Trainable parameters (``2 r_o r_i`` of them): ``inner_A (r_i, r_o)``
    (kaiming-uniform, as PEFT's lora_A) and ``inner_B (r_o, r_i)`` (zeros, so the layer starts at
    the base model). ``scaling = alpha / r_i``. Each call collapses to rank-``r_i`` LoRA factors
    and runs the fused LoRA kernels (see :mod:`lora_kernels.ops.nora`).
    """

    def __init__(self, weight, bias, outer_rank: int, inner_rank: int, alpha: float = 1.0,
                 calib_x: torch.Tensor | None = None, backend: str | None = None):
        super().__init__(weight, bias, backend)
        mx = min(self.in_features, self.out_features)
        V.rank("outer_rank", outer_rank, max_rank=mx, what="min(in_features, out_features)")
        V.rank("inner_rank", inner_rank, max_rank=outer_rank, what="outer_rank")
        self.outer_rank, self.inner_rank = outer_rank, inner_rank
        self.alpha = V.scalar("alpha", alpha)
        self.scaling = self.alpha / inner_rank
        oa, ob = svd_outer_factors(self.weight, outer_rank, calib_x)
        self.register_buffer("outer_A", oa)
        self.register_buffer("outer_B", ob)
        w = self.weight
        self.inner_A = nn.Parameter(torch.empty(inner_rank, outer_rank, dtype=w.dtype,
                                                device=w.device))
        self.inner_B = nn.Parameter(torch.zeros(outer_rank, inner_rank, dtype=w.dtype,
                                                device=w.device))
        nn.init.kaiming_uniform_(self.inner_A, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear, outer_rank: int, inner_rank: int, alpha: float = 1.0,
                    calib_x: torch.Tensor | None = None, backend: str | None = None
                    ) -> NoRALinear:
        cls._check_linear(linear)
        return cls(linear.weight, linear.bias, outer_rank, inner_rank, alpha, calib_x, backend)

    def lora_factors(self, view=same):
        """Rank-``r_i`` factors ``(inner_A outer_A, outer_B inner_B, scaling)``
        (:func:`lora_kernels.ops.nora.nora_factors`, shared with :func:`nora_linear`)."""
        P, Q = nora_factors(view(self.outer_A), view(self.inner_A), view(self.inner_B),
                            view(self.outer_B))
        return P, Q, self.scaling

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", outer_rank={self.outer_rank}, "
                f"inner_rank={self.inner_rank}, scaling={self.scaling:g}")
