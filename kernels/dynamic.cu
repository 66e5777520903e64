// Family `dynamic`: next_base = E + (beta/N) sum_i U_i and its reverse (SPEC sections 3, 4).
#include "elementwise.cuh"
#include "merge.cuh"

using namespace camex;

namespace {

template <typename T> __global__ void next_base_kernel(const T *base, const T *curved, T *out, int64_t n, int64_t oi, float c) {
  CAMEX_GRID_STRIDE(q, oi) {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += to_f32(curved[i * oi + q]);
    out[q] = from_f32<T>(to_f32(base[q]) + c * s);
  }
}

template <typename T> __global__ void dyn_grads_kernel(const T *gnb, T *grad_base, T *grad_curved, int64_t n, int64_t oi, float c) {
  CAMEX_GRID_STRIDE(k, n * oi) {
    const float g = to_f32(gnb[k % oi]);
    grad_curved[k] = from_f32<T>(c * g);
    if (k < oi) grad_base[k] = gnb[k];
  }
}

template <typename T> MergeArgs<T> beta_args(const camex_dynamic_params &p) {
  // Reuses the reduction of the CA-merge: zero groups, the <gnb, U_i> row only.
  MergeArgs<T> a;
  const int64_t oi = p.o * p.i;
  TauSrc<T> tau = {ptr<const T>(p.base), nullptr, oi};
  a.u.kind = U_STORE;
  a.u.f = nullptr;
  a.u.t = ptr<const T>(p.curved);
  a.u.tau = tau;
  a.mask.kind = CAMEX_MASK_NONE;
  a.mask.t = tau;
  a.mask.mask = nullptr;
  a.mask.thr = nullptr;
  a.mask.n = p.n;
  a.base = ptr<const T>(p.base);
  a.scores = nullptr;
  a.dare.kind = CAMEX_DARE_NONE;
  a.dare.threshold = 0;
  a.dare.seed = 0;
  a.dare.scale = 1.0;
  a.alpha = 1.f;
  a.g = 0;
  a.n = p.n;
  a.oi = oi;
  return a;
}

int64_t dyn_ws(const camex_dynamic_params &p) { return scalars_floats(0, p.n, p.o * p.i) * 4 + 4 * 256; }

template <typename T> int dynamic_forward_t(const camex_dynamic_params &p, cudaStream_t s) {
  const int64_t oi = p.o * p.i;
  CAMEX_LAUNCH(next_base_kernel<T>, grid_for(oi, 256), 256, s)(ptr<const T>(p.base), ptr<const T>(p.curved), ptr<T>(p.next_base),
                                                        p.n, oi, (float)(p.beta / (double)p.n));
  CAMEX_CHECK_LAUNCH();
  return 0;
}

template <typename T> int dynamic_backward_t(const camex_dynamic_params &p, cudaStream_t s) {
  if (dyn_ws(p) > p.workspace_bytes) return CAMEX_ERR_WORKSPACE;
  const int64_t oi = p.o * p.i;
  const T *gnb = ptr<const T>(p.grad_next_base);
  CAMEX_LAUNCH(dyn_grads_kernel<T>, grid_for(p.n * oi, 256), 256, s)(gnb, ptr<T>(p.grad_base), ptr<T>(p.grad_curved), p.n, oi,
                                                              (float)(p.beta / (double)p.n));
  CAMEX_CHECK_LAUNCH();
  MergeArgs<T> a = beta_args<T>(p);
  Arena ar = {ptr<char>(p.workspace), 0};
  return merge_reverse_scalars<T>(s, a, nullptr, true, gnb, nullptr, nullptr, nullptr, nullptr, nullptr,
                                  ptr<T>(p.grad_beta), nullptr, nullptr, p.o, ar);
}

}  // namespace

extern "C" int64_t camex_dynamic_workspace(const camex_dynamic_params *p) { return dyn_ws(*p); }

extern "C" int camex_dynamic_forward(const camex_dynamic_params *p, camex_stream_t stream) {
  if (p->n <= 0 || p->o <= 0 || p->i <= 0) return CAMEX_ERR_DIMS;
  CAMEX_DISPATCH(p->dtype, dynamic_forward_t, *p, (cudaStream_t)stream);
}

extern "C" int camex_dynamic_backward(const camex_dynamic_params *p, camex_stream_t stream) {
  if (p->n <= 0 || p->o <= 0 || p->i <= 0) return CAMEX_ERR_DIMS;
  if (!scalars_grid_fits(0, p->n, p->o * p->i, true, false, false)) return CAMEX_ERR_DIMS;
  CAMEX_DISPATCH(p->dtype, dynamic_backward_t, *p, (cudaStream_t)stream);
}
