// Family `merge`: Wbar_g = E + alpha * sum_i s[g,i] zeta[g,i] (m_i (.) curved_i) with curved given,
// the bias merge, and their reverse. Also the Philox known-answer entry point.
#include "elementwise.cuh"
#include "merge.cuh"

using namespace camex;

namespace {

template <typename T> MergeArgs<T> merge_args(const camex_merge_params &p) {
  MergeArgs<T> a;
  const int64_t oi = p.o * p.i;
  TauSrc<T> tau = {ptr<const T>(p.base), nullptr, oi};
  a.u.kind = U_STORE;
  a.u.f = nullptr;
  a.u.t = ptr<const T>(p.curved);
  a.u.tau = tau;
  a.mask.kind = p.mask ? CAMEX_MASK_TENSOR : CAMEX_MASK_NONE;
  a.mask.t = tau;
  a.mask.mask = ptr<const T>(p.mask);
  a.mask.thr = nullptr;
  a.mask.n = p.n;
  a.base = ptr<const T>(p.base);
  a.scores = ptr<const T>(p.scores);
  a.dare = p.dare;
  a.alpha = (float)p.alpha;
  a.g = p.g;
  a.n = p.n;
  a.oi = oi;
  return a;
}

int64_t merge_ws(const camex_merge_params &p, bool backward) {
  if (!backward) return 0;
  return scalars_floats(p.g, p.n, p.o * p.i) * 4 + 4 * 256;
}

template <typename T> int merge_forward_t(const camex_merge_params &p, cudaStream_t s) {
  MergeArgs<T> a = merge_args<T>(p);
  CAMEX_LAUNCH(merge_epilogue_kernel<T>, epilogue_grid(a.oi), 256, s)(a, ptr<T>(p.merged), nullptr, nullptr, 0.f);
  CAMEX_CHECK_LAUNCH();
  if (p.base_bias && p.expert_bias && p.merged_bias) {
    CAMEX_LAUNCH(bias_forward_kernel<T>, grid_for(p.g * p.o, 256), 256, s)(ptr<const T>(p.base_bias), ptr<const T>(p.expert_bias),
                                                                     a.scores, ptr<T>(p.merged_bias), a.alpha, p.g, p.n, p.o);
    CAMEX_CHECK_LAUNCH();
  }
  return 0;
}

template <typename T> int merge_backward_t(const camex_merge_params &p, cudaStream_t s) {
  if (merge_ws(p, true) > p.workspace_bytes) return CAMEX_ERR_WORKSPACE;
  MergeArgs<T> a = merge_args<T>(p);
  const T *gbar = ptr<const T>(p.grad_merged);
  Arena ar = {ptr<char>(p.workspace), 0};
  // grad_curved_i = H_i, and grad_base = sum_g Gbar_g from the same reads of Gbar (with the dots,
  // where h_dots_kernel takes them).
  const HPass<T> hp = {0.f, nullptr, ptr<T>(p.grad_curved), GroupSum<T>{nullptr, ptr<T>(p.grad_base)}};
  return merge_reverse_scalars<T>(s, a, gbar, false, nullptr, ptr<const T>(p.base_bias), ptr<const T>(p.expert_bias),
                                  ptr<const T>(p.grad_merged_bias), ptr<T>(p.grad_scores), ptr<T>(p.grad_alpha), nullptr,
                                  ptr<T>(p.grad_base_bias), ptr<T>(p.grad_expert_bias), p.o, ar, &hp);
}

__global__ void philox_test_kernel(const uint32_t *ctr, const uint32_t *key, uint32_t *out, int64_t count) {
  CAMEX_GRID_STRIDE(k, count) {
    const Philox4 r = philox4x32_10(ctr[4 * k], ctr[4 * k + 1], ctr[4 * k + 2], ctr[4 * k + 3], key[2 * k], key[2 * k + 1]);
    for (int j = 0; j < 4; ++j) out[4 * k + j] = r.x[j];
  }
}

}  // namespace

extern "C" int64_t camex_merge_workspace(const camex_merge_params *p, int32_t backward) {
  return merge_ws(*p, backward != 0);
}

extern "C" int camex_merge_forward(const camex_merge_params *p, camex_stream_t stream) {
  if (p->g <= 0 || p->n <= 0 || p->o <= 0 || p->i <= 0) return CAMEX_ERR_DIMS;
  CAMEX_DISPATCH(p->dtype, merge_forward_t, *p, (cudaStream_t)stream);
}

extern "C" int camex_merge_backward(const camex_merge_params *p, camex_stream_t stream) {
  if (p->g <= 0 || p->n <= 0 || p->o <= 0 || p->i <= 0) return CAMEX_ERR_DIMS;
  if (!scalars_grid_fits(p->g, p->n, p->o * p->i, false, p->base_bias && p->expert_bias, p->dare.kind != CAMEX_DARE_NONE))
    return CAMEX_ERR_DIMS;
  CAMEX_DISPATCH(p->dtype, merge_backward_t, *p, (cudaStream_t)stream);
}

extern "C" int camex_philox_test(uint64_t ctr, uint64_t key, uint64_t out, int64_t count, camex_stream_t stream) {
  if (count <= 0) return 0;
  CAMEX_LAUNCH(philox_test_kernel, grid_for(count, 256), 256, (cudaStream_t)stream)(ptr<const uint32_t>(ctr),
                                                                              ptr<const uint32_t>(key), ptr<uint32_t>(out), count);
  CAMEX_CHECK_LAUNCH();
  return 0;
}
