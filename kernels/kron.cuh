// The Kronecker curvature U = sum_r tau x1 A_r x2 B_r x3 C_r x4 D_r of one expert, and its reverse,
// as sequences of mode products on the 4-D view [o1, o2, i1, i2] (SPEC section 3; the same
// formulation as src/cpu/curvature.rs). Each mode product and each factor-gradient contraction is
// one launch of the strided GEMM in gemm.cuh; intermediates live in expert-sized f32 scratch
// (O*I floats each: 9.4 MB at T5-base `wi`, L2-resident on sm_90), never in [R, N, O, I].
#pragma once
#include "gemm.cuh"

namespace camex {

struct D4 {
  int64_t d[4];
  int64_t outer(int mode) const { int64_t p = 1; for (int k = 0; k < mode; ++k) p *= d[k]; return p; }
  int64_t inner(int mode) const { int64_t p = 1; for (int k = mode + 1; k < 4; ++k) p *= d[k]; return p; }
  int64_t total() const { return d[0] * d[1] * d[2] * d[3]; }
};

inline Opnd f32_opnd(const float *p) { Opnd o; o.p = p; o.base = nullptr; o.kind = OP_F32; o.sb = o.sr = o.sc = 0; return o; }
template <typename T> inline Opnd store_opnd(const T *p) { Opnd o; o.p = p; o.base = nullptr; o.kind = OP_STORE; o.sb = o.sr = o.sc = 0; return o; }
template <typename T> inline Opnd tau_opnd(const T *w, const T *e) { Opnd o; o.p = w; o.base = e; o.kind = OP_TAU; o.sb = o.sr = o.sc = 0; return o; }
inline Opnd with_strides(Opnd o, int64_t sb, int64_t sr, int64_t sc) { o.sb = sb; o.sr = sr; o.sc = sc; return o; }
inline OutView f32_out(float *p, bool acc) {
  OutView v; v.p = p; v.f32 = 1; v.accumulate = acc ? 1 : 0; v.sb = v.sr = v.sc = 0; v.bias = nullptr; v.bias_sb = 0; return v;
}
template <typename T> inline OutView store_out(T *p, bool acc) {
  OutView v; v.p = p; v.f32 = 0; v.accumulate = acc ? 1 : 0; v.sb = v.sr = v.sc = 0; v.bias = nullptr; v.bias_sb = 0; return v;
}

// y (+)= x x_mode M (M^T when `transpose`), y f32 with the layout of x. M: k x k storage at `m`.
// Runs as `outer` GEMMs [k x k] @ [k x inner] or `inner` GEMMs [outer x k] @ [k x k]^T,
// whichever has fewer batches (the CPU path makes the same choice).
template <typename T>
inline int mode_product(cudaStream_t s, float *y, bool accumulate, Opnd x, const D4 &d4, int mode, const T *m,
                        bool transpose) {
  const int64_t k = d4.d[mode], outer = d4.outer(mode), inner = d4.inner(mode);
  const int64_t m_r = transpose ? 1 : k, m_c = transpose ? k : 1;  // M[j][j'] at j*m_r + j'*m_c
  OutView out = f32_out(y, accumulate);
  if (outer <= inner) {
    // C_b[j][t] = sum_j' M[j][j'] X_b[j'][t]
    Opnd a = with_strides(store_opnd<T>(m), 0, m_r, m_c);
    Opnd b = with_strides(x, k * inner, inner, 1);
    out.sb = k * inner; out.sr = inner; out.sc = 1;
    return gemm<T>(s, a, b, out, k, inner, k, outer);
  }
  // C_t[o][j] = sum_j' X[o][j'][t] M[j][j']
  Opnd a = with_strides(x, 1, k * inner, inner);
  Opnd b = with_strides(store_opnd<T>(m), 0, m_c, m_r);
  out.sb = 1; out.sr = k * inner; out.sc = inner;
  return gemm<T>(s, a, b, out, outer, k, k, inner);
}

// g[j][j'] = sum_{o,t} Z[o][j][t] * X[o][j'][t]: the factor gradient of `mode`, stored as T at `g`.
template <typename T>
inline int mode_contract(cudaStream_t s, T *g, Opnd z, Opnd x, const D4 &d4, int mode, float *partial) {
  const int64_t k = d4.d[mode], outer = d4.outer(mode), inner = d4.inner(mode);
  OutView out = store_out<T>(g, false);
  out.sr = k; out.sc = 1;
  if (outer <= inner) {
    Opnd a = with_strides(z, k * inner, inner, 1);
    Opnd b = with_strides(x, k * inner, 1, inner);
    return gemm_sum<T>(s, a, b, out, partial, k, k, inner, outer);
  }
  Opnd a = with_strides(z, 1, inner, k * inner);
  Opnd b = with_strides(x, 1, k * inner, inner);
  return gemm_sum<T>(s, a, b, out, partial, k, k, outer, inner);
}

// Floats of split-K partials the contractions of `d4` need.
inline int64_t contract_partial_floats(const D4 &d4) {
  int64_t best = 0;
  for (int mode = 0; mode < 4; ++mode) {
    const int64_t k = d4.d[mode], outer = d4.outer(mode), inner = d4.inner(mode);
    const int64_t batch = outer <= inner ? outer : inner, K = outer <= inner ? inner : outer;
    const SumPlan pl = sum_plan(K, batch);
    const int64_t f = pl.z * k * k;
    if (f > best) best = f;
  }
  return best;
}

struct KronFactors {
  const void *a, *b, *c, *d;
  int64_t r, n;
};

template <typename T> inline const T *factor(const void *f, int64_t r, int64_t e, int64_t n, int64_t k) {
  return reinterpret_cast<const T *>(f) + (r * n + e) * k * k;
}

// u = sum_r tau x1 A x2 B x3 C x4 D for expert e (u f32 [O*I], overwritten). s1, s2: f32 scratch.
template <typename T>
inline int kron_forward(cudaStream_t s, float *u, Opnd tau, const KronFactors &f, int64_t e, const D4 &d4, float *s1,
                        float *s2) {
  for (int64_t r = 0; r < f.r; ++r) {
    CAMEX_TRY(mode_product<T>(s, s1, false, tau, d4, 0, factor<T>(f.a, r, e, f.n, d4.d[0]), false));
    CAMEX_TRY(mode_product<T>(s, s2, false, f32_opnd(s1), d4, 1, factor<T>(f.b, r, e, f.n, d4.d[1]), false));
    CAMEX_TRY(mode_product<T>(s, s1, false, f32_opnd(s2), d4, 2, factor<T>(f.c, r, e, f.n, d4.d[2]), false));
    CAMEX_TRY(mode_product<T>(s, u, r > 0, f32_opnd(s1), d4, 3, factor<T>(f.d, r, e, f.n, d4.d[3]), false));
  }
  return 0;
}

// Reverse chain of one expert (kron_backward in src/cpu/curvature.rs): from H = dL/dU (operand h)
// writes dL/dtau into gt (f32, overwritten) and the four factor gradients of expert e (storage T).
// t1, kk, w: f32 scratch [O*I]; partial: contract_partial_floats(d4) floats.
template <typename T>
inline int kron_backward(cudaStream_t s, float *gt, Opnd h, Opnd tau, const KronFactors &f, int64_t e, const D4 &d4,
                         T *ga, T *gb, T *gc, T *gd, float *t1, float *kk, float *w, float *partial) {
  const int64_t n = f.n;
  for (int64_t r = 0; r < f.r; ++r) {
    const T *A = factor<T>(f.a, r, e, n, d4.d[0]);
    const T *B = factor<T>(f.b, r, e, n, d4.d[1]);
    const T *C = factor<T>(f.c, r, e, n, d4.d[2]);
    const T *D = factor<T>(f.d, r, e, n, d4.d[3]);
    // K_CD = H x4 D^T x3 C^T; Z = K_CD x2 B^T; dA = Z_(1) tau_(1)^T
    CAMEX_TRY(mode_product<T>(s, t1, false, h, d4, 3, D, true));
    CAMEX_TRY(mode_product<T>(s, kk, false, f32_opnd(t1), d4, 2, C, true));
    CAMEX_TRY(mode_product<T>(s, w, false, f32_opnd(kk), d4, 1, B, true));
    CAMEX_TRY(mode_contract<T>(s, ga + (r * n + e) * d4.d[0] * d4.d[0], f32_opnd(w), tau, d4, 0, partial));
    // W = K_CD x1 A^T; dB = contraction over mode 2; dtau (+)= W x2 B^T
    CAMEX_TRY(mode_product<T>(s, w, false, f32_opnd(kk), d4, 0, A, true));
    CAMEX_TRY(mode_contract<T>(s, gb + (r * n + e) * d4.d[1] * d4.d[1], f32_opnd(w), tau, d4, 1, partial));
    CAMEX_TRY(mode_product<T>(s, gt, r > 0, f32_opnd(w), d4, 1, B, true));
    // K_AB = H x1 A^T x2 B^T; V = K_AB x4 D^T -> dC; Q = K_AB x3 C^T -> dD
    CAMEX_TRY(mode_product<T>(s, t1, false, h, d4, 0, A, true));
    CAMEX_TRY(mode_product<T>(s, kk, false, f32_opnd(t1), d4, 1, B, true));
    CAMEX_TRY(mode_product<T>(s, w, false, f32_opnd(kk), d4, 3, D, true));
    CAMEX_TRY(mode_contract<T>(s, gc + (r * n + e) * d4.d[2] * d4.d[2], f32_opnd(w), tau, d4, 2, partial));
    CAMEX_TRY(mode_product<T>(s, w, false, f32_opnd(kk), d4, 2, C, true));
    CAMEX_TRY(mode_contract<T>(s, gd + (r * n + e) * d4.d[3] * d4.d[3], f32_opnd(w), tau, d4, 3, partial));
  }
  return 0;
}

}  // namespace camex
