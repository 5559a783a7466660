"""Shared base of every adapter layer: frozen base weight, the factorisation hook, merge.

Every method but GLoRA is "base GEMM + low-rank chain": it implements one hook,
:meth:`AdapterLinear.lora_factors`, returning differentiable LoRA-equivalent factors
``(P (r, in), Q (out, r), scaling)`` with ``delta W = scaling * Q @ P``. Everything else
derives from it: ``forward`` (the fused LoRA op on ``P, Q``), ``as_lora`` (the same factors
under no_grad), ``delta_weight``, ``merged`` and the tensor-parallel forward
(``lora_kernels.parallel``, which passes a ``view`` mapping each stored tensor to its local
shard). GLoRA (Hadamard term, not low-rank) overrides ``forward`` and ``delta_weight`` instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .._conv1d import as_linear, is_conv1d
from ..ops.lora import lora_linear
from ..quant import QuantizedWeight, layer_base


def same(t):
    """The identity ``view`` of :meth:`AdapterLinear.lora_factors` (single-process layers)."""
    return t


class AdapterLinear(nn.Module):
    """``y = x W^T + b + delta(x)``, with ``W`` (out, in) and ``b`` (out,) frozen parameters.

    Subclasses implement :meth:`lora_factors` (or, like GLoRA, :meth:`forward` and
    :meth:`delta_weight`). ``backend`` is passed to the functional op on every call; ``dropout``
    (0 unless the method has one, e.g. LoRA) applies to the low-rank branch's input in training.
    """

    dropout: float = 0.0

    # True for a layer built from transformers' Conv1D (GPT-2): ``weight`` is then the (out, in)
    # transposed view of a contiguous (in, out) copy (see lora_kernels._conv1d)
    fan_in_fan_out = False

    def __init_subclass__(cls, **kwargs):
        # every subclass's ``from_linear`` also accepts a transformers Conv1D: it sees the
        # nn.Linear view ``as_linear(conv)`` (weight.t(), no copy; ``clone()`` in __init__ keeps
        # the transposed strides) and the new layer is marked ``fan_in_fan_out = True``
        super().__init_subclass__(**kwargs)
        fl = cls.__dict__.get("from_linear")
        if isinstance(fl, classmethod):
            inner = fl.__func__

            @functools.wraps(inner)
            def from_linear(c, linear, *args, quantize=None, **kw):
                # a quantized base (lora_kernels.quant.layer_base): a bnb Linear4bit as it is, or
                # quantize="nf4" | "int8" | "fp8"; the constructor sees deq(W) once
                conv = is_conv1d(linear)
                linear, qweight = layer_base(as_linear(linear) if conv else linear, quantize)
                layer = inner(c, linear, *args, **kw)
                layer.fan_in_fan_out = conv
                if qweight is not None:
                    layer.set_quantized_base(qweight)
                return layer

            cls.from_linear = classmethod(from_linear)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str | None = None):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            got = getattr(weight, "shape", type(weight).__name__)
            raise ValueError(f"weight must be a 2-D (out, in) tensor, got {got}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = (nn.Parameter(bias.detach().clone(), requires_grad=False)
                     if bias is not None else None)
        self.backend = backend

    def set_quantized_base(self, qweight: QuantizedWeight) -> None:
        """Replace the frozen dense ``weight`` with a quantized one (a ``lora_kernels.quant``
        module, registered as the submodule ``weight``; every op dequantises it in the kernels).
        """
        if tuple(qweight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"qweight must have shape {(self.out_features, self.in_features)}, "
                             f"got {tuple(qweight.shape)}")
        del self.weight
        self.weight = qweight

    @property
    def quantized(self) -> bool:
        """Whether the frozen base is a quantized weight."""
        return isinstance(self.weight, QuantizedWeight)

    @staticmethod
    def _check_linear(linear) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear or transformers' Conv1D, got "
                            f"{type(linear).__name__}")

    def lora_factors(self, view: Callable = same) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The method's LoRA-equivalent factors ``(P (r, in), Q (out, r), scaling)``,
        differentiable w.r.t. its trainable tensors (``delta W = scaling * Q @ P``).

        ``view`` maps each stored tensor (parameter or buffer) before use; the default is the
        identity, the tensor-parallel forward passes the map to this rank's local shards.
        """
        raise NotImplementedError(f"{type(self).__name__} has no low-rank form")

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``y = x W^T + b + scaling * dropout(x) P^T Q^T`` (``x (..., in)`` -> ``(..., out)``) on
        the fused LoRA op; ``generator`` seeds the dropout mask (training with dropout only)."""
        P, Q, s = self.lora_factors()
        p = self.dropout if self.training else 0.0
        return lora_linear(x, self.weight, self.bias, P, Q, s, p, generator=generator,
                           backend=self.backend)

    def delta_weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight delta this adapter adds (materialised on request).
        Default, for every method with a low-rank form: ``s * Q @ P`` from :meth:`as_lora`,
        multiplied in (at least) fp32 and returned in the factors' dtype."""
        P, Q, s = self.as_lora()
        ct = torch.promote_types(P.dtype, torch.float32)
        return (s * (Q.to(ct) @ P.to(ct))).to(P.dtype)

    def delta_bias(self) -> torch.Tensor | None:
        """The bias delta (None for methods that leave the bias alone)."""
        return None

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact LoRA-equivalent factors ``(lora_A (r, in), lora_B (out, r), scaling)``:
        :meth:`lora_factors` under no_grad, detached (no autograd history, storage may be shared
        with the layer's parameters)."""
        with torch.no_grad():
            P, Q, s = self.lora_factors()
        return P.detach(), Q.detach(), s

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the delta folded in (zero extra inference cost).

        On a quantized base: ``deq(W) + delta`` in float64, rounded once to the compute dtype;
        the result is dense and is *not* re-quantised (``self.weight.requantize(lin.weight)``
        gives that, with the format's rounding error on the merged weight)."""
        has_bias = self.bias is not None or self.delta_bias() is not None
        lin = nn.Linear(self.in_features, self.out_features, bias=has_bias,
                        device=self.weight.device, dtype=self.weight.dtype)
        w = (self.weight.dequantize(torch.float64) if self.quantized else self.weight.double())
        lin.weight.copy_((w + self.delta_weight().double()).to(lin.weight.dtype))
        if has_bias:
            b = self.bias.double() if self.bias is not None else torch.zeros(
                self.out_features, dtype=torch.float64, device=self.weight.device)
            db = self.delta_bias()
            if db is not None:
                b = b + db.double()
            lin.bias.copy_(b.to(lin.bias.dtype))
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")
