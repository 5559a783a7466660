// pybind11 module lora_kernels._C: a thin layer over the torch-free launchers in lora_kernels.h.
// Tensors cross as integers (t.data_ptr()), streams as torch.cuda.current_stream().cuda_stream,
// dtypes as 0/1/2 (float32/float16/bfloat16). Argument errors raise ValueError
// (std::invalid_argument); CUDA errors raise RuntimeError("<kernel>: <cuda error string>").
// Importing this module makes no CUDA call (the runtime is linked statically and initialises
// lazily), so it imports on machines without a GPU driver.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "lora_kernels.h"

namespace py = pybind11;

namespace {

template <typename P>
P ptr(uintptr_t v) {
  return reinterpret_cast<P>(v);
}

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

lk::DType dtype_of(int d) {
  if (d < 0 || d > 2) throw std::invalid_argument("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return static_cast<lk::DType>(d);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lora_kernels CUDA kernels (torch-free launchers; pointers and streams as integers)";
  m.attr("OPS") = py::make_tuple("lora_linear", "multi_lora_linear");
  m.attr("DTYPES") = py::make_tuple("float32", "float16", "bfloat16");
  m.def("compiled_archs", []() { return py::tuple(py::cast(lk::compiled_archs())); },
        "SM architectures the kernels were compiled for, e.g. (80, 90)");
  m.def("cuda_runtime_version", &lk::cuda_runtime_version,
        "CUDART_VERSION of the toolkit the module was built with (e.g. 13000)");

  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def(
      "lora_shrink",
      [](uintptr_t x, int64_t ldx, int64_t T, int64_t K, uintptr_t W, int64_t R, uintptr_t out,
         int64_t ldo, uintptr_t seed, float p, int dtype, int device, uintptr_t stream) {
        lk::lora_shrink(ptr<const void*>(x), ldx, T, K, ptr<const void*>(W), R, ptr<float*>(out),
                        ldo, ptr<const int64_t*>(seed), p, dtype_of(dtype), device,
                        stream_of(stream));
      },
      arg("x"), arg("ldx"), arg("T"), arg("K"), arg("W"), arg("R"), arg("out"), arg("ldo"),
      arg("seed"), arg("p"), arg("dtype"), arg("device"), arg("stream"), nogil,
      "out[t, j] (fp32) = sum_k drop(x)[t, k] W[j, k]; W (R, K) contiguous; seed: int64* or 0");

  m.def(
      "lora_expand",
      [](uintptr_t S, int64_t ldS, uintptr_t Bt, uintptr_t y, int64_t ldy, int64_t T, int64_t N,
         int64_t R, float scale, uintptr_t seed, float p, int dtype, int device,
         uintptr_t stream) {
        lk::lora_expand(ptr<const float*>(S), ldS, ptr<const void*>(Bt), ptr<void*>(y), ldy, T, N,
                        R, scale, ptr<const int64_t*>(seed), p, dtype_of(dtype), device,
                        stream_of(stream));
      },
      arg("S"), arg("ldS"), arg("Bt"), arg("y"), arg("ldy"), arg("T"), arg("N"), arg("R"),
      arg("scale"), arg("seed"), arg("p"), arg("dtype"), arg("device"), arg("stream"), nogil,
      "y[t, n] += scale * m(t, n) * sum_j S[t, j] Bt[j, n]; S fp32, Bt (R, N) contiguous");

  m.def(
      "grad_splits",
      [](int64_t T, int64_t RL, int64_t N, int device) { return lk::grad_splits(T, RL, N, device); },
      arg("T"), arg("RL"), arg("N"), arg("device"),
      "token splits of lora_grad_tn; its workspace is (splits, RL, grad_ldp(N)) fp32");
  m.def("grad_ldp", &lk::grad_ldp, arg("N"), "row stride of the lora_grad_tn workspace");

  m.def(
      "lora_grad_tn",
      [](uintptr_t L, int64_t ldl, uintptr_t Rm, int64_t ldr, int64_t T, int64_t RL, int64_t N,
         uintptr_t part, int64_t splits, uintptr_t seed, float p, int dtype, int device,
         uintptr_t stream) {
        lk::lora_grad_tn(ptr<const float*>(L), ldl, ptr<const void*>(Rm), ldr, T, RL, N,
                         ptr<float*>(part), splits, ptr<const int64_t*>(seed), p,
                         dtype_of(dtype), device, stream_of(stream));
      },
      arg("L"), arg("ldl"), arg("Rm"), arg("ldr"), arg("T"), arg("RL"), arg("N"), arg("part"),
      arg("splits"), arg("seed"), arg("p"), arg("dtype"), arg("device"), arg("stream"), nogil,
      "part[s, j, n] = sum_{t in split s} L[t, j] drop(Rm)[t, n] (fp32 partials)");

  m.def(
      "splitk_reduce",
      [](uintptr_t part, int64_t splits, int64_t RL, int64_t N, uintptr_t out, int64_t ldo,
         bool transpose, float scale, int dtype, int device, uintptr_t stream) {
        lk::splitk_reduce(ptr<const float*>(part), splits, RL, N, ptr<void*>(out), ldo, transpose,
                          scale, dtype_of(dtype), device, stream_of(stream));
      },
      arg("part"), arg("splits"), arg("RL"), arg("N"), arg("out"), arg("ldo"), arg("transpose"),
      arg("scale"), arg("dtype"), arg("device"), arg("stream"), nogil,
      "out = scale * sum_s part[s] ((RL, N), or (N, RL) if transpose), fixed summation order");

  m.def(
      "dropout_keep_mask",
      [](uintptr_t seed, int64_t T, int64_t K, float p, uintptr_t out, int device,
         uintptr_t stream) {
        lk::dropout_keep_mask(ptr<const int64_t*>(seed), T, K, p, ptr<uint8_t*>(out), device,
                              stream_of(stream));
      },
      arg("seed"), arg("T"), arg("K"), arg("p"), arg("out"), arg("device"), arg("stream"), nogil,
      "uint8 keep mask (T, K) of the kernels' dropout for seed and p");

  m.def(
      "multi_lora_decode",
      [](uintptr_t x, int64_t ldx, uintptr_t y, int64_t ldy, uintptr_t A, uintptr_t Bt,
         uintptr_t ranks, uintptr_t scalings, uintptr_t ids, bool ids_are_int64, int64_t T,
         int64_t K, int64_t N, int64_t max_rank, int64_t M, int dtype, int device,
         uintptr_t stream) {
        lk::multi_lora_decode(ptr<const void*>(x), ldx, ptr<void*>(y), ldy, ptr<const void*>(A),
                              ptr<const void*>(Bt), ptr<const int32_t*>(ranks),
                              ptr<const float*>(scalings), ptr<const void*>(ids), ids_are_int64, T,
                              K, N, max_rank, M, dtype_of(dtype), device, stream_of(stream));
      },
      arg("x"), arg("ldx"), arg("y"), arg("ldy"), arg("A"), arg("Bt"), arg("ranks"),
      arg("scalings"), arg("ids"), arg("ids_are_int64"), arg("T"), arg("K"), arg("N"),
      arg("max_rank"), arg("M"), arg("dtype"), arg("device"), arg("stream"), nogil,
      "y[t] += s_i (x[t] A_i^T) Bt_i per token, one kernel (decode)");

  m.def(
      "multi_lora_prefill",
      [](uintptr_t x, int64_t ldx, uintptr_t y, int64_t ldy, uintptr_t A, uintptr_t Bt,
         uintptr_t ranks, uintptr_t scalings, uintptr_t perm, uintptr_t seg_off, uintptr_t ws,
         int64_t T, int64_t K, int64_t N, int64_t max_rank, int64_t M, int dtype, int device,
         uintptr_t stream) {
        lk::multi_lora_prefill(ptr<const void*>(x), ldx, ptr<void*>(y), ldy, ptr<const void*>(A),
                               ptr<const void*>(Bt), ptr<const int32_t*>(ranks),
                               ptr<const float*>(scalings), ptr<const int64_t*>(perm),
                               ptr<const int64_t*>(seg_off), ptr<float*>(ws), T, K, N, max_rank,
                               M, dtype_of(dtype), device, stream_of(stream));
      },
      arg("x"), arg("ldx"), arg("y"), arg("ldy"), arg("A"), arg("Bt"), arg("ranks"),
      arg("scalings"), arg("perm"), arg("seg_off"), arg("ws"), arg("T"), arg("K"), arg("N"),
      arg("max_rank"), arg("M"), arg("dtype"), arg("device"), arg("stream"), nogil,
      "segmented y[perm[p]] += s_i (x[perm[p]] A_i^T) Bt_i over adapter runs (prefill)");
}
