"""Triton kernels of the MoE-LoRA op (``ops.moe_lora``): a grouped GEMM over expert-sorted row
tiles with the low-rank term in its epilogue.

Rows are grouped by expert once (the op's :class:`~lora_kernels.ExpertPlan`: ``order`` (M,),
``offsets`` (E+1,)); the launcher cuts every expert's segment of sorted positions into tiles of
BLOCK_M rows on device (no host sync) -- the *tile table* of fixed length
``G = cdiv(M, BLOCK_M) + min(E + 1, M)`` (an upper bound: each non-empty segment adds at most one
partial tile). Tile g covers sorted positions ``[TILE_START[g], TILE_END[g])`` of expert
``TILE_EXPERT[g]``; ``TILE_EXPERT == E`` marks the segment of skipped (``-1``) rows, whose
output rows the GEMM kernel writes as zeros; ``-1`` marks an unused tile (the program exits).
A row's position ``p`` maps to its token ``PERM[p]`` (= ``order[p]``): X is read and Y written
at token rows directly (no gathered copies), while the fp32 rank-r intermediates (S, G) live in
sorted-position order.

``moe_shrink_kernel``   grid (G,):   ``S[p, :] = X[PERM[p]] @ P_e^T``  (P_e (R, K), fp32 out)
``moe_gemm_kernel``     grid (G, cdiv(N, BLOCK_N)):
                        ``Y[PERM[p]] = X[PERM[p]] @ W_e^T + scale * S[p] @ BM_e^T + bias_e``
                        (``common.lowrank_epilogue``: the rank-r term in the epilogue, fp32)
``moe_seg_tn_kernel``   grid (E, cdiv(N, BLOCK_N)):
                        ``O[e, r, n] = scale * sum_{p in segment e} L[p, r] R[PERM[p], n]``
                        (deterministic: one program walks its expert's rows in order; experts
                        without rows store zeros)

Forward / backward of the op (shapes in ``ops.moe_lora``):
  S  = shrink(X, P = A)                          Y  = gemm(X, W, S, BM = B, bias)
  G  = shrink(dY, P = B^T)                       dX = gemm(dY, W^T, G, BM = A^T)   (view strides)
  dA = seg_tn(L = G, R = X) * s                  dB^T = seg_tn(L = S, R = dY) * s (stored
                                                 through dB's transposed strides)
Every pointer offset is int64 (tokens, experts and columns), masks guard every load.
"""

import triton
import triton.language as tl

from .common import lowrank_epilogue, mma


@triton.jit
def _tile(TILE_EXPERT, TILE_START, TILE_END, PERM, g, BLOCK_M: tl.constexpr):
    """(expert, sorted positions (int64), row mask, tokens (int64)) of tile g."""
    e = tl.load(TILE_EXPERT + g).to(tl.int64)
    row0 = tl.load(TILE_START + g)
    row1 = tl.load(TILE_END + g)
    pos = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    mm = pos < row1
    tok = tl.load(PERM + pos, mask=mm, other=0).to(tl.int64)
    return e, pos, mm, tok


@triton.jit
def moe_shrink_kernel(
    X, P, S, PERM, TILE_EXPERT, TILE_START, TILE_END,
    K, R, E,
    stride_xt, stride_xk, stride_pe, stride_pr, stride_pk, stride_sp, stride_sr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    g = tl.program_id(0)
    e, pos, mm, tok = _tile(TILE_EXPERT, TILE_START, TILE_END, PERM, g, BLOCK_M)
    if (e >= 0) & (e < E):
        rr = tl.arange(0, BLOCK_R)
        mr = rr < R
        rk = tl.arange(0, BLOCK_K)
        p_base = P + e * stride_pe
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            mk = kk < K
            xv = tl.load(X + tok[:, None] * stride_xt + kk[None, :] * stride_xk,
                         mask=mm[:, None] & mk[None, :], other=0.0)
            pv = tl.load(p_base + rr[None, :] * stride_pr + kk[:, None] * stride_pk,
                         mask=mr[None, :] & mk[:, None], other=0.0)
            acc = mma(xv, pv, acc, PRECISION, UPCAST)          # (BLOCK_M, BLOCK_R) fp32
        tl.store(S + pos[:, None] * stride_sp + rr[None, :] * stride_sr, acc,
                 mask=mm[:, None] & mr[None, :])


@triton.jit
def moe_gemm_kernel(
    X, W, BIAS, Y, S, BM, PERM, TILE_EXPERT, TILE_START, TILE_END,
    K, N, R, E,
    stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_be,
    stride_yt, stride_yn, stride_sp, stride_sr, stride_bme, stride_bmn, stride_bmr,
    scale,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    g = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, pos, mm, tok = _tile(TILE_EXPERT, TILE_START, TILE_END, PERM, g, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    rn64 = rn.to(tl.int64)
    y_ptr = Y + tok[:, None] * stride_yt + rn64[None, :] * stride_yn
    if e == E:      # skipped rows: output 0
        tl.store(y_ptr, tl.zeros((BLOCK_M, BLOCK_N), dtype=Y.dtype.element_ty),
                 mask=mm[:, None] & mn[None, :])
    elif (e >= 0) & (e < E):
        rk = tl.arange(0, BLOCK_K)
        w_base = W + e * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            mk = kk < K
            xv = tl.load(X + tok[:, None] * stride_xt + kk[None, :] * stride_xk,
                         mask=mm[:, None] & mk[None, :], other=0.0)
            wv = tl.load(w_base + rn64[None, :] * stride_wn + kk.to(tl.int64)[:, None] * stride_wk,
                         mask=mn[None, :] & mk[:, None], other=0.0)
            acc = mma(xv, wv, acc, PRECISION, UPCAST)
        acc = lowrank_epilogue(acc, S, BM + e * stride_bme, BIAS + e * stride_be, S, pos, rn,
                               pos, rn64, mm, mn, N, R, stride_sp, stride_sr, stride_bmn,
                               stride_bmr, scale, 0.0, HAS_LOWRANK, HAS_BIAS, False, BLOCK_M,
                               BLOCK_N, BLOCK_R, PRECISION)
        tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def moe_seg_tn_kernel(
    L, R, O, PERM, SEG_OFF,
    N, RANK,
    stride_lp, stride_lr, stride_rt, stride_rn, stride_oe, stride_or, stride_on,
    scale,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    start = tl.load(SEG_OFF + e)
    end = tl.load(SEG_OFF + e + 1)
    rr = tl.arange(0, BLOCK_R)
    mr = rr < RANK
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    rn64 = rn.to(tl.int64)
    rt = tl.arange(0, BLOCK_T).to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        pos = t0 + rt
        mt = pos < end
        tok = tl.load(PERM + pos, mask=mt, other=0).to(tl.int64)
        lv = tl.load(L + pos[None, :] * stride_lp + rr[:, None] * stride_lr,
                     mask=mr[:, None] & mt[None, :], other=0.0).to(tl.float32)
        rv = tl.load(R + tok[:, None] * stride_rt + rn64[None, :] * stride_rn,
                     mask=mt[:, None] & mn[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(lv, rv, acc, input_precision=PRECISION)
    acc = acc * scale
    tl.store(O + e * stride_oe + rr[:, None] * stride_or + rn64[None, :] * stride_on,
             acc.to(O.dtype.element_ty), mask=mr[:, None] & mn[None, :])


# GPU tiles (fixed, not autotuned: the kernels are unverified on a GPU; see ops.moe_lora)
GPU_TILES = {
    "shrink": dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
    "gemm": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    "seg_tn": dict(BLOCK_T=64, BLOCK_N=128, num_warps=4, num_stages=2),
}
_KERNELS = {"shrink": "moe_shrink_kernel", "gemm": "moe_gemm_kernel",
            "seg_tn": "moe_seg_tn_kernel"}
# what the ahead-of-time compile check (tests/cuda/aot_tools.py) builds for a GPU
AOT_CONFIGS = {
    _KERNELS[k]: [triton.Config({n: v for n, v in c.items() if n.startswith("BLOCK_")},
                                num_warps=c["num_warps"], num_stages=c["num_stages"])]
    for k, c in GPU_TILES.items()
}
