// LoRA shrink S = drop(x) A^T (fp32, T x r) with fused dropout, and the dropout mask itself.
#include "host.cuh"
#include "lora.cuh"

namespace lk {
namespace {

template <typename T>
void launch_shrink(const void* x, int64_t ldx, int64_t ntok, int64_t K, const void* W, int64_t R,
                   float* out, int64_t ldo, const int64_t* seed, float p, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec_x = K % VEC == 0 && ldx % VEC == 0 && aligned(x, 16);
  const bool vec_w = K % VEC == 0 && aligned(W, 16);
  const dim3 grid(static_cast<unsigned>(cdiv(ntok, shrink_cfg::BT)),
                  static_cast<unsigned>(cdiv(R, shrink_cfg::RT)));
  LK_LAUNCH(lora_shrink_kernel<T>, grid, shrink_cfg::NT, 0, stream,
            static_cast<const T*>(x), ldx, ntok, K, static_cast<const T*>(W), R, out, ldo, seed, p,
      inv_keep(p), vec_x, vec_w);
}

}  // namespace

void lora_shrink(const void* x, int64_t ldx, int64_t T, int64_t K, const void* W, int64_t R,
                 float* out, int64_t ldo, const int64_t* seed, float p, DType dtype, int device,
                 cudaStream_t stream) {
  static const char* name = "lora_shrink";
  check_dtype(dtype, name);
  check_p(p, seed, name);
  require(T >= 0 && K >= 0 && R >= 1, name, "need T >= 0, K >= 0, R >= 1");
  require(ldx >= K && ldo >= R, name, "leading dimensions must be >= the row lengths");
  require(cdiv(T, shrink_cfg::BT) < (int64_t{1} << 31) && cdiv(R, shrink_cfg::RT) <= 65535, name,
          "problem too large for one launch");
  if (T == 0) return;
  require(x != nullptr && W != nullptr && out != nullptr, name, "null pointer");
  DeviceGuard guard(device, name);
  LK_DISPATCH(dtype, launch_shrink, x, ldx, T, K, W, R, out, ldo, seed, p, stream);
  check_launch(name);
}

void dropout_keep_mask(const int64_t* seed, int64_t T, int64_t K, float p, uint8_t* out,
                       int device, cudaStream_t stream) {
  static const char* name = "dropout_keep_mask";
  check_p(p, seed, name);
  require(T >= 0 && K >= 0, name, "need T >= 0, K >= 0");
  const int64_t n = T * K;
  if (n == 0) return;
  require(out != nullptr, name, "null pointer");
  DeviceGuard guard(device, name);
  const int64_t blocks = cdiv(n, 256) < 65535 ? cdiv(n, 256) : 65535;
  LK_LAUNCH(dropout_keep_mask_kernel<>, static_cast<unsigned>(blocks), 256, 0, stream,
            seed, n, p, out);
  check_launch(name);
}

}  // namespace lk
