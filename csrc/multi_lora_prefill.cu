// Multi-adapter prefill (segmented): tokens sorted by adapter (perm, seg_off built on device by
// the caller, no host sync), then
//   1. seg_shrink: S[p, :r_i] = x[perm[p]] A_i^T for the sorted positions p of adapter i (fp32 ws)
//   2. seg_expand: y[perm[p]] += s_i * S[p, :r_i] Bt_i
// Both reuse the LoRA tiles (tiles.cuh). The grid is an upper bound on the number of
// (adapter, token tile) pairs, ceil(T / BT) + min(M, T); each block finds its pair with a warp
// scan over the segment lengths and surplus blocks exit, so no host-side tile list is needed.
#include "host.cuh"
#include "multi_lora.cuh"

namespace lk {
namespace {

template <typename T>
void launch_prefill(const void* x, int64_t ldx, void* y, int64_t ldy, const void* A,
                    const void* Bt, const int32_t* ranks, const float* scalings,
                    const int64_t* perm, const int64_t* seg_off, float* ws, int64_t ntok,
                    int64_t K, int64_t N, int64_t max_rank, int64_t M, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t segs = M < ntok ? M : ntok;  // at most this many non-empty segments
  {
    const bool vec_x = K % VEC == 0 && ldx % VEC == 0 && aligned(x, 16);
    const bool vec_w = K % VEC == 0 && aligned(A, 16);
    const dim3 grid(static_cast<unsigned>(cdiv(ntok, shrink_cfg::BT) + segs),
                    static_cast<unsigned>(cdiv(max_rank, shrink_cfg::RT)));
    LK_LAUNCH(seg_shrink_kernel<T>, grid, shrink_cfg::NT, 0, stream,
            static_cast<const T*>(x), ldx, static_cast<const T*>(A), ranks, perm, seg_off, ws, K,
        max_rank, M, vec_x, vec_w);
    check_launch("multi_lora_prefill (seg_shrink)");
  }
  {
    const bool vec_b = N % VEC == 0 && aligned(Bt, 16);
    const bool vec_ws = max_rank % 4 == 0 && aligned(ws, 16);
    const bool vec_y = N % 4 == 0 && ldy % 4 == 0 && aligned(y, 4 * sizeof(T));
    const dim3 grid(static_cast<unsigned>(cdiv(ntok, expand_cfg::BT) + segs),
                    static_cast<unsigned>(cdiv(N, expand_cfg::BN)));
    LK_LAUNCH(seg_expand_kernel<T>, grid, expand_cfg::NT, 0, stream,
            static_cast<T*>(y), ldy, static_cast<const T*>(Bt), ranks, scalings, perm, seg_off, ws, N,
        max_rank, M, vec_ws, vec_b, vec_y);
    check_launch("multi_lora_prefill (seg_expand)");
  }
}

}  // namespace

void multi_lora_prefill(const void* x, int64_t ldx, void* y, int64_t ldy, const void* A,
                        const void* Bt, const int32_t* ranks, const float* scalings,
                        const int64_t* perm, const int64_t* seg_off, float* ws, int64_t T,
                        int64_t K, int64_t N, int64_t max_rank, int64_t M, DType dtype,
                        int device, cudaStream_t stream) {
  static const char* name = "multi_lora_prefill";
  check_dtype(dtype, name);
  require(T >= 0 && K >= 0 && N >= 0 && max_rank >= 1 && M >= 1, name,
          "need T, K, N >= 0 and max_rank, max_adapters >= 1");
  require(ldx >= K && ldy >= N, name, "leading dimensions must be >= the row lengths");
  // grid.x of both launches is ceil(T / BT) + min(M, T): bound it with seg_expand's tile, the
  // smaller one (32 vs 64 tokens), whose grid is the larger (gridDim.x <= 2^31 - 1).
  static_assert(expand_cfg::BT <= shrink_cfg::BT, "seg_expand must have the larger grid");
  require(cdiv(T, expand_cfg::BT) + (M < T ? M : T) < (int64_t{1} << 31) &&
              cdiv(max_rank, shrink_cfg::RT) <= 65535 && cdiv(N, expand_cfg::BN) <= 65535,
          name, "problem too large for one launch");
  if (T == 0 || N == 0) return;
  require(x != nullptr && y != nullptr && A != nullptr && Bt != nullptr && ranks != nullptr &&
              scalings != nullptr && perm != nullptr && seg_off != nullptr && ws != nullptr,
          name, "null pointer");
  DeviceGuard guard(device, name);
  LK_DISPATCH(dtype, launch_prefill, x, ldx, y, ldy, A, Bt, ranks, scalings, perm, seg_off, ws, T,
              K, N, max_rank, M, stream);
}

}  // namespace lk
