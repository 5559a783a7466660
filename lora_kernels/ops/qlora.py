"""The quantized base without an adapter: ``y = x deq(W)^T + b`` (:func:`quant_linear`, the base
of multi-LoRA on a quantized weight) and serving's hooks on it (:func:`serving_base`,
:func:`base_linear`). LoRA on a quantized base is ``lora_linear`` itself (``ops.lora``'s
``qlora_fwd`` op); the quantized GEMM and the weight interface are ``ops.weights``.

``quant_linear`` is a plain ``torch.autograd.Function`` (gradients to x and b; W is frozen), not a
``define_op`` op: it is called inside ``multi_lora_linear``'s quantized path only.
"""

from __future__ import annotations

import torch

from .. import _validate as V
from ..quant import NF4Weight, QuantizedWeight, is_bnb_linear4bit
from .weights import check_quantized, qgemm


class _QLinear(torch.autograd.Function):
    """``x deq(W)^T + b`` with gradients to x and b (the quantized base of multi-LoRA)."""

    @staticmethod
    def forward(ctx, x2, bias, qw, backend):
        ctx.qw, ctx.backend, ctx.has_bias = qw, backend, bias is not None
        if backend == "triton":
            return qgemm(x2, qw, trans_w=False, out_dtype=x2.dtype, bias=bias)
        return torch.nn.functional.linear(x2, qw.dequantize(x2.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        dx = db = None
        dy = dy.contiguous() if dy.stride(-1) != 1 else dy
        if ctx.needs_input_grad[0]:
            if ctx.backend == "triton":
                dx = qgemm(dy, ctx.qw, trans_w=True, out_dtype=dy.dtype)
            else:
                dx = dy @ ctx.qw.dequantize(dy.dtype)
        if ctx.needs_input_grad[1] and ctx.has_bias:
            db = dy.sum(0)
        return dx, db, None, None


def quant_linear(x, qweight, bias=None, *, backend="torch"):
    """``y = x deq(W)^T + b`` for x ``(..., in)`` (no adapter); ``backend`` ``"torch"`` |
    ``"triton"`` (``"cuda"`` runs the torch dequantise-then-GEMM path)."""
    check_quantized("weight", qweight, x)
    out_f, in_f = qweight.shape
    if bias is not None:
        V.shape("bias", bias, (out_f,), "out_features")
        V.same_dtype("x", x, bias=bias)
    x2 = x.reshape(-1, in_f)
    be = "triton" if backend == "triton" else "torch"
    y = _QLinear.apply(x2, bias, qweight, be)
    return y.reshape(*x.shape[:-1], out_f)


def serving_base(linear) -> tuple[object, torch.dtype]:
    """``(weight, compute dtype)`` of a linear a serving layer wraps: a bitsandbytes
    ``Linear4bit``'s weight as an :class:`~lora_kernels.quant.NF4Weight` (taken as it is), an
    adapter layer's quantized weight as it is, else ``linear.weight`` and its dtype."""
    w = linear.weight
    if is_bnb_linear4bit(linear):
        w = NF4Weight.from_bnb(linear)
    return w, getattr(w, "dtype", None)  # None: a placeholder set later (tensor parallel)


def base_linear(x, weight, bias, backend: str = "torch"):
    """``x W^T + b`` for a dense or quantized ``weight`` (serving's base-only path)."""
    if isinstance(weight, QuantizedWeight):
        return quant_linear(x, weight, bias, backend=backend)
    return torch.nn.functional.linear(x, weight, bias)
