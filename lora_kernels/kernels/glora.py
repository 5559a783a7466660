"""Triton kernel for GLoRA: a GEMM whose weight tile is re-parameterised in registers.

``glora_gemm_kernel``  Y[M, N] = X[M, K] @ Weff[N, K]^T (+ bias[N] fp32)
    Weff[n, k] = W[n, k] + W[n, k] * A[n, k] + B[n, k]
with A and B each in one of five forms (constexpr ``A_MODE`` / ``B_MODE``):

    0 NONE      absent
    1 SCALAR    P1[0]
    2 VEC_N     P1[n * s1_0]                 (a vector along the output dim of this GEMM)
    3 VEC_K     P1[k * s1_0]                 (a vector along the reduction dim)
    4 LOWRANK   sum_r P1[n, r] P2[r, k]      (P1 (N, R), P2 (R, K), any strides)

Each K-step loads the W tile, builds ``Weff`` in fp32 registers (the LOWRANK forms cost one extra
``BLOCK_K x BLOCK_R x BLOCK_N`` dot each, i.e. ~R_pad/BLOCK_M of the main dot), casts it to X's
dtype and feeds the main dot. ``Weff`` never exists in HBM.

* forward   y  = x Weff^T + b_eff        X=x (T, in),  W=W (out, in),   N=out, K=in
* backward  dx = dy Weff                 X=dy (T, out), W=W^T (in, out) (strided view), N=in,
  K=out: a vector over ``out`` becomes VEC_K, a low-rank pair (down, up) becomes (up^T, down^T).

``glora_gemm_autotuned`` is the same kernel under ``triton.autotune`` over the shared LoRA GEMM
tiles (GPU only; the interpreter launches the plain kernel with fixed small tiles). ``M_BUCKET``
(next power of two of M, capped) is an autotune key only. Tested for correctness in Triton's
interpreter (tests/test_glora.py) and compiled ahead of time for sm_80/sm_90 for every support
mode (tests/cuda/test_triton_aot.py); GPU timings, where any, are in the benchmark results.
"""

import triton
import triton.language as tl

from .common import gemm_tile, mma
from .lora import GEMM_CONFIGS, prune_configs


@triton.jit
def _support(P1, P2, rn64, kk64, mask_n, mk, R, s1_0, s1_1, s2_0, s2_1, sup_n,
             MODE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] fp32 tile of a support tensor (transposed, like the W tile)."""
    if MODE == 3:
        v = tl.load(P1 + kk64 * s1_0, mask=mk, other=0.0).to(tl.float32)
        t = v[:, None] + tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    elif MODE == 4:
        rr = tl.arange(0, BLOCK_R)
        t = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            ri = r0 + rr
            mr = ri < R
            # P2^T tile [BLOCK_K, BLOCK_R] and P1^T tile [BLOCK_R, BLOCK_N]
            up = tl.load(P2 + kk64[:, None] * s2_1 + ri[None, :] * s2_0,
                         mask=mk[:, None] & mr[None, :], other=0.0)
            dn = tl.load(P1 + ri[:, None] * s1_1 + rn64[None, :] * s1_0,
                         mask=mr[:, None] & mask_n[None, :], other=0.0)
            t = mma(up, dn, t, PRECISION, UPCAST)
    else:
        # SCALAR / VEC_N: hoisted out of the K loop by the caller, passed in as sup_n
        t = sup_n[None, :] + tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    return t


@triton.jit
def _rne_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32. Interpreter only (UPCAST):
    Triton 3.9's interpreter converts fp32 -> bf16 with a biased rounding (about half of random
    values differ from torch's round-to-nearest), which, summed over K, costs ~5e-3 relative
    error; a GPU's cvt.rn.bf16.f32 rounds to nearest, which this reproduces exactly."""
    u = v.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _hoisted(P1, rn64, mask_n, s1_0, MODE: tl.constexpr, BLOCK_N: tl.constexpr):
    """K-independent forms as a [BLOCK_N] fp32 vector (SCALAR broadcast, VEC_N loaded)."""
    if MODE == 1:
        v = tl.load(P1).to(tl.float32) + tl.zeros((BLOCK_N,), dtype=tl.float32)
    elif MODE == 2:
        v = tl.load(P1 + rn64 * s1_0, mask=mask_n, other=0.0).to(tl.float32)
    else:
        v = tl.zeros((BLOCK_N,), dtype=tl.float32)
    return v


@triton.jit
def glora_gemm_kernel(
    X, W, Y, BIAS, A1, A2, B1, B2,
    M, N, K, RA, RB, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    sa1_0, sa1_1, sa2_0, sa2_1, sb1_0, sb1_1, sb2_0, sb2_1,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_RA: tl.constexpr, BLOCK_RB: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    rm, rn, mask_m, mask_n, rm64, rn64 = gemm_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N,
                                                   GROUP_M)
    rk = tl.arange(0, BLOCK_K)

    # K-independent supports, loaded once
    a_n = _hoisted(A1, rn64, mask_n, sa1_0, A_MODE, BLOCK_N)
    b_n = _hoisted(B1, rn64, mask_n, sb1_0, B_MODE, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mk = kk < K
        kk64 = kk.to(tl.int64)
        x = tl.load(X + rm64[:, None] * stride_xm + kk64[None, :] * stride_xk,
                    mask=mask_m[:, None] & mk[None, :], other=0.0)
        w = tl.load(W + rn64[None, :] * stride_wn + kk64[:, None] * stride_wk,
                    mask=mask_n[None, :] & mk[:, None], other=0.0).to(tl.float32)
        weff = w
        if A_MODE != 0:
            a = _support(A1, A2, rn64, kk64, mask_n, mk, RA, sa1_0, sa1_1, sa2_0, sa2_1,
                         a_n, A_MODE, BLOCK_K, BLOCK_N, BLOCK_RA, PRECISION, UPCAST)
            weff = weff + w * a
        if B_MODE != 0:
            b = _support(B1, B2, rn64, kk64, mask_n, mk, RB, sb1_0, sb1_1, sb2_0, sb2_1,
                         b_n, B_MODE, BLOCK_K, BLOCK_N, BLOCK_RB, PRECISION, UPCAST)
            weff = weff + b
        if UPCAST and X.dtype.element_ty == tl.bfloat16:
            weff = _rne_bf16(weff)      # what the GPU's cast computes; mma upcasts anyway
        else:
            weff = weff.to(X.dtype.element_ty)
        acc = mma(x, weff, acc, PRECISION, UPCAST)

    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if UPCAST and Y.dtype.element_ty == tl.bfloat16:
        acc = _rne_bf16(acc)            # exact in bf16: the interpreter's cast cannot bias it
    tl.store(Y + rm64[:, None] * stride_ym + rn64[None, :] * stride_yn,
             acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# The shared LoRA GEMM tiles minus 64x128x64 at 4 warps, which spills with the LOWRANK supports
# (20 STL at sm_90, Triton 3.6: bench/results/static-sm90.json).
GLORA_CONFIGS = [c for c in GEMM_CONFIGS
                 if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) != (64, 128, 4)]

glora_gemm_autotuned = triton.autotune(
    configs=GLORA_CONFIGS,
    key=["M_BUCKET", "N", "K", "RA", "RB", "A_MODE", "B_MODE", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": prune_configs},
)(glora_gemm_kernel)

# GPU tile configs compiled ahead of time by tests/test_glora.py (largest shared-memory footprint
# and a skinny one).
AOT_CONFIGS = {"glora_gemm_kernel": [GLORA_CONFIGS[1], GLORA_CONFIGS[-3]]}
