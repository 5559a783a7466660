"""Triton helper of the DoRA op (``ops.dora``); its GEMMs are ``kernels.lora.gemm_lowrank_kernel``
with the ``ROW_SCALE`` / ``X_SCALE`` flags."""

import triton
import triton.language as tl

from .common import keep_mask


@triton.jit
def keep_mask_kernel(SEED, OUT, n, p, BLOCK: tl.constexpr):
    """OUT[i] = 1 iff element i (row-major counter ``t * K + k``) of x is kept: the same mask the
    LoRA kernels' ``DROP_X`` / ``DROP_EPI`` / ``DROP_R`` apply (``kernels.common.keep_mask``)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    keep = keep_mask(SEED, offs, p)
    tl.store(OUT + offs, keep.to(tl.int8), mask=mask)
