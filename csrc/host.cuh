// Host-side helpers shared by the launchers: argument checks, error checks, device selection,
// dtype dispatch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "lora_kernels.h"

namespace lk {

[[noreturn]] inline void fail_arg(const char* fn, const std::string& what) {
  throw std::invalid_argument(std::string(fn) + ": " + what);
}

inline void require(bool ok, const char* fn, const char* what) {
  if (!ok) fail_arg(fn, what);
}

// Throws "<name>: <cuda error string>" if the last runtime call or launch failed.
inline void check_cuda(cudaError_t e, const char* name) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(std::string(name) + ": " + cudaGetErrorString(e));
  }
}
inline void check_launch(const char* name) { check_cuda(cudaGetLastError(), name); }

// Makes `device` current for the launch (this module links its own static CUDA runtime, whose
// current device need not match the caller's) and restores the previous one afterwards.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* name) {
    check_cuda(cudaGetDevice(&prev_), name);
    if (prev_ != device) {
      check_cuda(cudaSetDevice(device), name);
    } else {
      prev_ = -1;
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

inline int sm_count(int device, const char* name) {
  static int cache[128] = {0};
  if (device >= 0 && device < 128 && cache[device] > 0) return cache[device];
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), name);
  if (device >= 0 && device < 128) cache[device] = n;
  return n;
}

inline bool aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}

inline int dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

inline void check_dtype(DType d, const char* fn) {
  const int v = static_cast<int>(d);
  if (v < 0 || v > 2) fail_arg(fn, "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
}

inline float inv_keep(float p) { return p > 0.f ? 1.f / (1.f - p) : 1.f; }

inline void check_p(float p, const int64_t* seed, const char* fn) {
  if (!(p >= 0.f && p < 1.f)) fail_arg(fn, "dropout p must be in [0, 1)");
  if (p > 0.f && seed == nullptr) fail_arg(fn, "dropout p > 0 needs a seed pointer");
}

}  // namespace lk

// Calls F<T>(args...) for the runtime dtype; F is a template functor name.
#define LK_DISPATCH(dtype, FN, ...)                         \
  do {                                                      \
    switch (dtype) {                                        \
      case ::lk::DType::F32:                                \
        FN<float>(__VA_ARGS__);                             \
        break;                                              \
      case ::lk::DType::F16:                                \
        FN<__half>(__VA_ARGS__);                            \
        break;                                              \
      case ::lk::DType::BF16:                               \
        FN<__nv_bfloat16>(__VA_ARGS__);                     \
        break;                                              \
    }                                                       \
  } while (0)
