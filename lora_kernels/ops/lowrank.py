"""The low-rank engine: "base GEMM + low-rank chain", forward and backward, on every backend.

Every LoRA-shaped op is built on it: ``ops.lora`` (and through LoRA-equivalent factors NoRA,
CURLoRA, Deep LoRA), ``ops.dora``, ``ops.glora`` (its launchers), the quantized base
(``ops.weights``: the base GEMM is chosen here from the weight) and the TMA candidate
(``ops.lora_tma``). Layers: ``kernels.lora`` (Triton) / ``ops.lora_cuda`` (CUDA) -> this module
-> the op modules' ``define_op`` calls.

Shapes: x2 (T, in), weight (out, in) dense or quantized (``ops.weights``), bias (out,),
A (r, in), B (out, r); s = scaling, p = dropout probability on the low-rank input.
Forward:   Xd = drop(x2);  S = Xd A^T (T, r) fp32;  y = x2 W^T + b + s S B^T.
Backward (dy (T, out)):
  G  = dy B                                  (T, r) fp32
  dx = dy W + s * keep/(1-p) * (G A)         (dropout only on the low-rank path)
  dA = s * G^T Xd                            (r, in)
  dB = s * dy^T S                            (out, r)   S saved from the forward (T*r*4 bytes)
(dW, db are the op's: plain torch GEMM / reduction, only when the base requires grad.)
The dropout mask is regenerated from ``seed`` in backward, never stored.

:data:`BACKENDS` maps a backend name to ``(fwd, bwd)`` with
``fwd(x2, weight, bias, A, B, scaling, p, seed) -> (y, S)`` and
``bwd(dy, saved: Saved, need: Needs) -> (dx | None, dA | None, dB | None)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _triton as TR
from . import lora_cuda
from . import weights as W

__all__ = ["BACKENDS", "Needs", "Saved", "base_gemm", "cuda_bwd", "cuda_fwd", "gemm_lowrank",
           "tn", "torch_bwd", "torch_fwd", "torch_keep_mask", "triton_bwd", "triton_fwd"]


class Saved(NamedTuple):
    """What every backend's backward reads (saved by the forward): ``x`` (T, in),
    ``weight`` (out, in) (dense, or a quantized weight: ``ops.weights``), ``A`` (r, in),
    ``B`` (out, r), ``s = drop(x) A^T`` (T, r) fp32, ``scaling``, dropout ``p`` and its ``seed``
    (int64 (1,) or None)."""

    x: torch.Tensor
    weight: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    s: torch.Tensor
    scaling: float
    p: float
    seed: torch.Tensor | None


class Needs(NamedTuple):
    """Which of the low-rank backward's gradients to compute."""

    dx: bool
    dA: bool
    dB: bool


# ----------------------------------------------------------------------------- torch reference
def torch_keep_mask(seed: torch.Tensor, shape, p: float, device) -> torch.Tensor:
    """Reference-path dropout mask (bool, True = keep), regenerated from ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed.reshape(-1)[0].item()))
    return torch.rand(shape, generator=g, device=device) >= p


def torch_fwd(x2, weight, bias, A, B, scaling, p, seed):
    """``(y, S)`` in plain PyTorch; a quantized weight is dequantised in x's dtype per call."""
    if not isinstance(weight, torch.Tensor):
        weight = W.dense(weight, x2.dtype, x2.device)
    xd = x2 if p == 0.0 else x2 * torch_keep_mask(seed, x2.shape, p, x2.device) / (1.0 - p)
    s = F.linear(xd, A)
    # in place on the fresh base output: one (T, out) buffer, scaling folded into addmm's alpha
    y = F.linear(x2, weight, bias)
    if scaling != 0.0:
        y.addmm_(s, B.t(), alpha=scaling)
    else:   # addmm's alpha=0 skips the product (BLAS): NaN/inf factors propagate, as in PEFT
        y.add_((s @ B.t()).mul_(0.0))
    # S saved fp32 (float64 kept: dB = dy^T S of a float64 call stays float64-accurate)
    return y, (s if s.dtype == torch.float64 else s.float())


def torch_bwd(dy, saved: Saved, need: Needs):
    """``(dx, dA, dB)`` in plain PyTorch; W is read (dequantised if quantized) for dx only."""
    # scaling is applied to the small (T, r) operands only: no extra pass over (T, in|out)
    x2, weight, A, B, s, scaling, p, seed = saved
    dx = dA = dB = None
    keep = None if p == 0.0 else torch_keep_mask(seed, x2.shape, p, x2.device)
    if need.dx or need.dA:
        gs = (dy @ B).mul_(scaling)                                   # s * G (T, r)
    if need.dx:
        w = W.dense(weight, x2.dtype, x2.device)
        if keep is None:
            dx = torch.mm(dy, w).addmm_(gs, A)
        else:
            dx = torch.mm(dy, w).add_((gs @ A) * keep, alpha=1.0 / (1.0 - p))
    if need.dA:
        xd = x2 if keep is None else x2 * keep / (1.0 - p)
        dA = gs.t() @ xd
    if need.dB:
        dB = dy.t() @ (s * scaling).to(dy.dtype)
    return dx, dA, dB


# ----------------------------------------------------------------------------- Triton launchers
def gemm_lowrank(x, w, *, out_dtype, bias=None, s=None, bm=None, scale=1.0, seed=None, p=0.0,
                 drop_x=False, drop_epi=False, row_scale=None, x_scale=None) -> torch.Tensor:
    """Launch ``gemm_lowrank_kernel``:
    ``rows? * (drop?(x * xs?) @ w^T + scale*mask?(s @ bm^T)) (+bias)``.

    x (M, K), w (N, K), s (M, R) fp32, bm (N, R); any strides. ``row_scale`` (N,) and ``x_scale``
    (K,) are contiguous fp32 vectors or None (DoRA). Returns (M, N) in ``out_dtype``.
    """
    from ..kernels.lora import gemm_lowrank_autotuned, gemm_lowrank_kernel

    M, K = x.shape
    N = w.shape[0]
    y = TR.empty((M, N), out_dtype, x.device)
    if M == 0 or N == 0:
        return y
    R = s.shape[1] if s is not None else 1
    kernel, cfg, grid = TR.tile_launch(gemm_lowrank_kernel, gemm_lowrank_autotuned, M, N)
    dummy = y
    kernel[grid](
        x, w, y, bias.contiguous() if bias is not None else dummy, s if s is not None else dummy,
        bm if bm is not None else dummy, seed if seed is not None else dummy,
        row_scale if row_scale is not None else dummy, x_scale if x_scale is not None else dummy,
        M, N, K, R, min(TR.next_pow2(M), 8192),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
        s.stride(0) if s is not None else 0, s.stride(1) if s is not None else 0,
        bm.stride(0) if bm is not None else 0, bm.stride(1) if bm is not None else 0,
        float(scale), float(p),
        HAS_BIAS=bias is not None, HAS_LOWRANK=s is not None,
        DROP_X=drop_x, DROP_EPI=drop_epi,
        BLOCK_R=max(16, min(64, TR.next_pow2(R))),
        PRECISION=TR.dot_precision(x.dtype), UPCAST=TR.upcast(x.dtype, w.dtype),
        ROW_SCALE=row_scale is not None, X_SCALE=x_scale is not None, **cfg,
    )
    return y


def tn(lhs, rt, *, seed=None, p=0.0, drop_r=False) -> torch.Tensor:
    """Launch ``tn_kernel``: fp32 ``lhs^T @ drop?(rt)``, lhs (T, M), rt (T, N); split-K over T."""
    from ..kernels.lora import tn_kernel

    T, M = lhs.shape
    N = rt.shape[1]
    if TR.triton_interpret():
        bm, bn, bt, splits = 16 if M <= 16 else 32, 16 if N <= 16 else 32, 32, 2
    else:
        bm, bn, bt = min(64, max(16, TR.next_pow2(M))), min(128, max(16, TR.next_pow2(N))), 64
        tiles = TR.cdiv(M, bm) * TR.cdiv(N, bn)
        # enough programs to fill ~4 waves of 132 SMs, at least 256 tokens per split
        splits = max(1, min(TR.cdiv(T, 256), TR.cdiv(528, tiles)))
    per = TR.cdiv(max(T, 1), splits)
    per = TR.cdiv(per, bt) * bt
    splits = TR.cdiv(max(T, 1), per)
    part = TR.empty((splits, M, N), torch.float32, lhs.device)
    grid = (TR.cdiv(M, bm), TR.cdiv(N, bn), splits)
    tn_kernel[grid](
        lhs, rt, part, seed if seed is not None else part, T, M, N, per,
        lhs.stride(0), lhs.stride(1), rt.stride(0), rt.stride(1),
        part.stride(0), part.stride(1), part.stride(2), float(p),
        DROP_R=drop_r, BLOCK_M=bm, BLOCK_N=bn, BLOCK_T=bt,
        PRECISION=TR.dot_precision(lhs.dtype if lhs.dtype != torch.float32 else rt.dtype),
    )
    return part.sum(0) if splits > 1 else part[0]


def base_gemm(x, weight, *, trans_w: bool, out_dtype, bias=None, s=None, bm=None, scale=1.0,
              seed=None, p=0.0, drop_epi=False) -> torch.Tensor:
    """The Triton base GEMM with the low-rank epilogue, chosen from the weight:
    ``x @ W^T`` (``trans_w=False``, x (M, in)) or ``x @ W`` (``trans_w=True``, x (M, out)),
    ``(+bias) (+ scale * mask?(s @ bm^T))``. A dense W runs ``gemm_lowrank_kernel`` (W^T as a
    strided view), a quantized one ``kernels.quant`` (each tile dequantised in registers)."""
    if isinstance(weight, torch.Tensor):
        return gemm_lowrank(x, weight.t() if trans_w else weight, out_dtype=out_dtype, bias=bias,
                            s=s, bm=bm, scale=scale, seed=seed, p=p, drop_epi=drop_epi)
    return W.qgemm(x, weight, trans_w=trans_w, out_dtype=out_dtype, bias=bias, s=s, bm=bm,
                   scale=scale, seed=seed, p=p, drop_epi=drop_epi)


def triton_fwd(x2, weight, bias, A, B, scaling, p, seed):
    """``(y, S)``: the shrink ``S = drop(x2) A^T`` (fp32, dropout on the loads), then the base
    GEMM with bias and ``+ scaling * S B^T`` in its epilogue."""
    s = gemm_lowrank(x2, A, out_dtype=torch.float32, seed=seed, p=p, drop_x=p > 0.0)
    y = base_gemm(x2, weight, trans_w=False, out_dtype=x2.dtype, bias=bias, s=s, bm=B,
                  scale=scaling)
    return y, s


def triton_bwd(dy, saved: Saved, need: Needs):
    """``(dx, dA, dB)``: ``G = dy B``; ``dx = dy W + s G A`` (mask in the epilogue); split-K
    ``dA``, ``dB`` over tokens (deterministic)."""
    x2, weight, A, B, s, scaling, p, seed = saved
    dx = dA = dB = None
    drop = p > 0.0
    if need.dx or need.dA:
        g = gemm_lowrank(dy, B.t(), out_dtype=torch.float32)                  # (T, r)
    if need.dx:
        dx = base_gemm(dy, weight, trans_w=True, out_dtype=x2.dtype, s=g, bm=A.t(),
                       scale=scaling, seed=seed, p=p, drop_epi=drop)
    if need.dA:
        dA = (tn(g, x2, seed=seed, p=p, drop_r=drop) * scaling).to(A.dtype)  # (r, in)
    if need.dB:
        dB = (tn(dy, s) * scaling).to(B.dtype)                                # (out, r)
    return dx, dA, dB


# ----------------------------------------------------------------------------- CUDA
def cuda_fwd(x2, weight, bias, A, B, scaling, p, seed):
    """``ops.lora_cuda.fwd`` (cuBLAS base GEMM + our low-rank kernels); a quantized weight is
    dequantised into the reused workspace first."""
    w = W.dense(weight, x2.dtype, x2.device, reuse=True)
    return lora_cuda.fwd(x2, w, bias, A, B, scaling, p, seed)


def cuda_bwd(dy, saved: Saved, need: Needs):
    """``ops.lora_cuda.bwd``; a quantized weight is dequantised into the reused workspace."""
    w = W.dense(saved.weight, saved.x.dtype, saved.x.device, reuse=True)
    return lora_cuda.bwd(dy, saved._replace(weight=w), need)


BACKENDS = {"torch": (torch_fwd, torch_bwd), "triton": (triton_fwd, triton_bwd),
            "cuda": (cuda_fwd, cuda_bwd)}
