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


@triton.jit
def gemm_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The prologue of every tiled GEMM kernel: the output tile of program ``pid`` (grouped
    order, :func:`grouped_tile`) as ``(rm, rn, mask_m, mask_n, rm64, rn64)``: its row indices
    (BLOCK_M,) and column indices (BLOCK_N,), their bounds masks (``rm < M``, ``rn < N``) and the
    indices widened to int64 for pointer offsets (``row * stride`` may pass 2**31)."""
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, rm < M, rn < N, rm.to(tl.int64), rn.to(tl.int64)


@triton.jit
def lowrank_epilogue(acc, S, BM, BIAS, SEED, rm, rn, rm64, rn64, mask_m, mask_n, N, R,
                     stride_sm, stride_sr, stride_bn, stride_br, scale, p,
                     HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, DROP_EPI: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                     PRECISION: tl.constexpr):
    """The "+ low-rank + bias" epilogue of every base GEMM, on an fp32 tile ``acc (BLOCK_M,
    BLOCK_N)`` of rows ``rm`` and columns ``rn``:

        acc += scale * mask?(S[rm, :] @ BM[rn, :]^T)  (+ BIAS[rn])

    S (M, R) fp32 and BM (N, R) any strides; the rank is looped in BLOCK_R chunks. With DROP_EPI
    the low-rank term is multiplied by keep(t*N + n)/(1-p) (the dX path of LoRA dropout).
    """
    if HAS_LOWRANK:
        rr = tl.arange(0, BLOCK_R)
        lr = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            ri = r0 + rr
            mr = ri < R
            s = tl.load(S + rm64[:, None] * stride_sm + ri[None, :] * stride_sr,
                        mask=mask_m[:, None] & mr[None, :], other=0.0).to(tl.float32)
            b = tl.load(BM + rn64[None, :] * stride_bn + ri[:, None] * stride_br,
                        mask=mask_n[None, :] & mr[:, None], other=0.0).to(tl.float32)
            lr = tl.dot(s, b, lr, input_precision=PRECISION)
        lr = lr * scale
        if DROP_EPI:
            keep = keep_mask(SEED, rm64[:, None] * N + rn64[None, :], p)   # (64-bit: T*N)
            lr = tl.where(keep, lr / (1.0 - p), 0.0)
        acc += lr
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc
