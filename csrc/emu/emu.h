// CPU emulation of the CUDA execution model, force-included (g++ -include emu.h -DLK_EMULATE) when
// the csrc/ sources are compiled as plain C++ for tests/test_cuda_build.py. It runs every kernel
// launch synchronously on the host: one std::thread per CUDA thread of a block, blocks one after
// another, __syncthreads as a block-wide std::barrier, warp shuffles through a per-warp exchange
// buffer and barrier. Pointers are host pointers.
//
// What it checks: indexing, bounds and tails, vector vs scalar paths, tile/segment/split logic,
// the dropout RNG, shared-memory reuse across __syncthreads (a thread that skips a barrier its
// block takes aborts the run). What it cannot check: anything about real GPU execution (memory
// alignment faults, the memory model beyond barriers, performance, compiler codegen for sm_80/90).
#pragma once

#ifndef LK_EMULATE
#error "emu.h is only for the CPU emulation build (-DLK_EMULATE)"
#endif

#define __shared__ static
#include <cuda_runtime.h>  // host-side types only: dim3, uint3, float4, uint4, cudaError_t

#include <math.h>  // fmaf

#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace emu {

struct Ctx {
  dim3 grid, block;
  unsigned nthreads = 0;
  std::unique_ptr<std::barrier<>> block_bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<uint64_t> slots;          // one shuffle slot per thread
  std::vector<unsigned long> syncs;     // __syncthreads calls per thread in the current block
  std::vector<float4> dyn;              // dynamic shared memory (16-byte aligned)
};

inline Ctx*& ctx() {
  static Ctx* c = nullptr;
  return c;
}
inline thread_local uint3 tl_thread{0, 0, 0};
inline thread_local uint3 tl_block{0, 0, 0};

inline void syncthreads() {
  Ctx* c = ctx();
  ++c->syncs[tl_thread.x];
  c->block_bar->arrive_and_wait();
}

template <typename T>
inline T shfl(T v, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a wide type");
  Ctx* c = ctx();
  const unsigned tid = tl_thread.x, w = tid / 32;
  std::memcpy(&c->slots[tid], &v, sizeof(T));
  c->warp_bars[w]->arrive_and_wait();
  T r;
  std::memcpy(&r, &c->slots[w * 32 + static_cast<unsigned>(src_lane)], sizeof(T));
  c->warp_bars[w]->arrive_and_wait();
  return r;
}

inline void* dyn_smem() { return ctx()->dyn.data(); }

// Runs f() for every block of `grid` with block.x threads (1-D blocks), synchronously.
template <class F>
void launch(dim3 grid, dim3 block, size_t smem, F&& f) {
  if (block.y != 1 || block.z != 1 || block.x % 32 != 0 || block.x == 0) {
    std::fprintf(stderr, "emu: only 1-D blocks of whole warps are emulated\n");
    std::abort();
  }
  Ctx c;
  c.grid = grid;
  c.block = block;
  c.nthreads = block.x;
  c.block_bar = std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(block.x));
  for (unsigned w = 0; w < block.x / 32; ++w) c.warp_bars.push_back(std::make_unique<std::barrier<>>(32));
  c.slots.assign(block.x, 0);
  c.syncs.assign(block.x, 0);
  c.dyn.assign(smem / sizeof(float4) + 1, float4{});
  Ctx* prev = ctx();
  ctx() = &c;
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned t = 0; t < block.x; ++t) {
    threads.emplace_back([&c, &f, t]() {
      tl_thread = uint3{t, 0, 0};
      for (unsigned z = 0; z < c.grid.z; ++z)
        for (unsigned y = 0; y < c.grid.y; ++y)
          for (unsigned x = 0; x < c.grid.x; ++x) {
            tl_block = uint3{x, y, z};
            f();
            const unsigned long mine = c.syncs[t];
            c.block_bar->arrive_and_wait();  // end of block: everyone has finished it
            if (c.syncs[t] != c.syncs[0] || mine != c.syncs[t]) {
              std::fprintf(stderr, "emu: block (%u,%u,%u): threads took different numbers of "
                           "__syncthreads\n", x, y, z);
              std::abort();
            }
            c.block_bar->arrive_and_wait();
            c.syncs[t] = 0;
            c.block_bar->arrive_and_wait();
          }
    });
  }
  for (auto& th : threads) th.join();
  ctx() = prev;
}

}  // namespace emu

// ---- CUDA built-ins for the kernels
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx (::emu::tl_thread)
#define blockIdx (::emu::tl_block)
#define blockDim (::emu::ctx()->block)
#define gridDim (::emu::ctx()->grid)
inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  (void)::emu::shfl<int>(0, static_cast<int>(::emu::tl_thread.x % 32));
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
  return ::emu::shfl(v, static_cast<int>(::emu::tl_thread.x % 32) ^ o);
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned d) {
  const int lane = static_cast<int>(::emu::tl_thread.x % 32);
  return ::emu::shfl(v, lane >= static_cast<int>(d) ? lane - static_cast<int>(d) : lane);
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src) {
  return ::emu::shfl(v, src & 31);
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}

#define LK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::emu::launch(dim3(grid), dim3(block), (smem), [&]() { kernel(__VA_ARGS__); })
#define LK_DYN_SMEM(type, name) type* name = reinterpret_cast<type*>(::emu::dyn_smem())
