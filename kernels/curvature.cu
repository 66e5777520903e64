// Family `curvature`: the curvature U_i = M_i(tau_i) forward and backward, and the fused CA-merge
// (curvature + TIES mask + DARE + weighted merge over experts for every group + base, and the
// dynamic-merge output next_base) forward and backward.
//
// Structure of the fused forward (per call):
//   1. ties_trim only: per-expert k-th largest |tau| by radix select (mask.cuh).
//   2. kronecker only: for each expert i, for each rank r, four mode products
//      (rows side x1 A, x2 B, then columns side x3 C, x4 D) through two expert-sized f32 scratch
//      buffers (L2-resident at T5 shapes); the first reads tau = W_i - E on the fly, the last
//      accumulates over r into U[i] (f32 [N, O, I] workspace). No [R, N, O, I] or [G, N, O, I]
//      tensor is ever formed.
//   3. one element-wise epilogue pass: reads E, U_i (or tau_i for the identity) and the raw tau
//      for the mask, draws DARE with Philox, and writes merged[g] for all G groups, and optionally
//      curved (U) and next_base. It reads N+1 weights once and writes G merged weights.
// The backward recomputes U (like the CPU path), reduces <Gbar_g, zeta P_i> with fixed-order
// tree reductions, builds H_i = dL/dU_i per expert and runs the transposed chain (kron.cuh), or,
// with the tensor cores on, the fused reverse of kron_tc_bwd.cuh.
//
// The tensor-core forward and backward (kron_tc.cuh, kron_tc_bwd.cuh) are opt-in; what has run where
// is in the README ("Status").
#include "elementwise.cuh"
#include "kron_tc_bwd.cuh"
#include "merge.cuh"

using namespace camex;

namespace {

D4 dims4(int64_t o1, int64_t o2, int64_t i1, int64_t i2) {
  D4 d;
  d.d[0] = o1; d.d[1] = o2; d.d[2] = i1; d.d[3] = i2;
  return d;
}

bool bad_dims(int64_t n, int64_t o, int64_t i, int64_t r, int64_t o1, int64_t o2, int64_t i1, int64_t i2) {
  if (n <= 0 || o <= 0 || i <= 0 || r < 0) return true;
  if (r > 0 && (o1 * o2 != o || i1 * i2 != i || o1 <= 0 || o2 <= 0 || i1 <= 0 || i2 <= 0)) return true;
  return false;
}

// ---- standalone curvature ----

struct CurvWs {
  float *u, *s1, *s2;                      // forward
  float *gt, *t1, *kk, *w, *acc, *partial; // backward
};

CurvWs curv_ws(const camex_curvature_params &p, bool backward, Arena &ar) {
  CurvWs ws = {};
  if (p.r == 0) return ws;
  const int64_t oi = p.o * p.i;
  if (!backward) {
    ws.u = ar.take<float>(oi);
    ws.s1 = ar.take<float>(kron_scratch_floats(p.dtype, dims4(p.o1, p.o2, p.i1, p.i2), p.r));
    ws.s2 = ws.s1 + oi;
  } else {
    ws.gt = ar.take<float>(oi);
    ws.t1 = ar.take<float>(kron_scratch_floats(p.dtype, dims4(p.o1, p.o2, p.i1, p.i2), p.r, 1));  // or Z
    ws.kk = ar.take<float>(oi);
    ws.w = ar.take<float>(oi);
    ws.acc = ar.take<float>(oi);
    ws.partial = ar.take<float>(kron_bwd_partial_floats(p.dtype, dims4(p.o1, p.o2, p.i1, p.i2), p.r));
  }
  return ws;
}

template <typename T> int curvature_forward_t(const camex_curvature_params &p, cudaStream_t s) {
  const int64_t oi = p.o * p.i;
  const T *base = ptr<const T>(p.base), *experts = ptr<const T>(p.experts);
  T *curved = ptr<T>(p.curved);
  if (p.r == 0) {
    CAMEX_LAUNCH(tau_kernel<T>, grid_for(p.n * oi, 256), 256, s)(base, experts, curved, p.n, oi);
    CAMEX_CHECK_LAUNCH();
    return 0;
  }
  Arena ar = {ptr<char>(p.workspace), 0};
  CurvWs ws = curv_ws(p, false, ar);
  if (ar.used > p.workspace_bytes) return CAMEX_ERR_WORKSPACE;
  const D4 d4 = dims4(p.o1, p.o2, p.i1, p.i2);
  KronFactors f = {ptr<const void>(p.factor_a), ptr<const void>(p.factor_b), ptr<const void>(p.factor_c),
                   ptr<const void>(p.factor_d), p.r, p.n};
  for (int64_t e = 0; e < p.n; ++e) {
    // The tensor-core path writes U in storage T itself; the scalar chain's f32 U is converted.
    bool stored = false;
    CAMEX_TRY(kron_forward_any<T>(s, ws.u, base, experts + e * oi, f, e, d4, ws.s1, ws.s2, nullptr, 0,
                                  curved + e * oi, &stored));
    if (stored) continue;
    CAMEX_LAUNCH(f32_to_store_kernel<T>, grid_for(oi, 256), 256, s)(ws.u, curved + e * oi, oi);
    CAMEX_CHECK_LAUNCH();
  }
  return 0;
}

template <typename T> int curvature_backward_t(const camex_curvature_params &p, cudaStream_t s) {
  const int64_t oi = p.o * p.i;
  const T *base = ptr<const T>(p.base), *experts = ptr<const T>(p.experts);
  const T *gc = ptr<const T>(p.grad_curved);
  T *grad_base = ptr<T>(p.grad_base), *grad_experts = ptr<T>(p.grad_experts);
  if (p.r == 0) {
    CAMEX_TRY_RT(cudaMemcpyAsync(grad_experts, gc, sizeof(T) * p.n * oi, cudaMemcpyDeviceToDevice, s));
    CAMEX_LAUNCH(sum_experts_kernel<T>, grid_for(oi, 256), 256, s)(gc, grad_base, p.n, oi, -1.f);
    CAMEX_CHECK_LAUNCH();
    return 0;
  }
  Arena ar = {ptr<char>(p.workspace), 0};
  CurvWs ws = curv_ws(p, true, ar);
  if (ar.used > p.workspace_bytes) return CAMEX_ERR_WORKSPACE;
  const D4 d4 = dims4(p.o1, p.o2, p.i1, p.i2);
  KronFactors f = {ptr<const void>(p.factor_a), ptr<const void>(p.factor_b), ptr<const void>(p.factor_c),
                   ptr<const void>(p.factor_d), p.r, p.n};
  bool ready = false;  // this expert's first stage 1 ran in the previous expert's last launch
  for (int64_t e = 0; e < p.n; ++e) {
    const ExpertFinish<T> fin = expert_finish(grad_experts, ws.acc, e, p.n, oi, grad_base, (const float *)nullptr);
    bool next_ready = false;
    const NextExpert<T> nx = {e + 1 < p.n ? experts + (e + 1) * oi : nullptr, e + 1, ready, &next_ready};
    CAMEX_TRY(kron_backward_any<T>(s, ws.gt, store_opnd<T>(gc + e * oi), tau_opnd<T>(experts + e * oi, base), f, e, d4,
                               ptr<T>(p.grad_factor_a), ptr<T>(p.grad_factor_b), ptr<T>(p.grad_factor_c),
                               ptr<T>(p.grad_factor_d), ws.t1, ws.kk, ws.w, ws.partial, fin, oi, nullptr, 0, nx));
    ready = next_ready;
  }
  return 0;
}

// ---- fused CA-merge ----

struct CaWs {
  uint32_t *thr;
  float *u_all, *s1, *s2;                             // U (kronecker), unless the backward is given it
  int64_t scalars_at;                                 // the backward's scalar arena (byte offset)
  float *sumg, *h, *gt, *t1, *kk, *w, *acc, *partial; // backward
};

// Whether U comes from the caller's `curved` (the backward given the forward's U, camex.h) rather
// than being recomputed into u_all. Without curvature U is tau itself and `curved` is not read.
inline bool ca_u_given(const camex_ca_merge_params &p, bool backward) { return backward && p.r > 0 && p.curved != 0; }

CaWs ca_ws(const camex_ca_merge_params &p, bool backward, Arena &ar) {
  CaWs ws = {};
  const int64_t oi = p.o * p.i;
  ws.thr = ar.take<uint32_t>(p.n);
  if (p.mask_kind == CAMEX_MASK_TIES_TRIM) ar.used += trim_arena_bytes(p.n);
  if (p.r > 0) {
    // U, or (U given) the backward's H in U's place: right before s1, so that where H takes half of
    // it (bf16) the rest and s1 are one free stretch (ca_bwd_lent).
    if (!ca_u_given(p, backward)) ws.u_all = ar.take<float>(p.n * oi);
    else ws.h = ar.take<float>(p.n * oi);
    ws.s1 = ar.take<float>(kron_scratch_floats(p.dtype, dims4(p.o1, p.o2, p.i1, p.i2), p.r));
    ws.s2 = ws.s1 + oi;
  }
  if (backward) {
    ws.scalars_at = ar.used;
    ar.used += scalars_floats(p.g, p.n, oi) * 4 + 4 * 256;
    ws.sumg = ar.take<float>(oi);
    // With the curvature, H of every expert in one pass over grad_merged ([N, O*I]): in U's place
    // once the scalars have read U, else (U given) its own; without it, one expert's at a time.
    if (p.r == 0) ws.h = ar.take<float>(oi);
    else if (ws.u_all) ws.h = ws.u_all;
    ws.acc = ar.take<float>(oi);
    if (p.r > 0) {
      ws.gt = ar.take<float>(oi);
      ws.t1 = ws.s1;  // the forward scratch is free again once U is built (or not needed: U given)
      ws.kk = ws.s2;
      ws.w = ar.take<float>(oi);
      ws.partial = ar.take<float>(kron_bwd_partial_floats(p.dtype, dims4(p.o1, p.o2, p.i1, p.i2), p.r));
    }
  }
  return ws;
}

template <typename T> MergeArgs<T> ca_args(const camex_ca_merge_params &p, const CaWs &ws) {
  MergeArgs<T> a;
  const int64_t oi = p.o * p.i;
  TauSrc<T> tau = {ptr<const T>(p.base), ptr<const T>(p.experts), oi};
  a.u.kind = p.r == 0 ? U_TAU : ws.u_all ? U_F32 : U_STORE;
  a.u.f = ws.u_all;
  a.u.t = ws.u_all ? nullptr : ptr<const T>(p.curved);
  a.u.tau = tau;
  a.mask.kind = p.mask_kind;
  a.mask.t = tau;
  a.mask.mask = nullptr;
  a.mask.thr = ws.thr;
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

// Steps 1 and 2: thresholds and U (shared by forward and backward). `ar` continues after ca_ws.
// The forward's FwdU (null in the backward): an output its epilogue writes afterwards, free until
// then, where the tensor-core chain may keep its Z, and where that chain writes U in storage T.
template <typename T> struct FwdU {
  void *lent;
  int64_t lent_bytes;
  T *ut;  // [N, O*I] in storage T, or null: U in f32 (u_all)
};
template <typename T>
int ca_prepare(const camex_ca_merge_params &p, const CaWs &ws, Arena &trim_ar, cudaStream_t s,
               const FwdU<T> *fu = nullptr) {
  const int64_t oi = p.o * p.i;
  const T *base = ptr<const T>(p.base), *experts = ptr<const T>(p.experts);
  if (p.mask_kind == CAMEX_MASK_TIES_TRIM) {
    TauSrc<T> tau = {base, experts, oi};
    CAMEX_TRY(trim_thresholds<T>(s, tau, p.n, p.trim_k, ws.thr, trim_ar));
  }
  if (p.r > 0 && ws.u_all) {  // else the backward was given the forward's U
    const D4 d4 = dims4(p.o1, p.o2, p.i1, p.i2);
    KronFactors f = {ptr<const void>(p.factor_a), ptr<const void>(p.factor_b), ptr<const void>(p.factor_c),
                     ptr<const void>(p.factor_d), p.r, p.n};
    for (int64_t e = 0; e < p.n; ++e)
      CAMEX_TRY(kron_forward_any<T>(s, ws.u_all + e * oi, base, experts + e * oi, f, e, d4, ws.s1, ws.s2,
                                    fu ? fu->lent : nullptr, fu ? fu->lent_bytes : 0,
                                    fu && fu->ut ? fu->ut + e * oi : nullptr));
  }
  return 0;
}

// The trim arena sits right after the thresholds (see ca_ws).
Arena trim_arena(const camex_ca_merge_params &p) {
  Arena ar = {ptr<char>(p.workspace), 0};
  ar.take<uint32_t>(p.n);
  return ar;
}

template <typename T> int ca_merge_forward_t(const camex_ca_merge_params &p, cudaStream_t s) {
  if (p.mask_kind == CAMEX_MASK_TENSOR) return CAMEX_ERR_DIMS;
  Arena ar = {ptr<char>(p.workspace), 0};
  CaWs ws = ca_ws(p, false, ar);
  if (ar.used > p.workspace_bytes) return CAMEX_ERR_WORKSPACE;
  Arena tar = trim_arena(p);
  // Where the tensor-core chain takes the experts (the same path for each): merged ([G, O, I]; at
  // T5-base in bf16 75 MB), which the epilogue below writes whole, lends it room for Z; and U goes
  // out in storage T, the precision the epilogue rounds it to for `curved`: into curved where it is
  // wanted (the epilogue reads it there instead of writing it), else into the first half of U's f32
  // buffer where one round takes every rank (no f32 sum of earlier rounds to keep beside it).
  // Otherwise curved, if wanted and larger, lends the room, and U stays f32.
  const int64_t oi = p.o * p.i;
  FwdU<T> fu = {ptr<void>(p.merged), p.g * oi * (int64_t)sizeof(T), nullptr};
  const D4 d4 = dims4(p.o1, p.o2, p.i1, p.i2);
  if (p.r > 0 && kron_tc_fwd_taken<T>(d4)) {
    if (p.curved) fu.ut = ptr<T>(p.curved);
    else if (tc_z_place(d4, p.r, sizeof(FwdZ<T>), fu.lent, fu.lent_bytes).chunk >= p.r)
      fu.ut = reinterpret_cast<T *>(ws.u_all);
  }
  if (!fu.ut && p.curved && p.n > p.g) fu = {ptr<void>(p.curved), p.n * oi * (int64_t)sizeof(T), nullptr};
  CAMEX_TRY(ca_prepare<T>(p, ws, tar, s, &fu));
  MergeArgs<T> a = ca_args<T>(p, ws);
  if (fu.ut) {
    a.u.kind = U_STORE;
    a.u.t = fu.ut;
  }
  T *curved_out = fu.ut && fu.ut == ptr<T>(p.curved) ? nullptr : ptr<T>(p.curved);
  const float beta_n = p.has_beta ? (float)(p.beta / (double)p.n) : 0.f;
  CAMEX_LAUNCH(merge_epilogue_kernel<T>, epilogue_grid(a.oi), 256, s)(a, ptr<T>(p.merged), curved_out,
                                                                p.has_beta ? ptr<T>(p.next_base) : nullptr, beta_n);
  CAMEX_CHECK_LAUNCH();
  if (p.base_bias && p.expert_bias && p.merged_bias) {
    CAMEX_LAUNCH(bias_forward_kernel<T>, grid_for(p.g * p.o, 256), 256, s)(ptr<const T>(p.base_bias), ptr<const T>(p.expert_bias),
                                                                     a.scores, ptr<T>(p.merged_bias), a.alpha, p.g, p.n, p.o);
    CAMEX_CHECK_LAUNCH();
  }
  return 0;
}

template <typename T> int ca_merge_backward_t(const camex_ca_merge_params &p, cudaStream_t s) {
  if (p.mask_kind == CAMEX_MASK_TENSOR) return CAMEX_ERR_DIMS;
  Arena ar = {ptr<char>(p.workspace), 0};
  CaWs ws = ca_ws(p, true, ar);
  if (ar.used > p.workspace_bytes) return CAMEX_ERR_WORKSPACE;
  Arena tar = trim_arena(p);
  CAMEX_TRY(ca_prepare<T>(p, ws, tar, s));
  MergeArgs<T> a = ca_args<T>(p, ws);
  const int64_t oi = a.oi;
  const T *base = ptr<const T>(p.base), *experts = ptr<const T>(p.experts);
  const T *gbar = ptr<const T>(p.grad_merged);
  const T *gnb = p.has_beta ? ptr<const T>(p.grad_next_base) : nullptr;
  const float beta_n = p.has_beta ? (float)(p.beta / (double)p.n) : 0.f;
  const D4 d4 = dims4(p.o1, p.o2, p.i1, p.i2);
  KronFactors f = {ptr<const void>(p.factor_a), ptr<const void>(p.factor_b), ptr<const void>(p.factor_c),
                   ptr<const void>(p.factor_d), p.r, p.n};
  T *grad_experts = ptr<T>(p.grad_experts);
  // H's launch (the first, without curvature) also sums Gbar over the groups (sumg, + gnb), which
  // the last expert's finish turns into the base gradient.
  const GroupSum<T> sumg = {ws.sumg, nullptr};
  // H in storage T where every expert's reverse is the tensor-core path's single-pass one (bf16),
  // which rounds H to bf16 as it loads it anyway: the same bits in half the bytes, written once and
  // read once per round of ranks. Otherwise f32 (the scalar chain, and f16's split of H).
  T *ht = nullptr;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    int64_t lim = 0;
    if (p.r > 0 && kron_tc_bwd_taken<T>(d4, &lim)) ht = reinterpret_cast<T *>(ws.h);
  }
  static_assert(!ColsBwdPrec<__nv_bfloat16>::data_lo, "bf16's columns side reads H single-pass");
  // With H in storage T, the rest of H's f32 buffer and the scratch s1 right after it (ca_ws) are
  // free while the experts' reverses run (the tensor-core path uses neither t1 nor kk, s1's two
  // halves, when it takes the lent room): room for Z with larger rounds of ranks.
  char *lent = nullptr;
  int64_t lent_bytes = 0;
  if (ht) {
    const int64_t h_used = Arena::piece(p.n * oi * (int64_t)sizeof(T));
    const int64_t h_all = Arena::piece(p.n * oi * 4);
    char *h0 = reinterpret_cast<char *>(ws.h);
    lent = h0 + h_used;
    lent_bytes = h_all - h_used;
    if (reinterpret_cast<char *>(ws.s1) == h0 + h_all)
      lent_bytes += kron_scratch_floats(p.dtype, d4, p.r) * 4;
  }
  // Scalars and biases, in the arena ca_ws set aside for them (disjoint from the other buffers);
  // with the curvature, also H of every expert (after the scalars' last reads of U, whose buffer
  // ws.h may be, or in the same pass over Gbar where h_dots_kernel takes it).
  Arena sar = {ptr<char>(p.workspace), ws.scalars_at};
  const HPass<T> hp = {beta_n, ht ? nullptr : ws.h, ht, sumg};
  CAMEX_TRY(merge_reverse_scalars<T>(s, a, gbar, p.has_beta != 0, gnb, ptr<const T>(p.base_bias),
                                     ptr<const T>(p.expert_bias), ptr<const T>(p.grad_merged_bias),
                                     ptr<T>(p.grad_scores), ptr<T>(p.grad_alpha), ptr<T>(p.grad_beta),
                                     ptr<T>(p.grad_base_bias), ptr<T>(p.grad_expert_bias), p.o, sar,
                                     p.r > 0 ? &hp : nullptr));
  bool ready = false;  // this expert's first stage 1 ran in the previous expert's last launch
  for (int64_t e = 0; e < p.n; ++e) {
    const ExpertFinish<T> fin = expert_finish(grad_experts, ws.acc, e, p.n, oi, ptr<T>(p.grad_base), ws.sumg);
    if (p.r == 0) {  // dL/dtau_e = H_e
      CAMEX_LAUNCH(h_kernel<T>, h_grid(oi), 256, s)(a, gbar, gnb, beta_n, e, e + 1, ws.h, nullptr,
                                                           e == 0 ? sumg : GroupSum<T>{});
      CAMEX_CHECK_LAUNCH();
      CAMEX_LAUNCH(finish_expert_kernel<T>, grid_for(oi, 256), 256, s)(ws.h, fin, oi);
      CAMEX_CHECK_LAUNCH();
    } else {
      const Opnd he = ht ? store_opnd<T>(ht + e * oi) : f32_opnd(ws.h + e * oi);
      bool next_ready = false;
      const NextExpert<T> nx = {e + 1 < p.n ? experts + (e + 1) * oi : nullptr, e + 1, ready, &next_ready};
      CAMEX_TRY(kron_backward_any<T>(s, ws.gt, he, tau_opnd<T>(experts + e * oi, base), f, e, d4,
                                 ptr<T>(p.grad_factor_a), ptr<T>(p.grad_factor_b), ptr<T>(p.grad_factor_c),
                                 ptr<T>(p.grad_factor_d), ws.t1, ws.kk, ws.w, ws.partial, fin, oi, lent, lent_bytes,
                                 nx));
      ready = next_ready;
    }
  }
  return 0;
}

}  // namespace

namespace {
thread_local int32_t tc_thread_mode = -1;

int32_t tc_process_default() {
#ifdef CAMEX_EMU
  return 1;  // the emulation exists to check this path
#else
  static const int32_t v = [] {
    const char *e = getenv("CAMEX_TENSOR_CORES");
    return (int32_t)(e && e[0] == '1' ? 1 : 0);
  }();
  return v;
#endif
}
}  // namespace

extern "C" void camex_set_tensor_cores(int32_t mode) { tc_thread_mode = mode < 0 ? -1 : (mode ? 1 : 0); }

extern "C" int32_t camex_tensor_cores(void) { return tc_thread_mode >= 0 ? tc_thread_mode : tc_process_default(); }

extern "C" int64_t camex_curvature_workspace(const camex_curvature_params *p, int32_t backward) {
  Arena ar = {nullptr, 0};
  curv_ws(*p, backward != 0, ar);
  return ar.used;
}

extern "C" int camex_curvature_forward(const camex_curvature_params *p, camex_stream_t stream) {
  if (bad_dims(p->n, p->o, p->i, p->r, p->o1, p->o2, p->i1, p->i2)) return CAMEX_ERR_DIMS;
  CAMEX_DISPATCH(p->dtype, curvature_forward_t, *p, (cudaStream_t)stream);
}

extern "C" int camex_curvature_backward(const camex_curvature_params *p, camex_stream_t stream) {
  if (bad_dims(p->n, p->o, p->i, p->r, p->o1, p->o2, p->i1, p->i2)) return CAMEX_ERR_DIMS;
  CAMEX_DISPATCH(p->dtype, curvature_backward_t, *p, (cudaStream_t)stream);
}

extern "C" int64_t camex_ca_merge_workspace(const camex_ca_merge_params *p, int32_t backward) {
  Arena ar = {nullptr, 0};
  ca_ws(*p, backward != 0, ar);
  return ar.used;
}

extern "C" int camex_ca_merge_forward(const camex_ca_merge_params *p, camex_stream_t stream) {
  if (bad_dims(p->n, p->o, p->i, p->r, p->o1, p->o2, p->i1, p->i2) || p->g <= 0) return CAMEX_ERR_DIMS;
  CAMEX_DISPATCH(p->dtype, ca_merge_forward_t, *p, (cudaStream_t)stream);
}

extern "C" int camex_ca_merge_backward(const camex_ca_merge_params *p, camex_stream_t stream) {
  if (bad_dims(p->n, p->o, p->i, p->r, p->o1, p->o2, p->i1, p->i2) || p->g <= 0) return CAMEX_ERR_DIMS;
  if (!scalars_grid_fits(p->g, p->n, p->o * p->i, p->has_beta != 0, p->base_bias && p->expert_bias,
                         p->dare.kind != CAMEX_DARE_NONE))
    return CAMEX_ERR_DIMS;
  CAMEX_DISPATCH(p->dtype, ca_merge_backward_t, *p, (cudaStream_t)stream);
}
