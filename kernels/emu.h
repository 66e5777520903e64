// CPU emulation of the CUDA execution model, for checking the kernels' logic and counting what they
// execute where no GPU exists.
//
// Built only when build.rs sees CAMEX_KERNEL_EMU=1: kernels/*.cu are then compiled by the host C++
// compiler with -DCAMEX_EMU. Every launch runs its blocks one after another, each CUDA thread of a
// block a fiber that runs until it waits at __syncthreads() or the warp's mma.sync
// (kernels/emu_runtime.cpp); __shared__ variables become statics (one block at a time), and
// "device" pointers are host pointers. It checks indexing, tiling, reductions, selection and every launcher's
// orchestration, and fails a launch where the GPU would: a kernel thread's access off its natural
// alignment, an ldmatrix row or cp.async off 16 bytes or outside shared memory
// (cudaErrorMisalignedAddress), more dynamic shared memory than the device allows or than the
// kernel's opt-in covers (cudaErrorInvalidValue), one warp's lanes waiting at different warp
// collectives (mma, ldmatrix, __syncwarp: cudaErrorLaunchFailure). A block's threads take their turns between
// barriers in either order (camex_emu_thread_order), so a missing __syncthreads or __syncwarp shows
// as results that differ. It cannot show the memory model across blocks, occupancy or the real
// cudart (static __shared__ bytes against the opt-in: scripts/check-ptxas.sh checks those).
//
// Cost counters (camex_emu_counting, camex.h): the kernel sources are compiled with GCC's
// ThreadSanitizer instrumentation (-fsanitize=thread), which calls __tsan_readN/__tsan_writeN
// before every load and store left after optimisation (registers are free, as on the GPU). The
// runtime (kernels/emu_runtime.cpp, compiled WITHOUT instrumentation) defines those hooks itself (no
// sanitizer library is linked) and, while counting, logs each access of a kernel thread with its
// instruction address; at the end of each block the 32 lanes of every warp are matched instruction
// by instruction into warp-wide accesses, and shared-memory wavefronts (bank by bank) and global
// sectors are counted from their addresses. Tensor-core work is counted at the emulated mma.
// Everything the runtime itself does (threads, barriers, the mma emulation) lives in that second
// translation unit, so it is neither instrumented nor counted.
#pragma once

#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace emu {

// ---- kernels/emu_runtime.cpp (not instrumented) ----
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void syncthreads();
// __syncwarp(): the warp's lanes wait for each other (the full mask only).
void syncwarp();
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 on one warp, PTX ISA fragment layout.
void mma_bf16(float c[4], const uint32_t a[4], const uint32_t b[2]);
// ldmatrix.sync.aligned.m8n8.x{num}[.trans].shared.b16 on one warp (kernels/ldst.cuh).
void ldmatrix(uint32_t *d, int num, bool trans, const void *row);
// cp.async of `bytes` (src_bytes of them read, the rest zero), executed at the wait covering it.
void cp_async(void *dst, const void *src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
// The block's dynamic shared memory (one buffer: blocks run one at a time).
char *dyn_smem();
unsigned atomic_add(unsigned *p, unsigned v);
// Runs `body(ctx)` for the blocks of grid g (all of them, or the sampled ones while counting with
// sampling), each as b real threads. `kernel`: the launch's kernel expression (counter records);
// `smem`: its dynamic shared memory in bytes; `whole`: never sampled (CAMEX_LAUNCH_WHOLE).
// fn: the kernel function, whose opt-in (set_max_smem) a launch of more than 48 KiB of dynamic
// shared memory needs, as on the GPU.
void run(dim3 g, dim3 b, const char *kernel, const void *fn, int64_t smem, void (*body)(void *), void *ctx,
         bool whole = false);
// cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): refused above
// smem_limit(); else recorded for fn's launches.
cudaError_t set_max_smem(const void *fn, int64_t bytes);
// Whether the cost counters are on (camex_emu_counting): launchers then size their work as the GPU
// build does, where the tests' sizes differ (kron_tc.cuh's Z budget).
bool counting();
// The emulated device's opt-in shared memory per block for the calling thread
// (camex_emu_smem_limit): sm_90's 227 KiB unless a test sets another.
int64_t smem_limit();
// The error of this thread's last launch (a launch asking for more dynamic shared memory than
// smem_limit() fails without running, as cudaLaunchKernel does), cleared by reading it.
cudaError_t take_launch_error();

template <class... P> struct Launcher {
  void (*kernel)(P...);
  dim3 g, b;
  const char *name;
  int64_t smem;
  bool whole;
  template <class... A> void operator()(A &&...args) const {
    auto k = kernel;
    auto call = [&] { k(args...); };
    run(g, b, name, reinterpret_cast<const void *>(kernel), smem,
        [](void *c) { (*static_cast<decltype(call) *>(c))(); }, &call, whole);
  }
};

template <class... P>
Launcher<P...> launcher(void (*k)(P...), dim3 g, dim3 b, const char *name, int64_t smem, bool whole = false) {
  return Launcher<P...>{k, g, b, name, smem, whole};
}

inline cudaError_t get_last_error() { return take_launch_error(); }
inline cudaError_t memcpy_async(void *dst, const void *src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t memset_async(void *dst, int v, size_t bytes, cudaStream_t) {
  std::memset(dst, v, bytes);
  return cudaSuccess;
}

// No CUDA runtime is linked: launchers return cudaSuccess, a launch's cudaErrorInvalidValue (too
// much shared memory) or camex's own codes here.
inline const char *error_name(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaError (emulation build)"; }
inline const char *error_string(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "CUDA runtime error (the emulation build has no CUDA runtime)";
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define CAMEX_LAUNCH(kernel, grid, block, stream) ::emu::launcher(kernel, dim3(grid), dim3(block), #kernel, 0)
#define CAMEX_LAUNCH_SMEM(kernel, grid, block, smem, stream) \
  ::emu::launcher(kernel, dim3(grid), dim3(block), #kernel, (int64_t)(smem))
#define CAMEX_LAUNCH_WHOLE(kernel, grid, block, stream) \
  ::emu::launcher(kernel, dim3(grid), dim3(block), #kernel, 0, true)
#define CAMEX_DYNAMIC_SMEM(name) char *name = ::emu::dyn_smem()
#define CAMEX_SET_MAX_SMEM(kernel, bytes) ::emu::set_max_smem(reinterpret_cast<const void *>(kernel), (int64_t)(bytes))
#define cudaGetLastError() ::emu::get_last_error()
#define cudaGetErrorName(e) ::emu::error_name(e)
#define cudaGetErrorString(e) ::emu::error_string(e)
#define cudaMemcpyAsync(...) ::emu::memcpy_async(__VA_ARGS__)
#define cudaMemsetAsync(...) ::emu::memset_async(__VA_ARGS__)

inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::emu::syncwarp(); }
// Blocks run one at a time, each to its end: every write of an earlier block is seen.
inline void __threadfence() {}
inline unsigned atomicAdd(unsigned *p, unsigned v) { return ::emu::atomic_add(p, v); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
