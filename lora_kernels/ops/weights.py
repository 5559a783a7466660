"""The engine's weight interface: a base weight is a dense ``(out, in)`` tensor or a frozen
:class:`lora_kernels.quant.QuantizedWeight` (NF4 / int8 / FP8), and the engine
(:mod:`lora_kernels.ops.lowrank`) chooses the base GEMM from it.

* :func:`flatten` / :func:`rebuild`: a quantized weight as ``(tensors, ints, fmt)`` so it travels
  through a registered op's schema, and back as a :class:`QuantView` (no nn.Module per call).
* :func:`qgemm`: the Triton base GEMM that dequantises each weight tile in registers
  (``kernels.quant.qgemm_lowrank_kernel``; W dense never exists), with the LoRA epilogue.
* :func:`dense`: ``deq(W)`` for the torch / cuda paths (cuda: into one reused workspace per
  (device, dtype, shape), the Unsloth approach).
* :func:`dense_weight` / :func:`check_quantized`: the hook of ops that read W densely several
  times per call (DoRA, GLoRA) and the check of a quantized weight against ``x``.
"""

from __future__ import annotations

import torch

from .. import _validate as V
from ..quant import FP8Weight, Int8Weight, NF4Weight, QuantizedWeight, check_fp8_device
from . import _triton as TR

__all__ = ["QuantView", "check_quantized", "decode_splits", "dense", "dense_weight", "flatten",
           "is_quantized", "qgemm", "rebuild"]

_CLASSES = {"nf4": NF4Weight, "int8": Int8Weight, "fp8": FP8Weight}


def is_quantized(weight) -> bool:
    """Whether ``weight`` is not a dense tensor (a QuantizedWeight or its :class:`QuantView`)."""
    return not isinstance(weight, torch.Tensor)


# ----------------------------------------------------------------------------- (un)flattening
def flatten(qw: QuantizedWeight) -> tuple[list[torch.Tensor], list[int], str]:
    """(tensors, ints, fmt) that :func:`rebuild` turns back into an equivalent weight."""
    out_f, in_f = qw.shape
    if qw.fmt == "nf4":
        ts = [qw.packed, qw.absmax, qw.code]
        if qw.nested:
            ts += [qw.absmax2, qw.code2, qw.offset]
        return ts, [out_f, in_f, qw.blocksize, int(qw.nested)], "nf4"
    if qw.fmt == "int8":
        return [qw.qweight, qw.scale], [out_f, in_f, 0, 0], "int8"
    return [qw.qweight, qw.scale], [out_f, in_f, qw.block_size or 0, 0], "fp8"


class QuantView:
    """The fields of a quantized weight the launchers read (what :func:`flatten` carried); its
    ``dequantize`` is the format class's own, applied to these fields."""

    _dtype = torch.float32  # read by the format classes' dequantize when no dtype is passed

    def __init__(self, fmt, ts, meta):
        self.fmt, self.shape = fmt, torch.Size(meta[:2])
        self._shape = self.shape  # the format classes' dequantize reads it
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


def rebuild(fmt, ts, meta) -> QuantView:
    """The weight :func:`flatten` flattened, as a :class:`QuantView`."""
    return QuantView(fmt, ts, meta)


# ----------------------------------------------------------------------------- dense copies
_WORKSPACE: dict = {}


def dense(weight, dtype, device, reuse: bool = False) -> torch.Tensor:
    """``weight`` itself when dense, else ``deq(W)`` in ``dtype``; with ``reuse`` written into one
    workspace per (device, dtype, shape) (the cuda backend: the buffer is overwritten by the next
    layer of that shape)."""
    if isinstance(weight, torch.Tensor):
        return weight
    if not reuse:
        return weight.dequantize(dtype)
    key = (device, dtype, tuple(weight.shape))
    buf = _WORKSPACE.get(key)
    if buf is None:
        buf = _WORKSPACE[key] = torch.empty(weight.shape, dtype=dtype, device=device)
    return buf.copy_(weight.dequantize(dtype))


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


def decode_splits(M: int, N: int, K: int, device, tile) -> int:
    """Split-K factor of a decode GEMM: about 4 programs per SM, each over >= 2 K tiles."""
    if device.type != "cuda" or M > 16:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = TR.cdiv(N, tile["BLOCK_N"])
    return max(1, min(TR.cdiv(4 * sms, tiles), K // (2 * tile["BLOCK_K"])))


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
        splits = 1 if interp else decode_splits(M, N, K, x.device, DECODE_TILE)
    if splits > 1 or (not interp and M <= 16):
        kernel, cfg = qgemm_lowrank_kernel, (TR.interpreter_tiles(M, N) if interp
                                             else dict(DECODE_TILE))
    elif interp:
        kernel, cfg = qgemm_lowrank_kernel, TR.interpreter_tiles(M, N)
    else:
        kernel, cfg = TR.tuned(qgemm_lowrank_kernel, qgemm_lowrank_autotuned)
    if splits > 1:
        bk = cfg["BLOCK_K"]
        per = TR.cdiv(TR.cdiv(K, splits), bk) * bk
        splits = TR.cdiv(K, per)
    else:
        per = max(K, 1)
    part = TR.empty((splits, M, N), torch.float32, x.device) if splits > 1 else y
    dummy = y
    common = dict(PRECISION=TR.dot_precision(x.dtype), UPCAST=TR.upcast(x.dtype),
                  BLOCK_R=max(16, min(64, TR.next_pow2(R))))

    def grid(meta):
        return (TR.cdiv(M, meta["BLOCK_M"]) * TR.cdiv(N, meta["BLOCK_N"]), splits)

    kernel[grid](
        x, Q, QS, CODE, ABS2, CODE2, OFF, y, part, bias.contiguous() if bias is not None else dummy,
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
        splitk_epilogue_kernel[(TR.cdiv(M, bm_), TR.cdiv(N, bn_))](
            part, y, bias.contiguous() if bias is not None else dummy,
            s if s is not None else dummy,
            bm if bm is not None else dummy, seed if seed is not None else dummy,
            M, N, R, splits, part.stride(0), y.stride(0), y.stride(1),
            s.stride(0) if s is not None else 0, s.stride(1) if s is not None else 0,
            bm.stride(0) if bm is not None else 0, bm.stride(1) if bm is not None else 0,
            float(scale), float(p), HAS_BIAS=bias is not None, HAS_LOWRANK=s is not None,
            DROP_EPI=drop_epi, BLOCK_M=bm_, BLOCK_N=bn_, BLOCK_R=common["BLOCK_R"],
            PRECISION=common["PRECISION"])
    return y
