"""The fused LoRA op: ``y = x W^T + b + scaling * dropout(x) A^T B^T``.

Layers (one op, four layers):
  kernels.lora (Triton)  ->  _triton_fwd/_triton_bwd (launchers)  ->  torch.library ops
  ``lora_kernels::lora_fwd`` / ``lora_kernels::lora_bwd`` (``ops._register.define_op``: fakes,
  autograd, eager fast path)  ->  :func:`lora_linear` (functional)  ->  ``layers.LoRALinear``.

Shapes: x2 (T, in), weight (out, in), bias (out,), lora_A (r, in), lora_B (out, r).
Forward:   Xd = drop(x2);  S = Xd A^T (T, r) fp32;  y = x2 W^T + b + s S B^T.
Backward (dy (T, out)):
  G  = dy B                                  (T, r) fp32
  dx = dy W + s * keep/(1-p) * (G A)         (dropout only on the low-rank path)
  dA = s * G^T Xd                            (r, in)
  dB = s * dy^T S                            (out, r)   S saved from the forward (T*r*4 bytes)
  dW = dy^T x2, db = sum_t dy                (only when weight/bias require grad; torch GEMMs)
The dropout mask is regenerated from ``seed`` in backward, never stored.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import _validate as V
from .._backend import compact_rows_for_cpu_gemm, resolve_backend
from . import _triton as TR
from ._register import define_op, needs_grad


# ----------------------------------------------------------------------------- torch reference
def torch_keep_mask(seed: torch.Tensor, shape, p: float, device) -> torch.Tensor:
    """Reference-path dropout mask (bool, True = keep), regenerated from ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed.reshape(-1)[0].item()))
    return torch.rand(shape, generator=g, device=device) >= p


def _torch_fwd(x2, weight, bias, A, B, scaling, p, seed):
    xd = x2 if p == 0.0 else x2 * torch_keep_mask(seed, x2.shape, p, x2.device) / (1.0 - p)
    s = F.linear(xd, A)
    # in place on the fresh base output: one (T, out) buffer, scaling folded into addmm's alpha
    y = F.linear(x2, weight, bias).addmm_(s, B.t(), alpha=scaling)
    return y, s.float()


class Saved(NamedTuple):
    """What every backend's backward reads (saved by the forward): ``x`` (T, in),
    ``weight`` (out, in), ``A`` (r, in), ``B`` (out, r), ``s = drop(x) A^T`` (T, r) fp32,
    ``scaling``, dropout ``p`` and its ``seed`` (int64 (1,) or None)."""

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


def _torch_bwd(dy, saved: Saved, need: Needs):
    # scaling is applied to the small (T, r) operands only: no extra pass over (T, in|out)
    x2, weight, A, B, s, scaling, p, seed = saved
    dx = dA = dB = None
    keep = None if p == 0.0 else torch_keep_mask(seed, x2.shape, p, x2.device)
    if need.dx or need.dA:
        gs = (dy @ B).mul_(scaling)                                   # s * G (T, r)
    if need.dx:
        if keep is None:
            dx = torch.mm(dy, weight).addmm_(gs, A)
        else:
            dx = torch.mm(dy, weight).add_((gs @ A) * keep, alpha=1.0 / (1.0 - p))
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
    if TR.triton_interpret():
        kernel, cfg = gemm_lowrank_kernel, TR.interpreter_tiles(M, N)
    else:
        kernel, cfg = gemm_lowrank_autotuned, {}

    def grid(meta):
        return (triton_cdiv(M, meta["BLOCK_M"]) * triton_cdiv(N, meta["BLOCK_N"]),)

    dummy = y
    kernel[grid](
        x, w, y, bias if bias is not None else dummy, s if s is not None else dummy,
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
        tiles = triton_cdiv(M, bm) * triton_cdiv(N, bn)
        # enough programs to fill ~4 waves of 132 SMs, at least 256 tokens per split
        splits = max(1, min(triton_cdiv(T, 256), triton_cdiv(528, tiles)))
    per = triton_cdiv(max(T, 1), splits)
    per = triton_cdiv(per, bt) * bt
    splits = triton_cdiv(max(T, 1), per)
    part = TR.empty((splits, M, N), torch.float32, lhs.device)
    grid = (triton_cdiv(M, bm), triton_cdiv(N, bn), splits)
    tn_kernel[grid](
        lhs, rt, part, seed if seed is not None else part, T, M, N, per,
        lhs.stride(0), lhs.stride(1), rt.stride(0), rt.stride(1),
        part.stride(0), part.stride(1), part.stride(2), float(p),
        DROP_R=drop_r, BLOCK_M=bm, BLOCK_N=bn, BLOCK_T=bt,
        PRECISION=TR.dot_precision(lhs.dtype if lhs.dtype != torch.float32 else rt.dtype),
    )
    return part.sum(0) if splits > 1 else part[0]


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _triton_fwd(x2, weight, bias, A, B, scaling, p, seed):
    drop = p > 0.0
    s = gemm_lowrank(x2, A, out_dtype=torch.float32, seed=seed, p=p, drop_x=drop)
    y = gemm_lowrank(x2, weight, out_dtype=x2.dtype, bias=bias, s=s, bm=B, scale=scaling)
    return y, s


def _triton_bwd(dy, saved: Saved, need: Needs):
    x2, weight, A, B, s, scaling, p, seed = saved
    dx = dA = dB = None
    drop = p > 0.0
    if need.dx or need.dA:
        g = gemm_lowrank(dy, B.t(), out_dtype=torch.float32)                  # (T, r)
    if need.dx:
        dx = gemm_lowrank(dy, weight.t(), out_dtype=x2.dtype, s=g, bm=A.t(), scale=scaling,
                          seed=seed, p=p, drop_epi=drop)
    if need.dA:
        dA = (tn(g, x2, seed=seed, p=p, drop_r=drop) * scaling).to(A.dtype)  # (r, in)
    if need.dB:
        dB = (tn(dy, s) * scaling).to(B.dtype)                                # (out, r)
    return dx, dA, dB


def _impl(backend: str):
    if backend == "torch":
        return _torch_fwd, _torch_bwd
    if backend == "triton":
        return _triton_fwd, _triton_bwd
    if backend == "cuda":
        from . import lora_cuda

        return lora_cuda.fwd, lora_cuda.bwd
    raise ValueError(f"unknown backend {backend!r}")


# ----------------------------------------------------------------------------- registered ops
def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
         lora_B: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor | None,
         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, in) -> (y (T, out), S = drop(x) A^T (T, r) fp32)."""
    return _impl(backend)[0](x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _fwd_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


def _bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
         lora_B: torch.Tensor, s: torch.Tensor, scaling: float, dropout_p: float,
         seed: torch.Tensor | None, backend: str, need_dx: bool, need_dA: bool,
         need_dB: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx (T, in), dA (r, in), dB (out, r)); None (the op: empty) where unneeded."""
    return _impl(backend)[1](dy, Saved(x, weight, lora_A, lora_B, s, scaling, dropout_p, seed),
                             Needs(need_dx, need_dA, need_dB))


def _bwd_fake(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, backend, need_dx,
              need_dA, need_dB):
    return (x.new_empty(x.shape) if need_dx else None,
            lora_A.new_empty(lora_A.shape) if need_dA else None,
            lora_B.new_empty(lora_B.shape) if need_dB else None)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, scaling, p, seed, backend = inputs
    ctx.save_for_backward(x, weight, A, B, output[1], seed)
    ctx.scaling, ctx.p, ctx.backend = scaling, p, backend
    ctx.has_bias = bias is not None


def _grads(ctx, bwd, dy, _ds=None):
    """Backward of the op (``bwd``: the registered ``lora_bwd`` or :func:`_bwd`); dW and db
    are plain torch GEMM / reduction, only when the base requires grad."""
    x, weight, A, B, s, seed = ctx.saved_tensors
    nx, nw, nb, na, nB = ctx.needs_input_grad[:5]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx, dA, dB = bwd(dy, x, weight, A, B, s, ctx.scaling, ctx.p, seed, ctx.backend, nx, na, nB)
    dW = dy.t() @ x if nw else None
    db = dy.sum(0) if (nb and ctx.has_bias) else None
    return (dx if nx else None, dW, db, dA if na else None, dB if nB else None,
            None, None, None, None)


LORA_OP = define_op("lora_kernels::lora_fwd", _fwd, fake=_fwd_fake,
                    bwd_name="lora_kernels::lora_bwd", bwd=_bwd, bwd_fake=_bwd_fake,
                    setup_context=_setup_context, grads=_grads, nondiff_outputs=(1,),
                    function_name="LoRAFunction")
lora_fwd = LORA_OP.custom_op
#: Eager fast path of ``lora_kernels::lora_fwd`` (see :mod:`lora_kernels.ops._register`).
LoRAFunction = LORA_OP.Function
_needs_grad = needs_grad  # the name ops.multi_lora imports


# ----------------------------------------------------------------------------- public API
def lora_linear(x, weight, bias, lora_A, lora_B, scaling=1.0, dropout_p=0.0, *,
                generator=None, backend=None):
    """Fused LoRA linear: ``y = x W^T + b + scaling * dropout(x) A^T B^T``.

    Args:
        x: ``(..., in)``; any strides.
        weight: ``(out, in)`` base weight (frozen unless it requires grad), or a frozen
            ``lora_kernels.quant`` NF4Weight / Int8Weight / FP8Weight (dequantised in x's dtype;
            see ``ops.qlora``).
        bias: ``(out,)`` or ``None``.
        lora_A: ``(r, in)``; lora_B: ``(out, r)`` (PEFT layout).
        scaling: float multiplier of the low-rank branch (PEFT: ``alpha / r``).
        dropout_p: dropout on the low-rank branch's input, in ``[0, 1)``; the mask is
            regenerated from a seed drawn from ``generator`` (reproducible when seeded).
        backend: ``None | "torch" | "triton" | "cuda"`` (see ``lora_kernels._backend``).
    Returns:
        ``(..., out)`` in x's dtype; gradients flow to every input that requires them.
    """
    quantized = not isinstance(weight, torch.Tensor)  # a quant.QuantizedWeight: ops/qlora.py
    if not quantized:
        in_f, out_f = V.lora_args(x, weight, bias, lora_A, lora_B)
    scaling = V.scalar("scaling", scaling)
    p = V.scalar("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_open=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    be = resolve_backend(backend, x.device, "lora_linear")
    if be != "torch" and x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"x must be float32/float16/bfloat16 for backend={be!r}, got {x.dtype}")
    seed = TR.draw_seed(generator, x.device) if p > 0.0 else None
    if quantized:
        from .qlora import qlora_linear

        return qlora_linear(x, weight, bias, lora_A, lora_B, scaling=scaling, p=p, seed=seed,
                            backend=be)
    x2 = x if x.dim() == 2 else x.reshape(-1, in_f)  # 2-D: no view node in the autograd graph
    x2 = compact_rows_for_cpu_gemm(x2)  # row-padded bf16/fp16 on CPU: see its docstring
    y, _ = LORA_OP(x2, weight, bias, lora_A, lora_B, scaling, p, seed, be)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)
