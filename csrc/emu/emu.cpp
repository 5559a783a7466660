// Host stand-ins for the CUDA runtime calls the launchers make, for the CPU emulation build.
// EMU_SMS (env) sets the SM count the launchers see (default 4), to vary split/slice choices.
#include <cstdlib>

#include "emu.h"

extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  const char* env = std::getenv("EMU_SMS");
  *value = env ? std::atoi(env) : 4;
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
}
