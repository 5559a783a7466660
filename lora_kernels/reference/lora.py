"""Reference formulas for the LoRA op (dense, autograd-differentiable, any dtype)."""

from __future__ import annotations


def lora_linear(x, weight, bias, lora_A, lora_B, scaling=1.0, keep=None, dropout_p=0.0):
    """``x W^T + b + scaling * (keep * x / (1-p)) A^T B^T`` with an explicit keep-mask (or None)."""
    xd = x if keep is None else x * keep.to(x.dtype) / (1.0 - dropout_p)
    y = x @ weight.t() + scaling * (xd @ lora_A.t()) @ lora_B.t()
    return y if bias is None else y + bias
