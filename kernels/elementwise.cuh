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
// or acc + v, the running sum_i dL/dtau_i (the base gradient's).
template <typename T> struct ExpertFinish {
  T *grad_e = nullptr;
  float *acc = nullptr;
  int first = 0;
  __device__ __forceinline__ void store(int64_t q, float v) const {
    grad_e[q] = from_f32<T>(v);
    acc[q] = first ? v : acc[q] + v;
  }
};

template <typename T> __global__ void finish_expert_kernel(const float *gt, ExpertFinish<T> fin, int64_t oi) {
  CAMEX_GRID_STRIDE(q, oi) fin.store(q, gt[q]);
}

// grad_base = T(sumg - acc) (sumg null: -acc).
template <typename T> __global__ void base_grad_kernel(const float *sumg, const float *acc, T *out, int64_t oi) {
  CAMEX_GRID_STRIDE(q, oi) {
    const float neg = -acc[q];
    out[q] = from_f32<T>(sumg ? sumg[q] + neg : neg);
  }
}

}  // namespace camex
