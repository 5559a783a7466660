"""Launch helpers shared by the Triton launchers: tile choice, dot precision, seeds."""

from __future__ import annotations

import os

import torch

from .._backend import triton_interpret


def empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation for kernels. With ``LORA_KERNELS_POISON=1`` (set by the test suite) the
    buffer is filled with NaN, so any element a kernel fails to write shows up in the result."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("LORA_KERNELS_POISON", "0") == "1":
        t.fill_(float("nan"))
    return t


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's own TF32 switch (off by default, so fp32 stays IEEE-exact);
    half inputs use TF32 only for the small fp32 epilogue dots (rank-r), where it is harmless."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def upcast(*dtypes: torch.dtype) -> bool:
    """Whether kernels must upcast bf16 dot operands (interpreter bug; see kernels.common.mma)."""
    return triton_interpret() and torch.bfloat16 in dtypes


def gemm_tiles(M: int, N: int, K: int) -> dict:
    """Tile sizes for ``gemm_lowrank_kernel``.

    Interpreter: the smallest tiles tl.dot accepts (16) keep numpy work per program small.
    GPU: 128x128x64 / 8 warps / 3 stages is the usual Hopper/Ampere bf16 sweet spot for large
    GEMMs; skinny N (the rank-r shrink) gets a BLOCK_N just covering r. Not tuned on a GPU yet
    (no GPU run so far; see README "Status").
    """
    if triton_interpret():
        return dict(BLOCK_M=16 if M <= 16 else 32, BLOCK_N=16 if N <= 16 else 32, BLOCK_K=32,
                    GROUP_M=4)
    bm = 64 if M <= 64 else 128
    bn = min(128, max(16, next_pow2(N)))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8,
                num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3)


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """An int64 seed tensor (1,) on ``device``, drawn from ``generator`` (or the default one)."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=gdev, dtype=torch.int64)
    return seed.to(device)
