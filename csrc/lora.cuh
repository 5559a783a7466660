// LoRA low-rank branch kernels (templated on the element type; launched from lora_*.cu):
//   lora_shrink_kernel       S = drop(x) W^T, fp32 out            (forward S = drop(x) A^T; G = dy B)
//   lora_expand_kernel       y += scale * m * S Bt, in place       (forward y; backward dX)
//   lora_grad_tn_kernel      split-K partials of L^T drop(R)       (dA, dB^T)
//   splitk_reduce_kernel     fixed-order sum of the partials, scale, convert, transpose
//   dropout_keep_mask_kernel the dropout mask itself (tests)
#pragma once

#include "common.cuh"
#include "tiles.cuh"

namespace lk {

template <typename T>
__global__ void __launch_bounds__(shrink_cfg::NT, 2)
    lora_shrink_kernel(const T* __restrict__ x, int64_t ldx, int64_t ntok, int64_t K,
                       const T* __restrict__ W, int64_t R, float* __restrict__ out, int64_t ldo,
                       const int64_t* __restrict__ seed, float p, float inv_keep, bool vec_x,
                       bool vec_w) {
  const Dropout drop = make_dropout(seed, p, inv_keep);
  shrink_tile<T>(x, ldx, nullptr, static_cast<int64_t>(blockIdx.x) * shrink_cfg::BT, ntok, K, W,
                 static_cast<int64_t>(blockIdx.y) * shrink_cfg::RT, R, out, ldo, drop, vec_x,
                 vec_w);
}

template <typename Unused = void>  // a template so the header can be included by several .cu files
__global__ void dropout_keep_mask_kernel(const int64_t* __restrict__ seed, int64_t n, float p,
                                         uint8_t* __restrict__ out) {
  const Dropout drop = make_dropout(seed, p, 1.f);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = (!drop.on() || drop.factor(static_cast<uint64_t>(i)) != 0.f) ? 1 : 0;
}

template <typename T>
__global__ void __launch_bounds__(expand_cfg::NT, 2)
    lora_expand_kernel(const float* __restrict__ S, int64_t ldS, const T* __restrict__ Bt,
                       T* __restrict__ y, int64_t ldy, int64_t ntok, int64_t N, int64_t R,
                       float scale, const int64_t* __restrict__ seed, float p, float inv_keep,
                       bool vec_s, bool vec_b, bool vec_y) {
  const Dropout drop = make_dropout(seed, p, inv_keep);
  expand_tile<T>(S, ldS, static_cast<int64_t>(blockIdx.x) * expand_cfg::BT, ntok, R, Bt, N,
                 static_cast<int64_t>(blockIdx.y) * expand_cfg::BN, N, y, ldy, nullptr, scale,
                 drop, vec_s, vec_b, vec_y);
}

namespace tn_cfg {
constexpr int TC = 16, RJ = 16, BN = 256, NT = 128;
}

// Block (n tile, j tile, split): part[split, j, n] for j in [j0, j0 + 16), n in [n0, n0 + 256).
// 128 threads = 4 j groups (4 ranks each) x 32 column groups (2 x 4 columns, 128 apart).
template <typename T>
__global__ void __launch_bounds__(tn_cfg::NT, 3)
    lora_grad_tn_kernel(const float* __restrict__ L, int64_t ldl, const T* __restrict__ Rm,
                        int64_t ldr, int64_t ntok, int64_t RL, int64_t N, float* __restrict__ part,
                        int64_t ldp, int64_t per, const int64_t* __restrict__ seed, float p,
                        float inv_keep, bool vec_l, bool vec_r) {
  using namespace tn_cfg;
  __shared__ __align__(16) float Ls[TC * RJ];  // [t][j]
  __shared__ __align__(16) float Rs[TC * BN];  // [t][n]
  TileLoader<float, TC, RJ, NT> ll;
  TileLoader<T, TC, BN, NT> lr;
  const Dropout drop = make_dropout(seed, p, inv_keep);
  const Dropout nodrop;
  const int tid = threadIdx.x, nx = tid % 32, jy = tid / 32;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * RJ;
  const int64_t split = blockIdx.z;
  const int64_t t_begin = split * per;
  const int64_t t_end = t_begin + per < ntok ? t_begin + per : ntok;

  float acc[4][8];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[i][c] = 0.f;

  if (t_begin < t_end) {
    ll.load(L, ldl, nullptr, t_begin, t_end, j0, RL, vec_l, nodrop, 0);
    lr.load(Rm, ldr, nullptr, t_begin, t_end, n0, N, vec_r, drop, N);
  }
  for (int64_t t0 = t_begin; t0 < t_end; t0 += TC) {
    __syncthreads();
    ll.store(Ls, RJ);
    lr.store(Rs, BN);
    __syncthreads();
    if (t0 + TC < t_end) {
      ll.load(L, ldl, nullptr, t0 + TC, t_end, j0, RL, vec_l, nodrop, 0);
      lr.load(Rm, ldr, nullptr, t0 + TC, t_end, n0, N, vec_r, drop, N);
    }
#pragma unroll 4
    for (int t = 0; t < TC; ++t) fma_4x8(&Ls[t * RJ + jy * 4], &Rs[t * BN + nx * 4], acc);
  }

  // every (j < RL, n < ldp) element of this split's partial is written, zeros included
  float* out = part + split * RL * ldp;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t j = j0 + jy * 4 + i;
    if (j >= RL) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t c = n0 + h * 128 + nx * 4;  // c % 4 == 0 and ldp % 4 == 0
      if (c < ldp)
        *reinterpret_cast<float4*>(out + j * ldp + c) =
            make_float4(acc[i][h * 4], acc[i][h * 4 + 1], acc[i][h * 4 + 2], acc[i][h * 4 + 3]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    splitk_reduce_kernel(const float* __restrict__ part, int64_t splits, int64_t RL, int64_t N,
                         int64_t ldp, T* __restrict__ out, int64_t ldo, bool transpose,
                         float scale) {
  const int64_t n_el = RL * N;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n_el;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e / N, n = e % N;
    float s = 0.f;
    for (int64_t sp = 0; sp < splits; ++sp) s += part[(sp * RL + j) * ldp + n];
    const T v = Cvt<T>::from(s * scale);
    if (transpose) {
      out[n * ldo + j] = v;
    } else {
      out[j * ldo + n] = v;
    }
  }
}

}  // namespace lk
