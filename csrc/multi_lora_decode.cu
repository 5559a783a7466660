// Multi-adapter decode: y[t] += s_i * (x[t] A_i^T) Bt_i, i = ids[t], in ONE kernel.
// Block (token t, column slice): phase 1 (shrink) computes v = s_i * x[t] A_i^T into shared memory,
// one warp per pair of ranks, 16-byte loads along `in`, warp-shuffle reductions; phase 2 (expand)
// adds v Bt_i[:, slice] into y[t, slice] with 16-byte loads of Bt rows. Each adapter's real rank
// r_i = min(ranks[i], max_rank) bounds both loops, so a rank-4 adapter in a rank-64 pool reads
// 4 rows. Tokens with id -1 (or out of range) exit at once and leave y untouched.
// When there are fewer tokens than SMs, the output columns of a token are split over several
// blocks (slices); each recomputes the (cheap, L2-resident) shrink for its token.
#include "host.cuh"
#include "multi_lora.cuh"

namespace lk {
namespace {

template <typename T>
void launch_decode(const void* x, int64_t ldx, void* y, int64_t ldy, const void* A, const void* Bt,
                   const int32_t* ranks, const float* scalings, const void* ids, bool ids64,
                   int64_t ntok, int64_t K, int64_t N, int64_t max_rank, int64_t M, int sms,
                   cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec_x = K % VEC == 0 && ldx % VEC == 0 && aligned(x, 16) && aligned(A, 16);
  const bool vec_y = N % VEC == 0 && ldy % VEC == 0 && aligned(y, 16) && aligned(Bt, 16);
  // Fewer tokens than SMs: split the columns so that about one wave of blocks runs; each slice
  // keeps at least one warp's worth of vectors and repeats the shrink (A_i is L2-resident).
  int64_t slices = cdiv(sms, ntok);
  const int64_t max_slices = cdiv(N, 32 * VEC);
  if (slices > max_slices) slices = max_slices;
  if (slices > 4) slices = 4;
  if (slices < 1) slices = 1;
  const int64_t slice_w = cdiv(cdiv(N, slices), VEC) * VEC;
  slices = cdiv(N, slice_w);
  const dim3 grid(static_cast<unsigned>(ntok), static_cast<unsigned>(slices));
  const size_t smem = static_cast<size_t>(max_rank) * sizeof(float);
  LK_LAUNCH(multi_lora_decode_kernel<T>, grid, DEC_NT, smem, stream,
            static_cast<const T*>(x), ldx, static_cast<T*>(y), ldy, static_cast<const T*>(A),
      static_cast<const T*>(Bt), ranks, scalings, ids, ids64, K, N, max_rank, M, slice_w, vec_x,
      vec_y);
}

}  // namespace

void multi_lora_decode(const void* x, int64_t ldx, void* y, int64_t ldy, const void* A,
                       const void* Bt, const int32_t* ranks, const float* scalings,
                       const void* ids, bool ids_are_int64, int64_t T, int64_t K, int64_t N,
                       int64_t max_rank, int64_t M, DType dtype, int device, cudaStream_t stream) {
  static const char* name = "multi_lora_decode";
  check_dtype(dtype, name);
  require(T >= 0 && K >= 0 && N >= 0 && max_rank >= 1 && M >= 1, name,
          "need T, K, N >= 0 and max_rank, max_adapters >= 1");
  require(max_rank <= 12 * 1024, name, "max_rank must be <= 12288 (shared memory)");
  require(ldx >= K && ldy >= N, name, "leading dimensions must be >= the row lengths");
  require(T < (int64_t{1} << 31), name, "too many tokens for one launch");
  if (T == 0 || N == 0) return;
  require(x != nullptr && y != nullptr && A != nullptr && Bt != nullptr && ranks != nullptr &&
              scalings != nullptr && ids != nullptr,
          name, "null pointer");
  DeviceGuard guard(device, name);
  const int sms = sm_count(device, name);
  LK_DISPATCH(dtype, launch_decode, x, ldx, y, ldy, A, Bt, ranks, scalings, ids, ids_are_int64, T,
              K, N, max_rank, M, sms, stream);
  check_launch(name);
}

}  // namespace lk
