// Host launcher API of the CUDA kernels (torch-free). Every pointer is a device pointer; every
// matrix is row-major with the given leading dimension (row stride, in elements) and unit column
// stride. Launchers validate their arguments (std::invalid_argument), launch on `stream`, and check
// the launch with cudaGetLastError (std::runtime_error "<kernel>: <cuda error>").
//
// dtype: 0 = float32, 1 = float16, 2 = bfloat16 (the dtype of x / y / weights; fp32 accumulation).
// seed: device pointer to one int64 (dropout seed) or nullptr; p: drop probability (0 = off).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

namespace lk {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// ---- LoRA low-rank branch (lora_shrink.cu / lora_expand.cu / lora_grad.cu) ----

// out[t, j] (fp32, ld ldo) = sum_k drop(x)[t, k] * W[j, k];  x (T, K), W (R, K) contiguous.
// Dropout index of x[t, k] is t * K + k.
void lora_shrink(const void* x, int64_t ldx, int64_t T, int64_t K, const void* W, int64_t R,
                 float* out, int64_t ldo, const int64_t* seed, float p, DType dtype, int device,
                 cudaStream_t stream);

// y[t, n] += scale * m(t, n) * sum_j S[t, j] * Bt[j, n];  S (T, R) fp32, Bt (R, N) contiguous,
// y (T, N) in `dtype`. m = keep / (1 - p) of element t * N + n when p > 0 (the dX path), else 1.
void lora_expand(const float* S, int64_t ldS, const void* Bt, void* y, int64_t ldy, int64_t T,
                 int64_t N, int64_t R, float scale, const int64_t* seed, float p, DType dtype,
                 int device, cudaStream_t stream);

// Number of token splits lora_grad_tn uses for (T, RL, N) on `device`; the workspace is
// (splits, RL, grad_ldp(N)) fp32.
int64_t grad_splits(int64_t T, int64_t RL, int64_t N, int device);
inline int64_t grad_ldp(int64_t N) { return (N + 3) / 4 * 4; }

// part[s, j, n] = sum_{t in split s} L[t, j] * drop(Rm)[t, n];  L (T, RL) fp32, Rm (T, N) dtype.
// Dropout index of Rm[t, n] is t * N + n. Every partial is written (zeros for an empty split).
void lora_grad_tn(const float* L, int64_t ldl, const void* Rm, int64_t ldr, int64_t T,
                  int64_t RL, int64_t N, float* part, int64_t splits, const int64_t* seed,
                  float p, DType dtype, int device, cudaStream_t stream);

// out = scale * sum_s part[s] in a fixed order (deterministic), as (RL, N) with ld ldo, or
// transposed (N, RL) when `transpose`; converted to `dtype`.
void splitk_reduce(const float* part, int64_t splits, int64_t RL, int64_t N, void* out,
                   int64_t ldo, bool transpose, float scale, DType dtype, int device,
                   cudaStream_t stream);

// keep mask (uint8, 1 = kept) of the dropout above for a (T, K) input: for tests and debugging.
void dropout_keep_mask(const int64_t* seed, int64_t T, int64_t K, float p, uint8_t* out,
                       int device, cudaStream_t stream);

// ---- multi-adapter serving (multi_lora_decode.cu / multi_lora_prefill.cu) ----
// Pool: A (M, max_rank, K), Bt (M, max_rank, N) contiguous in `dtype`; ranks int32 (M,),
// scalings fp32 (M,); ids (T,) int32 or int64 (ids_are_int64), -1 = no adapter. Out-of-range ids
// are skipped by the kernels (never read out of bounds); validate them before calling.
// y[t] += scalings[i] * (x[t] A_i[:r_i]^T) Bt_i[:r_i] with i = ids[t], r_i = min(ranks[i], max_rank).

void multi_lora_decode(const void* x, int64_t ldx, void* y, int64_t ldy, const void* A,
                       const void* Bt, const int32_t* ranks, const float* scalings,
                       const void* ids, bool ids_are_int64, int64_t T, int64_t K, int64_t N,
                       int64_t max_rank, int64_t M, DType dtype, int device, cudaStream_t stream);

// Segmented (prefill): perm (T,) int64 = token indices sorted by adapter id (skipped tokens last),
// seg_off (M + 1,) int64 = start of each adapter's run in perm (seg_off[M] = end of the adapted
// tokens); ws: fp32 workspace of T * max_rank floats.
void multi_lora_prefill(const void* x, int64_t ldx, void* y, int64_t ldy, const void* A,
                        const void* Bt, const int32_t* ranks, const float* scalings,
                        const int64_t* perm, const int64_t* seg_off, float* ws, int64_t T,
                        int64_t K, int64_t N, int64_t max_rank, int64_t M, DType dtype,
                        int device, cudaStream_t stream);

// Virtual architectures the kernels were compiled for (e.g. {80, 90}), from __CUDA_ARCH_LIST__.
std::vector<int> compiled_archs();
int cuda_runtime_version();  // CUDART_VERSION the module was built with

}  // namespace lk
