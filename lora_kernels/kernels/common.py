"""``@triton.jit`` helpers shared by every kernel module."""

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    UPCAST is set by launchers only under ``TRITON_INTERPRET=1`` with bf16 operands: Triton's
    interpreter (3.9) returns garbage (~1e10) for bf16 ``tl.dot``; bf16*bf16 products are exact in
    fp32, so the upcast computes what the GPU's bf16 MMA computes.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def keep_mask(seed_ptr, offs, p):
    """Dropout keep-mask (True = keep) for element counters ``offs``; seed read on device."""
    seed = tl.load(seed_ptr)
    return tl.rand(seed, offs) >= p


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of a 1-D GEMM grid in grouped order: GROUP_M consecutive row tiles walk
    the column tiles together, so they share each W tile while it is in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group) % gsize, (pid % group) // gsize
