// Shared device helpers: dtype conversion, vector loads/stores, warp reductions, the dropout RNG.
// Torch-free: everything here takes raw pointers and plain integers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

// Kernel launch and dynamic shared memory, spelled so that the CPU emulator (csrc/emu, used by the
// tests to exercise kernel logic without a GPU) can replace them.
#ifndef LK_LAUNCH
#define LK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif
#ifndef LK_DYN_SMEM
#define LK_DYN_SMEM(type, name) extern __shared__ type name[]
#endif

namespace lk {

// ------------------------------------------------------------------------------ conversions
template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// ------------------------------------------------------------------------------ vector memory ops
template <int BYTES>
struct RawVec;
template <>
struct RawVec<16> { using type = uint4; };
template <>
struct RawVec<8> { using type = uint2; };
template <>
struct RawVec<4> { using type = unsigned int; };
template <>
struct RawVec<2> { using type = unsigned short; };

// Loads N consecutive elements (N * sizeof(T) bytes, that many bytes aligned) as fp32.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float* out) {
  using R = typename RawVec<N * sizeof(T)>::type;
  R raw = *reinterpret_cast<const R*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = Cvt<T>::to(e[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float* v) {
  using R = typename RawVec<N * sizeof(T)>::type;
  R raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < N; ++i) e[i] = Cvt<T>::from(v[i]);
  *reinterpret_cast<R*>(p) = raw;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ------------------------------------------------------------------------------ dropout RNG
// Philox4x32-10 (Salmon et al. 2011) keyed by the 64-bit seed. Element idx (the logical index
// t * in + k of x, whatever its strides) uses word (idx & 3) of the block for counter idx >> 2,
// so a scalar path and a 4-wide vector path produce the same mask. Forward (shrink) and backward
// (dX expand, dA) call the same function; nothing is stored.
__device__ __forceinline__ uint4 philox4x32_10(uint64_t seed, uint64_t ctr) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0u, c3 = 0u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t lo0 = 0xD2511F53u * c0, hi0 = __umulhi(0xD2511F53u, c0);
    const uint32_t lo1 = 0xCD9E8D57u * c2, hi1 = __umulhi(0xCD9E8D57u, c2);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

// 24 random bits -> [0, 1); an element is kept when u >= p.
__device__ __forceinline__ float bits_to_unit(uint32_t b) { return (b >> 8) * (1.0f / 16777216.0f); }

struct Dropout {
  uint64_t seed = 0;
  float p = 0.f;        // drop probability; 0 = off
  float inv_keep = 1.f; // 1 / (1 - p)
  __device__ __forceinline__ bool on() const { return p > 0.f; }
  // multiplier (0 or 1/(1-p)) of logical element idx
  __device__ __forceinline__ float factor(uint64_t idx) const {
    const uint4 r = philox4x32_10(seed, idx >> 2);
    const uint32_t w = (idx & 3) == 0 ? r.x : (idx & 3) == 1 ? r.y : (idx & 3) == 2 ? r.z : r.w;
    return bits_to_unit(w) >= p ? inv_keep : 0.f;
  }
  // multipliers of idx4 .. idx4 + 3 (idx4 % 4 == 0)
  __device__ __forceinline__ void factor4(uint64_t idx4, float* f) const {
    const uint4 r = philox4x32_10(seed, idx4 >> 2);
    f[0] = bits_to_unit(r.x) >= p ? inv_keep : 0.f;
    f[1] = bits_to_unit(r.y) >= p ? inv_keep : 0.f;
    f[2] = bits_to_unit(r.z) >= p ? inv_keep : 0.f;
    f[3] = bits_to_unit(r.w) >= p ? inv_keep : 0.f;
  }
};

// Reads the seed from device memory (a graph-capturable int64 tensor); p == 0 -> off.
__device__ __forceinline__ Dropout make_dropout(const int64_t* seed_ptr, float p, float inv_keep) {
  Dropout d;
  if (seed_ptr != nullptr && p > 0.f) {
    d.seed = static_cast<uint64_t>(*seed_ptr);
    d.p = p;
    d.inv_keep = inv_keep;
  }
  return d;
}

__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lk
