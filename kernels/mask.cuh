// TIES masks (SPEC section 3, lead's semantics in src/cpu/mask.rs) as device functions, and the
// deterministic on-device k-th largest |tau| selection used by `ties_trim`.
//
// Selection: a 4-pass MSB-first radix select (8 bits a pass) on the bit patterns of |tau| (for
// non-negative floats the bit order is the value order; every NaN is canonicalised to 0x7FC00000,
// above +Inf, so NaN magnitudes count as largest). Histograms use integer atomics, whose result
// does not depend on the order of the additions, so the threshold is exact and deterministic.
#pragma once
#include "common.cuh"

namespace camex {

__device__ __forceinline__ uint32_t mag_bits(float v) {
  const float a = fabsf(v);
  return (a != a) ? 0x7FC00000u : __float_as_uint(a);
}

template <typename T> struct TauSrc {
  const T *base;
  const T *experts;
  int64_t oi;
  __device__ __forceinline__ float tau(int64_t i, int64_t q) const {
    return to_f32(experts[i * oi + q]) - to_f32(base[q]);
  }
};

// Mask evaluation at one element position q for every expert.
template <typename T> struct MaskEval {
  int kind;               // camex_mask_kind
  TauSrc<T> t;
  const T *mask;          // CAMEX_MASK_TENSOR
  const uint32_t *thr;    // CAMEX_MASK_TIES_TRIM: threshold bits per expert
  int64_t n;

  __device__ __forceinline__ float trimmed(int64_t i, float tau) const {
    const float a = fabsf(tau);
    const float th = __uint_as_float(thr[i]);
    const bool kept = (a != a) || (!(th != th) && a >= th);
    return kept ? tau : 0.f;
  }
  // elect = sgn(sum_j v_j), v = tau (ties_sign) or trimmed tau (ties_trim), summed in expert order.
  __device__ __forceinline__ float elect(int64_t q) const {
    if (kind != CAMEX_MASK_TIES_SIGN && kind != CAMEX_MASK_TIES_TRIM) return 0.f;
    float s = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      const float v = t.tau(j, q);
      s += (kind == CAMEX_MASK_TIES_TRIM) ? trimmed(j, v) : v;
    }
    return sgnf(s);
  }
  __device__ __forceinline__ float m(int64_t i, int64_t q, float el) const {
    switch (kind) {
      case CAMEX_MASK_TIES_SIGN: return sgnf(t.tau(i, q)) == el ? 1.f : 0.f;
      case CAMEX_MASK_TIES_TRIM: {
        const float v = t.tau(i, q);
        return (trimmed(i, v) != 0.f && sgnf(v) == el) ? 1.f : 0.f;
      }
      case CAMEX_MASK_TENSOR: return to_f32(mask[i * t.oi + q]);
      default: return 1.f;
    }
  }
};

// State of the radix select per expert: [prefix, fixed-bit mask, remaining rank].
static __global__ void select_init_kernel(uint32_t *state, uint32_t *hist, int64_t n, uint32_t keep_count) {
  for (int64_t k = threadIdx.x; k < n * 256; k += blockDim.x) hist[k] = 0;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    state[3 * e] = 0;
    state[3 * e + 1] = 0;
    state[3 * e + 2] = keep_count;
  }
}

template <typename T>
__global__ void select_hist_kernel(TauSrc<T> src, const uint32_t *state, uint32_t *hist, int shift) {
  __shared__ uint32_t h[256];
  const int64_t e = blockIdx.y;
  for (int k = threadIdx.x; k < 256; k += blockDim.x) h[k] = 0;
  __syncthreads();
  const uint32_t prefix = state[3 * e], fixed = state[3 * e + 1];
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < src.oi; q += (int64_t)gridDim.x * blockDim.x) {
    const uint32_t b = mag_bits(src.tau(e, q));
    if ((b & fixed) == prefix) atomicAdd(&h[(b >> shift) & 255u], 1u);
  }
  __syncthreads();
  for (int k = threadIdx.x; k < 256; k += blockDim.x)
    if (h[k]) atomicAdd(&hist[e * 256 + k], h[k]);
}

// One thread per expert: find the digit holding the remaining-th largest, fix it, clear the histogram.
static __global__ void select_step_kernel(uint32_t *state, uint32_t *hist, int64_t n, int shift) {
  const int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (e >= n) return;
  uint32_t remaining = state[3 * e + 2];
  uint32_t cum = 0;
  int digit = 0;
  for (int b = 255; b >= 0; --b) {
    const uint32_t c = hist[e * 256 + b];
    if (cum + c >= remaining) { digit = b; break; }
    cum += c;
  }
  state[3 * e] |= (uint32_t)digit << shift;
  state[3 * e + 1] |= 255u << shift;
  state[3 * e + 2] = remaining - cum;
  for (int b = 0; b < 256; ++b) hist[e * 256 + b] = 0;
}

static __global__ void select_finish_kernel(const uint32_t *state, uint32_t *thr, int64_t n) {
  const int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (e < n) thr[e] = state[3 * e];
}

// keep_count = ceil(k * O * I) clamped to [1, O*I], as src/cpu/mask.rs.
inline uint32_t trim_keep_count(double k, int64_t oi) {
  double c = ceil(k * (double)oi);
  if (!(c >= 1.0)) c = 1.0;
  if (c > (double)oi) c = (double)oi;
  return (uint32_t)c;
}

// thr[e] = bits of the keep_count-th largest |tau_e| for every expert e.
template <typename T>
inline int trim_thresholds(cudaStream_t s, TauSrc<T> src, int64_t n, double k, uint32_t *thr, Arena &ar) {
  uint32_t *state = ar.take<uint32_t>(n * 3);
  uint32_t *hist = ar.take<uint32_t>(n * 256);
  if (n > 65535 || src.oi > 0xFFFFFFFFll) return CAMEX_ERR_DIMS;
  CAMEX_LAUNCH(select_init_kernel, 1, 256, s)(state, hist, n, trim_keep_count(k, src.oi));
  CAMEX_CHECK_LAUNCH();
  int64_t blocks = (src.oi + 256 * 8 - 1) / (256 * 8);
  if (blocks > 1024) blocks = 1024;
  for (int shift = 24; shift >= 0; shift -= 8) {
    CAMEX_LAUNCH(select_hist_kernel<T>, dim3((unsigned)blocks, (unsigned)n), 256, s)(src, state, hist, shift);
    CAMEX_CHECK_LAUNCH();
    CAMEX_LAUNCH(select_step_kernel, (unsigned)((n + 63) / 64), 64, s)(state, hist, n, shift);
    CAMEX_CHECK_LAUNCH();
  }
  CAMEX_LAUNCH(select_finish_kernel, (unsigned)((n + 63) / 64), 64, s)(state, thr, n);
  CAMEX_CHECK_LAUNCH();
  return 0;
}

// Arena bytes of trim_thresholds (state + histograms); thr itself is taken by the caller.
inline int64_t trim_arena_bytes(int64_t n) {
  return (n * 3 * 4 + 255) / 256 * 256 + (n * 256 * 4 + 255) / 256 * 256;
}

}  // namespace camex
