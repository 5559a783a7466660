// LoRA weight gradients as deterministic split-K reductions over tokens:
//   dA   = s * G^T drop(x)   (r, in)     L = G (T, r) fp32,  Rm = x (T, in), dropout on Rm
//   dB^T = s * S^T dy        (r, out)    L = S (T, r) fp32,  Rm = dy (T, out); written transposed
// Pass 1 (lora_grad_tn_kernel) writes one fp32 partial per token split; pass 2
// (splitk_reduce_kernel) sums the partials in split order, scales and converts. No atomics, so
// the result is bitwise reproducible for a given shape and device.
#include "host.cuh"
#include "lora.cuh"

namespace lk {
namespace {

int64_t tokens_per_split(int64_t T, int64_t splits) {
  const int64_t per = cdiv(T > 0 ? T : 1, splits);
  return cdiv(per, tn_cfg::TC) * tn_cfg::TC;
}

template <typename T>
void launch_tn(const float* L, int64_t ldl, const void* Rm, int64_t ldr, int64_t ntok, int64_t RL,
               int64_t N, float* part, int64_t splits, const int64_t* seed, float p,
               cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec_l = RL % 4 == 0 && ldl % 4 == 0 && aligned(L, 16);
  const bool vec_r = N % VEC == 0 && ldr % VEC == 0 && aligned(Rm, 16);
  const dim3 grid(static_cast<unsigned>(cdiv(N, tn_cfg::BN)),
                  static_cast<unsigned>(cdiv(RL, tn_cfg::RJ)), static_cast<unsigned>(splits));
  LK_LAUNCH(lora_grad_tn_kernel<T>, grid, tn_cfg::NT, 0, stream,
            L, ldl, static_cast<const T*>(Rm), ldr, ntok, RL, N, part, grad_ldp(N),
      tokens_per_split(ntok, splits), seed, p, inv_keep(p), vec_l, vec_r);
}

template <typename T>
void launch_reduce(const float* part, int64_t splits, int64_t RL, int64_t N, void* out,
                   int64_t ldo, bool transpose, float scale, int sms, cudaStream_t stream) {
  int64_t blocks = cdiv(RL * N, 256);
  if (blocks > 8 * static_cast<int64_t>(sms)) blocks = 8 * static_cast<int64_t>(sms);
  LK_LAUNCH(splitk_reduce_kernel<T>, static_cast<unsigned>(blocks), 256, 0, stream,
            part, splits, RL, N, grad_ldp(N), static_cast<T*>(out), ldo, transpose, scale);
}

}  // namespace

int64_t grad_splits(int64_t T, int64_t RL, int64_t N, int device) {
  static const char* name = "grad_splits";
  require(T >= 0 && RL >= 1 && N >= 0, name, "need T >= 0, RL >= 1, N >= 0");
  if (T == 0 || N == 0) return 1;
  int sms = 0;
  {
    DeviceGuard guard(device, name);
    sms = sm_count(device, name);
  }
  const int64_t tiles = cdiv(N, tn_cfg::BN) * cdiv(RL, tn_cfg::RJ);
  // about 4 waves of blocks, at least one 16-token chunk per split
  int64_t splits = cdiv(4 * static_cast<int64_t>(sms), tiles);
  const int64_t max_splits = cdiv(T, tn_cfg::TC);
  if (splits > max_splits) splits = max_splits;
  if (splits > 65535) splits = 65535;
  if (splits < 1) splits = 1;
  return cdiv(T, tokens_per_split(T, splits));
}

void lora_grad_tn(const float* L, int64_t ldl, const void* Rm, int64_t ldr, int64_t T, int64_t RL,
                  int64_t N, float* part, int64_t splits, const int64_t* seed, float p,
                  DType dtype, int device, cudaStream_t stream) {
  static const char* name = "lora_grad_tn";
  check_dtype(dtype, name);
  check_p(p, seed, name);
  require(T >= 0 && RL >= 1 && N >= 0, name, "need T >= 0, RL >= 1, N >= 0");
  require(splits >= 1 && splits <= 65535, name, "splits must be in [1, 65535]");
  require(ldl >= RL && ldr >= N, name, "leading dimensions must be >= the row lengths");
  require(cdiv(N, tn_cfg::BN) < (int64_t{1} << 31) && cdiv(RL, tn_cfg::RJ) <= 65535, name,
          "problem too large for one launch");
  if (N == 0) return;
  require(part != nullptr && (T == 0 || (L != nullptr && Rm != nullptr)), name, "null pointer");
  require(aligned(part, 16), name, "the partials workspace must be 16-byte aligned");
  DeviceGuard guard(device, name);
  LK_DISPATCH(dtype, launch_tn, L, ldl, Rm, ldr, T, RL, N, part, splits, seed, p, stream);
  check_launch(name);
}

void splitk_reduce(const float* part, int64_t splits, int64_t RL, int64_t N, void* out,
                   int64_t ldo, bool transpose, float scale, DType dtype, int device,
                   cudaStream_t stream) {
  static const char* name = "splitk_reduce";
  check_dtype(dtype, name);
  require(splits >= 1 && RL >= 1 && N >= 0, name, "need splits >= 1, RL >= 1, N >= 0");
  require(ldo >= (transpose ? RL : N), name, "ldo must be >= the output row length");
  if (N == 0) return;
  require(part != nullptr && out != nullptr, name, "null pointer");
  DeviceGuard guard(device, name);
  const int sms = sm_count(device, name);
  LK_DISPATCH(dtype, launch_reduce, part, splits, RL, N, out, ldo, transpose, scale, sms, stream);
  check_launch(name);
}

}  // namespace lk
