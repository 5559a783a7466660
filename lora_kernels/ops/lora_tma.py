"""Launcher of the TMA-descriptor candidate (``kernels.lora_tma``): the LoRA op with its two base
GEMMs on the persistent TMA kernel. A benchmark candidate, not a backend: bench/gpu_session.sh
times it against the Triton and CUDA backends; nothing picks it by default.

Same interface as the engine's ``ops.lowrank.triton_fwd`` / ``triton_bwd`` (and ``cuda_fwd`` /
``cuda_bwd``):

* ``fwd(x2, weight, bias, A, B, scaling, p, seed) -> (y, S)``:
  ``S = drop(x2) A^T`` (fp32, the skinny ``gemm_lowrank_kernel``: the same dropout mask as the
  Triton backend), then ``y = x2 W^T + b + scaling * S B^T`` on the TMA kernel (W (out, in) read
  K-major).
* ``bwd(dy, Saved(x2, weight, A, B, S, scaling, p, seed), Needs(dx, dA, dB))``:
  ``G = dy B`` (skinny kernel), ``dx = dy W + scaling * keep/(1-p) * G A`` on the TMA kernel (W
  read as stored, (K=out, N=in)), ``dA`` / ``dB`` by ``tn_kernel`` as in the Triton backend.

TMA constraints: a descriptor needs unit stride in its last dim and 16-byte aligned base and row
strides, so x / dy are copied when their rows are not (``_tma_rows``), and ``in_features`` and
``out_features`` must be multiples of 16 bytes (8 bf16/fp16 or 4 fp32 elements): otherwise
``ValueError`` (use backend="triton"). T and the rank are free.
"""

from __future__ import annotations

import functools

import torch

from . import _triton as TR
from .lowrank import Needs, Saved, gemm_lowrank, tn


def _aligned(t: torch.Tensor) -> bool:
    e = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and (t.shape[0] <= 1 or (t.stride(0) * e) % 16 == 0))


def _tma_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` if a descriptor can address it as it is, else a contiguous copy."""
    # clone, not .contiguous(): a one-row view counts as contiguous at any address
    return t if _aligned(t) else t.clone(memory_format=torch.contiguous_format)


def _check_dims(name: str, n: int, t: torch.Tensor):
    if (n * t.element_size()) % 16:
        raise ValueError(f"the TMA candidate needs {name} * {t.element_size()} bytes to be a "
                         f"multiple of 16 (tensor descriptors), got {name}={n}; use "
                         "backend='triton'")


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemm_lowrank_tma(x, w, *, w_kmajor: bool, out_dtype, bias=None, s=None, bm=None,
                     scale=1.0, seed=None, p=0.0, drop_epi=False, config=None) -> torch.Tensor:
    """``x @ op(w)^T (+bias) (+scale*mask?(s @ bm^T))`` on ``gemm_lowrank_tma_kernel``.

    x (M, K); w (N, K) when ``w_kmajor`` else (K, N); s (M, R) fp32; bm (N, R), any strides.
    ``config``: a ``triton.Config`` of ``kernels.lora_tma.TMA_CONFIGS`` (default: the first on
    a GPU, 16x16x16 tiles in the interpreter). Returns (M, N) in ``out_dtype``.
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    from ..kernels.lora_tma import TMA_CONFIGS, gemm_lowrank_tma_kernel

    M, K = x.shape
    N = w.shape[0] if w_kmajor else w.shape[1]
    y = TR.empty((M, N), out_dtype, x.device)
    if M == 0 or N == 0:
        return y
    x = _tma_rows(x)
    w = _tma_rows(w)
    if TR.triton_interpret():
        kw, opts, nsm = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2), {}, 3
    else:
        cfg = config or TMA_CONFIGS[0]
        kw, opts = dict(cfg.kwargs), dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        # off CUDA only the static profile's dry run gets here: an H100/H200's 132 SMs
        nsm = (_num_sms(x.device.index if x.device.index is not None else 0)
               if x.device.type == "cuda" else 132)
    bmk, bnk, bkk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    x_desc = TensorDescriptor.from_tensor(x, [bmk, bkk])
    w_desc = TensorDescriptor.from_tensor(w, [bnk, bkk] if w_kmajor else [bkk, bnk])
    R = s.shape[1] if s is not None else 1
    tiles = TR.cdiv(M, bmk) * TR.cdiv(N, bnk)
    grid = (max(1, min(nsm, tiles)),)
    gemm_lowrank_tma_kernel[grid](
        x_desc, w_desc, y, bias.contiguous() if bias is not None else y, s if s is not None else y,
        bm if bm is not None else y, seed if seed is not None else y,
        M, N, K, R, y.stride(0), y.stride(1),
        s.stride(0) if s is not None else 0, s.stride(1) if s is not None else 0,
        bm.stride(0) if bm is not None else 0, bm.stride(1) if bm is not None else 0,
        float(scale), float(p),
        HAS_BIAS=bias is not None, HAS_LOWRANK=s is not None, DROP_EPI=drop_epi,
        W_KMAJOR=w_kmajor, BLOCK_R=max(16, min(64, TR.next_pow2(R))), NUM_SMS=grid[0],
        PRECISION=TR.dot_precision(x.dtype), UPCAST=TR.upcast(x.dtype, w.dtype), **kw, **opts,
    )
    return y


def fwd(x2, weight, bias, A, B, scaling, p, seed, *, config=None):
    """``(y, S)`` of the LoRA op (see module doc)."""
    _check_dims("in_features", x2.shape[1], x2)
    _check_dims("out_features", weight.shape[0], x2)
    drop = p > 0.0
    s = gemm_lowrank(x2, A, out_dtype=torch.float32, seed=seed, p=p, drop_x=drop)
    y = gemm_lowrank_tma(x2, weight, w_kmajor=True, out_dtype=x2.dtype, bias=bias, s=s, bm=B,
                         scale=scaling, config=config)
    return y, s


def bwd(dy, saved: Saved, need: Needs, config=None):
    """``(dx | None, dA | None, dB | None)`` of :func:`fwd`'s ``y`` (``ops.lowrank.Saved`` /
    ``Needs``, as every backend's backward)."""
    x2, weight, A, B, s, scaling, p, seed = saved
    need_dx, need_dA, need_dB = need
    _check_dims("in_features", x2.shape[1], x2)
    _check_dims("out_features", weight.shape[0], x2)
    dx = dA = dB = None
    drop = p > 0.0
    if need_dx or need_dA:
        g = gemm_lowrank(dy, B.t(), out_dtype=torch.float32)                  # (T, r)
    if need_dx:
        dx = gemm_lowrank_tma(dy, weight, w_kmajor=False, out_dtype=x2.dtype, s=g, bm=A.t(),
                              scale=scaling, seed=seed, p=p, drop_epi=drop, config=config)
    if need_dA:
        dA = (tn(g, x2, seed=seed, p=p, drop_r=drop) * scaling).to(A.dtype)  # (r, in)
    if need_dB:
        dB = (tn(dy, s) * scaling).to(B.dtype)                                # (out, r)
    return dx, dA, dB
