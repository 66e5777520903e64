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
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace emu {

inline thread_local uint3 t_idx;
inline thread_local uint3 b_idx;
// Per worker thread: launches of concurrent host threads (parallel tests) stay independent.
inline thread_local dim3 b_dim, g_dim;
inline thread_local std::barrier<> *block_barrier = nullptr;

// Warp-level collectives (mma.sync): each warp's 32 lanes exchange fragments through this and meet
// at its own barrier. Only kernels whose block size is a multiple of 32 may use them.
struct Warp {
  std::barrier<> bar{32};
  uint32_t a[32][4];
  uint32_t b[32][2];
};
inline thread_local Warp *t_warp = nullptr;
inline thread_local unsigned t_lane = 0;

// Dynamic shared memory: one buffer, since blocks run one at a time.
inline char *dyn_smem() {
  alignas(16) static char buf[256 * 1024];
  return buf;
}

// One launch at a time in the whole process: __shared__ variables are statics, so two concurrent
// launches of one kernel (from parallel tests) would share them.
inline std::mutex launch_mutex;

inline void run(dim3 g, dim3 b, const std::function<void()> &body) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  const unsigned nt = b.x * b.y * b.z;
  std::barrier<> bar((std::ptrdiff_t)nt);
  std::vector<std::unique_ptr<Warp>> warps;
  for (unsigned w = 0; w < nt / 32; ++w) warps.push_back(std::make_unique<Warp>());
  std::vector<std::thread> threads;
  threads.reserve(nt);
  for (unsigned t = 0; t < nt; ++t) {
    threads.emplace_back([&, t] {
      t_idx = make_uint3(t % b.x, (t / b.x) % b.y, t / (b.x * b.y));
      t_warp = t / 32 < warps.size() ? warps[t / 32].get() : nullptr;
      t_lane = t % 32;
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

inline float bf16_bits_to_f32(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: D = A B + C on one warp, with the fragment
// layout of the PTX ISA (groupID g = lane / 4, t = lane % 4; the lower-indexed element of a pair in
// the low 16 bits): A a0:(g, 2t..2t+1) a1:(g+8, 2t..) a2:(g, 2t+8..) a3:(g+8, 2t+8..);
// B b0:(k 2t..2t+1, n g) b1:(k 2t+8.., n g); C c0,c1:(g, 2t..2t+1) c2,c3:(g+8, 2t..2t+1).
inline void mma_bf16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  Warp &w = *t_warp;
  const unsigned lane = t_lane;
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  w.b[lane][0] = b[0];
  w.b[lane][1] = b[1];
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned g = l >> 2, t = l & 3;
    auto put = [&](float(*m)[16], unsigned r, unsigned col, uint32_t v) {
      m[r][col] = bf16_bits_to_f32((uint16_t)(v & 0xffff));
      m[r][col + 1] = bf16_bits_to_f32((uint16_t)(v >> 16));
    };
    put(A, g, 2 * t, w.a[l][0]);
    put(A, g + 8, 2 * t, w.a[l][1]);
    put(A, g, 2 * t + 8, w.a[l][2]);
    put(A, g + 8, 2 * t + 8, w.a[l][3]);
    B[2 * t][g] = bf16_bits_to_f32((uint16_t)(w.b[l][0] & 0xffff));
    B[2 * t + 1][g] = bf16_bits_to_f32((uint16_t)(w.b[l][0] >> 16));
    B[2 * t + 8][g] = bf16_bits_to_f32((uint16_t)(w.b[l][1] & 0xffff));
    B[2 * t + 9][g] = bf16_bits_to_f32((uint16_t)(w.b[l][1] >> 16));
  }
  w.bar.arrive_and_wait();  // every lane has read the fragments before any lane writes new ones
  const unsigned g = lane >> 2, t = lane & 3;
  const unsigned rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int i = 0; i < 4; ++i) {
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc = std::fma(A[rows[i]][k], B[k][cols[i]], acc);
    c[i] = acc;
  }
}

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
#define CAMEX_LAUNCH_SMEM(kernel, grid, block, smem, stream) ::emu::launcher(kernel, dim3(grid), dim3(block))
#define CAMEX_DYNAMIC_SMEM(name) char *name = ::emu::dyn_smem()
#define CAMEX_SET_MAX_SMEM(kernel, bytes) cudaSuccess
#define cudaGetLastError() ::emu::get_last_error()
#define cudaMemcpyAsync(...) ::emu::memcpy_async(__VA_ARGS__)
#define cudaMemsetAsync(...) ::emu::memset_async(__VA_ARGS__)

inline void __syncthreads() { ::emu::block_barrier->arrive_and_wait(); }
inline unsigned atomicAdd(unsigned *p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
