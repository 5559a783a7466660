// LoRA expand-accumulate y += scale * m * (S Bt): the forward's y += s (x A^T) B^T and, with the
// dropout mask, the backward's dX += s * keep / (1 - p) * (G A).
#include "host.cuh"
#include "lora.cuh"

namespace lk {
namespace {

template <typename T>
void launch_expand(const float* S, int64_t ldS, const void* Bt, void* y, int64_t ldy, int64_t ntok,
                   int64_t N, int64_t R, float scale, const int64_t* seed, float p,
                   cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec_s = R % 4 == 0 && ldS % 4 == 0 && aligned(S, 16);
  const bool vec_b = N % VEC == 0 && aligned(Bt, 16);
  const bool vec_y = N % 4 == 0 && ldy % 4 == 0 && aligned(y, 4 * sizeof(T));
  const dim3 grid(static_cast<unsigned>(cdiv(ntok, expand_cfg::BT)),
                  static_cast<unsigned>(cdiv(N, expand_cfg::BN)));
  LK_LAUNCH(lora_expand_kernel<T>, grid, expand_cfg::NT, 0, stream,
            S, ldS, static_cast<const T*>(Bt), static_cast<T*>(y), ldy, ntok, N, R, scale, seed, p,
      inv_keep(p), vec_s, vec_b, vec_y);
}

}  // namespace

void lora_expand(const float* S, int64_t ldS, const void* Bt, void* y, int64_t ldy, int64_t T,
                 int64_t N, int64_t R, float scale, const int64_t* seed, float p, DType dtype,
                 int device, cudaStream_t stream) {
  static const char* name = "lora_expand";
  check_dtype(dtype, name);
  check_p(p, seed, name);
  require(T >= 0 && N >= 0 && R >= 1, name, "need T >= 0, N >= 0, R >= 1");
  require(ldS >= R && ldy >= N, name, "leading dimensions must be >= the row lengths");
  require(cdiv(T, expand_cfg::BT) < (int64_t{1} << 31) && cdiv(N, expand_cfg::BN) <= 65535, name,
          "problem too large for one launch");
  if (T == 0 || N == 0) return;
  require(S != nullptr && Bt != nullptr && y != nullptr, name, "null pointer");
  DeviceGuard guard(device, name);
  LK_DISPATCH(dtype, launch_expand, S, ldS, Bt, y, ldy, T, N, R, scale, seed, p, stream);
  check_launch(name);
}

}  // namespace lk
