"""``LoRALinear``: PEFT-compatible LoRA layer on the fused :func:`lora_kernels.lora_linear`."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _validate as V
from .base import AdapterLinear, same


class LoRALinear(AdapterLinear):
    """``y = x W^T + b + scaling * dropout(x) A^T B^T``.

    Parameters ``lora_A (r, in)`` (kaiming-uniform, as PEFT) and ``lora_B (out, r)`` (zeros, so the
    layer starts at the base model); ``scaling = alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA.
    """

    def __init__(self, weight, bias, r: int, alpha: float = 1.0, dropout: float = 0.0,
                 use_rslora: bool = False, backend: str | None = None):
        super().__init__(weight, bias, backend)
        V.rank("r", r)
        self.r = r
        self.alpha = V.scalar("alpha", alpha)
        self.dropout = V.scalar("dropout", dropout, lo=0.0, hi=1.0, hi_open=True)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        w = self.weight
        kw = dict(dtype=w.dtype, device=w.device)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float = 1.0, dropout: float = 0.0,
                    use_rslora: bool = False, backend: str | None = None) -> LoRALinear:
        cls._check_linear(linear)
        return cls(linear.weight, linear.bias, r, alpha, dropout, use_rslora, backend)

    def lora_factors(self, view=same):
        """``(lora_A, lora_B, scaling)``: the parameters themselves (through ``view``)."""
        return view(self.lora_A), view(self.lora_B), self.scaling

    def extra_repr(self) -> str:
        return (super().extra_repr()
                + f", r={self.r}, scaling={self.scaling:g}, dropout={self.dropout}")
