"""Dense plain-PyTorch references for NoRA, CURLoRA, Deep LoRA and GLoRA.

Each builds the dense ``(out, in)`` delta explicitly (no collapse, no fused kernel) and is
autograd-differentiable in any dtype; tests run them in float64 on CPU.
"""

from __future__ import annotations

import torch


def _linear(x, weight, bias, dw, db=None):
    y = x @ (weight + dw).t()
    if bias is not None:
        y = y + bias
    return y if db is None else y + db


def nora_delta(outer_A, inner_A, inner_B, outer_B, scaling=1.0):
    """``scaling * outer_B @ inner_B @ inner_A @ outer_A`` (out, in)."""
    return scaling * (outer_B @ (inner_B @ (inner_A @ outer_A)))


def nora_linear(x, weight, bias, outer_A, inner_A, inner_B, outer_B, scaling=1.0):
    return _linear(x, weight, bias, nora_delta(outer_A, inner_A, inner_B, outer_B, scaling))


def cur_delta(weight, col_idx, row_idx, U, scaling=1.0):
    """``scaling * W0[:, col_idx] @ U @ W0[row_idx, :]`` (out, in)."""
    C = weight[:, col_idx.long()]
    R = weight[row_idx.long(), :]
    return scaling * (C @ U @ R)


def cur_linear(x, weight, bias, col_idx, row_idx, U, scaling=1.0):
    return _linear(x, weight, bias, cur_delta(weight, col_idx, row_idx, U, scaling))


def deep_delta(factors, scaling=1.0):
    """``scaling * F_k @ ... @ F_2 @ F_1`` (out, in)."""
    d = factors[0]
    for f in factors[1:]:
        d = f @ d
    return scaling * d


def deep_lora_linear(x, weight, bias, factors, scaling=1.0):
    return _linear(x, weight, bias, deep_delta(factors, scaling))


def glora_support(s, out_f: int, in_f: int):
    """A or B as a dense (out, in) tensor: scalar/vector broadcast, pair ``down @ up``."""
    if s is None:
        return torch.zeros(())
    if isinstance(s, (tuple, list)):
        return s[0] @ s[1]
    return s if s.dim() == 0 else s[:, None]


def glora_c(C):
    """C as a dense (in,) vector."""
    if isinstance(C, (tuple, list)):
        return (C[0] @ C[1])[:, 0]
    return C


def glora_linear(x, weight, bias, A=None, B=None, C=None, D=None, E=None):
    """``x (W + W*A + B)^T + b + b*D + E + W@C``, every support dense."""
    out_f, in_f = weight.shape
    w_eff = weight + weight * glora_support(A, out_f, in_f).to(weight) \
        + glora_support(B, out_f, in_f).to(weight)
    y = x @ w_eff.t()
    if bias is not None:
        y = y + bias
        if D is not None:
            y = y + bias * D
    if E is not None:
        y = y + E
    if C is not None:
        y = y + weight @ glora_c(C)
    return y
