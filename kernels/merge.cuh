// The weighted merge over experts and its reverse, shared by `merge` (curved given) and the fused
// CA-merge (curved computed): element-wise kernels over q = p*I + col that loop over experts and
// groups in registers, and fixed-order reductions for the inner products behind grad_scores,
// grad_alpha and grad_beta.
#pragma once
#include "mask.cuh"
#include "mma.cuh"
#include "philox.cuh"

namespace camex {

enum USrcKind { U_F32 = 0, U_STORE = 1, U_TAU = 2 };

// Where U_i comes from: f32 scratch [N, O*I], a storage tensor (curved), or tau itself (identity).
template <typename T> struct USrc {
  int kind;
  const float *f;
  const T *t;
  TauSrc<T> tau;
  __device__ __forceinline__ float u(int64_t i, int64_t q) const {
    switch (kind) {
      case U_F32: return f[i * tau.oi + q];
      case U_STORE: return to_f32(t[i * tau.oi + q]);
      default: return tau.tau(i, q);
    }
  }
  // U_i at q and q + 1 as one access (q even, O*I even, the buffer's start aligned: aligned_pair).
  __device__ __forceinline__ void u2(int64_t i, int64_t q, float v[2]) const {
    switch (kind) {
      case U_F32: load_pair(f + i * tau.oi + q, v); return;
      case U_STORE: load_pair(t + i * tau.oi + q, v); return;
      default: v[0] = tau.tau(i, q), v[1] = tau.tau(i, q + 1);
    }
  }
};

template <typename T> struct MergeArgs {
  USrc<T> u;
  MaskEval<T> mask;
  const T *base;
  const T *scores;   // [G, N]
  camex_dare dare;
  float alpha;
  int64_t g, n, oi;
};

constexpr int NREG = 8;  // experts whose P_i stay in registers; more are re-read (correct, slower)
constexpr int EPI_TABLE = 1024;  // G*N merge weights staged per block by merge_epilogue_kernel

// merge_epilogue_kernel's grid: a thread per pair of elements (one per element where pairs do not
// apply, through the grid-stride loop).
inline unsigned epilogue_grid(int64_t oi) { return grid_for((oi + 1) / 2, 256); }

// merged[g][q] = E[q] + alpha * sum_i (s[g,i] * zeta[g,i,q]) * (m_i[q] * U_i[q]);
// optionally curved[i][q] = U_i[q] and next_base[q] = E[q] + beta_n * sum_i U_i[q] (unmasked U).
template <typename T>
// (256, 2): with (256) alone ptxas 13.0 for sm_80 picks 40 registers and spills P.
__global__ void __launch_bounds__(256, 2)
merge_epilogue_kernel(MergeArgs<T> a, T *merged, T *curved, T *next_base, float beta_n) {
  // alpha * s[g,i] * zeta[g,i] staged once per block when zeta does not depend on the element: the
  // group loop is then G*N shared-memory FMAs per element instead of G*N global score loads and
  // DARE evaluations (the kernel is meant to be bound by its N + 1 reads and G writes).
  __shared__ float wt[EPI_TABLE];
  const bool table = a.g * a.n <= EPI_TABLE && a.dare.kind != CAMEX_DARE_ELEMENT;
  if (table) {
    for (int64_t x = threadIdx.x; x < a.g * a.n; x += blockDim.x)
      wt[x] = a.alpha * (to_f32(a.scores[x]) * dare_zeta(a.dare, x / a.n, x % a.n, a.n, a.oi, 0));
    __syncthreads();
  }
  // Two elements per thread where every row starts aligned: each weight read from shared memory
  // (a broadcast, one wavefront per warp) serves both, and every access moves a pair (the same
  // arithmetic per element as the loop below, so the same bits).
  const bool pairs = a.oi % 2 == 0 && aligned_pair(a.base) && aligned_pair(a.u.f) && aligned_pair(a.u.t) &&
                     aligned_pair(merged) && aligned_pair(curved) && aligned_pair(next_base);
  if (table && a.n <= NREG && pairs && a.u.kind != U_TAU) {
    for (int64_t qb = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * 2; qb < a.oi;
         qb += (int64_t)gridDim.x * blockDim.x * 2) {
      float e[2], el[2], p[NREG][2], usum[2] = {0.f, 0.f};
      load_pair(a.base + qb, e);
#pragma unroll
      for (int k = 0; k < 2; ++k) el[k] = a.mask.elect(qb + k);
#pragma unroll
      for (int i = 0; i < NREG; ++i) {
        p[i][0] = p[i][1] = 0.f;
        if (i < a.n) {
          float u[2];
          a.u.u2(i, qb, u);
          if (curved) store_pair(curved + i * a.oi + qb, u);
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            usum[k] += u[k];
            p[i][k] = a.mask.kind == CAMEX_MASK_NONE ? u[k] : u[k] * a.mask.m(i, qb + k, el[k]);
          }
        }
      }
      if (next_base) {
        const float nb[2] = {e[0] + beta_n * usum[0], e[1] + beta_n * usum[1]};
        store_pair(next_base + qb, nb);
      }
      for (int64_t g = 0; g < a.g; ++g) {
        float acc[2] = {0.f, 0.f};
#pragma unroll
        for (int i = 0; i < NREG; ++i)
          if (i < a.n) {
            const float w = wt[g * a.n + i];
            acc[0] += w * p[i][0];
            acc[1] += w * p[i][1];
          }
        const float m2[2] = {e[0] + acc[0], e[1] + acc[1]};
        store_pair(merged + g * a.oi + qb, m2);
      }
    }
    return;
  }
  for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < a.oi; q += (int64_t)gridDim.x * blockDim.x) {
    const float e = to_f32(a.base[q]);
    const float el = a.mask.elect(q);
    float p[NREG];
    float usum = 0.f;
#pragma unroll
    for (int i = 0; i < NREG; ++i) {
      p[i] = 0.f;
      if (i < a.n) {
        const float u = a.u.u(i, q);
        if (curved) curved[i * a.oi + q] = from_f32<T>(u);
        usum += u;
        p[i] = a.mask.kind == CAMEX_MASK_NONE ? u : u * a.mask.m(i, q, el);
      }
    }
    for (int64_t i = NREG; i < a.n; ++i) {
      const float u = a.u.u(i, q);
      if (curved) curved[i * a.oi + q] = from_f32<T>(u);
      usum += u;
    }
    if (next_base) next_base[q] = from_f32<T>(e + beta_n * usum);
    if (table && a.n <= NREG) {
      for (int64_t g = 0; g < a.g; ++g) {
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < NREG; ++i)
          if (i < a.n) acc += wt[g * a.n + i] * p[i];
        merged[g * a.oi + q] = from_f32<T>(e + acc);
      }
      continue;
    }
    for (int64_t g = 0; g < a.g; ++g) {
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < NREG; ++i) {
        if (i < a.n) acc += to_f32(a.scores[g * a.n + i]) * dare_zeta(a.dare, g, i, a.n, a.oi, q) * p[i];
      }
      for (int64_t i = NREG; i < a.n; ++i) {
        const float u = a.u.u(i, q);
        const float pi = a.mask.kind == CAMEX_MASK_NONE ? u : u * a.mask.m(i, q, el);
        acc += to_f32(a.scores[g * a.n + i]) * dare_zeta(a.dare, g, i, a.n, a.oi, q) * pi;
      }
      merged[g * a.oi + q] = from_f32<T>(e + a.alpha * acc);
    }
  }
}

// merged_bias[g][o] = e_b[o] + alpha * sum_i s[g,i] (b_i[o] - e_b[o]) (no mask, no DARE).
template <typename T>
__global__ void bias_forward_kernel(const T *eb, const T *b, const T *scores, T *out, float alpha, int64_t g, int64_t n,
                                    int64_t o) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < g * o; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t gg = k / o, oo = k % o;
    const float e = to_f32(eb[oo]);
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += to_f32(scores[gg * n + i]) * (to_f32(b[i * o + oo]) - e);
    out[k] = from_f32<T>(e + alpha * s);
  }
}

constexpr int DOT_THREADS = 256;
constexpr int64_t DOT_CHUNK = 4096;  // elements per block: fixes the reduction order by shape only

inline int64_t dot_chunks(int64_t oi) { return (oi + DOT_CHUNK - 1) / DOT_CHUNK; }

// Partial inner products, rows r < G: <Gbar_r, zeta[r,i] (m_i U_i)>; row G (when `gnb`):
// <grad_next_base, U_i>. Block (chunk, row-block of DOT_ROWS, expert-block of NREG);
// out[((row*N)+i)*chunks + chunk]. A block reads its chunk of U (and the mask) once for DOT_ROWS
// rows (eight: 121 registers on sm_90, 128 on sm_80, no spills; U is read twice for G = 16 instead
// of four times at four rows. One row with DARE, whose per-element draws took 221 registers at four
// rows); each row's sum runs over q in the same order as with one row per block.
constexpr int DOT_ROWS = 8;
template <bool Dare> __host__ __device__ constexpr int dot_rows() { return Dare ? 1 : DOT_ROWS; }
template <typename T, bool Dare>
__device__ __forceinline__ void dots_body(float *red, const MergeArgs<T> &a, const T *gbar, const T *gnb, float *out,
                                          int64_t chunks, int64_t rows) {
  constexpr int rb = dot_rows<Dare>();  // rows per block
  const int64_t chunk = blockIdx.x, row0 = (int64_t)blockIdx.y * rb, i0 = (int64_t)blockIdx.z * NREG;
  float acc[rb][NREG];
#pragma unroll
  for (int r = 0; r < rb; ++r)
#pragma unroll
    for (int i = 0; i < NREG; ++i) acc[r][i] = 0.f;
  const int64_t q_end = min(a.oi, (chunk + 1) * DOT_CHUNK);
  // A block of the beta row alone reads U unmasked: no election, no mask.
  const bool masked = a.mask.kind != CAMEX_MASK_NONE && row0 < a.g;
  for (int64_t q = chunk * DOT_CHUNK + threadIdx.x; q < q_end; q += DOT_THREADS) {
    const float el = masked ? a.mask.elect(q) : 0.f;
    float u[NREG], pi[NREG];
#pragma unroll
    for (int i = 0; i < NREG; ++i) {
      const int64_t ie = i0 + i;
      u[i] = ie < a.n ? a.u.u(ie, q) : 0.f;
      pi[i] = ie < a.n && masked ? u[i] * a.mask.m(ie, q, el) : u[i];
    }
#pragma unroll
    for (int r = 0; r < rb; ++r) {
      const int64_t row = row0 + r;
      if (row >= rows) continue;
      if (row == a.g) {  // the beta row
        const float gv = gnb ? to_f32(gnb[q]) : 0.f;
#pragma unroll
        for (int i = 0; i < NREG; ++i) acc[r][i] += gv * u[i];
      } else {
        const float gv = to_f32(gbar[row * a.oi + q]);
#pragma unroll
        for (int i = 0; i < NREG; ++i)
          if (i0 + i < a.n) acc[r][i] += gv * (Dare ? dare_zeta(a.dare, row, i0 + i, a.n, a.oi, q) : 1.f) * pi[i];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < rb; ++r) {
    const int64_t row = row0 + r;
    if (row >= rows) continue;  // uniform across the block
#pragma unroll
    for (int i = 0; i < NREG; ++i) {
      const float s = block_sum<DOT_THREADS>(acc[r][i], red);
      const int64_t ie = i0 + i;
      if (threadIdx.x == 0 && ie < a.n) out[(row * a.n + ie) * chunks + chunk] = s;
    }
  }
}
template <typename T>
__global__ void __launch_bounds__(DOT_THREADS)
dots_kernel(MergeArgs<T> a, const T *gbar, const T *gnb, float *out, int64_t chunks, int64_t rows) {
  __shared__ float red[DOT_THREADS];
  dots_body<T, false>(red, a, gbar, gnb, out, chunks, rows);
}
template <typename T>
__global__ void __launch_bounds__(DOT_THREADS)
dots_dare_kernel(MergeArgs<T> a, const T *gbar, const T *gnb, float *out, int64_t chunks, int64_t rows) {
  __shared__ float red[DOT_THREADS];
  dots_body<T, true>(red, a, gbar, gnb, out, chunks, rows);
}

// Bias reverse: grad_base_bias[o] = sum_g (1 - alpha sum_i s[g,i]) dbb[g,o];
// grad_expert_bias[i,o] = alpha sum_g s[g,i] dbb[g,o].
template <typename T>
__global__ void bias_backward_kernel(const T *scores, const T *dbb, T *grad_eb, T *grad_b, float alpha, int64_t g,
                                     int64_t n, int64_t o) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < (n + 1) * o; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = k / o, oo = k % o;  // i == n: the base bias
    float s = 0.f;
    if (i == n) {
      for (int64_t gg = 0; gg < g; ++gg) {
        float ssum = 0.f;
        for (int64_t j = 0; j < n; ++j) ssum += to_f32(scores[gg * n + j]);
        s += (1.f - alpha * ssum) * (dbb ? to_f32(dbb[gg * o + oo]) : 0.f);
      }
      grad_eb[oo] = from_f32<T>(s);
    } else {
      for (int64_t gg = 0; gg < g; ++gg) s += to_f32(scores[gg * n + i]) * (dbb ? to_f32(dbb[gg * o + oo]) : 0.f);
      grad_b[i * o + oo] = from_f32<T>(alpha * s);
    }
  }
}

// bip[g*N + i] = <dbb_g, b_i - e_b>, one block per (g, i), fixed-order tree.
template <typename T>
__global__ void __launch_bounds__(DOT_THREADS)
bias_dots_kernel(const T *eb, const T *b, const T *dbb, float *bip, int64_t n, int64_t o) {
  __shared__ float red[DOT_THREADS];
  const int64_t gg = blockIdx.x / n, i = blockIdx.x % n;
  float s = 0.f;
  if (dbb)
    for (int64_t oo = threadIdx.x; oo < o; oo += DOT_THREADS)
      s += to_f32(dbb[gg * o + oo]) * (to_f32(b[i * o + oo]) - to_f32(eb[oo]));
  s = block_sum<DOT_THREADS>(s, red);
  if (threadIdx.x == 0) bip[blockIdx.x] = s;
}

// grad_scores[g,i] = alpha * ip[g,i]; grad_alpha = sum_{g,i} s[g,i] ip[g,i], ip including the bias
// products; grad_beta = (1/N) sum_i <gnb, U_i>. One block; every sum in a fixed order.
template <typename T>
__global__ void finalize_kernel(const float *dots, int64_t chunks, const float *bip, const T *scores, float alpha,
                                int64_t g, int64_t n, T *grad_scores, T *grad_alpha, T *grad_beta, float *ip_scratch) {
  for (int64_t k = threadIdx.x; k < g * n + (grad_beta ? n : 0); k += blockDim.x) {
    float s = 0.f;
    for (int64_t c = 0; c < chunks; ++c) s += dots[k * chunks + c];
    if (k < g * n && bip) s += bip[k];
    ip_scratch[k] = s;
    if (k < g * n && grad_scores) grad_scores[k] = from_f32<T>(alpha * s);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (grad_alpha) {
      float a = 0.f;
      for (int64_t k = 0; k < g * n; ++k) a += ip_scratch[k] * to_f32(scores[k]);
      *grad_alpha = from_f32<T>(a);
    }
    if (grad_beta) {
      float b = 0.f;
      for (int64_t i = 0; i < n; ++i) b += ip_scratch[g * n + i];
      *grad_beta = from_f32<T>(b / (float)n);
    }
  }
}

// H_i[q] = alpha * m_i[q] * sum_g s[g,i] zeta[g,i,q] Gbar_g[q]  (+ beta_n * gnb[q]),
// for experts [i_begin, i_end); written to f32 `hf` [.., O*I] (offset by i - i_begin) or to T `ht`.
// With `sum` set, also sum_g Gbar_g[q] (+ gnb[q]) in group order, from the same reads of Gbar (the
// base gradient's term: no pass of its own over the upstream gradient).
// Groups outer, H_EXPERTS experts' sums in registers: Gbar is read once per H_EXPERTS experts (once
// for every SPEC section 8 shape, N = 7), each sum still in group order (8: 70 registers on sm_80
// and sm_90, no spills, under ptxas 13.0; 4 had read Gbar twice at N = 7). The scores go through
// shared memory where they fit (every thread reads all of them).
constexpr int H_EXPERTS = 8, H_SCORES = 1024;
// Where h_kernel writes sum_g Gbar_g (+ gnb): f32 `f` or storage `t`; neither when both are null.
template <typename T> struct GroupSum {
  float *f = nullptr;
  T *t = nullptr;
};
// Elements per thread: each score a thread reads from shared memory serves H_Q of them (the reads
// are broadcasts, one wavefront per warp and score, which bounded the kernel at one element).
constexpr int H_Q = 2;
// h_kernel's grid for oi elements.
inline unsigned h_grid(int64_t oi) { return grid_for((oi + H_Q - 1) / H_Q, 256); }

// h_dots_kernel: H as h_kernel, and from the same reads of Gbar and U the dots of dots_kernel
// (<Gbar_g, zeta_gi m_i U_i> for every group g and expert i, and the beta row <gnb, U_i>), so that
// the backward passes over the upstream gradient once. The group-by-expert products are a GEMM
// with k = O*I: each warp stages its 64 elements of Gbar (16 groups at a time) and of m_i U_i in
// shared memory and runs them through the tensor cores (m = groups, n = experts, k = elements), in
// bf16 operands that are exact here: Gbar is bf16 storage, m_i is 0 or 1, and U is bf16 storage or
// an f32 value split into hi + lo (two mma). f32 accumulation, like dots_kernel's FMAs; only the
// order of the sum differs (fixed by the shape). Per block one chunk of DOT_CHUNK elements and one
// partial per dot, summed over the warps in warp order and scaled by DARE's per-expert zeta_gi, in
// dots_kernel's layout for finalize_kernel.
constexpr int HD_MT = 2;                    // m tiles of 16 groups: G <= 32 (every SPEC section 8 shape)
constexpr int HD_LD = 64 + 8;               // row stride of the staged matrices: conflict-free fragments
constexpr int HD_WARP = (16 + 2 * 8) * HD_LD;  // MmaT per warp: Gbar's 16 rows, U's hi and lo planes
constexpr int HD_SMEM = 8 * HD_WARP * 2;       // bytes, 8 warps (the reduction reuses them)
static_assert(DOT_CHUNK % (256 * H_Q) == 0, "a block's chunk is whole iterations");
static_assert(8 * HD_MT * 16 * 8 * 4 + 256 * 4 <= HD_SMEM, "the reduction fits the staging");

// The dots' outputs where h_dots_kernel computes them (dots_kernel's layout).
struct HDots {
  float *out;
  int64_t chunks, rows;
};

template <typename T, bool Dots>
__device__ __forceinline__ void h_body(char *hd, const MergeArgs<T> &a, const T *gbar, const T *gnb, float beta_n,
                                       int64_t i_begin, int64_t i_end, float *hf, T *ht, GroupSum<T> sum, HDots dd) {
  __shared__ float sc[H_SCORES];
  const bool staged = a.g * a.n <= H_SCORES;
  if (staged)
    for (int64_t k = threadIdx.x; k < a.g * a.n; k += blockDim.x) sc[k] = to_f32(a.scores[k]);
  __syncthreads();
  const bool summing = sum.f || sum.t;
  // Pairs of elements as one access (whole sectors per warp) where every row starts aligned.
  static_assert(H_Q == 2, "pair accesses");
  const bool pairs = a.oi % 2 == 0 && aligned_pair(gbar) && aligned_pair(gnb) && aligned_pair(hf) &&
                     aligned_pair(ht) && aligned_pair(sum.f) && aligned_pair(sum.t) &&
                     (!Dots || (aligned_pair(a.u.f) && aligned_pair(a.u.t)));
  // Dots: this warp's staging (Gbar rows gs, U's planes uh and ul) and accumulators.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  MmaT *gs = reinterpret_cast<MmaT *>(hd) + warp * HD_WARP, *uh = gs + 16 * HD_LD, *ul = uh + 8 * HD_LD;
  // hi + lo where m_i U_i is not bf16 already: U in f32, or a mask tensor's values times U.
  const bool ulo = a.u.kind == U_F32 || a.mask.kind == CAMEX_MASK_TENSOR;
  const bool masked = a.mask.kind != CAMEX_MASK_NONE;
  float c[HD_MT][4] = {}, nbacc[H_EXPERTS] = {};
  // Block-uniform steps (the warps' mma need all lanes): a chunk per block with the dots, else a
  // grid-stride loop.
  const int64_t q_begin = Dots ? (int64_t)blockIdx.x * DOT_CHUNK : (int64_t)blockIdx.x * blockDim.x * H_Q;
  const int64_t q_end = Dots ? min(a.oi, q_begin + DOT_CHUNK) : a.oi;
  const int64_t q_step = Dots ? (int64_t)blockDim.x * H_Q : (int64_t)gridDim.x * blockDim.x * H_Q;
  for (int64_t q0 = q_begin; q0 < q_end; q0 += q_step) {
    const int64_t qb = q0 + threadIdx.x * H_Q;
    const bool live = qb < a.oi;
    if (!Dots && !live) break;
    bool in[H_Q];
    float el[H_Q];
#pragma unroll
    for (int k = 0; k < H_Q; ++k) {
      in[k] = qb + k < a.oi;
      el[k] = in[k] ? a.mask.elect(qb + k) : 0.f;
    }
    float u[H_EXPERTS][H_Q];  // U_i (unmasked), for the beta row
    if constexpr (Dots) {
#pragma unroll
      for (int j = 0; j < H_EXPERTS; ++j) {
        float pm[H_Q], hv[H_Q], lv[H_Q];
        if (pairs && live && j < a.n) a.u.u2(j, qb, u[j]);
#pragma unroll
        for (int k = 0; k < H_Q; ++k) {
          if (!(pairs && live && j < a.n)) u[j][k] = in[k] && j < a.n ? a.u.u(j, qb + k) : 0.f;
          pm[k] = masked && in[k] && j < a.n ? u[j][k] * a.mask.m(j, qb + k, el[k]) : u[j][k];
          hv[k] = to_f32(from_f32<MmaT>(pm[k]));
          lv[k] = pm[k] - hv[k];
        }
        store_pair(uh + j * HD_LD + 2 * lane, hv);
        if (ulo) store_pair(ul + j * HD_LD + 2 * lane, lv);
      }
    }
    for (int64_t i0 = i_begin; i0 < i_end; i0 += H_EXPERTS) {
      float s[H_EXPERTS][H_Q];
#pragma unroll
      for (int j = 0; j < H_EXPERTS; ++j)
#pragma unroll
        for (int k = 0; k < H_Q; ++k) s[j][k] = 0.f;
      float sg[H_Q];  // the group sums (kept from the first pass over the groups only)
#pragma unroll
      for (int k = 0; k < H_Q; ++k) sg[k] = 0.f;
      for (int64_t g = 0; g < a.g; ++g) {
        float gb[H_Q];
        if (pairs && live) {
          load_pair(gbar + g * a.oi + qb, gb);
        } else {
#pragma unroll
          for (int k = 0; k < H_Q; ++k) gb[k] = in[k] ? to_f32(gbar[g * a.oi + qb + k]) : 0.f;
        }
#pragma unroll
        for (int k = 0; k < H_Q; ++k) sg[k] += gb[k];
#pragma unroll
        for (int j = 0; j < H_EXPERTS; ++j)
          if (i0 + j < i_end) {
            const float sv = staged ? sc[g * a.n + i0 + j] : to_f32(a.scores[g * a.n + i0 + j]);
#pragma unroll
            for (int k = 0; k < H_Q; ++k)
              if (in[k]) s[j][k] += sv * dare_zeta(a.dare, g, i0 + j, a.n, a.oi, qb + k) * gb[k];
          }
        if constexpr (Dots) {
          // Row g % 16 of the m tile; at its last row, the tile's four k steps (rows past G hold
          // whatever they held: each row of C depends on its own row of A alone, and those of
          // groups past G are not written out).
          store_pair(gs + (g & 15) * HD_LD + 2 * lane, gb);
          if ((g & 15) == 15 || g == a.g - 1) {
            __syncwarp();
            const auto tile = [&](float cm[4]) {
#pragma unroll
              for (int ks = 0; ks < 64; ks += 16) {
                uint32_t fa[4], fb[2];
                frag_a(fa, gs, HD_LD, 0, ks, lane);
                frag_b(fb, uh, HD_LD, 0, ks, lane);
                mma_bf16(cm, fa, fb);
                if (ulo) {
                  frag_b(fb, ul, HD_LD, 0, ks, lane);
                  mma_bf16(cm, fa, fb);
                }
              }
            };
            static_assert(HD_MT == 2, "two m tiles, named");
            if (g < 16) tile(c[0]);
            else tile(c[1]);
            __syncwarp();
          }
        }
      }
      float nb[H_Q] = {};  // gnb
      if (gnb && pairs && live) {
        load_pair(gnb + qb, nb);
      } else if (gnb) {
#pragma unroll
        for (int k = 0; k < H_Q; ++k) nb[k] = in[k] ? to_f32(gnb[qb + k]) : 0.f;
      }
      if constexpr (Dots) {
        if (dd.rows > a.g) {
#pragma unroll
          for (int j = 0; j < H_EXPERTS; ++j)
#pragma unroll
            for (int k = 0; k < H_Q; ++k) nbacc[j] += nb[k] * u[j][k];
        }
      }
      if (summing && i0 == i_begin && live) {
#pragma unroll
        for (int k = 0; k < H_Q; ++k)
          if (gnb) sg[k] += nb[k];
        if (pairs) {
          if (sum.f) store_pair(sum.f + qb, sg);
          else store_pair(sum.t + qb, sg);
        } else {
#pragma unroll
          for (int k = 0; k < H_Q; ++k) {
            if (!in[k]) continue;
            if (sum.f) sum.f[qb + k] = sg[k];
            else sum.t[qb + k] = from_f32<T>(sg[k]);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < H_EXPERTS; ++j) {
        const int64_t i = i0 + j;
        if (i >= i_end || !live) continue;
        float h[H_Q];
#pragma unroll
        for (int k = 0; k < H_Q; ++k) {
          h[k] = a.mask.kind == CAMEX_MASK_NONE || !in[k] ? a.alpha * s[j][k]
                                                          : a.alpha * a.mask.m(i, qb + k, el[k]) * s[j][k];
          if (gnb) h[k] += beta_n * nb[k];
        }
        if (pairs) {
          if (hf) store_pair(hf + (i - i_begin) * a.oi + qb, h);
          else store_pair(ht + i * a.oi + qb, h);
        } else {
#pragma unroll
          for (int k = 0; k < H_Q; ++k) {
            if (!in[k]) continue;
            if (hf) hf[(i - i_begin) * a.oi + qb + k] = h[k];
            else ht[i * a.oi + qb + k] = from_f32<T>(h[k]);
          }
        }
      }
    }
  }
  if constexpr (Dots) {
    // The warps' accumulators (C[g][i] at rows gid, gid + 8, columns 2t, 2t + 1) summed in warp
    // order; the beta row by block_sum. The staging is free once every warp is past its loop.
    __syncthreads();
    float *red = reinterpret_cast<float *>(hd), *tree = red + 8 * HD_MT * 16 * 8;
    const int gid = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < HD_MT; ++mt) {
      float *r = red + (warp * HD_MT + mt) * 16 * 8;
      store_pair(r + gid * 8 + 2 * t, c[mt]);
      store_pair(r + (gid + 8) * 8 + 2 * t, c[mt] + 2);
    }
    __syncthreads();
    for (int64_t x = threadIdx.x; x < a.g * 8; x += blockDim.x) {
      const int64_t row = x / 8, i = x % 8;
      if (i >= a.n) continue;
      float v = 0.f;
      for (int w = 0; w < 8; ++w) v += red[((w * HD_MT + row / 16) * 16 + row % 16) * 8 + i];
      // DARE per expert: zeta[g, i] is one factor of the whole sum (1 without DARE).
      dd.out[(row * a.n + i) * dd.chunks + blockIdx.x] = v * dare_zeta(a.dare, row, i, a.n, a.oi, 0);
    }
    if (dd.rows > a.g) {
#pragma unroll
      for (int j = 0; j < H_EXPERTS; ++j) {
        const float v = block_sum<256>(nbacc[j], tree);
        if (threadIdx.x == 0 && j < a.n) dd.out[(a.g * a.n + j) * dd.chunks + blockIdx.x] = v;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256, 1)
h_kernel(MergeArgs<T> a, const T *gbar, const T *gnb, float beta_n, int64_t i_begin, int64_t i_end, float *hf, T *ht,
         GroupSum<T> sum) {
  h_body<T, false>(nullptr, a, gbar, gnb, beta_n, i_begin, i_end, hf, ht, sum, HDots{});
}
template <typename T>
__global__ void __launch_bounds__(256, 1)
h_dots_kernel(MergeArgs<T> a, const T *gbar, const T *gnb, float beta_n, float *hf, T *ht, GroupSum<T> sum, HDots dd) {
  __shared__ __align__(16) char hd[HD_SMEM];
  h_body<T, true>(hd, a, gbar, gnb, beta_n, 0, a.n, hf, ht, sum, dd);
}

// The caller's H (h_kernel over every expert), which merge_reverse_scalars launches: in the dots'
// place where h_dots_kernel takes it (h_dots_taken), else after the scalars, whose dots read U
// before H may overwrite it.
template <typename T> struct HPass {
  float beta_n;
  float *hf;
  T *ht;
  GroupSum<T> sum;
};

// Whether h_dots_kernel computes the dots with H: on the tensor cores, so only where they are
// switched on (camex_tensor_cores(): opt-in until a GPU has run them), for bf16 storage (Gbar exact in the mma's bf16;
// merge_reverse_scalars asks for bf16 alone): no DARE per element (whose zeta differs per group,
// expert and element; per expert it is one factor of each dot), at most H_EXPERTS experts and
// 16 HD_MT groups, and U either bf16 storage or f32 that H does not overwrite with values of
// another size (the f32 H over f32 U is element by element, each read by its thread before it
// writes).
template <typename T> inline bool h_dots_taken(const MergeArgs<T> &a, const HPass<T> &h) {
  const bool u_ok = a.u.kind == U_STORE || (a.u.kind == U_F32 && !h.ht);
  return camex_tensor_cores() && a.dare.kind != CAMEX_DARE_ELEMENT && a.n <= H_EXPERTS && a.g <= 16 * HD_MT && a.g * a.n <= H_SCORES && u_ok;
}

// Whether merge_reverse_scalars' grids fit the hardware's limits (y and z at most 65535, x at most
// 2^31 - 1), which every backward's entry point checks before it enqueues anything: the dots
// take dot_rows rows (groups, and the beta row) per block, one with DARE.
inline bool scalars_grid_fits(int64_t g, int64_t n, int64_t oi, bool beta_row, bool bias, bool dare) {
  const int64_t rb = dare ? dot_rows<true>() : dot_rows<false>(), rows = g + (beta_row ? 1 : 0);
  return dot_chunks(oi) <= 0x7FFFFFFF && (rows + rb - 1) / rb <= 65535 && (n + NREG - 1) / NREG <= 65535 &&
         (!bias || g * n <= 0x7FFFFFFF);
}

// Workspace floats of merge_reverse_scalars: dots + bias dots + ip scratch.
inline int64_t scalars_floats(int64_t g, int64_t n, int64_t oi) {
  return (g + 1) * n * dot_chunks(oi) + g * n + (g + 1) * n + 192;
}

// grad_scores, grad_alpha, (grad_beta), and the bias gradients: everything that reduces over
// the whole weight. gnb_row: include the <gnb, U_i> row (grad_beta requested). hp (may be null):
// the caller's H over every expert (HPass), launched here.
template <typename T>
inline int merge_reverse_scalars(cudaStream_t s, const MergeArgs<T> &a, const T *gbar, bool beta_row, const T *gnb,
                                 const T *eb, const T *b, const T *dbb, T *grad_scores, T *grad_alpha, T *grad_beta,
                                 T *grad_eb, T *grad_b, int64_t o, Arena &ar, const HPass<T> *hp = nullptr) {
  const int64_t chunks = dot_chunks(a.oi);
  float *dots = ar.take<float>((a.g + 1) * a.n * chunks);
  float *bip = ar.take<float>(a.g * a.n);
  float *ip = ar.take<float>((a.g + 1) * a.n);
  const int64_t rows = a.g + (beta_row ? 1 : 0);  // grids within the limits: the entry points check
  const auto grid = [&](int rb) {
    return dim3((unsigned)chunks, (unsigned)((rows + rb - 1) / rb), (unsigned)((a.n + NREG - 1) / NREG));
  };
  bool fused = false;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {  // (the kernel is built for bf16 alone)
    fused = hp && gbar && h_dots_taken(a, *hp);
    if (fused)
      CAMEX_LAUNCH(h_dots_kernel<T>, (unsigned)chunks, 256, s)(a, gbar, gnb, hp->beta_n, hp->hf, hp->ht, hp->sum,
                                                               HDots{dots, chunks, rows});
  }
  if (!fused && a.dare.kind == CAMEX_DARE_NONE) {
    CAMEX_LAUNCH(dots_kernel<T>, grid(dot_rows<false>()), DOT_THREADS, s)(a, gbar, gnb, dots, chunks, rows);
  } else if (!fused) {
    CAMEX_LAUNCH(dots_dare_kernel<T>, grid(dot_rows<true>()), DOT_THREADS, s)(a, gbar, gnb, dots, chunks, rows);
  }
  CAMEX_CHECK_LAUNCH();
  const bool bias = eb && b;
  if (bias) {
    CAMEX_LAUNCH(bias_backward_kernel<T>, grid_for((a.n + 1) * o, 256), 256, s)(a.scores, dbb, grad_eb, grad_b, a.alpha, a.g,
                                                                          a.n, o);
    CAMEX_CHECK_LAUNCH();
    CAMEX_LAUNCH(bias_dots_kernel<T>, (unsigned)(a.g * a.n), DOT_THREADS, s)(eb, b, dbb, bip, a.n, o);
    CAMEX_CHECK_LAUNCH();
  }
  CAMEX_LAUNCH(finalize_kernel<T>, 1, 256, s)(dots, chunks, bias ? bip : nullptr, a.scores, a.alpha, a.g, a.n, grad_scores,
                                       grad_alpha, beta_row ? grad_beta : nullptr, ip);
  CAMEX_CHECK_LAUNCH();
  if (hp && !fused) {
    CAMEX_LAUNCH(h_kernel<T>, h_grid(a.oi), 256, s)(a, gbar, gnb, hp->beta_n, 0, a.n, hp->hf, hp->ht, hp->sum);
    CAMEX_CHECK_LAUNCH();
  }
  return 0;
}

}  // namespace camex
