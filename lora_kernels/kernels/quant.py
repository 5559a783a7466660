"""Triton kernels of the LoRA base GEMM on a quantized frozen weight (NF4 / int8 / FP8).

``qgemm_lowrank_kernel``  Y[M, N] = X[M, K] @ Wt[K, N]  (+ bias[N]) (+ scale * mask?(S Bm^T))
  with the weight tile *dequantised in registers* inside the K loop (as ``kernels.glora`` builds
  its ``W_eff`` tiles), so no dense copy of W ever exists in memory:
    * forward base+expand  y  = x W^T + b + s S B^T        TRANS_W=False: Wt[k, n] = W[n, k]
    * backward dX          dx = dy W + s keep/(1-p) (G A)  TRANS_W=True:  Wt[k, n] = W[k, n]
  The epilogue is ``kernels.common.lowrank_epilogue``, the same one ``gemm_lowrank_kernel`` runs.
  Each dequantised tile is cast to X's dtype before the MMA, so the kernel computes exactly
  ``X @ dequantize(W, X.dtype)^T`` (bitsandbytes' semantics: fp32 ``code * absmax``, then cast),
  up to the accumulation order.

  SPLIT_K (decode, T <= 16): a decode GEMM is memory-bound on the weight bytes, so the grid is
  (N tiles) x (K splits): every weight byte is read once, by one of enough programs to keep all
  SMs streaming (an N=4096 layer at BLOCK_N=64 has only 64 column tiles). Each program writes an
  fp32 partial (M, BLOCK_N) into P[split]; ``splitk_epilogue_kernel`` sums the partials in a fixed
  order (deterministic: no atomics) and applies the same epilogue. Bytes per decode step of a
  4096x4096 NF4 layer: 8 MiB codes + 1 MiB absmax (nested: 0.25 MiB) against 32 MiB of bf16, so
  the NF4 step can be ~3.5x faster than a bf16 one when both stream at the same bandwidth
  (a model; the measured ratio is ``nf4_decode_speedup_vs_bf16`` of the GPU benchmark).

Dequantisation of element W[r, c] (``dequant_tile``; r, c broadcast to the tile):
  NF4   f = r*K_W + c (row-major flat index, K_W = in_features), byte = Q[f >> 1],
        q = byte >> 4 if f even else byte & 15, w = CODE[q] * absmax[f // BLOCKSIZE],
        absmax = QS[b] (fp32) or, NESTED, CODE2[QS[b]] * ABS2[b // 256] + OFFSET
  int8  w = Q[r, c] * QS[r]
  FP8   w = Q[r, c] * QS[r]   or  (FP8_BLOCKED)  Q[r, c] * QS[r // 128, c // 128]
Row-major flat blocks need no alignment: ``in_features`` need not divide the NF4 block, and the
K tail of any format is masked.
"""

import triton
import triton.language as tl

from .common import gemm_tile, lowrank_epilogue, mma

FMT_NF4, FMT_INT8, FMT_FP8 = 0, 1, 2


@triton.jit
def dequant_tile(Q, QS, CODE, ABS2, CODE2, OFFSET, wr, wc, mask, K_W, stride_qr, stride_qc, n_cb,
                 FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
                 FP8_BLOCKED: tl.constexpr):
    """fp32 values of W[wr, wc] (wr, wc int index tensors broadcast to the tile's shape; masked
    elements are 0). See the module doc for each format."""
    wr = wr.to(tl.int64) + tl.zeros_like(wc).to(tl.int64)   # full 2-D row index
    wc = wc.to(tl.int64) + tl.zeros_like(wr)
    if FMT == 0:
        f = wr * K_W + wc
        byte = tl.load(Q + (f >> 1), mask=mask, other=0).to(tl.int32)
        q = tl.where((f & 1) == 0, byte >> 4, byte & 15)
        v = tl.load(CODE + q)
        blk = f // BLOCKSIZE
        if NESTED:
            qa = tl.load(QS + blk, mask=mask, other=0).to(tl.int32)
            a = (tl.load(CODE2 + qa) * tl.load(ABS2 + blk // 256, mask=mask, other=0.0)
                 + tl.load(OFFSET))
        else:
            a = tl.load(QS + blk, mask=mask, other=0.0)
        w = tl.where(mask, v * a, 0.0)
    else:
        # no `other`: an fp8 tensor takes no int fill; masked lanes are zeroed after the cast
        q = tl.load(Q + wr * stride_qr + wc * stride_qc, mask=mask).to(tl.float32)
        q = tl.where(mask, q, 0.0)
        if FMT == 2 and FP8_BLOCKED:
            s = tl.load(QS + (wr // 128) * n_cb + wc // 128, mask=mask, other=0.0)
        else:
            s = tl.load(QS + wr, mask=mask, other=0.0)
        w = q * s
    return w


@triton.jit
def qgemm_lowrank_kernel(
    X, Q, QS, CODE, ABS2, CODE2, OFFSET, Y, P, BIAS, S, BM, SEED,
    M, N, K, R, M_BUCKET, K_W, n_cb, k_per_split,
    stride_xm, stride_xk, stride_qr, stride_qc, stride_ym, stride_yn, stride_ps,
    stride_sm, stride_sr, stride_bn, stride_br,
    scale, p,
    FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, FP8_BLOCKED: tl.constexpr,
    TRANS_W: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, DROP_EPI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rm, rn, mask_m, mask_n, rm64, rn64 = gemm_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N,
                                                   GROUP_M)
    pid_s = tl.program_id(1)
    rk = tl.arange(0, BLOCK_K)

    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        mk = kk < k_hi
        x = tl.load(X + rm64[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mk[None, :], other=0.0)
        wmask = mk[:, None] & mask_n[None, :]
        if TRANS_W:    # tile[k, n] = W[k, n]
            w = dequant_tile(Q, QS, CODE, ABS2, CODE2, OFFSET, kk[:, None], rn[None, :], wmask,
                             K_W, stride_qr, stride_qc, n_cb, FMT, NESTED, BLOCKSIZE, FP8_BLOCKED)
        else:          # tile[k, n] = W[n, k]
            w = dequant_tile(Q, QS, CODE, ABS2, CODE2, OFFSET, rn[None, :], kk[:, None], wmask,
                             K_W, stride_qr, stride_qc, n_cb, FMT, NESTED, BLOCKSIZE, FP8_BLOCKED)
        acc = mma(x, w.to(X.dtype.element_ty), acc, PRECISION, UPCAST)

    if SPLIT_K:
        tl.store(P + pid_s.to(tl.int64) * stride_ps + rm64[:, None] * N + rn64[None, :], acc,
                 mask=mask_m[:, None] & mask_n[None, :])
    else:
        acc = lowrank_epilogue(acc, S, BM, BIAS, SEED, rm, rn, rm64, rn64, mask_m, mask_n, N, R,
                               stride_sm, stride_sr, stride_bn, stride_br, scale, p,
                               HAS_LOWRANK, HAS_BIAS, DROP_EPI, BLOCK_M, BLOCK_N, BLOCK_R,
                               PRECISION)
        tl.store(Y + rm64[:, None] * stride_ym + rn64[None, :] * stride_yn,
                 acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def splitk_epilogue_kernel(
    P, Y, BIAS, S, BM, SEED, M, N, R, splits,
    stride_ps, stride_ym, stride_yn, stride_sm, stride_sr, stride_bn, stride_br, scale, p,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, DROP_EPI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Y = sum_s P[s] (fixed order) + epilogue; P (splits, M, N) fp32 contiguous."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    msk = mask_m[:, None] & mask_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(P + tl.cast(s, tl.int64) * stride_ps + rm64[:, None] * N + rn64[None, :],
                       mask=msk, other=0.0)
    acc = lowrank_epilogue(acc, S, BM, BIAS, SEED, rm, rn, rm64, rn64, mask_m, mask_n, N, R,
                           stride_sm, stride_sr, stride_bn, stride_br, scale, p,
                           HAS_LOWRANK, HAS_BIAS, DROP_EPI, BLOCK_M, BLOCK_N, BLOCK_R, PRECISION)
    tl.store(Y + rm64[:, None] * stride_ym + rn64[None, :] * stride_yn,
             acc.to(Y.dtype.element_ty), mask=msk)


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


def _prune(configs, named_args, **kwargs):
    M = named_args["M"]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, triton.next_power_of_2(M))]
    return keep or configs[-1:]


# Candidate tiles (unmeasured on a GPU): bf16 GEMM tiles with BLOCK_K=64 (one NF4 block of the
# default blocksize per row per step) and 2 stages: the software pipeline also buffers the codes,
# scales and gathered code values of each stage, so 128x128x64 at 3 stages needs 224 KiB of shared
# memory (over sm_80's 164 KiB; the AOT compile reports the footprint), 2 stages fit.
# 128x128 and 64x128 at 4 warps were removed: they spill at sm_90 (Triton 3.6, 3 stages: 243 / 146
# STL in the forward; bench/results/static-sm90.json).
QGEMM_CONFIGS = [
    _cfg(128, 128, 64, 8, 2),
    _cfg(128, 64, 64, 4, 2), _cfg(64, 64, 64, 4, 2), _cfg(32, 64, 64, 4, 2),
]

qgemm_lowrank_autotuned = triton.autotune(
    configs=QGEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "R", "HAS_LOWRANK", "DROP_EPI", "FMT", "NESTED", "TRANS_W"],
    prune_configs_by={"early_config_prune": _prune},
)(qgemm_lowrank_kernel)

# Decode tile (T <= 16, split-K grid; unmeasured on a GPU).
# BLOCK_K=64: at 128 (4 warps) the tile spilled at sm_90 (53 STL; 64: 186 registers, none).
DECODE_TILE = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1)

# GPU tile configs compiled ahead of time by tests/test_triton_aot.py.
AOT_CONFIGS = {"qgemm_lowrank_kernel": [QGEMM_CONFIGS[0]]}
