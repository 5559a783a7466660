"""LoRA on a quantized frozen base (QLoRA): ``y = x deq(W)^T + b + s * dropout(x) A^T B^T``.

``lora_linear`` (and every op built on it) routes here when ``weight`` is a
:class:`lora_kernels.quant.QuantizedWeight`. The quantized weight travels through the registered
op as its tensors plus a few ints (``_flatten`` / ``_rebuild``), so ``torch.compile`` sees one
fake-tensor-aware op per direction; W never receives a gradient (it is frozen by construction).

Backends (same math as ``ops.lora``, S = drop(x) A^T (T, r) fp32 saved for the backward):
  torch   dequantise W into x's dtype per call (forward, and again in the backward: nothing dense is
          saved), then ``ops.lora``'s reference path.
  triton  ``kernels.quant.qgemm_lowrank_kernel``: the base GEMMs of the forward and of dX
          (``dy W``) dequantise each weight tile in registers (W dense never exists); the rank-r
          GEMMs (S, G) and the split-K dA / dB are ``ops.lora``'s dense kernels. Decode-sized
          inputs (T <= 16) on a GPU use the split-K grid (see the kernel module).
  cuda    dequantise into a reused per-(device, dtype, shape) workspace, then ``ops.lora``'s CUDA
          kernels (the Unsloth approach: one dense W-sized buffer per layer shape, not per layer).
"""

from __future__ import annotations

import torch

from .. import _validate as V
from ..quant import FP8Weight, Int8Weight, NF4Weight, QuantizedWeight, check_fp8_device
from . import _triton as TR
from . import lora as L
from ._register import define_op

_CLASSES = {"nf4": NF4Weight, "int8": Int8Weight, "fp8": FP8Weight}


# ----------------------------------------------------------------------------- (un)flattening
def _flatten(qw: QuantizedWeight) -> tuple[list[torch.Tensor], list[int], str]:
    """(tensors, ints, fmt) that :func:`_rebuild` turns back into an equivalent weight."""
    out_f, in_f = qw.shape
    if qw.fmt == "nf4":
        ts = [qw.packed, qw.absmax, qw.code]
        if qw.nested:
            ts += [qw.absmax2, qw.code2, qw.offset]
        return ts, [out_f, in_f, qw.blocksize, int(qw.nested)], "nf4"
    if qw.fmt == "int8":
        return [qw.qweight, qw.scale], [out_f, in_f, 0, 0], "int8"
    return [qw.qweight, qw.scale], [out_f, in_f, qw.block_size or 0, 0], "fp8"


class _View:
    """The fields of a quantized weight the launchers read (no nn.Module construction per call)."""

    _dtype = torch.float32  # unused: every call passes the dtype

    def __init__(self, fmt, ts, meta):
        self.fmt, self.shape = fmt, torch.Size(meta[:2])
        if fmt == "nf4":
            self.packed, self.absmax, self.code = ts[:3]
            self.blocksize, self.nested = meta[2], bool(meta[3])
            if self.nested:
                self.absmax2, self.code2, self.offset = ts[3:6]
        else:
            self.qweight, self.scale = ts
            self.block_size = meta[2] or None

    def dequantize(self, dtype):
        return _CLASSES[self.fmt].dequantize(self, dtype)

    def absmax_fp32(self):
        return NF4Weight.absmax_fp32(self)

    def scale_full(self):
        return FP8Weight.scale_full(self)

    @property
    def _shape(self):
        return self.shape


def _rebuild(fmt, ts, meta) -> _View:
    return _View(fmt, ts, meta)


# ----------------------------------------------------------------------------- Triton launcher
def _qargs(qw):
    """(Q, QS, CODE, ABS2, CODE2, OFFSET, stride_qr, stride_qc, n_cb, constexprs) of a weight."""
    if qw.fmt == "nf4":
        d = qw.absmax  # dummy pointer for unused tensors
        nested = qw.nested
        return (qw.packed, qw.absmax, qw.code, qw.absmax2 if nested else d,
                qw.code2 if nested else d, qw.offset if nested else d, 0, 0, 0,
                dict(FMT=0, NESTED=nested, BLOCKSIZE=qw.blocksize, FP8_BLOCKED=False))
    q, s = qw.qweight, qw.scale
    blocked = qw.fmt == "fp8" and qw.block_size is not None
    n_cb = s.shape[1] if blocked else 0
    return (q, s, s, s, s, s, q.stride(0), q.stride(1), n_cb,
            dict(FMT=1 if qw.fmt == "int8" else 2, NESTED=False, BLOCKSIZE=1,
                 FP8_BLOCKED=blocked))


def _decode_splits(M: int, N: int, K: int, device, tile) -> int:
    """Split-K factor of a decode GEMM: about 4 programs per SM, each over >= 2 K tiles."""
    if device.type != "cuda" or M > 16:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = TR_cdiv(N, tile["BLOCK_N"])
    return max(1, min(TR_cdiv(4 * sms, tiles), K // (2 * tile["BLOCK_K"])))


def TR_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def qgemm(x, qw, *, trans_w: bool, out_dtype, bias=None, s=None, bm=None, scale=1.0, seed=None,
          p=0.0, drop_epi=False, splits: int | None = None) -> torch.Tensor:
    """``x @ deq(W)^T`` (``trans_w=False``: x (M, in) -> (M, out)) or ``x @ deq(W)``
    (``trans_w=True``: x (M, out) -> (M, in)), plus the optional bias / low-rank epilogue
    (``+ scale * mask?(s @ bm^T)``, s (M, R) fp32, bm (N, R)). ``splits`` forces a split-K factor
    (tests); None picks one (decode only, GPU only)."""
    from ..kernels.quant import (
        DECODE_TILE,
        qgemm_lowrank_autotuned,
        qgemm_lowrank_kernel,
        splitk_epilogue_kernel,
    )

    out_f, in_f = qw.shape
    M, K = x.shape
    N = in_f if trans_w else out_f
    y = TR.empty((M, N), out_dtype, x.device)
    if M == 0 or N == 0:
        return y
    if qw.fmt == "fp8":
        check_fp8_device(x.device)
    Q, QS, CODE, ABS2, CODE2, OFF, sqr, sqc, n_cb, qconst = _qargs(qw)
    R = s.shape[1] if s is not None else 1
    interp = TR.triton_interpret()
    if splits is None:
        splits = 1 if interp else _decode_splits(M, N, K, x.device, DECODE_TILE)
    if splits > 1 or (not interp and M <= 16):
        kernel, cfg = qgemm_lowrank_kernel, (TR.interpreter_tiles(M, N) if interp
                                             else dict(DECODE_TILE))
    elif interp:
        kernel, cfg = qgemm_lowrank_kernel, TR.interpreter_tiles(M, N)
    else:
        kernel, cfg = qgemm_lowrank_autotuned, {}
    if splits > 1:
        bk = cfg["BLOCK_K"]
        per = TR_cdiv(TR_cdiv(K, splits), bk) * bk
        splits = TR_cdiv(K, per)
    else:
        per = max(K, 1)
    part = TR.empty((splits, M, N), torch.float32, x.device) if splits > 1 else y
    dummy = y
    common = dict(PRECISION=TR.dot_precision(x.dtype), UPCAST=TR.upcast(x.dtype),
                  BLOCK_R=max(16, min(64, TR.next_pow2(R))))

    def grid(meta):
        return (L.triton_cdiv(M, meta["BLOCK_M"]) * L.triton_cdiv(N, meta["BLOCK_N"]), splits)

    kernel[grid](
        x, Q, QS, CODE, ABS2, CODE2, OFF, y, part, bias if bias is not None else dummy,
        s if s is not None else dummy, bm if bm is not None else dummy,
        seed if seed is not None else dummy,
        M, N, K, R, min(TR.next_pow2(M), 8192), in_f, n_cb, per,
        x.stride(0), x.stride(1), sqr, sqc, y.stride(0), y.stride(1),
        part.stride(0) if splits > 1 else 0,
        s.stride(0) if s is not None else 0, s.stride(1) if s is not None else 0,
        bm.stride(0) if bm is not None else 0, bm.stride(1) if bm is not None else 0,
        float(scale), float(p),
        TRANS_W=trans_w, SPLIT_K=splits > 1, HAS_BIAS=bias is not None,
        HAS_LOWRANK=s is not None, DROP_EPI=drop_epi, **qconst, **common, **cfg,
    )
    if splits > 1:
        bm_, bn_ = 16, min(64, max(16, TR.next_pow2(N)))
        splitk_epilogue_kernel[(L.triton_cdiv(M, bm_), L.triton_cdiv(N, bn_))](
            part, y, bias if bias is not None else dummy, s if s is not None else dummy,
            bm if bm is not None else dummy, seed if seed is not None else dummy,
            M, N, R, splits, part.stride(0), y.stride(0), y.stride(1),
            s.stride(0) if s is not None else 0, s.stride(1) if s is not None else 0,
            bm.stride(0) if bm is not None else 0, bm.stride(1) if bm is not None else 0,
            float(scale), float(p), HAS_BIAS=bias is not None, HAS_LOWRANK=s is not None,
            DROP_EPI=drop_epi, BLOCK_M=bm_, BLOCK_N=bn_, BLOCK_R=common["BLOCK_R"],
            PRECISION=common["PRECISION"])
    return y


# ----------------------------------------------------------------------------- implementations
_WORKSPACE: dict = {}


def _dense(qw, dtype, device, reuse: bool) -> torch.Tensor:
    """The dequantised weight; with ``reuse`` written into one workspace per (device, dtype,
    shape) (the cuda backend: the buffer is overwritten by the next layer of that shape)."""
    if not reuse:
        return qw.dequantize(dtype)
    key = (device, dtype, tuple(qw.shape))
    buf = _WORKSPACE.get(key)
    if buf is None:
        buf = _WORKSPACE[key] = torch.empty(qw.shape, dtype=dtype, device=device)
    return buf.copy_(qw.dequantize(dtype))


def _fwd_impl(x2, qw, bias, A, B, *, scaling, p, seed, backend):
    if backend == "triton":
        drop = p > 0.0
        s = L.gemm_lowrank(x2, A, out_dtype=torch.float32, seed=seed, p=p, drop_x=drop)
        y = qgemm(x2, qw, trans_w=False, out_dtype=x2.dtype, bias=bias, s=s, bm=B, scale=scaling)
        return y, s
    w = _dense(qw, x2.dtype, x2.device, backend == "cuda")
    return L._impl(backend)[0](x2, w, bias, A, B, scaling, p, seed)


def _bwd_impl(dy, saved: L.Saved, need: L.Needs, backend: str):
    """ops.lora's backward with ``saved.weight`` the quantized weight."""
    x2, qw, A, B, s, scaling, p, seed = saved
    need_dx, need_dA, need_dB = need
    if backend == "triton":
        dx = dA = dB = None
        drop = p > 0.0
        if need_dx or need_dA:
            g = L.gemm_lowrank(dy, B.t(), out_dtype=torch.float32)
        if need_dx:
            dx = qgemm(dy, qw, trans_w=True, out_dtype=x2.dtype, s=g, bm=A.t(), scale=scaling,
                       seed=seed, p=p, drop_epi=drop)
        if need_dA:
            dA = (L.tn(g, x2, seed=seed, p=p, drop_r=drop) * scaling).to(A.dtype)
        if need_dB:
            dB = (L.tn(dy, s) * scaling).to(B.dtype)
        return dx, dA, dB
    if need_dx or backend == "cuda":
        w = _dense(qw, x2.dtype, x2.device, backend == "cuda")
    else:  # the reference backward reads W only for dx
        w = torch.empty(0, dtype=x2.dtype, device=x2.device)
    return L._impl(backend)[1](dy, saved._replace(weight=w), need)


# ----------------------------------------------------------------------------- registered op
def _fwd(x: torch.Tensor, qtensors: list[torch.Tensor], qmeta: list[int], fmt: str,
         bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
         dropout_p: float, seed: torch.Tensor | None,
         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, in) -> (y (T, out), S = drop(x) A^T (T, r) fp32)."""
    return _fwd_impl(x, _rebuild(fmt, qtensors, qmeta), bias, lora_A, lora_B, scaling=scaling,
                     p=dropout_p, seed=seed, backend=backend)


def _fwd_fake(x, qtensors, qmeta, fmt, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return (x.new_empty((x.shape[0], qmeta[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


def _bwd(dy: torch.Tensor, x: torch.Tensor, qtensors: list[torch.Tensor], qmeta: list[int],
         fmt: str, lora_A: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, scaling: float,
         dropout_p: float, seed: torch.Tensor | None, backend: str, need_dx: bool,
         need_dA: bool, need_dB: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (T, in), dA (r, in), dB (out, r)); None (the op: empty) where unneeded."""
    saved = L.Saved(x, _rebuild(fmt, qtensors, qmeta), lora_A, lora_B, s, scaling, dropout_p,
                    seed)
    return _bwd_impl(dy, saved, L.Needs(need_dx, need_dA, need_dB), backend)


def _bwd_fake(dy, x, qtensors, qmeta, fmt, lora_A, lora_B, s, scaling, dropout_p, seed, backend,
              need_dx, need_dA, need_dB):
    return (x.new_empty(x.shape) if need_dx else None,
            lora_A.new_empty(lora_A.shape) if need_dA else None,
            lora_B.new_empty(lora_B.shape) if need_dB else None)


def _setup_context(ctx, inputs, output):
    x, qts, qmeta, fmt, bias, A, B, scaling, p, seed, backend = inputs
    ctx.save_for_backward(x, A, B, output[1], seed, *qts)
    ctx.qmeta, ctx.fmt, ctx.scaling, ctx.p, ctx.backend = qmeta, fmt, scaling, p, backend
    ctx.has_bias = bias is not None


def _grads(ctx, bwd, dy, _ds=None):
    x, A, B, s, seed, *qts = ctx.saved_tensors
    nx, _, _, _, nb, na, nB = ctx.needs_input_grad[:7]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx, dA, dB = bwd(dy, x, qts, ctx.qmeta, ctx.fmt, A, B, s, ctx.scaling, ctx.p, seed,
                     ctx.backend, nx, na, nB)
    db = dy.sum(0) if (nb and ctx.has_bias) else None
    # the registered op's autograd wants the list input's structure back (one None per tensor);
    # the eager autograd.Function (called with _bwd itself) one None for the list
    dq = None if bwd is _bwd else [None] * len(qts)
    return (dx if nx else None, dq, None, None, db, dA if na else None,
            dB if nB else None, None, None, None, None)


QLORA_OP = define_op("lora_kernels::qlora_fwd", _fwd, fake=_fwd_fake,
                     bwd_name="lora_kernels::qlora_bwd", bwd=_bwd, bwd_fake=_bwd_fake,
                     setup_context=_setup_context, grads=_grads, nondiff_outputs=(1,),
                     function_name="QLoRAFunction")


# ----------------------------------------------------------------------------- public entry
def check_quantized(name: str, qw, x) -> None:
    """``qw`` must be a QuantizedWeight matching ``x (..., in)`` and on x's device."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"{name} must be a QuantizedWeight, got {type(qw).__name__}")
    V.float_tensor("x", x, min_ndim=1)
    if x.dtype == torch.float64:
        raise TypeError("x must be float32/float16/bfloat16 with a quantized weight, got float64")
    out_f, in_f = qw.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x must have last dim in_features={in_f} ({name} is {tuple(qw.shape)}"
                         f"), got x of shape {tuple(x.shape)}")
    if qw.device != x.device:
        raise ValueError(f"{name} (quantized) must be on {x.device} (like x), got {qw.device}")


def qlora_linear(x, qweight, bias, lora_A, lora_B, *, scaling, p, seed, backend):
    """``lora_linear`` on a quantized ``qweight`` (arguments already validated by the caller
    except the quantized weight itself). The weight is dequantised in x's dtype."""
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"weight must be a torch.Tensor or a lora_kernels.quant QuantizedWeight, "
                        f"got {type(qweight).__name__}")
    check_quantized("weight", qweight, x)
    out_f, in_f = qweight.shape
    if bias is not None:
        V.float_tensor("bias", bias, ndim=1)
        V.shape("bias", bias, (out_f,), "out_features")
        V.same_dtype("x", x, bias=bias)
        V.same_device("x", x, bias=bias)
    V.lora_factors(lora_A, lora_B, x, in_f, out_f)
    x2 = x if x.dim() == 2 else x.reshape(-1, in_f)
    ts, meta, fmt = _flatten(qweight)
    y, _ = QLORA_OP(x2, ts, meta, fmt, bias, lora_A, lora_B, scaling, p, seed, backend)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)


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


def dense_weight(weight, like: torch.Tensor | None = None):
    """``weight`` itself, or, for a quantized one, ``deq(W)`` in ``like``'s dtype (checked against
    ``like (..., in)``). The hook of the methods whose fused kernels read W densely several times
    per call (DoRA's norm and two GEMMs, GLoRA's Hadamard tile ``W * A``): on a quantized base they
    dequantise W once per call into a transient dense copy."""
    if isinstance(weight, QuantizedWeight):
        if like is None:
            return weight.dequantize()
        check_quantized("weight", weight, like)
        return weight.dequantize(like.dtype)
    return weight


def serving_base(linear) -> tuple[object, torch.dtype]:
    """``(weight, compute dtype)`` of a linear a serving layer wraps: a bitsandbytes
    ``Linear4bit``'s weight as an :class:`~lora_kernels.quant.NF4Weight` (taken as it is), an
    adapter layer's quantized weight as it is, else ``linear.weight`` and its dtype."""
    from ..quant import is_bnb_linear4bit

    w = linear.weight
    if is_bnb_linear4bit(linear):
        w = NF4Weight.from_bnb(linear)
    return w, getattr(w, "dtype", None)  # None: a placeholder set later (tensor parallel)


def base_linear(x, weight, bias, backend: str = "torch"):
    """``x W^T + b`` for a dense or quantized ``weight`` (serving's base-only path)."""
    if isinstance(weight, QuantizedWeight):
        return quant_linear(x, weight, bias, backend=backend)
    return torch.nn.functional.linear(x, weight, bias)
