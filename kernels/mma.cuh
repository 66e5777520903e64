// Warp-level tensor-core helpers shared by the tensor-core kernels (kron_tc.cuh, gemm.cuh):
// mma.sync m16n8k16 with bf16 operands and f32 accumulation (sm_80 and later), fragment loads from
// k-contiguous shared matrices, and which operands are split into bf16 hi + lo halves per storage
// type (TcSplit, SPEC section 5).
// In the emulation build (kernels/emu.h) mma_bf16 runs on the CPU with the PTX ISA fragment layout.
#pragma once
#include <cstring>
#include <type_traits>

#include "common.cuh"

namespace camex {

// The tensor cores always multiply bf16 halves: bf16 has f32's exponent range, so the hi/lo split of
// an f32 value neither overflows (f16 stops at 65504) nor goes subnormal for small values such as
// gradients (f16's lo half would lose its bits below about 2^-3). f16 storage values are exact as
// bf16 hi + lo (11 <= 16 significant bits). (Only the bf16 mma is emulated, kernels/emu.h.)
using MmaT = __nv_bfloat16;

template <typename T> struct is_half_type : std::false_type {};
template <> struct is_half_type<__half> : std::true_type {};
template <> struct is_half_type<__nv_bfloat16> : std::true_type {};

__host__ __device__ inline int tc_pad(int64_t k) { return (int)((k + 15) / 16 * 16); }
__host__ __device__ inline int tc_ld(int kp) { return kp + 8; }  // row stride: conflict-free fragments

// c += A B for one warp: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (the only form used:
// every operand is bf16, see MmaT).
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

// Which operands the tensor cores take as bf16 hi = bf16(v) plus lo = bf16(v - hi) (two or three
// mma per product instead of one) for storage T. SPEC section 5: within its two bounds (tol, and
// 2x the error of the official einsums evaluated in the storage dtype) the fastest arithmetic wins.
//   data:   tau = W - E, the f32 intermediates and upstream gradients (rounded once more each);
//   factor: the Kronecker factors (exact in hi for bf16 storage; f16 needs hi + lo to be exact).
// bf16 storage: factors exact in hi (no factor lo). PrecOf<bf16> splits data (two mma per
// factor-by-data product, three per data-by-data contraction); gemm.cuh takes it for f32 and tau
// operands, the Kronecker kernels no longer for bf16 (FwdPrec below and the per-kernel policies in
// kron_tc_bwd.cuh, all single-pass for bf16).
// Single-pass bf16 (one mma per product, no lo arrays in shared memory), measured in the CPU
// emulation (tests/gpu.rs emu): the forward and the backward's rows side (P = L tau, dA, dB, dtau)
// stay within bound 2 at about the official code's error (T5 `wi` curvature 3.8e-3 against E_off
// 3.8e-3; worst ratio to the bound over the bf16 tests 0.68, ca_merge grad_factor_c [1, 2, 1, 1]:
// 6.8e-3 against tol 1e-2). With the columns side (dC, dD: H contracted with P x4 D, P x3 C; since
// regrouped as P with H x4 D^T, H x3 C^T) also
// single-pass, grad_factor_c for a 1 x 1 factor C ([R, N, 1, 1]: each entry one cancelling sum
// over the expert's O x I products) failed both bounds: rel_err 1.7e-2 > tol 1e-2 and > 2 E_off =
// 1.4e-2 (official bf16 einsums 6.9e-3; emu_ca_merge_half_matches_cpu at [N, O, I] = [2, 7, 13]).
// Split by operand (kron_tc_bwd.cuh): H and P single-pass with the f32 intermediates T1, T2 split
// took that case to 1.0e-2 (P single and H split: 1.2e-2), over tol; every other bf16 factor
// gradient stayed at most 0.53 of its bound. So a 1 x 1 factor (that one cancelling sum) takes the
// scalar backward (kron_tc_bwd_fits), and with it excluded the columns side is single-pass
// throughout, T1 and T2 too: over the 278 f16/bf16 comparisons of tests/emu.rs the worst ratio to
// the bound went from 0.56 to 0.57 (curvature grad_factor_c [2, 3, 2, 2]); the T5-base-sized cases
// from 0.43-0.48 to 0.49-0.51, i.e. the official bf16 einsums' own error.
// f16 storage: data and factors both split, three mma per product (hi hi + hi lo + lo hi): the
// cheapest form the bf16 mma allows within bound 2. f16 keeps 11 significant bits, so the official
// f16 reference rounds at 2^-12 and its E_off is ~8x bf16's, while one bf16 rounding is 2^-9. In the
// emulation, the Kronecker curvature at [N, O, I] = [3, 6, 10]: no data split (tau and
// intermediates in bf16) gave rel_err 2.6e-3, no factor split (f16 factors rounded to bf16) 3.7e-3,
// against E_off 5.0e-4 (bound 2: 1.0e-3; bound 1: 2e-3); with both split, 2.1e-4 at worst over the
// curvature tests (E_off 4.4e-4).
struct TcSplit {
  bool data_lo, factor_lo;
};
template <typename T> __host__ __device__ constexpr TcSplit tc_split() { return TcSplit{true, true}; }
template <> __host__ __device__ constexpr TcSplit tc_split<__nv_bfloat16>() { return TcSplit{true, false}; }
template <typename T> __host__ __device__ constexpr bool data_lo() { return tc_split<T>().data_lo; }
template <typename T> __host__ __device__ constexpr bool factor_lo() { return tc_split<T>().factor_lo; }
// A precision policy for the Kronecker tensor-core kernels, separate from the storage type: the
// kernels that the forward alone runs take FwdPrec, those the backward runs (including its call of
// the forward's stage 1, whose P feeds dC and dD) PrecOf.
template <bool DataLo, bool FactorLo> struct Prec {
  static constexpr bool data_lo = DataLo, factor_lo = FactorLo;
  __host__ __device__ static constexpr TcSplit split() { return TcSplit{DataLo, FactorLo}; }
};
template <typename T> using PrecOf = Prec<tc_split<T>().data_lo, tc_split<T>().factor_lo>;
// The forward drops bf16's data split: single-pass bf16 (tau and the f32 intermediate Z rounded
// once to bf16, one mma per product) met both bounds on every curvature and ca_merge forward test
// in the emulation (measurements above); only the backward's degenerate 1 x 1 factor gradients
// needed it, and they take the scalar backward.
// f16 keeps both splits (above: one bf16 rounding is 4x f16's and breaks bound 2).
template <typename T>
using FwdPrec = Prec<tc_split<T>().data_lo && !std::is_same<T, __nv_bfloat16>::value, tc_split<T>().factor_lo>;

// Splits v into hi = T(v) and lo = T(v - hi) (T = MmaT, bf16): hi + lo carries ~16 significant
// bits with f32's range (no overflow past 65504 or subnormal lo halves, as f16 halves would have;
// f16 storage values are exact in hi + lo). An infinite v gives lo = NaN, so Inf inputs come out
// as NaN.
template <typename T> __device__ __forceinline__ void split_store(T *hi, T *lo, int64_t k, float v) {
  const T h = from_f32<T>(v);
  hi[k] = h;
  lo[k] = from_f32<T>(v - to_f32(h));
}

// A data operand under policy P (Prec): hi + lo (P::data_lo) or hi alone (lo is not touched).
template <typename P> __device__ __forceinline__ void store_data(MmaT *hi, MmaT *lo, int64_t k, float v) {
  if constexpr (P::data_lo) split_store(hi, lo, k, v);
  else hi[k] = from_f32<MmaT>(v);
}

// Raw bits of a bf16 shared-memory element, for fragments gathered one element at a time.
__device__ __forceinline__ uint32_t mma_bits(MmaT v) {
  uint16_t u;
  memcpy(&u, &v, 2);
  return u;
}

// Two data elements as the 32-bit pairs of a fragment (v0 in the low 16 bits): hi, and lo where P
// splits data (lo is not touched otherwise).
template <typename P> __device__ __forceinline__ void pack_data2(uint32_t &hi, uint32_t &lo, float v0, float v1) {
  const MmaT h0 = from_f32<MmaT>(v0), h1 = from_f32<MmaT>(v1);
  hi = mma_bits(h0) | (mma_bits(h1) << 16);
  if constexpr (P::data_lo)
    lo = mma_bits(from_f32<MmaT>(v0 - to_f32(h0))) | (mma_bits(from_f32<MmaT>(v1 - to_f32(h1))) << 16);
}

// Two consecutive data elements (k even) as one 32-bit store per half: v0 in the low 16 bits.
template <typename P> __device__ __forceinline__ void store_data2(MmaT *hi, MmaT *lo, int64_t k, float v0, float v1) {
  uint32_t h, l = 0;
  pack_data2<P>(h, l, v0, v1);
  *reinterpret_cast<uint32_t *>(hi + k) = h;
  if constexpr (P::data_lo) *reinterpret_cast<uint32_t *>(lo + k) = l;
}

// Register fragments without shared memory (flash-attention's reuse of an accumulator as the next
// mma's operand). Two m16n8 f32 accumulator tiles, n tiles 2k and 2k + 1 of one m tile, are the A
// fragment of k step k (M = their rows, K = their columns): the accumulator's pairs (row g or
// g + 8, columns 2t and 2t + 1) are the A fragment's, split as P splits data.
template <typename P>
__device__ __forceinline__ void frag_a_of_acc(uint32_t ah[4], uint32_t al[4], const float c0[4], const float c1[4]) {
  pack_data2<P>(ah[0], al[0], c0[0], c0[1]);
  pack_data2<P>(ah[1], al[1], c0[2], c0[3]);
  pack_data2<P>(ah[2], al[2], c1[0], c1[1]);
  pack_data2<P>(ah[3], al[3], c1[2], c1[3]);
}
// The A fragment of a matrix X (rows m0.., k k0..) holds the B fragments of k step k0 for n tiles
// m0 (half 0) and m0 + 8 (half 1) of B[k][n] = X[n][k]: frag_b and frag_a read the same pairs.
__device__ __forceinline__ void frag_b_of_a(uint32_t b[2], const uint32_t a[4], int half) {
  b[0] = a[half];
  b[1] = a[half + 2];
}

// Eight consecutive data elements (k a multiple of 8) as one 16-byte store per half.
template <typename P> __device__ __forceinline__ void store_data8(MmaT *hi, MmaT *lo, int64_t k, const float v[8]) {
  uint32_t h[4], l[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const MmaT h0 = from_f32<MmaT>(v[2 * i]), h1 = from_f32<MmaT>(v[2 * i + 1]);
    h[i] = mma_bits(h0) | (mma_bits(h1) << 16);
    if constexpr (P::data_lo) {
      const MmaT l0 = from_f32<MmaT>(v[2 * i] - to_f32(h0)), l1 = from_f32<MmaT>(v[2 * i + 1] - to_f32(h1));
      l[i] = mma_bits(l0) | (mma_bits(l1) << 16);
    }
  }
  *reinterpret_cast<uint4 *>(hi + k) = make_uint4(h[0], h[1], h[2], h[3]);
  if constexpr (P::data_lo) *reinterpret_cast<uint4 *>(lo + k) = make_uint4(l[0], l[1], l[2], l[3]);
}

// c += A B for two data operands: Ah Bh, plus Ah Bl where B has lo halves (policy PB) and Al Bh
// where A has (PA); never lo lo.
template <typename PA, typename PB = PA>
__device__ __forceinline__ void mma_data(float c[4], const uint32_t ah[4], const uint32_t al[4], const uint32_t bh[2],
                                         const uint32_t bl[2]) {
  mma_bf16(c, ah, bh);
  if constexpr (PB::data_lo) mma_bf16(c, ah, bl);
  if constexpr (PA::data_lo) mma_bf16(c, al, bh);
}

}  // namespace camex
