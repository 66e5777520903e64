// CPU emulation of the CUDA execution model, for checking the kernels' logic where no GPU exists.
//
// Built only when build.rs sees CAMEX_KERNEL_EMU=1: kernels/*.cu are then compiled by the host C++
// compiler with -DCAMEX_EMU. Every launch runs its blocks one after another, each block as
// blockDim real threads (std::thread) that meet at __syncthreads() on a std::barrier; __shared__
// variables become statics (one block at a time), atomics are real atomics, and "device" pointers
// are host pointers. It checks indexing, tiling, reductions, selection and every launcher's
// orchestration; it cannot show GPU-only problems (memory model, occupancy, speed, real cudart).
#pragma once

#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace emu {

inline thread_local uint3 t_idx;
inline thread_local uint3 b_idx;
// Per worker thread: launches of concurrent host threads (parallel tests) stay independent.
inline thread_local dim3 b_dim, g_dim;
inline thread_local std::barrier<> *block_barrier = nullptr;

// One launch at a time in the whole process: __shared__ variables are statics, so two concurrent
// launches of one kernel (from parallel tests) would share them.
inline std::mutex launch_mutex;

inline void run(dim3 g, dim3 b, const std::function<void()> &body) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  const unsigned nt = b.x * b.y * b.z;
  std::barrier<> bar((std::ptrdiff_t)nt);
  std::vector<std::thread> threads;
  threads.reserve(nt);
  for (unsigned t = 0; t < nt; ++t) {
    threads.emplace_back([&, t] {
      t_idx = make_uint3(t % b.x, (t / b.x) % b.y, t / (b.x * b.y));
      g_dim = g;
      b_dim = b;
      block_barrier = &bar;
      for (unsigned z = 0; z < g.z; ++z)
        for (unsigned y = 0; y < g.y; ++y)
          for (unsigned x = 0; x < g.x; ++x) {
            b_idx = make_uint3(x, y, z);
            body();
            bar.arrive_and_wait();  // the next block starts when every thread has left this one
          }
    });
  }
  for (auto &th : threads) th.join();
}

template <class... P> struct Launcher {
  void (*kernel)(P...);
  dim3 g, b;
  template <class... A> void operator()(A &&...args) const {
    auto k = kernel;
    run(g, b, [&] { k(args...); });
  }
};

template <class... P> Launcher<P...> launcher(void (*k)(P...), dim3 g, dim3 b) { return Launcher<P...>{k, g, b}; }

inline cudaError_t get_last_error() { return cudaSuccess; }
inline cudaError_t memcpy_async(void *dst, const void *src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t memset_async(void *dst, int v, size_t bytes, cudaStream_t) {
  std::memset(dst, v, bytes);
  return cudaSuccess;
}

}  // namespace emu

#define threadIdx (::emu::t_idx)
#define blockIdx (::emu::b_idx)
#define blockDim (::emu::b_dim)
#define gridDim (::emu::g_dim)
#define CAMEX_LAUNCH(kernel, grid, block, stream) ::emu::launcher(kernel, dim3(grid), dim3(block))
#define cudaGetLastError() ::emu::get_last_error()
#define cudaMemcpyAsync(...) ::emu::memcpy_async(__VA_ARGS__)
#define cudaMemsetAsync(...) ::emu::memset_async(__VA_ARGS__)

inline void __syncthreads() { ::emu::block_barrier->arrive_and_wait(); }
inline unsigned atomicAdd(unsigned *p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
