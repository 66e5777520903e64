// Shared device helpers: storage <-> f32 conversion, dtype dispatch, launch checking, and a
// fixed-order block reduction. Every reduction in camex accumulates in f32 and combines partial
// sums in an order fixed by the launch shape, never by timing: no float atomics anywhere.
#pragma once

#ifdef CAMEX_EMU
// CPU emulation build (kernels/emu.h): the same sources compiled by a host C++ compiler.
#include "emu.h"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "camex.h"

namespace camex {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
// Round to nearest even, as half::f16::from_f32 / half::bf16::from_f32 on the CPU side.
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T> __device__ __forceinline__ float ld(const T *p, int64_t k) { return to_f32(p[k]); }
template <typename T> __device__ __forceinline__ void st(T *p, int64_t k, float v) { p[k] = from_f32<T>(v); }

template <typename T> __host__ __device__ inline T *ptr(uint64_t p) { return reinterpret_cast<T *>(p); }

// Two consecutive elements (the first at an even index of a row that starts aligned) as one access.
template <typename T> __device__ __forceinline__ bool aligned_pair(const T *p) {
  return (reinterpret_cast<uintptr_t>(p) & (2 * sizeof(T) - 1)) == 0;
}
__device__ __forceinline__ void load_pair(const float *p, float v[2]) {
  const float2 x = *reinterpret_cast<const float2 *>(p);
  v[0] = x.x;
  v[1] = x.y;
}
template <typename T> __device__ __forceinline__ void load_pair(const T *p, float v[2]) {
  static_assert(sizeof(T) == 2, "16-bit storage");
  const uint32_t x = *reinterpret_cast<const uint32_t *>(p);
  T h[2];
  memcpy(h, &x, 4);
  v[0] = to_f32(h[0]);
  v[1] = to_f32(h[1]);
}
__device__ __forceinline__ void store_pair(float *p, const float v[2]) {
  *reinterpret_cast<float2 *>(p) = make_float2(v[0], v[1]);
}
template <typename T> __device__ __forceinline__ void store_pair(T *p, const float v[2]) {
  static_assert(sizeof(T) == 2, "16-bit storage");
  const T h[2] = {from_f32<T>(v[0]), from_f32<T>(v[1])};
  uint32_t x;
  memcpy(&x, h, 4);
  *reinterpret_cast<uint32_t *>(p) = x;
}

// sgn with sgn(0) = 0 and sgn(NaN) = NaN (SPEC section 3), as Float::sgn on the CPU.
__device__ __forceinline__ float sgnf(float v) {
  if (v != v) return v;
  return v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f);
}

// Grid-stride loop bounds: enough blocks to fill the GPU, capped so gridDim.x stays small.
inline unsigned grid_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  if (b > 65535 * 8) b = 65535 * 8;
  if (b < 1) b = 1;
  return (unsigned)b;
}

// Sum of `v` over a block of exactly BLOCK threads, in a fixed tree order; result in thread 0.
template <int BLOCK> __device__ __forceinline__ float block_sum(float v, float *smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int s = BLOCK / 2; s > 0; s >>= 1) {
    if ((int)threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];
    __syncthreads();
  }
  float r = smem[0];
  __syncthreads();
  return r;
}

// A bump allocator over the caller's workspace; offsets are aligned to 256 bytes.
struct Arena {
  char *base;
  int64_t used;
  // Bytes a piece of `bytes` takes (its start to the next piece's).
  static int64_t piece(int64_t bytes) { return (bytes + 255) / 256 * 256; }
  // Every piece starts 256-byte aligned, also after raw byte counts added to `used` (the
  // kernels' vector accesses and whole 32-byte sectors depend on it).
  template <typename U> U *take(int64_t count) {
    used = piece(used);
    U *p = reinterpret_cast<U *>(base ? base + used : nullptr);
    used += piece(count * (int64_t)sizeof(U));
    return p;
  }
};

}  // namespace camex

// Kernel launch: CAMEX_LAUNCH(kernel, grid, block, stream)(args...). In the emulation build it
// runs the kernel on the CPU (emu.h); otherwise it is the usual triple-chevron launch.
#ifndef CAMEX_EMU
#define CAMEX_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#define CAMEX_LAUNCH_SMEM(kernel, grid, block, smem, stream) kernel<<<(grid), (block), (smem), (stream)>>>
// A launch whose blocks do unequal work over a flat index space (the reductions of per-block
// partials): the same launch; the emulation's cost counters run every block of it, not a sample.
#define CAMEX_LAUNCH_WHOLE(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
// The block's dynamic shared memory, as `char *name` (16-byte aligned).
#define CAMEX_DYNAMIC_SMEM(name) extern __shared__ __align__(16) char name[]
// Opt-in above 48 KB of dynamic shared memory (sm_80: up to 163 KB, sm_90: 227 KB). The runtime
// refuses an opt-in whose sum with the kernel's static __shared__ bytes exceeds the device's limit,
// and the launchers opt in to the whole limit: scripts/check-ptxas.sh keeps static shared memory
// out of every kernel named here. A refusal is returned, and cleared from the runtime's last-error
// slot so that the next op's CAMEX_CHECK_LAUNCH does not report it again.
namespace camex {
inline cudaError_t set_max_dynamic_smem(const void *kernel, int64_t bytes) {
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  if (e != cudaSuccess) (void)cudaGetLastError();
  return e;
}
// An attribute of the current device, or `fallback` where the runtime does not say (its error
// cleared: the fallback stands, and no later check should report it).
inline int device_attribute(cudaDeviceAttr attr, int fallback) {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, attr, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return fallback;
  }
  return v;
}
}  // namespace camex
#define CAMEX_SET_MAX_SMEM(kernel, bytes) ::camex::set_max_dynamic_smem((const void *)(kernel), (int64_t)(bytes))
#endif

// Returns from the launcher on the first failed launch (error code of cudaGetLastError).
#define CAMEX_CHECK_LAUNCH()                          \
  do {                                                \
    cudaError_t camex_e_ = cudaGetLastError();        \
    if (camex_e_ != cudaSuccess) return (int)camex_e_; \
  } while (0)

// A CUDA runtime call whose error the launcher returns: cleared from the runtime's last-error slot
// too (a failing call also sets it), so that the next op's CAMEX_CHECK_LAUNCH does not report it.
#define CAMEX_TRY_RT(expr)                      \
  do {                                          \
    cudaError_t camex_e_ = (expr);              \
    if (camex_e_ != cudaSuccess) {              \
      (void)cudaGetLastError();                 \
      return (int)camex_e_;                     \
    }                                           \
  } while (0)

#define CAMEX_TRY(expr)        \
  do {                         \
    int camex_r_ = (expr);     \
    if (camex_r_ != 0) return camex_r_; \
  } while (0)

// Calls FN<T>(args...) with T the storage type of `dtype`.
#define CAMEX_DISPATCH(dtype, FN, ...)                                   \
  switch (dtype) {                                                       \
    case CAMEX_F32: return FN<float>(__VA_ARGS__);                       \
    case CAMEX_F16: return FN<__half>(__VA_ARGS__);                      \
    case CAMEX_BF16: return FN<__nv_bfloat16>(__VA_ARGS__);              \
    default: return CAMEX_ERR_DIMS;                                      \
  }
