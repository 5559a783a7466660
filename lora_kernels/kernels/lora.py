"""Triton kernels shared by every "base GEMM + low-rank chain" op.

Two kernels cover the LoRA forward and backward (and, through their LoRA-equivalent factors, NoRA,
CURLoRA and Deep LoRA):

``gemm_lowrank_kernel``  Y[M, N] = drop?(X)[M, K] @ W[N, K]^T  (+ bias[N])
                                   (+ scale * mask?(S[M, R] @ Bm[N, R]^T))
    * forward shrink      S  = drop(x) A^T        X=x,  W=A,    fp32 output, dropout on X loads
    * forward base+expand y  = x W^T + b + s S B^T X=x,  W=W,    S=S, Bm=B
    * backward shrink     G  = dy B               X=dy, W=B^T (strided view)
    * backward dX         dx = dy W + s keep/(1-p) (G A)   X=dy, W=W^T, S=G, Bm=A^T, epilogue mask
  Two optional per-feature scales (constexpr flags, off by default, so the LoRA launches compile
  exactly as before) serve DoRA (ops.dora):
    * ``ROW_SCALE``: Y[:, n] = rows[n] * (base + low-rank)[:, n] (+ bias[n]) -- DoRA's
      ``g = m / ||W + s B A||_row`` applied in the epilogue, before the bias;
    * ``X_SCALE``: X[:, k] is read as xs[k] * X[:, k] -- DoRA's backward reads ``dy * g`` this way
      (X=dy, K=out), so the scaled ``(T, out)`` gradient is never written.
  All strides are passed, so transposed views cost nothing. The rank-r intermediate (S, G) is
  fp32 and tiny (T*r*4 bytes): it never round-trips HBM in low precision.
  Design choice (DESIGN.md option 2): S is a separate skinny GEMM. Option 1 (accumulate x A^T in
  the base K-loop) re-computes x A^T once per N-tile: at T=8192, 4096x4096, r=16, BLOCK_N=128 that
  is 32 * 2*T*in*r = 34 GFLOP extra (~12% of the 275 GFLOP base), against one extra read of x here
  (64 MiB bf16, ~20 us at 3 TB/s, ~5% of the ~0.35 ms base GEMM).

``tn_kernel``  O[s, M, N] = sum_{t in split s} L[t, M] * drop?(Rt)[t, N]   (fp32 partials)
    * dA = s G^T drop(x)   (L=G,  Rt=x, dropout on Rt)
    * dB = s dy^T S        (L=dy, Rt=S)
  Split-K over tokens with one partial per split, summed by the launcher: deterministic (no
  atomics), so seeded runs reproduce bit-for-bit.

``gemm_lowrank_autotuned`` is the same kernel under ``triton.autotune`` (GPU only; the
interpreter launches the plain kernel with fixed small tiles). ``M_BUCKET`` (next power of two of
M, capped) is an autotune key only, so a new token count does not re-tune every call.

Dropout masks are never stored: element (t, k) of x keeps iff rand(seed, t*K + k) >= p, with the
seed read from a device tensor (no host sync, CUDA-graph safe). Forward and backward evaluate the
same counter, so they see the same mask.
"""

import triton
import triton.language as tl

from .common import gemm_tile, keep_mask, lowrank_epilogue, mma


@triton.jit
def gemm_lowrank_kernel(
    X, W, Y, BIAS, S, BM, SEED, ROWS, XS,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    stride_sm, stride_sr, stride_bn, stride_br,
    scale, p,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr,
    DROP_X: tl.constexpr, DROP_EPI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, ROW_SCALE: tl.constexpr = False, X_SCALE: tl.constexpr = False,
):
    rm, rn, mask_m, mask_n, rm64, rn64 = gemm_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N,
                                                   GROUP_M)
    rk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mk = kk < K
        # 64-bit offsets: kk * stride_wk reaches out * in (the dX GEMM reads W^T), past 2^31
        # for e.g. a 128k x 16k lm_head; the dropout counter t * K + k past 2^31 at T * K
        kk64 = kk.to(tl.int64)
        x = tl.load(X + rm64[:, None] * stride_xm + kk64[None, :] * stride_xk,
                    mask=mask_m[:, None] & mk[None, :], other=0.0)
        if DROP_X:
            # mask only; the 1/(1-p) rescale is applied once to the fp32 accumulator
            keep = keep_mask(SEED, rm64[:, None] * K + kk64[None, :], p)
            x = tl.where(keep, x, tl.zeros_like(x))
        if X_SCALE:
            # (BLOCK_M, BLOCK_K) * xs[k]: the product rounded once to X's dtype, like torch's
            xsc = tl.load(XS + kk, mask=mk, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * xsc[None, :]).to(X.dtype.element_ty)
        w = tl.load(W + rn64[None, :] * stride_wn + kk64[:, None] * stride_wk,
                    mask=mask_n[None, :] & mk[:, None], other=0.0)
        acc = mma(x, w, acc, PRECISION, UPCAST)
    if DROP_X:
        acc = acc / (1.0 - p)

    # low-rank term (the shared epilogue helper); the bias is added after DoRA's row scale
    acc = lowrank_epilogue(acc, S, BM, BIAS, SEED, rm, rn, rm64, rn64, mask_m, mask_n, N, R,
                           stride_sm, stride_sr, stride_bn, stride_br, scale, p,
                           HAS_LOWRANK, False, DROP_EPI, BLOCK_M, BLOCK_N, BLOCK_R, PRECISION)
    if ROW_SCALE:
        acc = acc * tl.load(ROWS + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm64[:, None] * stride_ym + rn64[None, :] * stride_yn,
             acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def tn_kernel(
    L, RT, O, SEED,
    T, M, N, tokens_per_split,
    stride_lt, stride_lm, stride_rt, stride_rn, stride_os, stride_om, stride_on,
    p,
    DROP_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = tl.arange(0, BLOCK_T)
    mask_m = rm < M
    mask_n = rn < N
    # 64-bit offsets: rm * stride_om reaches M * N (a full (out, in) product) past 2^31
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        tt = t0 + rt
        mt = tt < t_end
        tt64 = tt.to(tl.int64)
        lt = tl.load(L + tt64[None, :] * stride_lt + rm64[:, None] * stride_lm,
                     mask=mask_m[:, None] & mt[None, :], other=0.0).to(tl.float32)
        r = tl.load(RT + tt64[:, None] * stride_rt + rn64[None, :] * stride_rn,
                    mask=mt[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        if DROP_R:
            keep = keep_mask(SEED, tt64[:, None] * N + rn64[None, :], p)
            r = tl.where(keep, r / (1.0 - p), 0.0)
        acc = tl.dot(lt, r, acc, input_precision=PRECISION)
    tl.store(O + pid_s.to(tl.int64) * stride_os + rm64[:, None] * stride_om
             + rn64[None, :] * stride_on,
             acc, mask=mask_m[:, None] & mask_n[None, :])


def prune_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (a skinny rank-r N, a decode-sized M), and the
    tiles that spill when the launch also draws a dropout mask (DROP_X_SPILLS, DROP_EPI_SPILLS)."""
    M, N = named_args["M"], named_args["N"]
    keep = [c for c in configs
            if c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(N))
            and c.kwargs["BLOCK_M"] <= max(32, triton.next_power_of_2(M))]
    spills = (DROP_X_SPILLS if kwargs.get("DROP_X") else []) + \
        (DROP_EPI_SPILLS if kwargs.get("DROP_EPI") else [])
    if spills:
        bad = {_key(c) for c in spills}
        keep = [c for c in keep if _key(c) not in bad] or keep
    return keep or configs[-1:]


def _key(c):
    return (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


# Candidate tiles (unmeasured on a GPU so far): the usual Hopper/Ampere bf16 GEMM shapes, plus
# skinny-N tiles for the rank-r shrink and small-M tiles for decode. No candidate may spill with
# the low-rank epilogue (bench/results/static-sm90.json, tests/cuda/test_triton36.py): its second
# fp32 (BLOCK_M, BLOCK_N) accumulator doubles the registers per thread, so 128x256 at 8 warps and
# 128x128 at 4 warps (2 x 128 fp32 accumulators per thread + operands > 255 registers: ~390 / ~165
# STL in SASS) were removed; 128x128 at 8 warps (2 x 64) is the largest tile that does not spill.
GEMM_CONFIGS = [
    _cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 4),
    _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4), _cfg(64, 64, 64, 4, 4),
    _cfg(32, 64, 128, 4, 4), _cfg(128, 32, 128, 4, 4), _cfg(256, 16, 64, 8, 3),
    _cfg(128, 16, 128, 4, 4), _cfg(64, 16, 256, 4, 3), _cfg(32, 16, 256, 4, 3),
]

# Candidates that spill only when a dropout mask is drawn in the same kernel (tl.rand per element
# of the x tile, DROP_X: the forward shrink; of the output tile, DROP_EPI: the dX epilogue), read
# off bench/results/static-sm90.json (Triton 3.6, sm_90): 64x16x256 679 STL, 128x16x128 12 STL with
# DROP_X; 128x128 at 8 warps 269 STL, 64x128 / 128x64 at 4 warps 201 / 155 STL with DROP_EPI.
# prune_configs leaves them out of those launches only.
DROP_X_SPILLS = [_cfg(128, 16, 128, 4, 4), _cfg(64, 16, 256, 4, 3)]
DROP_EPI_SPILLS = [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(64, 128, 64, 4, 4),
                   _cfg(128, 64, 64, 4, 4)]

gemm_lowrank_autotuned = triton.autotune(
    configs=GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "R", "HAS_LOWRANK", "DROP_X", "DROP_EPI", "ROW_SCALE", "X_SCALE"],
    prune_configs_by={"early_config_prune": prune_configs},
)(gemm_lowrank_kernel)

# GPU tile configs that tests/cuda/test_triton_aot.py compiles ahead of time for sm_80/sm_90 (the
# largest shared-memory footprint and the skinny shrink tile).
AOT_CONFIGS = {"gemm_lowrank_kernel": [GEMM_CONFIGS[1], GEMM_CONFIGS[-3]]}
