"""``DeepLoRALinear``: a depth-k factorisation ``F_k ... F_1`` of the update (k >= 3)."""

from __future__ import annotations

import torch
from torch import nn

from .. import _validate as V
from ..ops.deep import deep_factors
from .base import AdapterLinear, same


@torch.no_grad()
def compressed_factors(grad: torch.Tensor, rank: int, depth: int, eps: float
                       ) -> list[torch.Tensor]:
    """Compressed Deep LoRA init from one batch's gradient ``grad (out, in)`` of the loss w.r.t.
    the layer's weight: with ``grad = U S V^T``, ``F_1 = eps V_r^T``, ``F_k = eps U_r`` (the rank-r
    subspace the updates stay in) and inner ``F_i = eps I_r``. Float64 SVD."""
    V.float_tensor("grad", grad, ndim=2)
    out_f, in_f = grad.shape
    U, _, Vh = torch.linalg.svd(grad.detach().to(torch.float64), full_matrices=False)
    eye = torch.eye(rank, dtype=torch.float64, device=grad.device)
    fs = [eps * Vh[:rank]] + [eps * eye for _ in range(depth - 2)] + [eps * U[:, :rank]]
    return [f.to(grad.dtype) for f in fs]


class DeepLoRALinear(AdapterLinear):
    """``y = x W^T + b + scaling * x (F_k ... F_2 F_1)^T``.

    Trainable ``factors`` (an ``nn.ParameterList``): ``F1 (r, in)``, ``F2 .. F_{k-1} (r, r)``,
    ``Fk (out, r)``; ``r (in + out) + (k - 2) r^2`` parameters. Default init: each factor
    orthogonal with gain ``eps`` (1e-3), so the update starts at ``~eps^k`` (almost the base
    model). Compressed variant: pass ``grad`` (the loss gradient w.r.t. the base weight on one
    batch), see :func:`compressed_factors`. Each call folds the inner factors and runs the fused
    LoRA kernels at rank r (see :mod:`lora_kernels.ops.deep`).
    """

    def __init__(self, weight, bias, rank: int, depth: int = 3, eps: float = 1e-3,
                 generator: torch.Generator | None = None, *, scaling: float = 1.0,
                 grad: torch.Tensor | None = None, backend: str | None = None):
        super().__init__(weight, bias, backend)
        V.rank("rank", rank, max_rank=min(self.in_features, self.out_features),
               what="min(in_features, out_features)")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 3:
            raise ValueError(f"depth must be an int >= 3 (use LoRALinear for depth 2), "
                             f"got {depth!r}")
        self.rank, self.depth = rank, depth
        self.eps = V.scalar("eps", eps, lo=0.0)
        self.scaling = V.scalar("scaling", scaling)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
        w = self.weight
        shapes = [(rank, self.in_features)] + [(rank, rank)] * (depth - 2) + \
            [(self.out_features, rank)]
        if grad is not None:
            V.float_tensor("grad", grad, ndim=2)
            V.shape("grad", grad, tuple(w.shape), "like weight (out, in)")
            init = compressed_factors(grad.to(w.device), rank, depth, self.eps)
        else:
            init = []
            for shp in shapes:
                t = torch.empty(shp, dtype=torch.float32)
                nn.init.orthogonal_(t, gain=self.eps, generator=generator)
                init.append(t)
        self.compressed = grad is not None
        self.factors = nn.ParameterList(
            [nn.Parameter(t.to(dtype=w.dtype, device=w.device)) for t in init])

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, depth: int = 3, eps: float = 1e-3,
                    generator: torch.Generator | None = None, *, scaling: float = 1.0,
                    grad: torch.Tensor | None = None, backend: str | None = None
                    ) -> DeepLoRALinear:
        cls._check_linear(linear)
        return cls(linear.weight, linear.bias, rank, depth, eps, generator, scaling=scaling,
                   grad=grad, backend=backend)

    def lora_factors(self, view=same):
        """Rank-r factors ``(F_{k-1} ... F_2 F_1, F_k, scaling)``
        (:func:`lora_kernels.ops.deep.deep_factors`, shared with :func:`deep_lora_linear`)."""
        P, Q = deep_factors([view(f) for f in self.factors])
        return P, Q, self.scaling

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", rank={self.rank}, depth={self.depth}, "
                f"eps={self.eps:g}, compressed={self.compressed}")
