// Family `mask`: the TIES masks m_i [N, O, I] (0/1) on the raw domain vectors.
#include "elementwise.cuh"
#include "mask.cuh"

using namespace camex;

namespace {

template <typename T> __global__ void fill_kernel(T *out, int64_t total, float v) {
  CAMEX_GRID_STRIDE(k, total) out[k] = from_f32<T>(v);
}

template <typename T> __global__ void mask_kernel(MaskEval<T> m, T *out) {
  CAMEX_GRID_STRIDE(q, m.t.oi) {
    const float el = m.elect(q);
    for (int64_t i = 0; i < m.n; ++i) out[i * m.t.oi + q] = from_f32<T>(m.m(i, q, el));
  }
}

int64_t mask_ws(const camex_mask_params &p, Arena &ar) {
  ar.take<uint32_t>(p.n);
  if (p.mask_kind == CAMEX_MASK_TIES_TRIM) ar.used += trim_arena_bytes(p.n);
  return ar.used;
}

template <typename T> int ties_mask_t(const camex_mask_params &p, cudaStream_t s) {
  const int64_t oi = p.o * p.i;
  T *out = ptr<T>(p.mask);
  if (p.mask_kind == CAMEX_MASK_NONE) {
    CAMEX_LAUNCH(fill_kernel<T>, grid_for(p.n * oi, 256), 256, s)(out, p.n * oi, 1.f);
    CAMEX_CHECK_LAUNCH();
    return 0;
  }
  if (p.mask_kind != CAMEX_MASK_TIES_SIGN && p.mask_kind != CAMEX_MASK_TIES_TRIM) return CAMEX_ERR_DIMS;
  Arena probe = {nullptr, 0};
  if (mask_ws(p, probe) > p.workspace_bytes) return CAMEX_ERR_WORKSPACE;
  Arena ar = {ptr<char>(p.workspace), 0};
  uint32_t *thr = ar.take<uint32_t>(p.n);
  TauSrc<T> tau = {ptr<const T>(p.base), ptr<const T>(p.experts), oi};
  if (p.mask_kind == CAMEX_MASK_TIES_TRIM) CAMEX_TRY(trim_thresholds<T>(s, tau, p.n, p.trim_k, thr, ar));
  MaskEval<T> m;
  m.kind = p.mask_kind;
  m.t = tau;
  m.mask = nullptr;
  m.thr = thr;
  m.n = p.n;
  CAMEX_LAUNCH(mask_kernel<T>, grid_for(oi, 256), 256, s)(m, out);
  CAMEX_CHECK_LAUNCH();
  return 0;
}

}  // namespace

extern "C" int64_t camex_mask_workspace(const camex_mask_params *p) {
  Arena ar = {nullptr, 0};
  return mask_ws(*p, ar);
}

extern "C" int camex_ties_mask(const camex_mask_params *p, camex_stream_t stream) {
  if (p->n <= 0 || p->o <= 0 || p->i <= 0) return CAMEX_ERR_DIMS;
  CAMEX_DISPATCH(p->dtype, ties_mask_t, *p, (cudaStream_t)stream);
}
