"""``DoRALinear``: PEFT-compatible DoRA layer (``use_dora=True``) on
:func:`lora_kernels.dora_linear`."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.dora import dora_linear, dora_norm, weight_sq_norm
from .base import AdapterLinear
from .lora import init_lora_factors


class DoRALinear(AdapterLinear):
    """``y = g * (x W^T) + g * scaling * dropout(x) A^T B^T + b``, ``g = m / ||W + s B A||_row``.

    Parameters (PEFT names): ``lora_A (r, in)`` (kaiming-uniform), ``lora_B (out, r)`` (zeros) and
    ``magnitude (out,)`` (PEFT's ``lora_magnitude_vector.<adapter>.weight``), initialised to
    ``||W_j||`` so the layer starts at the base model. ``scaling = alpha / r`` (``alpha / sqrt(r)``
    with rsLoRA). The norm is detached (as PEFT); with dropout in training the base term follows
    PEFT (``ops.dora``). ``||W_j||^2`` of the frozen base is computed once and cached (recomputed
    if ``weight`` is modified in place or replaced).

    DoRA is not a LoRA: its delta ``(g - 1) * W + g * s B A`` has the full-rank term
    ``diag(g - 1) W``, so :meth:`as_lora` raises ``NotImplementedError`` (and a model with DoRA
    layers is saved as a PEFT *DoRA* adapter by :func:`lora_kernels.save_peft_adapter`). Its exact
    serving form is LoRA factors plus an output row scale: :meth:`as_dora`.
    """

    def __init__(self, weight, bias, r: int, alpha: float = 1.0, dropout: float = 0.0,
                 use_rslora: bool = False, backend: str | None = None):
        super().__init__(weight, bias, backend)
        init_lora_factors(self, r, alpha, dropout, use_rslora)
        w = self.weight
        self._wsq_key = None
        self._wsq = None
        self.magnitude = nn.Parameter(self.weight_sq_norm().sqrt().to(w.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float = 1.0, dropout: float = 0.0,
                    use_rslora: bool = False, backend: str | None = None) -> DoRALinear:
        cls._check_linear(linear)
        return cls(linear.weight, linear.bias, r, alpha, dropout, use_rslora, backend)

    def weight_sq_norm(self) -> torch.Tensor:
        """``||W_j||^2`` (out,) fp32 of the frozen base, cached per (storage, version, device).
        Under ``torch.compile`` it is computed in the graph instead (one read of W per call): the
        cache key (a data pointer) is not traceable."""
        w = self.weight
        if self.quantized:  # frozen codes: deq(W)'s norms, once per device / compute dtype
            key = ("quantized", id(w), w.device, w.dtype)
            if self._wsq is None or self._wsq_key != key:
                self._wsq = weight_sq_norm(w.dequantize(torch.float32))
                self._wsq_key = key
            return self._wsq
        if torch.compiler.is_compiling() or w.is_inference():  # (no version counter: no cache)
            return weight_sq_norm(w.detach())
        key = (w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape))
        if self._wsq is None or self._wsq_key != key:
            self._wsq = weight_sq_norm(w.detach())
            self._wsq_key = key
        return self._wsq

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        return dora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.magnitude,
                           self.scaling, p, generator=generator, backend=self.backend,
                           weight_sq_norm=self.weight_sq_norm())

    @torch.no_grad()
    def row_scale(self) -> torch.Tensor:
        """``g = m / ||W + s B A||_row`` (out,) fp32, the low-rank norm (no dense delta)."""
        n = dora_norm(self.weight, self.lora_A, self.lora_B, self.scaling, self.weight_sq_norm())
        return self.magnitude.detach().float() / n

    def as_dora(self) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
        """``(lora_A, lora_B, scaling, magnitude)``: what PEFT stores for this layer."""
        return self.lora_A, self.lora_B, self.scaling, self.magnitude

    def as_lora(self):
        raise NotImplementedError(
            "DoRALinear has no exact LoRA form: its delta (g - 1) * W + g * s * B @ A has the "
            "full-rank term diag(g - 1) @ W; use as_dora() (LoRA factors + magnitude) or "
            "delta_weight()")

    @torch.no_grad()
    def _merged_weight64(self) -> torch.Tensor:
        w = self.weight.double() + self.scaling * (self.lora_B.double() @ self.lora_A.double())
        return (self.magnitude.double() / torch.linalg.vector_norm(w, dim=1))[:, None] * w

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """Dense ``g[:, None] * (W + s B A) - W`` (out, in), computed in float64."""
        return (self._merged_weight64() - self.weight.double()).to(self.weight.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight ``g[:, None] * (W + s B A)`` (PEFT's merge) and the
        base bias (DoRA leaves the bias alone), rounded once from float64."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self._merged_weight64().to(lin.weight.dtype))
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (super().extra_repr()
                + f", r={self.r}, scaling={self.scaling:g}, dropout={self.dropout}")
