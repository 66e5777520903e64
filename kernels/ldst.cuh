// Shared-memory data movement for the tensor-core kernels (sm_80 and later): ldmatrix (with .trans)
// fragment loads and cp.async global -> shared copies in commit groups. In the emulation build
// (kernels/emu.h) both run in kernels/emu_runtime.cpp: ldmatrix as a warp collective with the PTX
// ISA fragment layout, cp.async deferred until the wait that covers it (so a missing wait reads
// stale shared memory every time), and both counted as the hardware serves them (ldmatrix: one
// 128-byte phase per 8x8 matrix; cp.async: a 16-byte global read and shared write per lane).
#pragma once
#include "common.cuh"

namespace camex {

// The 32-bit shared-state-space address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void *p) {
#ifdef CAMEX_EMU
  return 0;  // unused: the emulation takes the generic pointer
#else
  return (uint32_t)__cvta_generic_to_shared(p);
#endif
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses (16 bytes
// each) of matrix i; d[i] gets this lane's pair of matrix i: (row lane/4, columns 2(lane%4), +1),
// or with TRANS (rows 2(lane%4), +1, column lane/4); the lower-indexed element in the low 16 bits.
template <bool TRANS> __device__ __forceinline__ void ldmatrix_x4(uint32_t d[4], const void *row) {
#ifdef CAMEX_EMU
  ::emu::ldmatrix(d, 4, TRANS, row);
#else
  const uint32_t a = smem_addr(row);
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(a));
#endif
}

// The same for two matrices (lanes 0..15 give the row addresses).
template <bool TRANS> __device__ __forceinline__ void ldmatrix_x2(uint32_t d[2], const void *row) {
#ifdef CAMEX_EMU
  ::emu::ldmatrix(d, 2, TRANS, row);
#else
  const uint32_t a = smem_addr(row);
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(d[0]), "=r"(d[1]) : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(d[0]), "=r"(d[1]) : "r"(a));
#endif
}

// cp.async.cg.shared.global of 16 bytes; the last 16 - src_bytes bytes are zero-filled (src_bytes
// 0 writes zeros and reads nothing: the edge tiles' padding).
__device__ __forceinline__ void cp_async_16(void *smem, const void *gmem, int src_bytes = 16) {
#ifdef CAMEX_EMU
  ::emu::cp_async(smem, gmem, 16, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes));
#endif
}

// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef CAMEX_EMU
  ::emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed groups are pending (the newest N); the copies
// then are visible to this thread, and to the block after a __syncthreads().
template <int N> __device__ __forceinline__ void cp_async_wait() {
#ifdef CAMEX_EMU
  ::emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

}  // namespace camex
