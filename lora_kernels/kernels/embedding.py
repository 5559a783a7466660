"""Triton kernels of embedding LoRA (``ops.embedding``): a gather plus a rank-r correction.

Shapes (PEFT's ``lora.Embedding``; ``ids`` (T,) in [0, V)): base ``W (V, N)``, ``A (R, V)``
(``lora_embedding_A``), ``B (N, R)`` (``lora_embedding_B``)::

    y[t, :] = W[ids[t], :] + scale * A[:, ids[t]]^T B^T                  (T, N)

so per token the low-rank term reads one column of ``A`` (R values) and the whole ``B``; the
``V``-wide ``A`` is never multiplied. Served (``HAS_SLOTS``): token ``t`` uses slot
``k = slots[t]`` (-1: base only) of a pool ``A (K, R, V)``, ``B`` read as ``(K, N, R)`` strides of
the pool's ``lora_Bt (K, R, N)`` and ``scales (K,)`` fp32.

Backward (dy (T, N)):
    G  = scale * dy B                         (T, R) fp32  ``embedding_lora_dyb_kernel``
    dA[:, v] = sum_{t: ids[t] = v} G[t, :]    (R, V)       index_add over the touched ids only
    dB = scale * dy^T A[:, ids]^T             (N, R)       ``embedding_lora_db_kernel``, split-K
                                                           over tokens, fp32 partials summed
                                                           (no atomics: deterministic)
Every offset that scales with a tensor dimension is computed in int64 (a 128k x 4096 table has
2^29 elements; ``ids * stride`` overflows int32 beyond 2^31).
"""

import triton
import triton.language as tl


@triton.jit
def embedding_lora_fwd_kernel(
    IDS, SLOTS, W, A, B, SCALES, Y,
    T, N, R,
    stride_wv, stride_wn, stride_ak, stride_ar, stride_av,
    stride_bk, stride_bn, stride_br, stride_yt, stride_yn,
    scale,
    HAS_SLOTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    mt = rt < T
    mn = rn < N
    rt64 = rt.to(tl.int64)
    rn64 = rn.to(tl.int64)
    ids = tl.load(IDS + rt64, mask=mt, other=0).to(tl.int64)
    acc = tl.load(W + ids[:, None] * stride_wv + rn64[None, :] * stride_wn,
                  mask=mt[:, None] & mn[None, :], other=0.0).to(tl.float32)
    lr = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    if HAS_SLOTS:
        slot = tl.load(SLOTS + rt64, mask=mt, other=-1).to(tl.int64)
        on = mt & (slot >= 0)
        k = tl.where(on, slot, 0)
        sc = tl.load(SCALES + k, mask=on, other=0.0).to(tl.float32)
        for r0 in range(0, R, BLOCK_R):
            ri = r0 + rr
            mr = ri < R
            s = tl.load(A + k[:, None] * stride_ak + ri[None, :] * stride_ar
                        + ids[:, None] * stride_av,
                        mask=on[:, None] & mr[None, :], other=0.0).to(tl.float32)   # (T, R)
            b = tl.load(B + k[:, None, None] * stride_bk + rn64[None, :, None] * stride_bn
                        + ri[None, None, :] * stride_br,
                        mask=on[:, None, None] & mn[None, :, None] & mr[None, None, :],
                        other=0.0).to(tl.float32)                                  # (T, N, R)
            lr += tl.sum(s[:, None, :] * b, axis=2)
        acc += lr * sc[:, None]
    else:
        for r0 in range(0, R, BLOCK_R):
            ri = r0 + rr
            mr = ri < R
            s = tl.load(A + ri[None, :] * stride_ar + ids[:, None] * stride_av,
                        mask=mt[:, None] & mr[None, :], other=0.0).to(tl.float32)   # (T, R)
            b = tl.load(B + rn64[None, :] * stride_bn + ri[:, None] * stride_br,
                        mask=mn[None, :] & mr[:, None], other=0.0).to(tl.float32)   # (R, N)
            lr = tl.dot(s, b, lr, input_precision="ieee")
        acc += lr * scale
    tl.store(Y + rt64[:, None] * stride_yt + rn64[None, :] * stride_yn,
             acc.to(Y.dtype.element_ty), mask=mt[:, None] & mn[None, :])


@triton.jit
def embedding_lora_dyb_kernel(
    DY, B, G, T, N, R,
    stride_dt, stride_dn, stride_bn, stride_br, stride_gt, stride_gr,
    scale,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """G[t, r] = scale * sum_n dy[t, n] B[n, r]  (fp32, one (BLOCK_T, BLOCK_R) tile per program)."""
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ri = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rn = tl.arange(0, BLOCK_N)
    mt = rt < T
    mr = ri < R
    rt64 = rt.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + rn
        mn = nn < N
        nn64 = nn.to(tl.int64)
        dy = tl.load(DY + rt64[:, None] * stride_dt + nn64[None, :] * stride_dn,
                     mask=mt[:, None] & mn[None, :], other=0.0).to(tl.float32)
        b = tl.load(B + nn64[:, None] * stride_bn + ri[None, :] * stride_br,
                    mask=mn[:, None] & mr[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(dy, b, acc, input_precision="ieee")
    tl.store(G + rt64[:, None] * stride_gt + ri[None, :] * stride_gr, acc * scale,
             mask=mt[:, None] & mr[None, :])


@triton.jit
def embedding_lora_db_kernel(
    DY, IDS, A, O, T, N, R, tokens_per_split,
    stride_dt, stride_dn, stride_ar, stride_av, stride_os, stride_on, stride_or,
    scale,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """O[s, n, r] = scale * sum_{t in split s} dy[t, n] A[r, ids[t]]  (fp32 partials)."""
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ri = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rt = tl.arange(0, BLOCK_T)
    mn = rn < N
    mr = ri < R
    rn64 = rn.to(tl.int64)
    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        tt = t0 + rt
        mt = tt < t_end
        tt64 = tt.to(tl.int64)
        ids = tl.load(IDS + tt64, mask=mt, other=0).to(tl.int64)
        dyt = tl.load(DY + tt64[None, :] * stride_dt + rn64[:, None] * stride_dn,
                      mask=mn[:, None] & mt[None, :], other=0.0).to(tl.float32)    # (N, T)
        s = tl.load(A + ri[None, :] * stride_ar + ids[:, None] * stride_av,
                    mask=mt[:, None] & mr[None, :], other=0.0).to(tl.float32)      # (T, R)
        acc = tl.dot(dyt, s, acc, input_precision="ieee")
    tl.store(O + pid_s * stride_os + rn64[:, None] * stride_on + ri[None, :] * stride_or,
             acc * scale, mask=mn[:, None] & mr[None, :])
