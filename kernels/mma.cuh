// Warp-level tensor-core helpers shared by the tensor-core kernels (kron_tc.cuh, gemm.cuh):
// mma.sync m16n8k16 with f16/bf16 operands and f32 accumulation (sm_80 and later), fragment loads
// from k-contiguous shared matrices, and the hi/lo split that keeps f32-level products.
// In the emulation build (kernels/emu.h) mma_bf16 runs on the CPU with the PTX ISA fragment layout.
#pragma once
#include <cstring>
#include <type_traits>

#include "common.cuh"

namespace camex {

// The tensor cores always multiply bf16 halves: bf16 has f32's exponent range, so the hi/lo split of
// an f32 value neither overflows (f16 stops at 65504) nor goes subnormal for small values such as
// gradients (f16's lo half would lose its bits below about 2^-3). f16 storage values are exact as
// bf16 hi + lo (11 <= 16 significant bits).
using MmaT = __nv_bfloat16;

template <typename T> struct is_half_type : std::false_type {};
template <> struct is_half_type<__half> : std::true_type {};
template <> struct is_half_type<__nv_bfloat16> : std::true_type {};

__host__ __device__ inline int tc_pad(int64_t k) { return (int)((k + 15) / 16 * 16); }
__host__ __device__ inline int tc_ld(int kp) { return kp + 8; }  // row stride: conflict-free fragments

// c += A B for one warp: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (the only form used:
// every operand is a bf16 half, see MmaT).
__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef CAMEX_EMU
  ::emu::mma_bf16(c, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <typename T> __device__ __forceinline__ uint32_t ld_pair(const T *p) {
  return *reinterpret_cast<const uint32_t *>(p);
}

// A fragment: rows m0..m0+15, k k0..k0+15 of a row-major [rows][ld] shared matrix.
template <typename T>
__device__ __forceinline__ void frag_a(uint32_t a[4], const T *s, int ld, int m0, int k0, int lane) {
  const T *p0 = s + (m0 + (lane >> 2)) * ld + k0 + 2 * (lane & 3);
  const T *p1 = p0 + 8 * ld;
  a[0] = ld_pair(p0);
  a[1] = ld_pair(p1);
  a[2] = ld_pair(p0 + 8);
  a[3] = ld_pair(p1 + 8);
}

// B fragment: k k0..k0+15, n n0..n0+7, where B[k][n] = s[n * ld + k] (k contiguous).
template <typename T>
__device__ __forceinline__ void frag_b(uint32_t b[2], const T *s, int ld, int n0, int k0, int lane) {
  const T *p = s + (n0 + (lane >> 2)) * ld + k0 + 2 * (lane & 3);
  b[0] = ld_pair(p);
  b[1] = ld_pair(p + 8);
}

// Splits v into hi = T(v) and lo = T(v - hi) (T = MmaT, bf16): hi + lo carries ~16 significant
// bits with f32's range, so its products with an exact factor lose nothing SPEC's tolerances see
// (its scalar gradients need it). An infinite v gives lo = NaN, so Inf inputs come out as NaN.
template <typename T> __device__ __forceinline__ void split_store(T *hi, T *lo, int64_t k, float v) {
  const T h = from_f32<T>(v);
  hi[k] = h;
  lo[k] = from_f32<T>(v - to_f32(h));
}

}  // namespace camex
