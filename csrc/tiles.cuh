// Block-level building blocks of the skinny GEMMs around a rank-r adapter (CUDA cores, fp32
// accumulation). Each is a __device__ function run by a whole thread block, so that the LoRA
// kernels and the segmented multi-adapter (prefill) kernels share one implementation:
//
//   shrink_tile   out[t, j]  = sum_k drop(x)[t, k] * W[j, k]         (x A^T, dy B; fp32 out)
//   expand_tile   y[t, n]   += scale * m(t, n) * sum_j S[t, j] Bt[j, n]   (into y / dX in place)
//   (lora_grad.cu: the split-K "L^T R" tile for dA / dB uses the same loader.)
//
// Global -> shared staging goes through TileLoader: 16-byte vector loads when the caller says the
// rows are 16-byte aligned (runtime flag, uniform per block), a scalar path otherwise, rows/cols
// outside the matrix read as 0, dropout applied on the fly, and values converted to fp32 once.
#pragma once

#include "common.cuh"

namespace lk {

// ------------------------------------------------------------------------------ tile loader
// ROWS x COLS elements of a row-major matrix (row stride ld, unit column stride) into registers
// (fp32), then into shared memory. Rows r in [r0, r0 + ROWS) exist if r < rend and live at memory
// row rowmap[r] (rowmap == nullptr: row r); columns c in [c0, c0 + COLS) exist if c < ncols.
// Missing elements read as 0. Dropout (if on) multiplies element (r, c) by the factor of logical
// index r * ldrop + c.
// The tile is cut into chunks of VEC = 16 / sizeof(T) consecutive columns, chunk ch = tid + i * NT
// (consecutive threads read consecutive chunks: coalesced). With `vec` a chunk is one 16-byte
// load; preconditions (checked by the launcher): base and ld * sizeof(T) 16-byte aligned,
// ncols % VEC == 0, c0 % VEC == 0, and ldrop % 4 == 0 when dropout is on. Without `vec` (unaligned
// rows, odd widths) the same chunk is read element by element with per-element bounds.
template <typename T, int ROWS, int COLS, int NT>
struct TileLoader {
  static constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  static_assert(COLS % VEC == 0 && VEC % 4 == 0, "tile width must be a multiple of the vector width");
  static constexpr int CPR = COLS / VEC;          // chunks per row
  static constexpr int NCH = ROWS * CPR;          // chunks per tile
  static constexpr int VPT = (NCH + NT - 1) / NT; // chunks per thread
  float v[VPT * VEC];

  __device__ __forceinline__ void load(const T* __restrict__ base, int64_t ld,
                                       const int64_t* __restrict__ rowmap, int64_t r0,
                                       int64_t rend, int64_t c0, int64_t ncols, bool vec,
                                       const Dropout& drop, int64_t ldrop) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int ch = tid + i * NT;
      float* out = v + i * VEC;
      const int rr = ch / CPR, cc = (ch % CPR) * VEC;
      const int64_t r = r0 + rr, c = c0 + cc;
#pragma unroll
      for (int u = 0; u < VEC; ++u) out[u] = 0.f;
      if ((NCH % NT == 0 || ch < NCH) && r < rend && c < ncols) {
        const T* src = base + (rowmap != nullptr ? rowmap[r] : r) * ld + c;
        const uint64_t idx = static_cast<uint64_t>(r) * static_cast<uint64_t>(ldrop) + c;
        if (vec) {
          load_vec<T, VEC>(src, out);
          if (drop.on()) {
#pragma unroll
            for (int q = 0; q < VEC; q += 4) {
              float f[4];
              drop.factor4(idx + q, f);
#pragma unroll
              for (int u = 0; u < 4; ++u) out[q + u] *= f[u];
            }
          }
        } else {
#pragma unroll
          for (int u = 0; u < VEC; ++u) {
            if (c + u < ncols) {
              const float f = drop.on() ? drop.factor(idx + u) : 1.f;
              out[u] = Cvt<T>::to(src[u]) * f;
            }
          }
        }
      }
    }
  }

  // s[rr * sld + cc] = tile(rr, cc); sld % 4 == 0 and s 16-byte aligned.
  __device__ __forceinline__ void store(float* s, int sld) const {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int ch = threadIdx.x + i * NT;
      if (NCH % NT == 0 || ch < NCH) {
        float* d = s + (ch / CPR) * sld + (ch % CPR) * VEC;
#pragma unroll
        for (int q = 0; q < VEC; q += 4)
          *reinterpret_cast<float4*>(d + q) =
              make_float4(v[i * VEC + q], v[i * VEC + q + 1], v[i * VEC + q + 2], v[i * VEC + q + 3]);
      }
    }
  }

  // s[cc * sld + rr] = tile(rr, cc) (transposed).
  __device__ __forceinline__ void store_t(float* s, int sld) const {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int ch = threadIdx.x + i * NT;
      if (NCH % NT == 0 || ch < NCH) {
        const int rr = ch / CPR, cc = (ch % CPR) * VEC;
#pragma unroll
        for (int u = 0; u < VEC; ++u) s[(cc + u) * sld + rr] = v[i * VEC + u];
      }
    }
  }
};

// ------------------------------------------------------------------------------ shrink
// out[r, j] = sum_k drop(x)[r, k] * W[j, k] for rows r in [r0, min(r0 + 64, rend)) and ranks
// j in [j0, min(j0 + 16, R)). x rows via rowmap (see TileLoader), W (R, K) row-major, out fp32
// with row stride ldo indexed by r (not by rowmap[r]).
// 256 threads = 4 k-groups x 64; each thread owns 4 rows x 4 ranks and a quarter of every
// 128-wide K chunk; the k-groups are summed through shared memory at the end (deterministic).
// The next chunk is prefetched into registers while the current one is multiplied.
namespace shrink_cfg {
constexpr int BT = 64, RT = 16, BK = 128, NT = 256, SLD = BK + 4;
}

// acc[i][c] += a[i] * b[c] for the 4 x 8 register tile of the expand and grad kernels: a is one
// float4 of the staged rank-side operand, b two float4s 128 floats apart (a thread owns columns
// 4*nx..4*nx+3 and 128+4*nx..128+4*nx+3 of a 256-wide block).
__device__ __forceinline__ void fma_4x8(const float* a4, const float* b8, float acc[4][8]) {
  const float4 a = *reinterpret_cast<const float4*>(a4);
  const float4 b0 = *reinterpret_cast<const float4*>(b8);
  const float4 b1 = *reinterpret_cast<const float4*>(b8 + 128);
  const float av[4] = {a.x, a.y, a.z, a.w};
  const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[i][c] = fmaf(av[i], bv[c], acc[i][c]);
}

template <typename T>
__device__ __forceinline__ void shrink_tile(const T* __restrict__ x, int64_t ldx,
                                            const int64_t* __restrict__ rowmap, int64_t r0,
                                            int64_t rend, int64_t K, const T* __restrict__ W,
                                            int64_t j0, int64_t R, float* __restrict__ out,
                                            int64_t ldo, const Dropout& drop, bool vec_x,
                                            bool vec_w) {
  using namespace shrink_cfg;
  __shared__ __align__(16) float xs[BT * SLD];
  __shared__ __align__(16) float ws[RT * SLD];
  TileLoader<T, BT, BK, NT> lx;
  TileLoader<T, RT, BK, NT> lw;
  const int tid = threadIdx.x, kg = tid / 64, l = tid % 64, tg = l % 16, jg = l / 16;
  const Dropout nodrop;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) acc[i][jj] = 0.f;

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    lx.load(x, ldx, rowmap, r0, rend, k0, K, vec_x, drop, K);
    lw.load(W, K, nullptr, j0, R, k0, K, vec_w, nodrop, 0);
    __syncthreads();  // the previous chunk is no longer read
    lx.store(xs, SLD);
    lw.store(ws, SLD);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK / 4; kk += 4) {
      const int k = kg * (BK / 4) + kk;
      float4 a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = *reinterpret_cast<const float4*>(&xs[(tg + 16 * i) * SLD + k]);
#pragma unroll
      for (int i = 0; i < 4; ++i) b[i] = *reinterpret_cast<const float4*>(&ws[(jg + 4 * i) * SLD + k]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          float s = acc[i][jj];
          s = fmaf(a[i].x, b[jj].x, s);
          s = fmaf(a[i].y, b[jj].y, s);
          s = fmaf(a[i].z, b[jj].z, s);
          s = fmaf(a[i].w, b[jj].w, s);
          acc[i][jj] = s;
        }
    }
  }
  // sum the 4 k-groups in a fixed order
  __syncthreads();
  float* red = xs;  // 3 * 16 * 64 floats <= BT * SLD
  if (kg > 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) red[((kg - 1) * 16 + i * 4 + jj) * 64 + l] = acc[i][jj];
  }
  __syncthreads();
  if (kg == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = r0 + tg + 16 * i;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int q = i * 4 + jj;
        const float s = acc[i][jj] + red[q * 64 + l] + red[(16 + q) * 64 + l] + red[(32 + q) * 64 + l];
        const int64_t j = j0 + jg + 4 * jj;
        if (r < rend && j < R) out[r * ldo + j] = s;
      }
    }
  }
}

// ------------------------------------------------------------------------------ expand
// y[row(r), n] += scale * m(r, n) * sum_{j<R} S[r, j] * Bt[j, n] for rows r in
// [r0, min(r0 + 32, rend)) and columns n in [n0, min(n0 + 256, N)); row(r) = rowmap[r] or r.
// S fp32 (ld ldS, indexed by r), Bt (R, N) with row stride ldb, y with row stride ldy.
// m = dropout factor of logical index r * N + n (dX path) or 1.
// 256 threads = 8 row groups (4 rows each) x 32 column groups (2 x 4 columns, 128 apart, so
// shared-memory reads are conflict-free); ranks are walked in chunks of 32.
namespace expand_cfg {
constexpr int BT = 32, BN = 256, RC = 32, NT = 256, SSLD = BT + 4;
}

template <typename T>
__device__ __forceinline__ void expand_tile(const float* __restrict__ S, int64_t ldS, int64_t r0,
                                            int64_t rend, int64_t R, const T* __restrict__ Bt,
                                            int64_t ldb, int64_t n0, int64_t N, T* __restrict__ y,
                                            int64_t ldy, const int64_t* __restrict__ rowmap,
                                            float scale, const Dropout& drop, bool vec_s,
                                            bool vec_b, bool vec_y) {
  using namespace expand_cfg;
  __shared__ __align__(16) float Ss[RC * SSLD];  // [j][r]
  __shared__ __align__(16) float Bs[RC * BN];    // [j][n]
  TileLoader<float, BT, RC, NT> ls;
  TileLoader<T, RC, BN, NT> lb;
  const int tid = threadIdx.x, nx = tid % 32, ty = tid / 32;
  const Dropout nodrop;
  float acc[4][8];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[i][c] = 0.f;

  for (int64_t j0 = 0; j0 < R; j0 += RC) {
    ls.load(S, ldS, nullptr, r0, rend, j0, R, vec_s, nodrop, 0);
    lb.load(Bt, ldb, nullptr, j0, R, n0, N, vec_b, nodrop, 0);
    __syncthreads();  // the previous chunk is no longer read
    ls.store_t(Ss, SSLD);
    lb.store(Bs, BN);
    __syncthreads();
    const int jn = static_cast<int>(R - j0 < RC ? R - j0 : RC);
#pragma unroll 4
    for (int j = 0; j < jn; ++j) fma_4x8(&Ss[j * SSLD + ty * 4], &Bs[j * BN + nx * 4], acc);
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + ty * 4 + i;
    if (r >= rend) continue;
    T* yr = y + (rowmap != nullptr ? rowmap[r] : r) * ldy;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t c = n0 + h * 128 + nx * 4;
      if (vec_y) {
        if (c < N) {
          float f[4] = {1.f, 1.f, 1.f, 1.f};
          if (drop.on()) drop.factor4(static_cast<uint64_t>(r) * N + c, f);
          float cur[4];
          load_vec<T, 4>(yr + c, cur);
#pragma unroll
          for (int q = 0; q < 4; ++q) cur[q] = fmaf(scale * acc[i][h * 4 + q], f[q], cur[q]);
          store_vec<T, 4>(yr + c, cur);
        }
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (c + q < N) {
            const float f = drop.on() ? drop.factor(static_cast<uint64_t>(r) * N + c + q) : 1.f;
            yr[c + q] = Cvt<T>::from(fmaf(scale * acc[i][h * 4 + q], f, Cvt<T>::to(yr[c + q])));
          }
        }
      }
    }
  }
}

}  // namespace lk
