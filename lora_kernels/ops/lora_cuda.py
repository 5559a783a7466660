"""CUDA backend of the LoRA op (``backend="cuda"``): cuBLAS base GEMM + our low-rank kernels.

The engine's CUDA backend (:mod:`lora_kernels.ops.lowrank` ``BACKENDS["cuda"]``), same interface
as its ``torch_fwd`` / ``torch_bwd``:

* ``fwd(x2, weight, bias, A, B, scaling, p, seed) -> (y, S)``
* ``bwd(dy, saved: Saved, need: Needs) -> (dx, dA, dB)`` (``ops.lowrank.Saved`` / ``Needs``)

What runs where (per call):

======================  ===========================================================
forward                 ``y = F.linear(x2, W, b)`` (cuBLAS);
                        ``S = drop(x2) A^T`` fp32 (``_C.lora_shrink``, dropout fused);
                        ``y += s * S B^T`` in place (``_C.lora_expand``)
backward dX             ``dx = dy W`` (cuBLAS); ``G = dy B`` fp32 (``_C.lora_shrink``);
                        ``dx += s * keep/(1-p) * G A`` in place (``_C.lora_expand``)
backward dA, dB         split-K over tokens, fp32 partials + fixed-order reduction
                        (``_C.lora_grad_tn`` + ``_C.splitk_reduce``): deterministic
======================  ===========================================================

Dropout: the keep mask of element ``x2[t, k]`` is a Philox4x32-10 draw keyed by the int64 ``seed``
tensor at counter ``(t * in + k) // 4`` (word ``(t * in + k) % 4``); forward and backward regenerate
the same mask, nothing is stored. It is *not* the mask of the torch or Triton backends (each
backend is reproducible on its own); :func:`keep_mask` returns it for tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import _cuda
from ._triton import empty

if TYPE_CHECKING:
    from .lowrank import Needs, Saved

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Device type the wrappers accept. Only the CPU emulation tests (tests/cuda/test_cuda_build.py, with
# the host-emulated module of csrc/emu) change it, to run this exact code on host memory.
_DEVICE_TYPE = "cuda"


# ----------------------------------------------------------------------------- helpers
def dtype_code(name: str, t: torch.Tensor) -> int:
    try:
        return DTYPE_CODE[t.dtype]
    except KeyError:
        raise TypeError(
            f"{name} must be float32/float16/bfloat16 for backend='cuda', got {t.dtype}"
        ) from None


def check_cuda_tensor(name: str, t, device: torch.device | None = None, *, ndim: int | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """Raise a clear TypeError/ValueError unless ``t`` is a CUDA tensor as described."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != _DEVICE_TYPE:
        raise ValueError(f"backend='cuda' needs CUDA tensors: {name} is on {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like x), got {t.device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    return t


def leading_dim(t: torch.Tensor) -> int | None:
    """Row stride of a 2-D tensor whose rows are contiguous and do not overlap, else None."""
    rows, cols = t.shape
    if cols > 1 and t.stride(1) != 1:
        return None
    if rows <= 1:
        return max(cols, 1)
    ld = t.stride(0)
    return ld if ld >= max(cols, 1) else None


def as_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(t', ld)``: ``t`` itself when its rows are unit-stride, else a contiguous copy."""
    ld = leading_dim(t)
    if ld is None:
        t = t.contiguous()
        ld = max(t.shape[1], 1)
    return t, ld


def stream_of(device: torch.device) -> int:
    """The current stream's handle (what the launchers take), 0 off CUDA (emulation)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else 0


def seed_ptr(seed: torch.Tensor | None, p: float, device: torch.device) -> int:
    if p == 0.0:
        return 0
    if seed is None:
        raise ValueError("dropout_p > 0 needs a seed tensor (int64, shape (1,))")
    check_cuda_tensor("seed", seed, device, dtype=torch.int64)
    if seed.numel() < 1:
        raise ValueError("seed must hold one int64, got an empty tensor")
    return seed.data_ptr()


def _check_lora(x2, weight, bias, A, B) -> tuple[torch.device, int]:
    check_cuda_tensor("x", x2, ndim=2)
    dev = x2.device
    code = dtype_code("x", x2)
    T, in_f = x2.shape
    check_cuda_tensor("weight", weight, dev, ndim=2, dtype=x2.dtype)
    out_f = weight.shape[0]
    if weight.shape[1] != in_f:
        raise ValueError(f"weight must have shape (out, {in_f}), got {tuple(weight.shape)}")
    if bias is not None:
        check_cuda_tensor("bias", bias, dev, ndim=1, dtype=x2.dtype)
        if bias.shape[0] != out_f:
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
    check_cuda_tensor("lora_A", A, dev, ndim=2, dtype=x2.dtype)
    check_cuda_tensor("lora_B", B, dev, ndim=2, dtype=x2.dtype)
    r = A.shape[0]
    if r < 1 or A.shape[1] != in_f:
        raise ValueError(f"lora_A must have shape (r >= 1, {in_f}), got {tuple(A.shape)}")
    if tuple(B.shape) != (out_f, r):
        raise ValueError(f"lora_B must have shape ({out_f}, {r}), got {tuple(B.shape)}")
    return dev, code


class Launcher:
    """The compiled module's LoRA launchers bound to one call's dtype, device and stream: the one
    place where raw pointers, leading dimensions and integer codes go into ``lora_kernels._C``.

    Every matrix argument is a 2-D tensor whose rows are unit-stride (:func:`as_rows`); its leading
    dimension is read from its strides here, so callers pass tensors only.
    """

    def __init__(self, x: torch.Tensor):
        self.C = _cuda.module()
        self.code = dtype_code("x", x)
        self.index = device_index(x.device)
        self.stream = stream_of(x.device)

    def shrink(self, x, w, out, *, seed_ptr: int = 0, p: float = 0.0) -> None:
        """``out (T, r) fp32 = drop(x) w^T`` for ``x (T, K)``, ``w (r, K)`` contiguous."""
        x, ldx = as_rows(x)
        (T, K), r = x.shape, w.shape[0]
        self.C.lora_shrink(x.data_ptr(), ldx, T, K, w.data_ptr(), r, out.data_ptr(), r, seed_ptr,
                           float(p), self.code, self.index, self.stream)

    def expand_(self, s, w, y, *, scaling: float, seed_ptr: int = 0,
                p: float = 0.0) -> torch.Tensor:
        """``y (T, N) += scaling * mask?(s w)`` for ``s (T, r)`` fp32, ``w (r, N)`` contiguous
        (the mask of ``seed_ptr``/``p`` on the output, for the dx epilogue); returns ``y`` (a
        row-contiguous copy if its rows were not unit-stride)."""
        y, ldy = as_rows(y)
        (T, N), r = y.shape, w.shape[0]
        self.C.lora_expand(s.data_ptr(), r, w.data_ptr(), y.data_ptr(), ldy, T, N, r,
                           float(scaling), seed_ptr, float(p), self.code, self.index, self.stream)
        return y

    def grad_tn(self, lhs, rhs, out, *, transpose: bool, scaling: float, seed_ptr: int = 0,
                p: float = 0.0) -> None:
        """``out = scaling * lhs^T drop(rhs)`` (``(RL, N)``, or its transpose ``(N, RL)`` when
        ``transpose``) for ``lhs (T, RL)`` fp32 (None when T = 0), ``rhs (T, N)``; split-K over T
        with fp32 partials and a fixed-order reduction (deterministic)."""
        rhs, ldr = as_rows(rhs)
        T, N = rhs.shape
        RL = out.shape[1] if transpose else out.shape[0]
        if lhs is not None:
            lhs, ldl = as_rows(lhs)
        C, dev = self.C, self.index
        splits = C.grad_splits(T, RL, N, dev)
        part = empty((splits, RL, C.grad_ldp(N)), torch.float32, out.device)
        C.lora_grad_tn(lhs.data_ptr() if lhs is not None else 0, ldl if lhs is not None else RL,
                       rhs.data_ptr(), ldr, T, RL, N, part.data_ptr(), splits, seed_ptr,
                       float(p), self.code, dev, self.stream)
        C.splitk_reduce(part.data_ptr(), splits, RL, N, out.data_ptr(), out.shape[1], transpose,
                        float(scaling), self.code, dev, self.stream)


# ----------------------------------------------------------------------------- forward / backward
def fwd(x2, weight, bias, A, B, scaling, p, seed):
    """``(y, S)``: ``y = x2 W^T + b + scaling * drop(x2) A^T B^T``, ``S = drop(x2) A^T`` (fp32)."""
    dev, _ = _check_lora(x2, weight, bias, A, B)
    T = x2.shape[0]
    r = B.shape[1]
    sp = seed_ptr(seed, p, dev)
    y = F.linear(x2, weight, bias)                      # base GEMM: cuBLAS
    s = empty((T, r), torch.float32, dev)
    if T == 0:
        return as_rows(y)[0], s
    K = Launcher(x2)
    K.shrink(x2, A.contiguous(), s, seed_ptr=sp, p=p)
    # B^T (r, out) row-major: the expand's row layout
    y = K.expand_(s, B.t().contiguous(), y, scaling=scaling)
    return y, s


def bwd(dy, saved: Saved, need: Needs):
    """Gradients ``(dx | None, dA | None, dB | None)`` of :func:`fwd`'s ``y`` (see module doc)."""
    x2, weight, A, B, s, scaling, p, seed = saved
    dev, _ = _check_lora(x2, weight, None, A, B)
    T, in_f = x2.shape
    out_f, r = B.shape
    check_cuda_tensor("dy", dy, dev, ndim=2, dtype=x2.dtype)
    if tuple(dy.shape) != (T, out_f):
        raise ValueError(f"dy must have shape ({T}, {out_f}), got {tuple(dy.shape)}")
    sp = seed_ptr(seed, p, dev)
    K = Launcher(x2)
    dyr, _ = as_rows(dy)
    dx = dA = dB = None

    g = None
    if (need.dx or need.dA) and T > 0:
        g = empty((T, r), torch.float32, dev)           # G = dy B (fp32)
        K.shrink(dyr, B.t().contiguous(), g)            # B^T (r, out) row-major
    if need.dx:
        dx = torch.mm(dyr, weight)                      # base dX GEMM: cuBLAS
        if T > 0:                                       # A (r, in): the expand's row layout
            dx = K.expand_(g, A.contiguous(), dx, scaling=scaling, seed_ptr=sp, p=p)
    if need.dA:
        dA = empty((r, in_f), A.dtype, dev)
        K.grad_tn(g, x2, dA, transpose=False, scaling=scaling, seed_ptr=sp, p=p)
    if need.dB:
        check_cuda_tensor("s", s, dev, ndim=2, dtype=torch.float32)
        if tuple(s.shape) != (T, r):
            raise ValueError(f"s must have shape ({T}, {r}), got {tuple(s.shape)}")
        dB = empty((out_f, r), B.dtype, dev)
        K.grad_tn(s, dyr, dB, transpose=True, scaling=scaling)
    return dx, dA, dB


def keep_mask(seed: torch.Tensor, T: int, K: int, p: float) -> torch.Tensor:
    """The (T, K) bool keep mask the kernels apply to an x2 of shape (T, K) for seed and p."""
    check_cuda_tensor("seed", seed, dtype=torch.int64)
    out = torch.empty((T, K), dtype=torch.uint8, device=seed.device)
    if p > 0.0 and T * K > 0:
        _cuda.module().dropout_keep_mask(seed.data_ptr(), T, K, float(p), out.data_ptr(),
                                         device_index(seed.device), stream_of(seed.device))
    else:
        out.fill_(1)
    return out.bool()
