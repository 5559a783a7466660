"""Triton kernels for multi-adapter LoRA (many adapters in one batch, each token picks one).

Pool layout (``lora_kernels.pool.AdapterPool``), rank-major so a kernel reads contiguous rows
and touches only an adapter's real rank:

  P  (MAXA, MAXR, K)  rows >= rank_i are zero (forward: P = lora_A,   K = in)
  Q  (MAXA, MAXR, N)  rows >= rank_i are zero (forward: Q = lora_Bt,  N = out)
  RANKS int32 (MAXA,) (0 = free slot), SCALES fp32 (MAXA,)

Every kernel computes, for a token t with adapter i = ids[t],

  Y[t, :] += SCALES[i] * (X[t, :] @ P[i]^T) @ Q[i]          (shrink -> expand, fused)

and leaves Y[t] untouched when ``i < 0``, ``i >= MAXA`` or ``RANKS[i] == 0`` (the guards make an
unchecked id unable to read out of bounds; the public op still validates ids first). The
rank-``r`` intermediate lives in registers (fp32) between shrink and expand: it never reaches HBM.
Backward dX is the same kernel with ``P = lora_Bt`` (K = out) and ``Q = lora_A`` (N = in).

Rank handling: ``RB`` (constexpr) is the power of two covering the largest rank currently loaded
in the pool (from the pool's host-side mirror, so no device read); every P/Q load is masked with
``r < RANKS[i]``, so a rank-4 adapter in a pool whose largest adapter has rank 64 moves 4 rows of
bytes, not 64 (masked lanes issue no memory traffic). Compute on masked lanes is wasted, which is
free for the memory-bound decode kernel and ``RB/N`` of the work for prefill.

``bgmv_kernel`` (decode: few tokens per adapter; gather per token)
    grid (T, SPLIT_N): program (t, j) computes the whole shrink ``v = s_i x_t A_i^T`` (a GEMV over
    K, fp32) and then the expand for output columns ``[j*n_per_split, (j+1)*n_per_split)``.
    Bytes per token: ``r_i*(K+N)*elt`` adapter bytes (A_i once from HBM, re-read from L2 by the
    SPLIT_N - 1 other column slices) + ``K*elt`` (x) + ``2*N*elt`` (read-modify-write of y). At
    decode the adapter bytes dominate: 64 tokens, 4096x4096, r=16, bf16, distinct adapters move
    64 * 16 * 8192 * 2 B = 16.8 MB of adapters against 1.5 MB of activations.
    SPLIT_N is chosen by the launcher so ``T * SPLIT_N`` fills the GPU (several waves of SMs).

``sgmv_kernel`` (prefill: segments of tokens per adapter; segmented GEMM)
    Tokens are grouped by adapter on device once per forward (the batch plan,
    ``ops.multi_lora.plan``: stable sort + segment starts, no host sync) into a *tile table* of
    fixed length G = cdiv(T, BLOCK_M) + min(MAXA, T) (an upper bound on the number of BLOCK_M
    tiles, so the grid is fixed for a given T). Tile g
    covers sorted rows ``[TILE_START[g], TILE_END[g])`` of adapter ``TILE_ADAPTER[g]`` (-1: unused
    tile, the program exits). Program (g, j): shrink ``S = X[rows] @ P_a^T`` with tl.dot over K
    (BLOCK_M x RB accumulator), then the expand over its column slice with tl.dot
    (RB x BLOCK_N tiles of Q_a), read-modify-write of Y[rows]. With ``STORE_S`` the program writes
    the unscaled fp32 ``S`` (T, RB) instead of expanding (backward needs ``x A^T``, ``dy B``).
    The shrink is recomputed once per column slice (SPLIT_N of them): overhead
    SPLIT_N * 2*T*K*r flops, e.g. 4 * 2*4096*4096*16 = 2.1 GFLOP next to a 137 GFLOP base GEMM.

``seg_tn_kernel`` (backward: per-adapter factor gradients)
    grid (MAXA, cdiv(N, BLOCK_N)): ``O[a, r, n] = SCALES[a] * sum_{t in segment a} L[t, r] R[t, n]``
    over the adapter's sorted segment ``PERM[SEG_OFF[a]:SEG_OFF[a + 1]]`` (dynamic bounds read
    on device), deterministic (no atomics);
    rows r >= rank_a are left as they are (the launcher zero-initialises O).
      dA[a]  = s_a * G_a^T X_a      (L = G = dy Bt_a^T, R = x)
      dBt[a] = s_a * U_a^T dY_a     (L = U = x A_a^T,   R = dy)
"""

import triton
import triton.language as tl

from .common import mma
from .multi_lora_tiles import GPU, KERNELS


@triton.jit
def bgmv_kernel(
    X, Y, P, Q, RANKS, SCALES, IDS,
    K, N, MAXA, n_per_split,
    stride_xt, stride_xk, stride_yt, stride_yn,
    stride_pa, stride_pr, stride_pk, stride_qa, stride_qr, stride_qn,
    RB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    aid = tl.load(IDS + t).to(tl.int64)
    ok = (aid >= 0) & (aid < MAXA)
    a = tl.where(ok, aid, 0)
    rank = tl.load(RANKS + a)
    rank = tl.where(ok, rank, 0)
    if rank > 0:
        scale = tl.load(SCALES + a)
        rr = tl.arange(0, RB)
        mr = rr < rank
        rk = tl.arange(0, BLOCK_K)
        p_base = P + a * stride_pa + rr[:, None] * stride_pr
        acc = tl.zeros((RB, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            mk = kk < K
            xv = tl.load(X + t * stride_xt + kk * stride_xk, mask=mk, other=0.0).to(tl.float32)
            pv = tl.load(p_base + kk[None, :] * stride_pk, mask=mr[:, None] & mk[None, :],
                         other=0.0).to(tl.float32)
            acc += pv * xv[None, :]
        v = tl.sum(acc, axis=1) * scale                       # (RB,) fp32, on chip

        n_start = j * n_per_split
        n_end = tl.minimum(n_start + n_per_split, N)
        rn = tl.arange(0, BLOCK_N)
        q_base = Q + a * stride_qa + rr[:, None] * stride_qr
        for n0 in range(n_start, n_end, BLOCK_N):
            nn = n0 + rn
            mn = nn < n_end
            qv = tl.load(q_base + nn[None, :] * stride_qn, mask=mr[:, None] & mn[None, :],
                         other=0.0).to(tl.float32)
            d = tl.sum(qv * v[:, None], axis=0)                 # (BLOCK_N,)
            yp = Y + t * stride_yt + nn * stride_yn
            yv = tl.load(yp, mask=mn, other=0.0).to(tl.float32)
            tl.store(yp, (yv + d).to(Y.dtype.element_ty), mask=mn)


@triton.jit
def tile_tokens(PERM, row0, row1, BLOCK_M: tl.constexpr):
    """(row mask, int64 token index) of the sorted rows ``[row0, row1)`` of one tile."""
    rows = row0 + tl.arange(0, BLOCK_M)
    mm = rows < row1
    return mm, tl.load(PERM + rows, mask=mm, other=0).to(tl.int64)


@triton.jit
def sgmv_kernel(
    X, Y, S, P, Q, RANKS, SCALES, PERM, TILE_ADAPTER, TILE_START, TILE_END,
    K, N, MAXA, n_per_split,
    stride_xt, stride_xk, stride_yt, stride_yn, stride_st, stride_sr,
    stride_pa, stride_pr, stride_pk, stride_qa, stride_qr, stride_qn,
    STORE_S: tl.constexpr, RB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    g = tl.program_id(0)
    j = tl.program_id(1)
    aid = tl.load(TILE_ADAPTER + g).to(tl.int64)
    ok = (aid >= 0) & (aid < MAXA)
    a = tl.where(ok, aid, 0)
    rank = tl.load(RANKS + a)
    rank = tl.where(ok, rank, 0)
    if STORE_S:
        go = ok      # S rows of a rank-0 adapter's tokens are written as zeros
    else:
        go = rank > 0
    if go:
        row0 = tl.load(TILE_START + g)
        row1 = tl.load(TILE_END + g)
        mm, tok = tile_tokens(PERM, row0, row1, BLOCK_M)
        rr = tl.arange(0, RB)
        mr = rr < rank
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, RB), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            mk = kk < K
            xv = tl.load(X + tok[:, None] * stride_xt + kk[None, :] * stride_xk,
                         mask=mm[:, None] & mk[None, :], other=0.0)
            pv = tl.load(P + a * stride_pa + rr[None, :] * stride_pr + kk[:, None] * stride_pk,
                         mask=mr[None, :] & mk[:, None], other=0.0)
            acc = mma(xv, pv, acc, PRECISION, UPCAST)         # (BLOCK_M, RB) fp32, on chip
        if STORE_S:
            tl.store(S + tok[:, None] * stride_st + rr[None, :] * stride_sr, acc,
                     mask=mm[:, None])
        else:
            scale = tl.load(SCALES + a)
            acc = acc * scale
            n_start = j * n_per_split
            n_end = tl.minimum(n_start + n_per_split, N)
            rn = tl.arange(0, BLOCK_N)
            for n0 in range(n_start, n_end, BLOCK_N):
                nn = n0 + rn
                mn = nn < n_end
                qv = tl.load(Q + a * stride_qa + rr[:, None] * stride_qr + nn[None, :] * stride_qn,
                             mask=mr[:, None] & mn[None, :], other=0.0).to(tl.float32)
                d = tl.dot(acc, qv, input_precision=PRECISION)
                yp = Y + tok[:, None] * stride_yt + nn[None, :] * stride_yn
                ym = mm[:, None] & mn[None, :]
                yv = tl.load(yp, mask=ym, other=0.0).to(tl.float32)
                tl.store(yp, (yv + d).to(Y.dtype.element_ty), mask=ym)


@triton.jit
def sgmv_gemm_kernel(
    X, W, BIAS, Y, S, Q, RANKS, SCALES, PERM, TILE_ADAPTER, TILE_START, TILE_END,
    K, N, MAXA,
    stride_xt, stride_xk, stride_wn, stride_wk, stride_yt, stride_yn, stride_st, stride_sr,
    stride_qa, stride_qr, stride_qn,
    HAS_BIAS: tl.constexpr, RB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Fused prefill: ``Y[rows] = X[rows] W^T + b + s_a S[rows] Q_a`` over the tile table of
    ``plan.tile_table(..., include_base=True)`` (tile_adapter -1: base-only rows; empty tiles exit).
    S (T, RB) fp32 = X A^T comes from ``sgmv_kernel`` with STORE_S. Against cuBLAS + sgmv this
    removes the read-modify-write of Y (2*T*N*elt bytes) and the per-column-slice recompute of
    the shrink; it costs running the base GEMM in Triton over adapter-sorted row tiles."""
    g = tl.program_id(0)
    pid_n = tl.program_id(1)
    row0 = tl.load(TILE_START + g)
    row1 = tl.load(TILE_END + g)
    if row1 > row0:
        mm, tok = tile_tokens(PERM, row0, row1, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = rn < N
        rn64 = rn.to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            mk = kk < K
            kk64 = kk.to(tl.int64)                        # kk * stride_wk: up to out * in
            xv = tl.load(X + tok[:, None] * stride_xt + kk64[None, :] * stride_xk,
                         mask=mm[:, None] & mk[None, :], other=0.0)
            wv = tl.load(W + rn64[None, :] * stride_wn + kk64[:, None] * stride_wk,
                         mask=mn[None, :] & mk[:, None], other=0.0)
            acc = mma(xv, wv, acc, PRECISION, UPCAST)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        aid = tl.load(TILE_ADAPTER + g).to(tl.int64)
        ok = (aid >= 0) & (aid < MAXA)
        a = tl.where(ok, aid, 0)
        rank = tl.where(ok, tl.load(RANKS + a), 0)
        if rank > 0:
            rr = tl.arange(0, RB)
            mr = rr < rank
            sv = tl.load(S + tok[:, None] * stride_st + rr[None, :] * stride_sr,
                         mask=mm[:, None] & mr[None, :], other=0.0)
            qv = tl.load(Q + a * stride_qa + rr[:, None] * stride_qr + rn64[None, :] * stride_qn,
                         mask=mr[:, None] & mn[None, :], other=0.0).to(tl.float32)
            acc += tl.load(SCALES + a) * tl.dot(sv, qv, input_precision=PRECISION)
        tl.store(Y + tok[:, None] * stride_yt + rn64[None, :] * stride_yn,
                 acc.to(Y.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def seg_tn_kernel(
    L, R, O, RANKS, SCALES, PERM, SEG_OFF,
    N, MAXR,
    stride_lt, stride_lr, stride_rt, stride_rn, stride_oa, stride_or, stride_on,
    RB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    a = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rank = tl.load(RANKS + a)
    start = tl.load(SEG_OFF + a)
    end = tl.load(SEG_OFF + a + 1)
    if (rank > 0) & (end > start):
        scale = tl.load(SCALES + a)
        rr = tl.arange(0, RB)
        mr = rr < rank
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = rn < N
        rt = tl.arange(0, BLOCK_T)
        acc = tl.zeros((RB, BLOCK_N), dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            rows = t0 + rt
            mt = rows < end
            tok = tl.load(PERM + rows, mask=mt, other=0).to(tl.int64)
            lv = tl.load(L + tok[None, :] * stride_lt + rr[:, None] * stride_lr,
                         mask=mr[:, None] & mt[None, :], other=0.0).to(tl.float32)
            rv = tl.load(R + tok[:, None] * stride_rt + rn[None, :] * stride_rn,
                         mask=mt[:, None] & mn[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(lv, rv, acc, input_precision=PRECISION)
        acc = acc * scale
        tl.store(O + a * stride_oa + rr[:, None] * stride_or + rn[None, :] * stride_on,
                 acc.to(O.dtype.element_ty), mask=(mr & (rr < MAXR))[:, None] & mn[None, :])


# GPU tile configs that the ahead-of-time compile check (tests/cuda/aot_tools.py) builds: the
# sizes the launchers use on a GPU, from the one table in kernels.multi_lora_tiles (decode:
# RB <= 16).
def _aot_configs() -> dict:
    out = {}
    for kind, cfg in GPU.items():
        meta = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
        out[KERNELS[kind]] = [triton.Config(meta, num_warps=cfg.get("num_warps", 4),
                                            num_stages=cfg.get("num_stages", 3))]
    return out


AOT_CONFIGS = _aot_configs()
