// Build facts reported by lora_kernels._C.compiled_archs() / cuda_runtime_version().
#include <cuda_runtime_api.h>

#include "lora_kernels.h"

namespace lk {

std::vector<int> compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  // nvcc defines this in host code too: the virtual architectures of this compilation
  // (e.g. 800,900), the same for every .cu file of the module (one CMake arch list).
  const std::vector<int> raw = {__CUDA_ARCH_LIST__};
  std::vector<int> out;
  for (int a : raw) out.push_back(a / 10);
  return out;
#else
  return {};
#endif
}

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace lk
