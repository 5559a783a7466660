// Multi-adapter serving kernels (templated on the element type; launched from multi_lora_*.cu):
//   multi_lora_decode_kernel  one kernel per step: per token shrink -> expand, rank-r in smem
//   seg_shrink_kernel / seg_expand_kernel  the segmented (prefill) path over adapter runs
#pragma once

#include "common.cuh"
#include "tiles.cuh"

namespace lk {

constexpr int DEC_NT = 256;
constexpr int DEC_WARPS = DEC_NT / 32;

template <typename T>
__global__ void __launch_bounds__(DEC_NT)
    multi_lora_decode_kernel(const T* __restrict__ x, int64_t ldx, T* __restrict__ y, int64_t ldy,
                             const T* __restrict__ A, const T* __restrict__ Bt,
                             const int32_t* __restrict__ ranks, const float* __restrict__ scalings,
                             const void* __restrict__ ids, bool ids64, int64_t K, int64_t N,
                             int64_t max_rank, int64_t M, int64_t slice_w, bool vec_x,
                             bool vec_y) {
  constexpr int VEC = 16 / sizeof(T);
  LK_DYN_SMEM(float, v);  // max_rank floats
  const int64_t t = blockIdx.x;
  const int64_t id = ids64 ? static_cast<const int64_t*>(ids)[t]
                           : static_cast<int64_t>(static_cast<const int32_t*>(ids)[t]);
  if (id < 0 || id >= M) return;
  int64_t r = ranks[id];
  if (r > max_rank) r = max_rank;
  if (r <= 0) return;
  const float scale = scalings[id];
  const T* __restrict__ xr = x + t * ldx;
  const T* __restrict__ Ai = A + id * max_rank * K;
  const T* __restrict__ Bi = Bt + id * max_rank * N;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // ---- shrink: v[j] = scale * <x[t], A_i[j]>, two ranks per warp per pass
  for (int64_t j = 2 * warp; j < r; j += 2 * DEC_WARPS) {
    const bool two = j + 1 < r;
    const T* __restrict__ a0 = Ai + j * K;
    const T* __restrict__ a1 = a0 + K;
    float s0 = 0.f, s1 = 0.f;
    if (vec_x) {
#pragma unroll 4
      for (int64_t k = static_cast<int64_t>(lane) * VEC; k < K; k += 32 * VEC) {
        float xv[VEC], av[VEC];
        load_vec<T, VEC>(xr + k, xv);
        load_vec<T, VEC>(a0 + k, av);
#pragma unroll
        for (int u = 0; u < VEC; ++u) s0 = fmaf(xv[u], av[u], s0);
        if (two) {
          load_vec<T, VEC>(a1 + k, av);
#pragma unroll
          for (int u = 0; u < VEC; ++u) s1 = fmaf(xv[u], av[u], s1);
        }
      }
    } else {
#pragma unroll 4
      for (int64_t k = lane; k < K; k += 32) {
        const float xv = Cvt<T>::to(xr[k]);
        s0 = fmaf(xv, Cvt<T>::to(a0[k]), s0);
        if (two) s1 = fmaf(xv, Cvt<T>::to(a1[k]), s1);
      }
    }
    s0 = warp_sum(s0);
    s1 = warp_sum(s1);
    if (lane == 0) {
      v[j] = s0 * scale;
      if (two) v[j + 1] = s1 * scale;
    }
  }
  __syncthreads();

  // ---- expand: y[t, n] += sum_j v[j] * Bt_i[j, n] over this block's column slice
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * slice_w;
  const int64_t n_end = n_begin + slice_w < N ? n_begin + slice_w : N;
  T* __restrict__ yr = y + t * ldy;
  if (vec_y) {  // slice_w % VEC == 0, so every chunk is whole
    for (int64_t n = n_begin + static_cast<int64_t>(threadIdx.x) * VEC; n < n_end;
         n += static_cast<int64_t>(DEC_NT) * VEC) {
      float acc[VEC];
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc[u] = 0.f;
#pragma unroll 4
      for (int64_t j = 0; j < r; ++j) {
        float bv[VEC];
        load_vec<T, VEC>(Bi + j * N + n, bv);
        const float vj = v[j];
#pragma unroll
        for (int u = 0; u < VEC; ++u) acc[u] = fmaf(vj, bv[u], acc[u]);
      }
      float cur[VEC];
      load_vec<T, VEC>(yr + n, cur);
#pragma unroll
      for (int u = 0; u < VEC; ++u) cur[u] += acc[u];
      store_vec<T, VEC>(yr + n, cur);
    }
  } else {
    for (int64_t n = n_begin + threadIdx.x; n < n_end; n += DEC_NT) {
      float acc = 0.f;
#pragma unroll 4
      for (int64_t j = 0; j < r; ++j) acc = fmaf(v[j], Cvt<T>::to(Bi[j * N + n]), acc);
      yr[n] = Cvt<T>::from(Cvt<T>::to(yr[n]) + acc);
    }
  }
}

// Maps blockIdx.x to (segment, tile within the segment) where segment i has
// ceil((seg_off[i + 1] - seg_off[i]) / BT) tiles, in segment order. Returns false for a
// surplus block. Block-uniform result.
template <int BT>
__device__ __forceinline__ bool resolve_tile(const int64_t* __restrict__ seg_off, int64_t M,
                                             int64_t& seg, int64_t& tile) {
  __shared__ int64_t s_seg, s_tile;
  const int64_t bx = blockIdx.x;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    if (lane == 0) s_seg = -1;
    __syncwarp();
    int64_t run = 0;
    for (int64_t base = 0; base < M; base += 32) {
      const int64_t i = base + lane;
      const int64_t cnt = i < M ? seg_off[i + 1] - seg_off[i] : 0;
      const int64_t tiles = cnt > 0 ? (cnt + BT - 1) / BT : 0;
      int64_t inc = tiles;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int64_t nb = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += nb;
      }
      const int64_t exc = inc - tiles;
      if (tiles > 0 && bx >= run + exc && bx < run + inc) {
        s_seg = i;
        s_tile = bx - run - exc;
      }
      run += __shfl_sync(0xffffffffu, inc, 31);
      if (run > bx) break;  // warp-uniform
    }
  }
  __syncthreads();
  seg = s_seg;
  tile = s_tile;
  return seg >= 0;
}

template <typename T>
__global__ void __launch_bounds__(shrink_cfg::NT, 2)
    seg_shrink_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ A,
                      const int32_t* __restrict__ ranks, const int64_t* __restrict__ perm,
                      const int64_t* __restrict__ seg_off, float* __restrict__ ws, int64_t K,
                      int64_t max_rank, int64_t M, bool vec_x, bool vec_w) {
  int64_t seg, tile;
  if (!resolve_tile<shrink_cfg::BT>(seg_off, M, seg, tile)) return;
  int64_t r = ranks[seg];
  if (r > max_rank) r = max_rank;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * shrink_cfg::RT;
  if (j0 >= r) return;
  const int64_t p0 = seg_off[seg] + tile * shrink_cfg::BT;
  const Dropout nodrop;
  shrink_tile<T>(x, ldx, perm, p0, seg_off[seg + 1], K, A + seg * max_rank * K, j0, r, ws,
                 max_rank, nodrop, vec_x, vec_w);
}

template <typename T>
__global__ void __launch_bounds__(expand_cfg::NT, 2)
    seg_expand_kernel(T* __restrict__ y, int64_t ldy, const T* __restrict__ Bt,
                      const int32_t* __restrict__ ranks, const float* __restrict__ scalings,
                      const int64_t* __restrict__ perm, const int64_t* __restrict__ seg_off,
                      const float* __restrict__ ws, int64_t N, int64_t max_rank, int64_t M,
                      bool vec_ws, bool vec_b, bool vec_y) {
  int64_t seg, tile;
  if (!resolve_tile<expand_cfg::BT>(seg_off, M, seg, tile)) return;
  int64_t r = ranks[seg];
  if (r > max_rank) r = max_rank;
  if (r <= 0) return;
  const int64_t p0 = seg_off[seg] + tile * expand_cfg::BT;
  const bool vec_s = vec_ws && r % 4 == 0;  // S rows of this segment: r floats, ld max_rank
  const Dropout nodrop;
  expand_tile<T>(ws, max_rank, p0, seg_off[seg + 1], r, Bt + seg * max_rank * N, N,
                 static_cast<int64_t>(blockIdx.y) * expand_cfg::BN, N, y, ldy, perm,
                 scalings[seg], nodrop, vec_s, vec_b, vec_y);
}

}  // namespace lk
