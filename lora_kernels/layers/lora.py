"""``LoRALinear``: PEFT-compatible LoRA layer on the fused :func:`lora_kernels.lora_linear`."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _validate as V
from ..ops.lora import lora_linear
from .base import AdapterLinear, same


def init_lora_factors(layer: AdapterLinear, r: int, alpha: float, dropout: float,
                      use_rslora: bool) -> None:
    """PEFT's LoRA parameters on ``layer`` (LoRALinear, DoRALinear): ``lora_A (r, in)``
    kaiming-uniform, ``lora_B (out, r)`` zeros (the layer starts at its base), ``scaling =
    alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), ``dropout`` in [0, 1); ``r``, ``alpha``,
    ``use_rslora`` kept as attributes."""
    V.rank("r", r)
    layer.r = r
    layer.alpha = V.scalar("alpha", alpha)
    layer.dropout = V.scalar("dropout", dropout, lo=0.0, hi=1.0, hi_open=True)
    layer.use_rslora = bool(use_rslora)
    layer.scaling = layer.alpha / (math.sqrt(r) if use_rslora else r)
    kw = dict(dtype=layer.weight.dtype, device=layer.weight.device)
    layer.lora_A = nn.Parameter(torch.empty(r, layer.in_features, **kw))
    layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, r, **kw))
    nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))


class LoRALinear(AdapterLinear):
    """``y = x W^T + b + scaling * dropout(x) A^T B^T``.

    Parameters ``lora_A (r, in)`` (kaiming-uniform, as PEFT) and ``lora_B (out, r)`` (zeros, so the
    layer starts at the base model); ``scaling = alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA.
    """

    def __init__(self, weight, bias, r: int, alpha: float = 1.0, dropout: float = 0.0,
                 use_rslora: bool = False, backend: str | None = None):
        super().__init__(weight, bias, backend)
        init_lora_factors(self, r, alpha, dropout, use_rslora)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float = 1.0, dropout: float = 0.0,
                    use_rslora: bool = False, backend: str | None = None) -> LoRALinear:
        cls._check_linear(linear)
        return cls(linear.weight, linear.bias, r, alpha, dropout, use_rslora, backend)

    def lora_factors(self, view=same):
        """``(lora_A, lora_B, scaling)``: the parameters themselves (through ``view``)."""
        return view(self.lora_A), view(self.lora_B), self.scaling

    def add_lora_bias(self, init: torch.Tensor | None = None) -> None:
        """PEFT's ``lora_bias=True``: a trainable ``lora_bias (out,)`` (the bias of PEFT's
        ``lora_B`` linear, zeros unless ``init``), added as ``scaling * lora_bias`` to the output
        (fused: the op's bias is ``b + scaling * lora_bias``, so its gradient is ``scaling *
        sum_t dy``)."""
        kw = dict(dtype=self.lora_B.dtype, device=self.lora_B.device)
        b = torch.zeros(self.out_features, **kw)
        if init is not None:
            V.shape("init", init, (self.out_features,), "(out_features,)")
            b.copy_(init)
        self.lora_bias = nn.Parameter(b)

    def effective_bias(self) -> torch.Tensor | None:
        """The bias the fused op adds: ``bias + scaling * lora_bias`` (differentiable)."""
        lb = getattr(self, "lora_bias", None)
        if lb is None:
            return self.bias
        return lb * self.scaling if self.bias is None else self.bias + lb * self.scaling

    def delta_bias(self) -> torch.Tensor | None:
        lb = getattr(self, "lora_bias", None)
        return None if lb is None else (lb.detach() * self.scaling)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """As :meth:`AdapterLinear.forward`, with a LoRA bias (``lora_bias=True``) folded into
        the op's bias."""
        p = self.dropout if self.training else 0.0
        return lora_linear(x, self.weight, self.effective_bias(), self.lora_A, self.lora_B,
                           self.scaling, p, generator=generator, backend=self.backend)

    def extra_repr(self) -> str:
        return (super().extra_repr()
                + f", r={self.r}, scaling={self.scaling:g}, dropout={self.dropout}")
