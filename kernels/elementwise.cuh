// Small element-wise kernels shared by several families.
#pragma once
#include "common.cuh"

namespace camex {

#define CAMEX_GRID_STRIDE(k, total) \
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < (total); k += (int64_t)gridDim.x * blockDim.x)

// out[k] = T(in[k]).
template <typename T> __global__ void f32_to_store_kernel(const float *in, T *out, int64_t total) {
  CAMEX_GRID_STRIDE(k, total) out[k] = from_f32<T>(in[k]);
}

// out[i][q] = T(W_i[q] - E[q]) for all experts.
template <typename T> __global__ void tau_kernel(const T *base, const T *experts, T *out, int64_t n, int64_t oi) {
  CAMEX_GRID_STRIDE(k, n * oi) out[k] = from_f32<T>(to_f32(experts[k]) - to_f32(base[k % oi]));
}

// out[q] = T(sum_i x[i][q] * c), experts in order (c = -1: the base gradient of the identity curvature).
template <typename T> __global__ void sum_experts_kernel(const T *x, T *out, int64_t n, int64_t oi, float c) {
  CAMEX_GRID_STRIDE(q, oi) {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += to_f32(x[i * oi + q]);
    out[q] = from_f32<T>(c * s);
  }
}

// Where one expert's dL/dtau goes once complete: grad_experts_e = T(v), and acc = v (first expert)
// or acc + v, the running sum_i dL/dtau_i. The last expert writes the base gradient from it instead,
// T(sumg - acc) (sumg null: -acc), so no pass of its own reads acc back.
template <typename T> struct ExpertFinish {
  T *grad_e = nullptr;
  float *acc = nullptr;
  int first = 0;
  T *grad_base = nullptr;  // set for the last expert only
  const float *sumg = nullptr;
  __device__ __forceinline__ void store(int64_t q, float v) const {
    grad_e[q] = from_f32<T>(v);
    const float a = first ? v : acc[q] + v;
    if (grad_base) {
      const float neg = -a;
      grad_base[q] = from_f32<T>(sumg ? sumg[q] + neg : neg);
    } else {
      acc[q] = a;
    }
  }
};

// Expert e's of n: its gradient slice of grad_experts, and the base gradient for the last.
template <typename T>
inline ExpertFinish<T> expert_finish(T *grad_experts, float *acc, int64_t e, int64_t n, int64_t oi, T *grad_base,
                                     const float *sumg) {
  ExpertFinish<T> f;
  f.grad_e = grad_experts + e * oi;
  f.acc = acc;
  f.first = e == 0;
  if (e == n - 1) {
    f.grad_base = grad_base;
    f.sumg = sumg;
  }
  return f;
}

template <typename T> __global__ void finish_expert_kernel(const float *gt, ExpertFinish<T> fin, int64_t oi) {
  CAMEX_GRID_STRIDE(q, oi) fin.store(q, gt[q]);
}

}  // namespace camex
