"""Launch helpers shared by the Triton launchers: tile choice, dot precision, seeds, ``cdiv``."""

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


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (b > 0): tile and split counts."""
    return -(-a // b)


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


def interpreter_tiles(M: int, N: int) -> dict:
    """Fixed tiles for the interpreter: the smallest tl.dot accepts (16), so numpy work per
    program stays small. On a GPU the kernels are autotuned instead (kernels.lora)."""
    return dict(BLOCK_M=16 if M <= 16 else 32, BLOCK_N=16 if N <= 16 else 32, BLOCK_K=32,
                GROUP_M=4)


# The one known-good GPU config per autotuned kernel that ``LORA_KERNELS_AUTOTUNE=0`` launches
# (kernel name -> launch meta-parameters): a candidate of the kernel's own autotune list that
# does not spill in any launch of bench/results/static-sm90.json (dropout's DROP_X / DROP_EPI
# included: kernels.lora DROP_*_SPILLS) and is mid-sized, so that small test shapes still cover
# several tiles. A kernel not listed uses its autotuner's first candidate.
FIXED_TILES = {
    "gemm_lowrank_kernel": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4,
                                num_stages=4),
    "glora_gemm_kernel": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4,
                              num_stages=4),
    "qgemm_lowrank_kernel": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4,
                                 num_stages=2),
}


def autotune_enabled() -> bool:
    """False under ``LORA_KERNELS_AUTOTUNE=0``: the GPU session's correctness and memcheck passes
    (one compile per specialisation instead of one per autotune candidate)."""
    return os.environ.get("LORA_KERNELS_AUTOTUNE", "1").strip() != "0"


def tuned(plain, autotuned) -> tuple[object, dict]:
    """``(kernel, launch kwargs)`` of an autotuned GPU launch: ``(autotuned, {})`` (its autotuner
    picks the config), or with ``LORA_KERNELS_AUTOTUNE=0`` ``plain`` with the kernel's
    :data:`FIXED_TILES` entry (``BLOCK_*``, ``num_warps``, ``num_stages``). Every launcher of an
    autotuned kernel goes through here."""
    if autotune_enabled():
        return autotuned, {}
    name = getattr(getattr(plain, "fn", plain), "__name__", "")
    fixed = FIXED_TILES.get(name)
    if fixed is None:
        c = autotuned.configs[0]
        fixed = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    return plain, dict(fixed)


def tile_launch(plain, autotuned, M: int, N: int):
    """``(kernel, tile kwargs, grid)`` of a tiled (M, N) GEMM launch: ``plain`` with
    :func:`interpreter_tiles` under ``TRITON_INTERPRET=1``, else :func:`tuned` (``autotuned``, its
    autotuner picking the tiles, or fixed tiles); ``grid(meta)`` is one program per (BLOCK_M,
    BLOCK_N) output tile."""
    if triton_interpret():
        kernel, cfg = plain, interpreter_tiles(M, N)
    else:
        kernel, cfg = tuned(plain, autotuned)

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    return kernel, cfg, grid


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """An int64 seed tensor (1,) on ``device``, drawn from ``generator`` (or the default one)."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=gdev, dtype=torch.int64)
    return seed.to(device)
