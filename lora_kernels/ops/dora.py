"""The fused DoRA op (PEFT's ``use_dora=True``), with the weight norm computed in low rank.

Shapes: x2 (T, in), weight W (out, in), bias b (out,), lora_A A (r, in), lora_B B (out, r),
magnitude m (out,); s = scaling; p = dropout_p, ``xd = keep * x2 / (1 - p)`` (``xd = x2`` if p = 0).

Semantics (PEFT 0.21 ``DoraLinearVariant.forward`` + ``DoraLinearLayer.forward``, matched exactly):

    n = ||W + s B A||_row   (out,)  2-norm over ``in``; DETACHED (DoRA paper sec. 4.3, as PEFT)
    g = m / n               (out,)
    p == 0 (or eval):  y = g * (x W^T + s S B^T) + b,                S = x A^T        (T, r)
    p  > 0:            y = x W^T + b + (g - 1) * (xd W^T) + g * s S B^T,   S = xd A^T
                         = [x W^T + b + s S B^T] + (g - 1) * u,   u = xd W^T + s S B^T  (T, out)

PEFT with dropout adds its DoRA term, computed on the *dropped* input, to the base output of the
*un-dropped* input (``result + (g - 1) * (xd W^T) + g * s * lora(xd)``): the base weight is seen
through two different inputs, so the p > 0 forward needs two base GEMMs (as in PEFT); we keep that
meaning so PEFT-trained adapters and their training curves carry over. ``g`` and ``n`` are fp32.

The low-rank norm (never a dense ``out x in`` delta):

    n_j^2 = ||W_j||^2 + 2 s B_j . (A W^T)_{:, j} + s^2 B_j (A A^T) B_j^T

``A W^T`` (r, out) is one skinny ``r x in x out`` GEMM (2 r in out flops: r/T of the base GEMM),
``A A^T`` an r x r Gram; ``||W_j||^2`` of the frozen base is passed in (``weight_sq_norm``;
:class:`~lora_kernels.layers.dora.DoRALinear` computes it once and caches it) or computed here.

Backward (dy (T, out); n detached, so g is a constant per feature):

    p == 0:  dy' = g * dy   (the whole output is g * (LoRA output without bias)):
        dx = dy' W + s (dy' B) A         dA = s (dy' B)^T x        dB = s dy'^T S = g * (s dy^T S)
        dm_j = sum_t dy_tj (x W^T + s S B^T)_tj / n_j = sum_t dy_tj (y_tj - b_j) / m_j
    p  > 0:  G = (g * dy) B:
        dx = dy W + keep/(1-p) * ((dy * (g - 1)) W + s G A)
        dA = s G^T xd                    dB = g * (s dy^T S)
        dm_j = sum_t dy_tj u_tj / n_j
    dW (only if weight requires grad) = (g * dy)^T x (p == 0);  dy^T x + ((g - 1) * dy)^T xd (p > 0)
    db = sum_t dy

What is stored for backward: x2, W, A, B, m, S (T*r fp32), n and g (out fp32) and
* p == 0: the output ``y`` itself (``dm`` is recovered from ``y - b``, because ``y - b = g * z``
  and ``g n = m``): no extra ``(T, out)`` tensor -- ``y`` is kept alive anyway by whatever consumes
  it in the model (the next matmul / attention saves its input). Rows with ``m_j == 0`` (where
  ``y - b`` carries no information) are recomputed exactly from ``x W_J^T + s S B_J^T`` for just
  those rows. Consequence: modifying ``y`` in place before ``backward`` makes autograd raise
  (saved-tensor version check), as for any op that saves its output (e.g. ``torch.exp``).
  Precision: in bf16/fp16 ``y - b`` carries the rounding of ``y``; dm's relative error is that of
  ``y`` (~2^-9 .. 2^-8 times ``|y| / |y - b|``).
* p > 0: ``u`` (T, out) in x's dtype -- it cannot be recovered from ``y`` (PEFT keeps more).
The dropout mask is regenerated from ``seed`` in backward (torch: torch's generator; Triton:
``tl.rand`` on the same counters as the LoRA kernels; CUDA: the LoRA kernels' Philox mask).

Backends (``backend=``):
* ``"torch"``: plain PyTorch (the reference path and the CPU default).
* ``"triton"``: ``gemm_lowrank_kernel`` with ``ROW_SCALE`` (g applied in the epilogue of the fused
  base+expand GEMM, before the bias: no extra pass over y) and ``X_SCALE`` (backward reads
  ``g * dy`` on the fly: the dx GEMM and the ``G = dy' B`` shrink). The ``(T, out)``
  ``dm`` reduction and, for p > 0, ``y += (g - 1) * u`` and the masked dx sum are torch ops (the
  p > 0 keep mask is materialised by a small Triton kernel, ``kernels.dora.keep_mask_kernel``).
  Tested through Triton's interpreter and compiled for sm_80/sm_90 (tests/cuda/test_triton_aot.py);
  not run on a GPU.
* ``"cuda"``: the LoRA CUDA kernels (``ops.lora_cuda``) with g applied by cheap torch ops
  (``y *= g``, ``+ b``; backward on ``g * dy``); p > 0 adds the ``u`` GEMM and the masked dx term
  in torch with the kernels' own Philox mask. Logic tested under the CPU emulation of csrc/
  (tests/test_dora.py); not run on a GPU.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import _validate as V
from .._backend import ENV_VAR, resolve_backend
from . import _triton as TR
from . import lora_cuda
from ._register import define_op, pick
from .lowrank import Needs, Saved, gemm_lowrank, tn, torch_keep_mask
from .lowrank import torch_bwd as lora_torch_bwd
from .weights import dense_weight


# ----------------------------------------------------------------------------- the weight norm
def weight_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """``||W_j||^2`` per output row, fp32 (out,) -- computed once per frozen base (a float64
    weight: in float64, then rounded; vector_norm does not narrow). Like the row scale ``g``,
    the norms are fp32 for every dtype: a float64 DoRA call is fp32-accurate in ``g``."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(weight, dim=1, dtype=acc).square().float()


def dora_norm(weight, lora_A, lora_B, scaling: float, wsq: torch.Tensor | None = None,
              backend: str = "torch") -> torch.Tensor:
    """``||W + s B A||_row`` (out,) fp32, in low rank (see the module docstring); no autograd.

    ``wsq``: ``||W_j||^2`` (out,) fp32 or None (computed). The ``A W^T`` product runs on
    ``backend`` (Triton: fp32 accumulate and output; torch/cuda: one F.linear in W's dtype).
    """
    weight = dense_weight(weight, lora_A)
    with torch.no_grad():
        if wsq is None:
            wsq = weight_sq_norm(weight)
        if backend == "triton":
            awt = gemm_lowrank(lora_A.detach(), weight, out_dtype=torch.float32)     # (r, out)
        else:
            awt = F.linear(lora_A.detach(), weight).float()                           # (r, out)
        Af = lora_A.detach().float()
        Bf = lora_B.detach().float()
        gram = Af @ Af.t()                                                            # (r, r)
        cross = (Bf * awt.t()).sum(1)                                                 # (out,)
        quad = ((Bf @ gram) * Bf).sum(1)                                              # (out,)
        n2 = wsq.float() + (2.0 * scaling) * cross + (scaling * scaling) * quad
        return n2.clamp_min_(0.0).sqrt_()


def _coldot(a: torch.Tensor, b: torch.Tensor, chunk_elems: int = 1 << 20) -> torch.Tensor:
    """``sum_t a[t, j] * b[t, j]`` (out,) in fp32, over row chunks (bounded fp32 temporaries)."""
    T, N = a.shape
    out = torch.zeros(N, dtype=torch.float32, device=a.device)
    step = max(1, chunk_elems // max(N, 1))
    for t0 in range(0, T, step):
        aa, bb = a[t0:t0 + step], b[t0:t0 + step]
        if aa.dtype == torch.float32 and bb.dtype == torch.float32:
            out += (aa * bb).sum(0)
        else:
            out += (aa.float() * bb.float()).sum(0)
    return out


# ----------------------------------------------------------------------------- torch path
def _torch_fwd(x2, weight, bias, A, B, scaling, p, seed, *, g):
    """``(y, S fp32, u | None)``; g (out,) fp32."""
    gd = g.to(x2.dtype)
    if p == 0.0:
        s = F.linear(x2, A)
        y = F.linear(x2, weight).addmm_(s, B.t(), alpha=scaling)   # z = x W^T + s S B^T, in place
        y = torch.addcmul(bias, y, gd, out=y) if bias is not None else y.mul_(gd)
        return y, s.float(), None
    xd = x2 * torch_keep_mask(seed, x2.shape, p, x2.device) / (1.0 - p)
    s = F.linear(xd, A)
    u = F.linear(xd, weight).addmm_(s, B.t(), alpha=scaling)
    y = F.linear(x2, weight, bias).addmm_(s, B.t(), alpha=scaling)
    y.addcmul_(u, gd - 1)
    return y, s.float(), u


def _torch_bwd(dy, saved: Saved, needs: Needs, *, g):
    """(dx, dA, dB) of the DoRA op; ``g`` (out,) fp32 the detached row scale."""
    x2, weight, A, B, s, scaling, p, seed = saved
    need_dx, need_dA, need_dB = needs
    gd = g.to(dy.dtype)
    dyg = dy * gd                                                   # g * dy (T, out)
    if p == 0.0:
        return lora_torch_bwd(dyg, Saved(x2, weight, A, B, s, scaling, 0.0, None),
                               Needs(need_dx, need_dA, need_dB))
    keep = torch_keep_mask(seed, x2.shape, p, x2.device)
    dx = dA = dB = None
    gs = (dyg @ B).mul_(scaling)                                    # s G (T, r)
    if need_dx:
        inner = torch.mm(dy * (gd - 1), weight).addmm_(gs, A)
        dx = torch.mm(dy, weight).add_(inner * keep, alpha=1.0 / (1.0 - p))
    if need_dA:
        dA = gs.t() @ (x2 * keep / (1.0 - p))
    if need_dB:
        dB = dyg.t() @ (s * scaling).to(dy.dtype)
    return dx, dA, dB


# ----------------------------------------------------------------------------- Triton path
def _triton_keep(seed, T, K, p, device) -> torch.Tensor:
    """The (T, K) bool keep mask the Triton kernels apply for ``seed`` (materialised)."""
    from ..kernels.dora import keep_mask_kernel

    out = torch.empty((T, K), dtype=torch.int8, device=device)
    n = T * K
    if n:
        BLOCK = 1024
        keep_mask_kernel[(TR.cdiv(n, BLOCK),)](seed, out, n, float(p), BLOCK=BLOCK)
    return out.bool()


def _triton_fwd(x2, weight, bias, A, B, scaling, p, seed, *, g):
    if p == 0.0:
        s = gemm_lowrank(x2, A, out_dtype=torch.float32)
        y = gemm_lowrank(x2, weight, out_dtype=x2.dtype, bias=bias, s=s, bm=B, scale=scaling,
                         row_scale=g)
        return y, s, None
    s = gemm_lowrank(x2, A, out_dtype=torch.float32, seed=seed, p=p, drop_x=True)
    u = gemm_lowrank(x2, weight, out_dtype=x2.dtype, s=s, bm=B, scale=scaling, seed=seed, p=p,
                     drop_x=True)
    y = gemm_lowrank(x2, weight, out_dtype=x2.dtype, bias=bias, s=s, bm=B, scale=scaling)
    y.addcmul_(u, (g - 1).to(x2.dtype))
    return y, s, u


def _triton_bwd(dy, saved: Saved, needs: Needs, *, g):
    """(dx, dA, dB) of the DoRA op; ``g`` (out,) fp32 the detached row scale."""
    x2, weight, A, B, s, scaling, p, seed = saved
    need_dx, need_dA, need_dB = needs
    dx = dA = dB = None
    drop = p > 0.0
    if need_dx or need_dA:
        G = gemm_lowrank(dy, B.t(), out_dtype=torch.float32, x_scale=g)      # (g*dy) B (T, r)
    if need_dx:
        if not drop:
            dx = gemm_lowrank(dy, weight.t(), out_dtype=x2.dtype, s=G, bm=A.t(), scale=scaling,
                              x_scale=g)
        else:
            base = gemm_lowrank(dy, weight.t(), out_dtype=torch.float32)
            inner = gemm_lowrank(dy, weight.t(), out_dtype=torch.float32, s=G, bm=A.t(),
                                 scale=scaling, x_scale=(g - 1).contiguous())
            keep = _triton_keep(seed, x2.shape[0], x2.shape[1], p, x2.device)
            dx = base.add_(inner.mul_(keep), alpha=1.0 / (1.0 - p)).to(x2.dtype)
    if need_dA:
        dA = (tn(G, x2, seed=seed, p=p, drop_r=drop) * scaling).to(A.dtype)
    if need_dB:
        dB = (tn(dy, s) * scaling).mul_(g[:, None]).to(B.dtype)
    return dx, dA, dB


# ----------------------------------------------------------------------------- CUDA path
def _cuda_fwd(x2, weight, bias, A, B, scaling, p, seed, *, g):
    gd = g.to(x2.dtype)
    if p == 0.0:
        y, s = lora_cuda.fwd(x2, weight, None, A, B, scaling, 0.0, None)
        y = torch.addcmul(bias, y, gd, out=y) if bias is not None else y.mul_(gd)
        return y, s, None
    y, s = lora_cuda.fwd(x2, weight, bias, A, B, scaling, p, seed)
    keep = lora_cuda.keep_mask(seed, x2.shape[0], x2.shape[1], p)
    u = F.linear(x2 * keep / (1.0 - p), weight).addmm_(s.to(x2.dtype), B.t(), alpha=scaling)
    y.addcmul_(u, gd - 1)
    return y, s, u


def _cuda_bwd(dy, saved: Saved, needs: Needs, *, g):
    """(dx, dA, dB) of the DoRA op; ``g`` (out,) fp32 the detached row scale."""
    x2, weight, A, B, s, scaling, p, seed = saved
    need_dx, need_dA, need_dB = needs
    gd = g.to(dy.dtype)
    dyg = dy * gd
    if p == 0.0:
        return lora_cuda.bwd(dyg, Saved(x2, weight, A, B, s, scaling, 0.0, None),
                             Needs(need_dx, need_dA, need_dB))
    _, dA, dB = lora_cuda.bwd(dyg, Saved(x2, weight, A, B, s, scaling, p, seed),
                              Needs(False, need_dA, need_dB))
    dx = None
    if need_dx:
        keep = lora_cuda.keep_mask(seed, x2.shape[0], x2.shape[1], p)
        inner = torch.mm(dy * (gd - 1), weight).addmm_((dyg @ B).mul_(scaling), A)
        dx = torch.mm(dy, weight).add_(inner * keep, alpha=1.0 / (1.0 - p))
    return dx, dA, dB


def _torch_keep(seed, x2, p):
    return torch_keep_mask(seed, x2.shape, p, x2.device)


def _triton_keep_x(seed, x2, p):
    return _triton_keep(seed, x2.shape[0], x2.shape[1], p, x2.device)


def _cuda_keep(seed, x2, p):
    return lora_cuda.keep_mask(seed, x2.shape[0], x2.shape[1], p)


#: backend -> (fwd, bwd, keep): ``keep(seed, x2, p)`` is the (T, in) bool mask the backend's
#: kernels apply (only materialised for dW with dropout)
BACKENDS = {"torch": (_torch_fwd, _torch_bwd, _torch_keep),
            "triton": (_triton_fwd, _triton_bwd, _triton_keep_x),
            "cuda": (_cuda_fwd, _cuda_bwd, _cuda_keep)}


# ----------------------------------------------------------------------------- autograd
def _dm(dy, y, u, bias, *, x2, weight, B, s, m, n, scaling):
    """``dL/dm`` (out,) fp32 (module docstring): from y (p == 0) or u (p > 0)."""
    if u is not None:
        return _coldot(dy, u) / n
    num = _coldot(dy, y)
    if bias is not None:
        num -= bias.float() * dy.sum(0, dtype=torch.float32)
    mf = m.detach().float()
    zero = mf == 0
    dm = num / torch.where(zero, torch.ones_like(mf), mf)
    if bool(zero.any()):                      # y - b = 0 there: recompute z for those rows only
        J = zero.nonzero().squeeze(1)
        z = F.linear(x2, weight[J]).float() + scaling * (s @ B[J].float().t())
        dm[J] = _coldot(dy[:, J], z) / n[J]
    return dm


def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
         weight_sq_norm: torch.Tensor | None, scaling: float, dropout_p: float,
         seed: torch.Tensor | None, backend: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (T, in) -> (y (T, out), S (T, r) fp32, n (out,) fp32, g (out,) fp32,
    u (T, out) if dropout_p > 0 else (0,))."""
    n = dora_norm(weight, lora_A, lora_B, scaling, weight_sq_norm, backend)
    g = magnitude.detach().float() / n
    fwd = pick(BACKENDS, backend, "dora_linear")[0]
    y, s, u = fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, g=g)
    return y, s, n, g, (u if u is not None else x.new_empty(0))


def _fwd_fake(x, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p,
              seed, backend):
    T, out_f, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    f32 = torch.float32
    return (x.new_empty((T, out_f)), x.new_empty((T, r), dtype=f32),
            x.new_empty((out_f,), dtype=f32), x.new_empty((out_f,), dtype=f32),
            x.new_empty((T, out_f) if dropout_p > 0.0 else (0,)))


def _bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor, s: torch.Tensor,
         n: torch.Tensor, g: torch.Tensor, seed: torch.Tensor | None, yu: torch.Tensor,
         scaling: float, dropout_p: float, backend: str, need_dx: bool, need_dW: bool,
         need_db: bool, need_dA: bool, need_dB: bool, need_dm: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                    torch.Tensor]:
    """(dx, dW, db, dA, dB, dm); None (the op: empty) where unneeded. ``yu``: the saved y
    (dropout_p == 0) or u (dropout_p > 0), see the module docstring."""
    p = dropout_p
    impl = pick(BACKENDS, backend, "dora_linear")
    dx, dA, dB = impl[1](dy, Saved(x, weight, lora_A, lora_B, s, scaling, p, seed),
                         Needs(need_dx, need_dA, need_dB), g=g)
    dm = dW = db = None
    if need_dm:
        y, u = (None, yu) if p > 0.0 else (yu, None)
        dm = _dm(dy, y, u, bias, x2=x, weight=weight, B=lora_B, s=s, m=magnitude, n=n,
                 scaling=scaling).to(magnitude.dtype)
    if need_dW:
        gd = g.to(dy.dtype)
        if p == 0.0:
            dW = (dy * gd).t() @ x
        else:
            keep = impl[2](seed, x, p)
            dW = dy.t() @ x + (dy * (gd - 1)).t() @ (x * keep / (1.0 - p))
    if need_db and bias is not None:
        db = dy.sum(0)
    return dx, dW, db, dA, dB, dm


def _bwd_fake(dy, x, weight, bias, lora_A, lora_B, magnitude, s, n, g, seed, yu, scaling,
              dropout_p, backend, need_dx, need_dW, need_db, need_dA, need_dB, need_dm):
    def like(flag, t):
        return t.new_empty(t.shape) if flag and t is not None else None

    return (like(need_dx, x), like(need_dW, weight), like(need_db, bias), like(need_dA, lora_A),
            like(need_dB, lora_B), like(need_dm, magnitude))


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, m, _wsq, scaling, p, seed, backend = inputs
    y, s, n, g, u = output
    ctx.save_for_backward(x, weight, bias, A, B, m, s, n, g, seed, u if p > 0.0 else y)
    ctx.scaling, ctx.p, ctx.backend = scaling, p, backend


def _grads(ctx, bwd, dy, *_nondiff):
    x, weight, bias, A, B, m, s, n, g, seed, yu = ctx.saved_tensors
    nx, nw, nb, na, nB, nm = ctx.needs_input_grad[:6]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx, dW, db, dA, dB, dm = bwd(dy, x, weight, bias, A, B, m, s, n, g, seed, yu, ctx.scaling,
                                 ctx.p, ctx.backend, nx, nw, nb and bias is not None, na, nB, nm)
    return (dx if nx else None, dW if nw else None, db if (nb and bias is not None) else None,
            dA if na else None, dB if nB else None, dm if nm else None,
            None, None, None, None, None)


DORA_OP = define_op("lora_kernels::dora_fwd", _fwd, fake=_fwd_fake,
                    bwd_name="lora_kernels::dora_bwd", bwd=_bwd, bwd_fake=_bwd_fake,
                    setup_context=_setup_context, grads=_grads, nondiff_outputs=(1, 2, 3, 4),
                    function_name="DoRAFunction")
#: Eager fast path of ``lora_kernels::dora_fwd`` (see :mod:`lora_kernels.ops._register`).
DoRAFunction = DORA_OP.Function


# ----------------------------------------------------------------------------- public API
def _resolve(backend, device) -> str:
    """DoRA's CUDA backend is the LoRA CUDA kernels: an explicit ``"cuda"`` (argument or
    ``LORA_KERNELS_BACKEND``) is checked against ``lora_linear``'s kernel; ``None`` never picks
    cuda/triton for DoRA implicitly (``("...", "dora_linear")`` is not in VERIFIED_ON_GPU)."""
    want = backend
    if want is None:
        want = os.environ.get(ENV_VAR, "").strip() or None
    return resolve_backend(want, device, "lora_linear" if want == "cuda" else "dora_linear")


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling=1.0, dropout_p=0.0, *,
                generator=None, backend=None, weight_sq_norm=None):
    """Fused DoRA linear (PEFT ``use_dora=True``):
    ``y = g * (x W^T) + g * scaling * dropout(x) A^T B^T + b``, ``g = m / ||W + s B A||_row``
    (norm detached). With ``dropout_p > 0`` the base term keeps PEFT's meaning,
    ``x W^T + (g - 1) * (drop(x) W^T)`` (module docstring).

    Args:
        x: ``(..., in)``; any strides.
        weight: ``(out, in)`` frozen base weight; bias: ``(out,)`` or None.
        lora_A: ``(r, in)``; lora_B: ``(out, r)``; magnitude: ``(out,)`` (PEFT's
            ``lora_magnitude_vector``); all in x's dtype and device.
        scaling: float (PEFT: ``alpha / r``). dropout_p: in ``[0, 1)``, on the adapter's input.
        generator: seeds the dropout mask (reproducible when seeded).
        backend: ``None | "torch" | "triton" | "cuda"``.
        weight_sq_norm: optional ``(out,)`` fp32 ``||W_j||^2`` of the frozen base (cached by
            :class:`DoRALinear`); computed per call when None.
    Returns:
        ``(..., out)`` in x's dtype; gradients to x, magnitude, lora_A, lora_B (and weight/bias if
        they require grad).
    """
    weight = dense_weight(weight, x)  # a quantized base: deq(W) per call (ops.weights)
    in_f, out_f = V.lora_args(x, weight, bias, lora_A, lora_B)
    V.float_tensor("magnitude", magnitude, ndim=1)
    V.shape("magnitude", magnitude, (out_f,), "(out_features,)")
    V.same_dtype("x", x, magnitude=magnitude)
    V.same_device("x", x, magnitude=magnitude)
    if weight_sq_norm is not None:
        V.tensor("weight_sq_norm", weight_sq_norm, ndim=1)
        V.shape("weight_sq_norm", weight_sq_norm, (out_f,), "(out_features,)")
        if weight_sq_norm.dtype != torch.float32:
            raise TypeError(f"weight_sq_norm must be float32, got {weight_sq_norm.dtype}")
        V.same_device("x", x, weight_sq_norm=weight_sq_norm)
        if weight_sq_norm.requires_grad:
            raise ValueError("weight_sq_norm must not require grad (it is a cached constant)")
    scaling = V.scalar("scaling", scaling)
    p = V.scalar("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_open=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    be = _resolve(backend, x.device)
    if be != "torch" and x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"x must be float32/float16/bfloat16 for backend={be!r}, got {x.dtype}")
    seed = TR.draw_seed(generator, x.device) if p > 0.0 else None
    x2 = x if x.dim() == 2 else x.reshape(-1, in_f)
    # registered op under compile, eager autograd.Function with grad, plain forward otherwise
    y = DORA_OP(x2, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, p, seed,
                be)[0]
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)
