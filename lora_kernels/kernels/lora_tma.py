"""Benchmark candidate (not a backend): a persistent TMA-descriptor Triton GEMM with the fused
low-rank epilogue.

``gemm_lowrank_tma_kernel``
    Y[M, N] = X[M, K] @ op(W)^T (+ bias[N]) (+ scale * mask?(S[M, R] @ Bm[N, R]^T))
    * X and W are read through host-built tensor descriptors (``TensorDescriptor``: on sm_90 a
      CUtensorMap passed as a kernel parameter; the loads become TMA bulk copies, ``UTMALDG``):
      ``W_KMAJOR=True``  W stored (N, K) (the forward ``x W^T``, tile [BLOCK_N, BLOCK_K], used
      transposed); ``W_KMAJOR=False`` W stored (K, N) (the backward ``dy W``: W itself, tile
      [BLOCK_K, BLOCK_N]). Out-of-range tile parts read as zero.
    * persistent grid: ``NUM_SMS`` programs walk the output tiles in grouped order
      (``grouped_tile``), so W tiles are shared in L2 and no launch tail is left per tile wave.
    * epilogue, per tile, as ``kernels.lora.gemm_lowrank_kernel``: ``+ scale * S Bm^T`` (rank in
      BLOCK_R chunks, fp32 S, tf32 dot), dropout keep/(1-p) on the low-rank term (``DROP_EPI``,
      the dX of dropout training; same counter t*N + n as the Triton backend), bias, then a
      masked store (any N). Without dropout the low-rank term is accumulated into the main fp32
      accumulator itself (no second BLOCK_M x BLOCK_N accumulator: what made the 128x256 /
      4-warp 128x128 tiles of the pointer kernel spill, bench/results/static-sm90.json).

Not the default anywhere: bench/gpu_session.sh times it against ``gemm_lowrank_kernel`` and the
CUDA backend at the training point. Tested in Triton's interpreter (tests/cuda/test_lora_tma.py);
compiled for sm_90 by the static profile; never run on a GPU yet.
"""

import triton
import triton.language as tl

from .common import grouped_tile, keep_mask, mma


@triton.jit
def gemm_lowrank_tma_kernel(
    x_desc, w_desc, Y, BIAS, S, BM, SEED,
    M, N, K, R,
    stride_ym, stride_yn, stride_sm, stride_sr, stride_bn, stride_br,
    scale, p,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, DROP_EPI: tl.constexpr,
    W_KMAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(k_tiles):
            k0 = kt * BLOCK_K
            a = x_desc.load([m0, k0])                                   # [BLOCK_M, BLOCK_K]
            if W_KMAJOR:
                b = w_desc.load([n0, k0]).T                             # [BLOCK_K, BLOCK_N]
            else:
                b = w_desc.load([k0, n0])
            acc = mma(a, b, acc, PRECISION, UPCAST)

        rm = m0 + tl.arange(0, BLOCK_M)
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < N
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        if HAS_LOWRANK:
            rr = tl.arange(0, BLOCK_R)
            lr = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # used (kept) only with DROP_EPI
            for r0 in range(0, R, BLOCK_R):
                ri = r0 + rr
                mr = ri < R
                s = tl.load(S + rm64[:, None] * stride_sm + ri[None, :] * stride_sr,
                            mask=mask_m[:, None] & mr[None, :], other=0.0).to(tl.float32)
                bb = tl.load(BM + rn64[None, :] * stride_bn + ri[:, None] * stride_br,
                             mask=mask_n[None, :] & mr[:, None], other=0.0).to(tl.float32)
                if DROP_EPI:
                    lr = tl.dot(s, bb, lr, input_precision=PRECISION)
                else:
                    acc = tl.dot(s * scale, bb, acc, input_precision=PRECISION)
            if DROP_EPI:
                keep = keep_mask(SEED, rm64[:, None] * N + rn64[None, :], p)
                acc += tl.where(keep, lr * (scale / (1.0 - p)), 0.0)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm64[:, None] * stride_ym + rn64[None, :] * stride_yn,
                 acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


# Candidate tiles for the base GEMM at the training point (unmeasured; the launcher picks the
# first unless told otherwise). With the low-rank term folded into the one accumulator, 128x256
# at 8 warps holds 128 fp32 accumulators per thread, as a plain GEMM of that tile does.
TMA_CONFIGS = [_cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 4, 4)]
