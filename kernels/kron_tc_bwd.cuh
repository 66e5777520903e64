// Tensor-core backward of the Kronecker curvature for f16/bf16 storage (SPEC section 4), one expert
// at a time, fused into three kernels per round of ranks instead of ten mode products and four
// contractions per rank (kron.cuh's chain).
//
// Like the forward (kron_tc.cuh) it is opt-in (camex_set_tensor_cores, CAMEX_TENSOR_CORES=1; the
// README's "Status" says why); in the CPU emulation (kernels/emu.h; tests/gpu.rs `emu`) the tensor
// cores are the default.
//
// With L_r = A_r (x) B_r, R_r = C_r (x) D_r (U = sum_r L_r tau R_r^T) and H = dL/dU, per rank:
//   P = L tau                              (rows side: kron_rows_split_kernel, the forward's stage 1)
//   T1 = H x4 D^T,  T2 = H x3 C^T,  K = H R = T1 x3 C^T          (columns side)
//   dC[c][c'] = sum_{p,d'} T1[p,(c,d')] P[p,(c',d')]
//   dD[d][d'] = sum_{p,c'} T2[p,(c',d)] P[p,(c',d')]
//   V = K x2 B^T,  dA[a][a'] = sum_{b,q} V[(a,b),q] tau[(a',b),q]
//   W = K x1 A^T,  dB[b][b'] = sum_{a,q} W[(a,b),q] tau[(a,b'),q]
//   dtau += V x1 A^T = L^T H R
// which is the chain of SPEC section 4 regrouped (every factor gradient contracts H with tau
// transformed by the other three factors). Per round of ranks (kron_tc_rank_chunk; Z as BwdZ: one
// bf16 plane for bf16, 2 bytes per value, or ZSplit's two, hi and lo, for f16):
//   1. kron_rows_split_kernel: Z_r = P_r (slab layout [r][plane][slab][O][8]), one block per
//      8-column slab looping over the round's ranks;
//   2. kron_cols_bwd_kernel, one block per run of Z rows, looping over the round's ranks: H's rows
//      stay in shared memory; P's rows in, dC and dD partials out, and K's rows written over P's,
//      rounded as the rows side reads them (bf16: one plane; f16: hi and lo); for bf16 with factors
//      of at most 32, kron_cols_bwd_reg_kernel, which keeps its intermediates in registers;
//   3. kron_rows_bwd_kernel, one block per 8-column slab looping over the round's ranks: K's slab
//      and tau in, dA and dB partials out, and L^T K added to dtau's slab, rank by rank (with dtau
//      resident, the last round writes the expert's gradient and the base gradient's running sum
//      instead of dtau: finish_expert_kernel's work, ExpertFinish); where one round takes every
//      rank, a slab's ranks split over rows_bwd_groups blocks, the last of which to arrive sums
//      dtau over them in group order;
//   4. after the rounds, one fixed-order reduction of every rank's partials into the factor
//      gradients (FactorReduce): in the next expert's first step 2 launch where one follows, else
//      on its own launch. No atomics: the same inputs give the same bits.
// Step 1 of every round but the first runs in step 3's launch of the round before, and that of
// the next expert's first round in this expert's last step 3 where the caller names the next
// expert (NextExpert): kron_rows_bwd_split_kernel; both are per slab, and each block touches only
// its slab of Z.
// Every product goes through the tensor cores as in kron_tc.cuh, under a precision policy per
// kernel (ColsBwdPrec, RowsBwdPrec below; Prec in mma.cuh): bf16 is single-pass throughout; f16
// splits data and factors; data-by-data contractions with split data take three mma (hi hi, hi lo,
// lo hi). f32 accumulation
// throughout.
#pragma once
#include "elementwise.cuh"
#include "kron_tc.cuh"

namespace camex {

// The backward's precision policies (mma.cuh, Prec), per kernel. bf16 is single-pass like the
// forward (FwdPrec) for every operand: tau, H, P (ColsBwdPrec: the columns side reads one bf16
// plane of Z), K, and the columns side's own f32 intermediates T1 = H x4 D^T and T2 = H x3 C^T,
// rounded once to bf16 where dC, dD and K take them; mma.cuh has the measurements. f16 splits
// everything (PrecOf).
template <typename T> using RowsBwdPrec = FwdPrec<T>;
template <typename T> using ColsBwdPrec = FwdPrec<T>;
static_assert(std::is_same<BwdZ<__nv_bfloat16>, MmaT>::value && std::is_same<BwdZ<__half>, ZSplit>::value &&
                  !ColsBwdPrec<__nv_bfloat16>::data_lo && ColsBwdPrec<__half>::data_lo,
              "Z's lo plane (BwdZ) exactly where the columns side reads P's lo halves");
// The fixed-order reduction of one expert's factor-gradient partials (ranks r0..r0+nr): grad[(r *
// nexp + expert)][x] = the sum over blocks, in block order, of the rows side's partials
// ([nr][slabs][o1^2 + o2^2] at pab: dA then dB) or the columns side's ([nr][cblocks][i1^2 + i2^2]
// at pcd: dC then dD). kron_bwd_reduce_kernel runs it alone, or each columns-side block of the next
// expert runs its share (factor_reduce_share): the same sums in the same order, the same bits.
template <typename T> struct FactorReduce {
  const float *pab = nullptr, *pcd = nullptr;  // null: nothing to reduce
  T *ga = nullptr, *gb = nullptr, *gc = nullptr, *gd = nullptr;
  int64_t slabs = 0, cblocks = 0;
  int o1 = 0, o2 = 0, i1 = 0, i2 = 0;
  int64_t r0 = 0, nr = 0, nexp = 0, expert = 0;
  __host__ __device__ int64_t sab() const { return (int64_t)o1 * o1 + (int64_t)o2 * o2; }
  __host__ __device__ int64_t scd() const { return (int64_t)i1 * i1 + (int64_t)i2 * i2; }
};
// Element k of one side's gradients: rank k / (n1^2 + n2^2), element x of g1 (n1 x n1) then g2, the
// sum of `blocks` partials in block order.
template <typename T>
__device__ __forceinline__ void factor_reduce_one(const FactorReduce<T> &f, const float *part, int64_t blocks, int n1,
                                                  int n2, T *g1, T *g2, int64_t k) {
  const int64_t n11 = (int64_t)n1 * n1, sz = n11 + (int64_t)n2 * n2, rl = k / sz, x = k % sz;
  const int64_t re = (f.r0 + rl) * f.nexp + f.expert;
  float s = 0.f;
  // Eight loads in flight per thread (L2-latency bound otherwise); the sum still in block order.
#pragma unroll 8
  for (int64_t b = 0; b < blocks; ++b) s += part[(rl * blocks + b) * sz + x];
  if (x < n11) g1[re * n11 + x] = from_f32<T>(s);
  else g2[re * n2 * n2 + x - n11] = from_f32<T>(s);
}
// Element k < nr * sab of the rows side's (dA, dB), and k < nr * scd of the columns side's (dC, dD).
template <typename T> __device__ __forceinline__ void factor_reduce_ab(const FactorReduce<T> &f, int64_t k) {
  factor_reduce_one(f, f.pab, f.slabs, f.o1, f.o2, f.ga, f.gb, k);
}
template <typename T> __device__ __forceinline__ void factor_reduce_cd(const FactorReduce<T> &f, int64_t k) {
  factor_reduce_one(f, f.pcd, f.cblocks, f.i1, f.i2, f.gc, f.gd, k);
}
// This block's share of f (none where f.pab is null): an even run of each side's elements per
// block, so that every block reads about the same bytes (the emulation's sampled blocks stand for
// the others) and consecutive threads read consecutive floats of each partial.
template <typename T> __device__ __forceinline__ void factor_reduce_share(const FactorReduce<T> &f) {
  if (!f.pab) return;
  const int64_t b = blockIdx.x, g = gridDim.x, nab = f.nr * f.sab(), ncd = f.nr * f.scd();
  for (int64_t k = nab * b / g + threadIdx.x; k < nab * (b + 1) / g; k += blockDim.x) factor_reduce_ab(f, k);
  for (int64_t k = ncd * b / g + threadIdx.x; k < ncd * (b + 1) / g; k += blockDim.x) factor_reduce_cd(f, k);
}

// Fragments of a k-major plain shared array with k's row stride ld (A[m][k] = s[k * ld + m],
// B[k][n] = s[k * ld + n]; ld * 2 bytes an odd multiple of 16, m0 and n0 multiples of 8):
// ldmatrix.trans, one 128-byte phase per 8 x 8 matrix and free of bank conflicts.
__device__ __forceinline__ void frag_a_kmajor(uint32_t a[4], const MmaT *s, int ld, int m0, int k0, int lane) {
  const int i = lane >> 3, r = lane & 7;  // lanes 8i..8i+7: matrix i = (k half i / 2, m half i % 2)
  ldmatrix_x4<true>(a, s + (int64_t)(k0 + r + 8 * (i >> 1)) * ld + m0 + 8 * (i & 1));
}
__device__ __forceinline__ void frag_b_kmajor(uint32_t b[2], const MmaT *s, int ld, int n0, int k0, int lane) {
  ldmatrix_x2<true>(b, s + (int64_t)(k0 + (lane & 15)) * ld + n0);  // lanes 0..15: rows k0..k0+15
}

// The fragment from a row-major (KMajor false: frag_a, frag_b) or k-major (true) shared array.
template <bool KMajor>
__device__ __forceinline__ void frag_a_as(uint32_t a[4], const MmaT *s, int ld, int m0, int k0, int lane) {
  if constexpr (KMajor) frag_a_kmajor(a, s, ld, m0, k0, lane);
  else frag_a(a, s, ld, m0, k0, lane);
}
template <bool KMajor>
__device__ __forceinline__ void frag_b_as(uint32_t b[2], const MmaT *s, int ld, int n0, int k0, int lane) {
  if constexpr (KMajor) frag_b_kmajor(b, s, ld, n0, k0, lane);
  else frag_b(b, s, ld, n0, k0, lane);
}

// Copies a k x k factor transposed (dst[j'][j] = f[j][j']) into zero-padded shared matrices
// (ld = tc_ld: ld / 2 words is 4 mod 8). Each warp-wide store covers 8 rows j' x 4 columns j: the
// rows fall in eight distinct groups of banks (4 (2m + 1) j' mod 32), the columns in one word pair
// each, so one wavefront; 32 consecutive j' of one j, as a plain loop would store, took four. Its
// loads, though, read 16 bytes of each of four rows of f: half of each 32-byte sector. Sectors
// (for the kernels bound by L2 traffic, not shared memory): 16 rows j' x 2 columns j, whole
// sectors of two rows of f, for two wavefronts per store (rows j' and j' + 8 share banks).
template <typename P, bool Sectors = false, typename T>
__device__ __forceinline__ void load_factor_t(MmaT *hi, MmaT *lo, const T *f, int k, int ld) {
  constexpr int TR = Sectors ? 16 : 8, TC = 32 / TR;  // TR x TC tiles (j', j)
  const int tr = (k + TR - 1) / TR, tiles = tr * ((k + TC - 1) / TC);
  for (int x = threadIdx.x; x < tiles * 32; x += TC_THREADS) {
    const int tile = x >> 5, l = x & 31;
    const int jp = (tile % tr) * TR + l % TR, j = (tile / tr) * TC + l / TR;
    if (jp >= k || j >= k) continue;
    const int64_t at = (int64_t)jp * ld + j;
    const float v = to_f32(f[j * k + jp]);
    if constexpr (P::factor_lo) split_store(hi, lo, at, v);
    else hi[at] = from_f32<MmaT>(v);
  }
}

// ---- columns side: dC, dD and K = H R ----
// Every per-row matrix (H[p], P[p] and the intermediates T1 = H D, T2 = C^T H) is kept
// row-major as X[p][c][d] (row stride lz, an odd number of 16-byte units), written by the producing
// mma as 32-bit pairs; every product reads it through ldmatrix-friendly fragments (k-contiguous
// pairs, or ldmatrix.trans where k is the row index), so no operand is stored transposed.

struct ColsBwdLayout {
  int i1p, i2p, lz, lc, ld, pr;
  int64_t ps, hh, hl, ph, pl, yh, yl, y2h, y2l, cth, ctl, dth, dtl, red, bytes;
};

// float4 of `red` per warp: its accumulators of the widest contraction, ntmax n tiles of 32 lanes.
__host__ __device__ inline int cols_bwd_red_stride(const ColsBwdLayout &l) {
  return (l.i1p > l.i2p ? l.i1p : l.i2p) / 8 * 32;
}

// pr: rows per block; sp: the split of H, P, T1 and T2 (ColsBwdPrec). Shared matrices: H, P, Y (T1)
// and Y2 (T2), [pr][i1p][lz]; C^T
// [i1p][lc]; D^T [i2p][ld]; the f32 accumulators of dC's and dD's warps (cols_bwd_contract_mma),
// [warps][n tiles][32 lanes][4].
__host__ __device__ inline ColsBwdLayout cols_bwd_layout(int i1, int i2, int pr, TcSplit sp) {
  ColsBwdLayout l;
  l.pr = pr;
  l.i1p = tc_pad(i1);
  l.i2p = tc_pad(i2);
  l.lz = tc_ld(l.i2p);
  l.lc = tc_ld(l.i1p);
  l.ld = tc_ld(l.i2p);
  // ps = i1p lz + 8 is 16 bytes past a multiple of 128 (i1p lz is a multiple of 128 elements), so
  // rows p of one 16-byte column fall in eight distinct bank groups (load_z_rows' plane copies).
  l.ps = (int64_t)l.i1p * l.lz + 8;
  const int64_t e = 2;
  const int64_t xb = (int64_t)pr * l.ps * e;
  const int64_t cb = (int64_t)l.i1p * l.lc * e, db = (int64_t)l.i2p * l.ld * e;
  const bool dlo = sp.data_lo, flo = sp.factor_lo;
  l.hh = 0;
  l.hl = l.hh + xb;
  l.ph = l.hl + (dlo ? xb : 0);
  l.pl = l.ph + xb;
  l.yh = l.pl + (dlo ? xb : 0);
  l.yl = l.yh + xb;
  l.y2h = l.yl + (dlo ? xb : 0);
  l.y2l = l.y2h + xb;
  l.cth = l.y2l + (dlo ? xb : 0);
  l.ctl = l.cth + cb;
  l.dth = l.ctl + (flo ? cb : 0);
  l.dtl = l.dth + db;
  l.red = l.dtl + (flo ? db : 0);
  l.bytes = l.red + (int64_t)TC_WARPS * cols_bwd_red_stride(l) * 16;
  return l;
}

// Rows per block of the columns-side kernel: the most (up to 8) whose shared memory fits `lim`,
// the device's opt-in (tc_smem_limit), else 1 (which kron_tc_bwd_fits then refuses). The partials'
// workspace is sized with the same limit (kron_tc_bwd_partial_floats): sized on sm_90's, sm_80's
// fewer rows per block (more blocks, more partials) would not fit it, and the tensor-core backward
// was declined there at `wo` shapes (T5-base bf16: 6 rows, 208 KiB; sm_80 takes 4, 154 KiB).
__host__ __device__ inline int cols_bwd_rows(int i1, int i2, TcSplit sp, int64_t lim) {
  for (int pr = 8; pr > 1; --pr)
    if (cols_bwd_layout(i1, i2, pr, sp).bytes <= lim) return pr;
  return 1;
}

// out[m][n] (row stride nv; m < mv, n < nv) = sum_p sum_k A_p[m][k] B_p[k][n] over the block's pr
// rows p (operands at p * ps): a data-by-data contraction (mp x np, k padded to kp) by the nw warps
// w0..w0+nw-1, in two calls with a __syncthreads between them (the caller's, so that the two
// contractions of a rank run side by side on the two halves of the block). A_p is an intermediate
// as stored (AK false: A[m][k] = X[m][k]) or transposed (AK: A[m][k] = X[k][m]); B_p is P as [n][k]
// (BK false) or [k][n] (BK). cols_bwd_contract_mma: each warp takes one m tile and every n tile
// (its A fragment read once per k step) over a group of rows p, and leaves its accumulators in
// `red` (as each lane holds them, 16-byte stores free of bank conflicts; rs float4 per warp);
// cols_bwd_contract_sum: the groups' accumulators summed in group order (a fixed order: the same bits
// every run) into out, in global memory.
template <typename PA, typename PB, bool AK, bool BK>
__device__ __forceinline__ void cols_bwd_contract_mma(const MmaT *ah_, const MmaT *al_, const MmaT *bh_,
                                                      const MmaT *bl_, int lz, int64_t ps, int pr, int mp, int np,
                                                      int kp, int w0, int nw, float4 *red, int rs) {
  const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) - w0;
  const int mtn = mp / 16, ntn = np / 8, groups = nw / mtn;
  const int mt = w % mtn, pg = w / mtn;
  if (w < 0 || w >= nw || pg >= groups) return;
  float c[TC_KMAX / 8][4] = {};
  for (int p = pg; p < pr; p += groups) {
    const int64_t off = p * ps;
    for (int k0 = 0; k0 < kp; k0 += 16) {
      uint32_t ah[4], al[4];
      frag_a_as<AK>(ah, ah_ + off, lz, mt * 16, k0, lane);
      if constexpr (PA::data_lo) frag_a_as<AK>(al, al_ + off, lz, mt * 16, k0, lane);
#pragma unroll
      for (int nt = 0; nt < TC_KMAX / 8; ++nt)
        if (nt < ntn) {
          uint32_t bh[2], bl[2];
          frag_b_as<BK>(bh, bh_ + off, lz, nt * 8, k0, lane);
          if constexpr (PB::data_lo) frag_b_as<BK>(bl, bl_ + off, lz, nt * 8, k0, lane);
          mma_data<PA, PB>(c[nt], ah, al, bh, bl);
        }
    }
  }
#pragma unroll
  for (int nt = 0; nt < TC_KMAX / 8; ++nt)
    if (nt < ntn) red[(w0 + w) * rs + nt * 32 + lane] = make_float4(c[nt][0], c[nt][1], c[nt][2], c[nt][3]);
}

__device__ __forceinline__ void cols_bwd_contract_sum(int mp, int np, int w0, int nw, const float4 *red, int rs,
                                                      float *out, int mv, int nv) {
  const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) - w0, g = lane >> 2, t = lane & 3;
  const int mtn = mp / 16, ntn = np / 8, groups = nw / mtn;
  if (w < 0 || w >= mtn) return;  // group 0's warps, one per m tile
  const int mt = w;
#pragma unroll
  for (int nt = 0; nt < TC_KMAX / 8; ++nt)
    if (nt < ntn) {
      float sum[4] = {0.f, 0.f, 0.f, 0.f};
      for (int sg = 0; sg < groups; ++sg) {
        const float4 v = red[(w0 + sg * mtn + mt) * rs + nt * 32 + lane];
        sum[0] += v.x, sum[1] += v.y, sum[2] += v.z, sum[3] += v.w;
      }
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int m = mt * 16 + g + 8 * (v >> 1), n = nt * 8 + 2 * t + (v & 1);
        if (m < mv && n < nv) out[m * nv + n] = sum[v];
      }
    }
}

// A factor times each row's matrix: st(p, mt, nt, c) gets the m16n8 tile (mt, nt) of F X_p
// (M = i1p rows of F, N = i2p columns of X_p, K = i1p; X_p k-major at p * ps, row stride lz, read
// with ldmatrix.trans). Warps take (row, n tile) units and read each unit's fragments once for all
// m tiles; without factor lo halves a warp keeps all of F's fragments (at most 64 registers).
template <typename P, typename St>
__device__ __forceinline__ void cols_factor_by_rows(const MmaT *fh, const MmaT *fl, int lf, const MmaT *xh,
                                                    const MmaT *xl, int lz, int64_t ps, int pr, int i1p, int i2p,
                                                    St st) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kt = i1p / 16, ntd = i2p / 8;
  constexpr int KS = TC_KMAX / 16;
  FactorFrags<P> fk;
  factor_frags_load<P>(fk, fh, lf, kt, lane);
  for (int u = warp; u < pr * ntd; u += TC_WARPS) {
    const int p = u / ntd, nt = u % ntd;
    uint32_t bh[KS][2], bl[KS][2];
#pragma unroll
    for (int k = 0; k < KS; ++k)
      if (k < kt) {
        frag_b_kmajor(bh[k], xh + p * ps, lz, nt * 8, k * 16, lane);
        if constexpr (P::data_lo) frag_b_kmajor(bl[k], xl + p * ps, lz, nt * 8, k * 16, lane);
      }
#pragma unroll
    for (int mt = 0; mt < KS; ++mt)
      if (mt < kt) {
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        factor_frags_tile<P>(c, fk, fh, fl, lf, mt, kt, bh, bl, lane);
        st(p, mt, nt, c);
      }
  }
}

// H's rows for a columns-side block, once for every rank: H[pl][c][d] = H[p, c*i2 + d] for the
// block's Z rows p0 + pl (output row p = z_row_to_p), a data operand under P (row stride lz, p
// stride ps).
template <typename T, typename P>
__device__ __forceinline__ void load_h_rows(MmaT *hh, MmaT *hl, int lz, int64_t ps, Opnd h, int64_t p0, int pr,
                                            int64_t O, int o1, int i1, int i2) {
  const int64_t I = (int64_t)i1 * i2;
  for (int64_t x = threadIdx.x; x < (int64_t)pr * I; x += TC_THREADS) {
    const int64_t pl = x / I, q = x % I, zrow = p0 + pl;
    if (zrow < O)
      store_data<P>(hh, hl, pl * ps + (q / i2) * lz + q % i2, opnd_ld<T>(h, z_row_to_p<BwdZ<T>>(zrow, o1, O) * I + q));
  }
}

// grid (ceil(O / pr)): each block a run of pr Z rows (row zr is output row (zr % o1, zr / o1):
// z_row_to_p). z: the round's P_r (BwdZ, ranks r0..r0+nr), overwritten with K_r as the rows side
// reads it (one plane without the rows side's data lo halves: bf16);
// part: f32 [nr][blocks][i1*i1 + i2*i2], this block's dC and dD contributions per rank.
// One block per SM at the shapes that matter (142 KiB of shared memory at T5-base `wi`, bf16), so
// the launch bounds ask for one: the warps keep factor and data fragments in registers.
template <typename T>
__global__ void __launch_bounds__(TC_THREADS, 1)
kron_cols_bwd_kernel(Opnd h, MmaT *__restrict__ z, const T *__restrict__ fc, const T *__restrict__ fd,
                     float *__restrict__ part, int o1, int i1, int i2, int pr, int64_t O, int64_t r0, int64_t nr,
                     int64_t nexp, int64_t expert, FactorReduce<T> prev) {
  CAMEX_DYNAMIC_SMEM(smem);
  using P = ColsBwdPrec<T>;  // H, P, T1 and T2
  const ColsBwdLayout L = cols_bwd_layout(i1, i2, pr, P::split());
  MmaT *Hh = reinterpret_cast<MmaT *>(smem + L.hh), *Hl = reinterpret_cast<MmaT *>(smem + L.hl);
  MmaT *Ph = reinterpret_cast<MmaT *>(smem + L.ph), *Pl = reinterpret_cast<MmaT *>(smem + L.pl);
  MmaT *Yh = reinterpret_cast<MmaT *>(smem + L.yh), *Yl = reinterpret_cast<MmaT *>(smem + L.yl);
  MmaT *Y2h = reinterpret_cast<MmaT *>(smem + L.y2h), *Y2l = reinterpret_cast<MmaT *>(smem + L.y2l);
  MmaT *Cth = reinterpret_cast<MmaT *>(smem + L.cth), *Ctl = reinterpret_cast<MmaT *>(smem + L.ctl);
  MmaT *Dth = reinterpret_cast<MmaT *>(smem + L.dth), *Dtl = reinterpret_cast<MmaT *>(smem + L.dtl);
  float4 *red = reinterpret_cast<float4 *>(smem + L.red);
  // K stored as the rows side takes it (RowsBwdPrec's data split; bf16: the hi plane alone).
  using KP = Prec<RowsBwdPrec<T>::data_lo, false>;
  const int64_t I = (int64_t)i1 * i2, plane = slab_plane(I, O);
  const int64_t p0 = (int64_t)blockIdx.x * pr, blocks = gridDim.x;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int i1p = L.i1p, i2p = L.i2p, lz = L.lz;
  const int64_t ps = L.ps;
  const int mt16 = pr * i1p / 16, mtp = i1p / 16;

  // The padding the products read: H's and P's (columns d past i2, rows c past i1, rows past O)
  // and the factors'. T1, T2 and `red` are written whole before each read.
  zero_smem(smem + L.hh, L.yh - L.hh);
  zero_smem(smem + L.cth, L.red - L.cth);
  __syncthreads();
  load_h_rows<T, P>(Hh, Hl, lz, ps, h, p0, pr, O, o1, i1, i2);

  for (int64_t rl = 0; rl < nr; ++rl) {
    const int64_t r = r0 + rl;
    __syncthreads();  // the previous rank's readers are done
    load_factor_t<P>(Cth, Ctl, fc + (r * nexp + expert) * i1 * i1, i1, L.lc);
    load_factor_t<P>(Dth, Dtl, fd + (r * nexp + expert) * i2 * i2, i2, L.ld);
    MmaT *zr = z + rl * ZMem<BwdZ<T>>::planes * plane;
    float *out = part + (rl * blocks + blockIdx.x) * ((int64_t)i1 * i1 + (int64_t)i2 * i2);
    load_z_rows<P, BwdZ<T>>(Ph, Pl, lz, ps, zr, p0, pr, O, i1, i2);
    __syncthreads();

    // T1[p][c][d'] = sum_d H[p][c][d] D[d][d'] (the factor operand is D^T as stored).
    cols_fwd_mode_d<P, true, P, !P::factor_lo>(Hh, Hl, lz, ps, mtp, Dth, Dtl, L.ld, Yh, Yl, lz, ps, mt16, i2p);
    // T2[p][c'][d] = sum_c C[c][c'] H[p][c][d]  (M = c', N = d, K = c; A = C^T as stored).
    cols_factor_by_rows<P>(Cth, Ctl, L.lc, Hh, Hl, lz, ps, pr, i1p, i2p, [&](int pl, int mt, int nt, const float c[4]) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
        store_data2<P>(Y2h, Y2l, pl * ps + (int64_t)(mt * 16 + g + 8 * hh) * lz + nt * 8 + 2 * t, c[2 * hh],
                        c[2 * hh + 1]);
    });
    __syncthreads();
    // The two contractions side by side, each on half of the warps (one exchange through `red`
    // between half as many groups as one contraction on every warp would have):
    // dC[c][c'] += sum_{p,d'} T1[p][c][d'] P[p][c'][d']  (M = c, N = c', K = (p, d')), and
    // dD[d][d'] += sum_{p,c'} T2[p][c'][d] P[p][c'][d']  (M = d, N = d', K = (p, c')).
    constexpr int half = TC_WARPS / 2;
    const int rs = cols_bwd_red_stride(L);
    if (threadIdx.x / 32 < half)
      cols_bwd_contract_mma<P, P, false, false>(Yh, Yl, Ph, Pl, lz, ps, pr, i1p, i1p, i2p, 0, half, red, rs);
    else
      cols_bwd_contract_mma<P, P, true, true>(Y2h, Y2l, Ph, Pl, lz, ps, pr, i2p, i2p, i1p, half, half, red, rs);
    // K[p][c'][d'] = sum_c C[c][c'] T1[p][c][d']  (M = c', N = d', K = c; A = C^T as stored), over
    // P's planes at the same Z rows (the block's own), rounded as the rows side would round it.
    cols_factor_by_rows<P>(Cth, Ctl, L.lc, Yh, Yl, lz, ps, pr, i1p, i2p, [&](int pl, int mt, int nt, const float c[4]) {
      const int64_t zrow = p0 + pl;
      if (zrow >= O) return;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int cc = mt * 16 + g + 8 * hh, d = nt * 8 + 2 * t;
        if (cc >= i1 || d >= i2) continue;
        const int64_t q = (int64_t)cc * i2 + d, at = slab_at(q, zrow, O);
        if (i2 % 2 == 0) {  // d + 1 < i2, and q is even: the pair lies in one slab, 4-byte aligned
          store_data2<KP>(zr + at, zr + plane + at, 0, c[2 * hh], c[2 * hh + 1]);
          continue;
        }
        store_data<KP>(zr, zr + plane, at, c[2 * hh]);
        if (d + 1 < i2) {
          store_data<KP>(zr, zr + plane, slab_at(q + 1, zrow, O), c[2 * hh + 1]);
        }
      }
    });
    __syncthreads();  // every warp's accumulators are in `red`
    cols_bwd_contract_sum(i1p, i1p, 0, half, red, rs, out, i1, i1);
    cols_bwd_contract_sum(i2p, i2p, half, half, red, rs, out + (int64_t)i1 * i1, i2, i2);
  }
  factor_reduce_share(prev);  // the previous expert's factor gradients, where it left them to this launch
}

// ---- columns side with its intermediates in registers (bf16, i1 and i2 at most 32) ----
// Where the columns side is single-pass throughout (bf16: ColsBwdPrec without lo halves) and both
// factors are at most 32, a warp keeps one row's intermediates in registers and hands them straight
// back to the tensor cores (frag_a_of_acc, frag_b_of_a), so nothing but H, P and the factors goes
// through shared memory. T1 is contracted over both of its indices (over d' in dC, over c in K),
// and an accumulator is an operand only along its columns, so the warp makes it twice, as T1 and
// as T1^T: 16 mma more per row than one T1, instead of a store and two reads of it in shared
// memory. Per rank and row p (M, N, K of each product):
//   T1   = H D      T1[c][d']   = sum_d H[c][d] D[d][d']       (c, d', d)  -> dC += T1 P^T   (c, c', d')
//   T1^T = D^T H^T  T1^T[d'][c] = sum_d D[d][d'] H[c][d]       (d', c, d)  -> K = C^T T1     (c', d', c)
//   T2^T = H^T C    T2^T[d][c'] = sum_c H[c][d] C[c][c']       (d, c', c)  -> dD += T2^T P   (d, d', c')
// Warps take whole rows (pr / 8 each, pr = cols_bwd_reg_rows); dC and dD stay in registers across
// the warp's rows, and the warps' partials are summed in warp order at the end of each rank. K goes
// out through shared memory, in whole sectors of Z.

struct ColsBwdRegLayout {
  int lz, lc, ld, pr;
  int64_t ps, hh, ph, pstep, ct, dt, red, bytes;
};

// H and P [pr][i1p][lz] (p stride ps, as cols_bwd_layout's), C^T [i1p][lc] and D^T [i2p][ld]
// (zero-padded), and the warps' partials of one of dC and dD at a time, [warps][tiles][32 lanes]
// float4. pipe: a second P buffer, pstep elements on (else pstep = 0), so that the next rank's P
// comes in by cp.async while this rank's is multiplied.
__host__ __device__ inline ColsBwdRegLayout cols_bwd_reg_layout(int i1p, int i2p, int pr, bool pipe = false) {
  ColsBwdRegLayout l;
  l.pr = pr;
  l.lz = tc_ld(i2p);
  l.lc = tc_ld(i1p);
  l.ld = tc_ld(i2p);
  l.ps = (int64_t)i1p * l.lz + 8;
  const int64_t xb = (int64_t)pr * l.ps * 2;
  const int tc = (i1p / 16) * (i1p / 8), td = (i2p / 16) * (i2p / 8);
  l.hh = 0;
  l.ph = xb;
  l.pstep = pipe ? (int64_t)pr * l.ps : 0;
  l.ct = (pipe ? 3 : 2) * xb;
  l.dt = l.ct + (int64_t)i1p * l.lc * 2;
  l.red = (l.dt + (int64_t)i2p * l.ld * 2 + 15) / 16 * 16;
  l.bytes = l.red + (int64_t)TC_WARPS * (tc > td ? tc : td) * 32 * 16;
  return l;
}

// Whether storage T's columns side takes the register kernel at factors i1 x i2.
template <typename T> __host__ __device__ inline bool cols_bwd_reg_ok(int i1, int i2) {
  return !ColsBwdPrec<T>::data_lo && !ColsBwdPrec<T>::factor_lo && tc_pad(i1) <= 32 && tc_pad(i2) <= 32;
}

// Rows per block of the register kernel: 24, 16 or 8 (three, two or one per warp), the most that
// fit `lim` and still give about a wave of blocks on an H200 (132 SMs), since a block per row run
// amortises the warps' exchange of partials over more rows. The partials' workspace is sized on
// it (cols_bwd_plan), so the workspace query and the launch must see the same emulation mode (a
// mismatch gets CAMEX_ERR_WORKSPACE, as the launcher sizes its arena the same way).
__host__ __device__ inline int cols_bwd_reg_rows(int64_t O, int i1, int i2, int64_t lim) {
#ifdef CAMEX_EMU
  // The emulation's small test shapes: 8, 16 or 24 rows by O, so that the tests run all three (and
  // blocks that end past O); while its cost counters run, the GPU's choice.
  if (!::emu::counting()) {
    const int pr = 8 * (1 + (int)(O % 3));
    return cols_bwd_reg_layout(tc_pad(i1), tc_pad(i2), pr).bytes <= lim ? pr : 8;
  }
#endif
  for (int pr = 24; pr > 8; pr -= 8)
    if ((O + pr - 1) / pr >= 120 && cols_bwd_reg_layout(tc_pad(i1), tc_pad(i2), pr).bytes <= lim) return pr;
  return 8;
}

// Two neighbouring f32 partials (columns n, n + 1 of one row) as one 8-byte store where `pairs`
// (even row lengths from an 8-byte aligned base: the accumulator's lane pairs then fill whole
// sectors), else one by one, the second only where `two`.
__device__ __forceinline__ void store_partial_pair(float *d, float v0, float v1, bool pairs, bool two) {
  const float v[2] = {v0, v1};
  if (pairs) {
    store_pair(d, v);
    return;
  }
  d[0] = v0;
  if (two) d[1] = v1;
}

// The warps' m16n8 accumulators of one contraction (M x N tiles per warp) summed in warp order into
// out[m * nv + n] (m < mv, n < nv), through `red`; pairs (n, n + 1) as one 8-byte store where they
// are aligned, so that each row's run fills whole sectors.
template <int M, int N>
__device__ __forceinline__ void cols_bwd_reg_sum(const float (&acc)[M][N][4], float4 *red, float *out, int mv, int nv) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int tiles = M * N;
  __syncthreads();  // the previous readers of red are done
#pragma unroll
  for (int mt = 0; mt < M; ++mt)
#pragma unroll
    for (int nt = 0; nt < N; ++nt)
      red[(warp * tiles + mt * N + nt) * 32 + lane] = make_float4(acc[mt][nt][0], acc[mt][nt][1], acc[mt][nt][2], acc[mt][nt][3]);
  __syncthreads();
  const bool pairs = nv % 2 == 0 && (reinterpret_cast<uintptr_t>(out) & 7) == 0;
  for (int x = threadIdx.x; x < tiles * 32; x += TC_THREADS) {
    const int tile = x >> 5, l = x & 31, g = l >> 2, t = l & 3, mt = tile / N, nt = tile % N;
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    for (int w = 0; w < TC_WARPS; ++w) {
      const float4 v = red[(w * tiles + tile) * 32 + l];
      s[0] += v.x, s[1] += v.y, s[2] += v.z, s[3] += v.w;
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int m = mt * 16 + g + 8 * hh, n = nt * 8 + 2 * t;
      if (m < mv && n < nv) store_partial_pair(out + m * nv + n, s[2 * hh], s[2 * hh + 1], pairs, n + 1 < nv);
    }
  }
}

// c = A B^T over registers (M x N m16n8 tiles, K k steps): a holds A's fragments, bt the A fragments
// of B (rows n, columns k), whose halves are B^T's B fragments (frag_b_of_a); then c's A fragments
// over its columns (n tile pairs), split as P says (bf16: hi alone).
template <typename P, int M, int N, int K>
__device__ __forceinline__ void reg_product(uint32_t (&out)[M][N / 2][4], const uint32_t (&a)[M][K][4],
                                            const uint32_t (&bt)[N / 2][K][4]) {
  float c[M][N][4] = {};
#pragma unroll
  for (int mt = 0; mt < M; ++mt)
#pragma unroll
    for (int nt = 0; nt < N; ++nt)
#pragma unroll
      for (int ks = 0; ks < K; ++ks) {
        uint32_t b[2];
        frag_b_of_a(b, bt[nt / 2][ks], nt & 1);
        mma_bf16(c[mt][nt], a[mt][ks], b);
      }
  uint32_t unused[4];
#pragma unroll
  for (int mt = 0; mt < M; ++mt)
#pragma unroll
    for (int ks = 0; ks < N / 2; ++ks) frag_a_of_acc<P>(out[mt][ks], unused, c[mt][2 * ks], c[mt][2 * ks + 1]);
}

// acc += A X over registers and a row's P in shared memory (row stride lz): X = P^T (KMajor false:
// X[k][n] = P[n][k]) or P (true: X[k][n] = P[k][n], through ldmatrix.trans). Each B fragment is read
// once for all M m tiles.
template <int M, int N, int K, bool KMajor>
__device__ __forceinline__ void reg_contract_p(float (&acc)[M][N][4], const uint32_t (&a)[M][K][4], const MmaT *pp,
                                               int lz, int lane) {
#pragma unroll
  for (int nt = 0; nt < N; ++nt)
#pragma unroll
    for (int ks = 0; ks < K; ++ks) {
      uint32_t b[2];
      frag_b_as<KMajor>(b, pp, lz, nt * 8, ks * 16, lane);
#pragma unroll
      for (int mt = 0; mt < M; ++mt) mma_bf16(acc[mt][nt], a[mt][ks], b);
    }
}

// As kron_cols_bwd_kernel (same arguments, grid (ceil(O / pr)), pr = cols_bwd_reg_rows), for
// i1p = I1P and i2p = I2P. Per rank, two passes over the warp's rows, so that only one of dC's and
// dD's accumulators is live at a time: T2^T and dD; then T1, dC, T1^T and K, K going over the row's
// P in shared memory (the warp's own row, read by then) and from there out to Z in whole sectors.
template <typename T, int I1P, int I2P>
__global__ void __launch_bounds__(TC_THREADS, 1)
kron_cols_bwd_reg_kernel(Opnd h, MmaT *__restrict__ z, const T *__restrict__ fc, const T *__restrict__ fd,
                         float *__restrict__ part, int o1, int i1, int i2, int pr, int64_t O, int64_t r0, int64_t nr,
                         int64_t nexp, int64_t expert, FactorReduce<T> prev, int pipe) {
  CAMEX_DYNAMIC_SMEM(smem);
  using P = ColsBwdPrec<T>;
  using KP = Prec<RowsBwdPrec<T>::data_lo, false>;  // K as the rows side takes it
  static_assert(!P::data_lo && !P::factor_lo && !KP::data_lo, "single-pass operands and exact factors only");
  constexpr int MC = I1P / 16, NC = I1P / 8, MD = I2P / 16, ND = I2P / 8;  // k steps: MC over c, MD over d
  const ColsBwdRegLayout L = cols_bwd_reg_layout(I1P, I2P, pr, pipe != 0);
  MmaT *Hs = reinterpret_cast<MmaT *>(smem + L.hh), *Ps = reinterpret_cast<MmaT *>(smem + L.ph);
  MmaT *Ct = reinterpret_cast<MmaT *>(smem + L.ct), *Dt = reinterpret_cast<MmaT *>(smem + L.dt);
  float4 *red = reinterpret_cast<float4 *>(smem + L.red);
  const int64_t I = (int64_t)i1 * i2, plane = slab_plane(I, O), slabs = (I + TC_QC - 1) / TC_QC;
  const int64_t p0 = (int64_t)blockIdx.x * pr, blocks = gridDim.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int lz = L.lz;
  const int64_t ps = L.ps;

  // Pipelined (pipe: the launcher's cols_bwd_reg_pipe): the next rank's P rows go in by cp.async, one
  // group per rank, into the other P buffer, while this rank's are multiplied (the first rank's
  // while H's rows come in); the bits are the unpipelined path's.
  const bool piped = L.pstep != 0;
  const int64_t zrank = ZMem<BwdZ<T>>::planes * plane;  // Z's elements per rank
  auto prefetch = [&](int64_t rl, int buf) {  // rank rl's P rows into buffer buf, as one group
    load_z_rows<P, BwdZ<T>, true>(Ps + buf * L.pstep, nullptr, lz, ps, z + rl * zrank, p0, pr, O, i1, i2);
    cp_async_commit();
  };
  zero_smem(smem, L.red);  // the padding of H, P and the factors (red is written whole before reads)
  __syncthreads();
  if (piped) prefetch(0, 0);
  load_h_rows<T, P>(Hs, nullptr, lz, ps, h, p0, pr, O, o1, i1, i2);

  for (int64_t rl = 0; rl < nr; ++rl) {
    const int64_t r = r0 + rl;
    // The previous rank's readers of P (K by then, copied out: the buffer the next copies
    // overwrite) and of the factors are done.
    __syncthreads();
    load_factor_t<P>(Ct, nullptr, fc + (r * nexp + expert) * i1 * i1, i1, L.lc);
    load_factor_t<P>(Dt, nullptr, fd + (r * nexp + expert) * i2 * i2, i2, L.ld);
    MmaT *zr = z + rl * zrank;
    float *out = part + (rl * blocks + blockIdx.x) * ((int64_t)i1 * i1 + (int64_t)i2 * i2);
    const int buf = piped ? (int)(rl & 1) : 0;
    MmaT *Pc = Ps + buf * L.pstep;  // this rank's P (then K)
    if (piped) pipe_next_rank(rl, nr, buf, prefetch);
    else load_z_rows<P, BwdZ<T>>(Ps, nullptr, lz, ps, zr, p0, pr, O, i1, i2);
    __syncthreads();
    // The factors' A fragments, for the whole rank: C^T (M = c', K = c) and D^T (M = d', K = d);
    // their halves are the B fragments of C (K = c, N = c') and D (K = d, N = d').
    uint32_t ca[MC][MC][4], da[MD][MD][4];
#pragma unroll
    for (int mt = 0; mt < MC; ++mt)
#pragma unroll
      for (int ks = 0; ks < MC; ++ks) frag_a(ca[mt][ks], Ct, L.lc, mt * 16, ks * 16, lane);
#pragma unroll
    for (int mt = 0; mt < MD; ++mt)
#pragma unroll
      for (int ks = 0; ks < MD; ++ks) frag_a(da[mt][ks], Dt, L.ld, mt * 16, ks * 16, lane);

    float dd[MD][ND][4] = {};
    for (int pl = warp; pl < pr && p0 + pl < O; pl += TC_WARPS) {
      const MmaT *hp = Hs + pl * ps, *pp = Pc + pl * ps;
      // T2^T = H^T C (H^T through ldmatrix.trans), then dD[d][d'] += sum_c' T2^T[d][c'] P[c'][d']
      // (P's B fragment through ldmatrix.trans: k = c' is its row index).
      uint32_t hta[MD][MC][4];
#pragma unroll
      for (int mt = 0; mt < MD; ++mt)
#pragma unroll
        for (int ks = 0; ks < MC; ++ks) frag_a_kmajor(hta[mt][ks], hp, lz, mt * 16, ks * 16, lane);
      uint32_t va[MD][MC][4];  // T2^T's A fragments
      reg_product<P, MD, NC, MC>(va, hta, ca);
      reg_contract_p<MD, ND, MC, true>(dd, va, pp, lz, lane);
    }
    cols_bwd_reg_sum<MD, ND>(dd, red, out + (int64_t)i1 * i1, i2, i2);

    float dc[MC][NC][4] = {};
    for (int pl = warp; pl < pr && p0 + pl < O; pl += TC_WARPS) {
      const MmaT *hp = Hs + pl * ps;
      MmaT *pp = Pc + pl * ps;
      uint32_t ha[MC][MD][4];  // H's A fragments (M = c, K = d); halves: H^T's B (K = d, N = c)
#pragma unroll
      for (int mt = 0; mt < MC; ++mt)
#pragma unroll
        for (int ks = 0; ks < MD; ++ks) frag_a(ha[mt][ks], hp, lz, mt * 16, ks * 16, lane);
      {  // T1 = H D, then dC[c][c'] += sum_d' T1[c][d'] P[c'][d'] (P's B fragment: k = d' contiguous)
        uint32_t ta[MC][MD][4];
        reg_product<P, MC, ND, MD>(ta, ha, da);
        reg_contract_p<MC, NC, MD, false>(dc, ta, pp, lz, lane);
      }
      // T1^T = D^T H^T, then K[c'][d'] = sum_c C[c][c'] T1[c][d'] (T1's B fragment: T1^T's A halves),
      // over the row's P (every lane has read it: __syncwarp), rounded as the rows side reads K.
      uint32_t ua[MD][MC][4];  // T1^T's A fragments
      reg_product<P, MD, NC, MD>(ua, da, ha);
      __syncwarp();
#pragma unroll
      for (int mt = 0; mt < MC; ++mt)
#pragma unroll
        for (int nt = 0; nt < ND; ++nt) {
          float k[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int ks = 0; ks < MC; ++ks) {
            uint32_t b[2];
            frag_b_of_a(b, ua[nt / 2][ks], nt & 1);
            mma_bf16(k, ca[mt][ks], b);
          }
          // K is exactly 0 at c' >= i1 and d' >= i2 (zero rows of C^T and D^T), so the padding that
          // the next rank's P relies on stays zero.
#pragma unroll
          for (int hh = 0; hh < 2; ++hh)
            store_data2<KP>(pp, nullptr, (mt * 16 + g + 8 * hh) * lz + nt * 8 + 2 * t, k[2 * hh], k[2 * hh + 1]);
        }
    }
    cols_bwd_reg_sum<MC, NC>(dc, red, out, i1, i1);  // its barriers also order K's stores before the copy

    // K's rows out to Z, as load_z_rows read P's: one 16-byte run of a slab per row where i2 % 8 == 0,
    // consecutive lanes taking consecutive rows (whole sectors).
    if (i2 % TC_QC == 0) {
      for (int64_t x = threadIdx.x; x < (int64_t)pr * slabs; x += TC_THREADS) {
        const int64_t sl = x / pr, pl = x % pr, zrow = p0 + pl, q = sl * TC_QC;
        if (zrow < O)
          *reinterpret_cast<uint4 *>(zr + slab_at(q, zrow, O)) =
              *reinterpret_cast<const uint4 *>(Pc + pl * ps + (q / i2) * lz + q % i2);
      }
    } else {
      for (int64_t x = threadIdx.x; x < (int64_t)pr * I; x += TC_THREADS) {
        const int64_t pl = x / I, q = x % I, zrow = p0 + pl;
        if (zrow < O) zr[slab_at(q, zrow, O)] = Pc[pl * ps + (q / i2) * lz + q % i2];
      }
    }
  }
  factor_reduce_share(prev);  // as kron_cols_bwd_kernel
}

// ---- rows side: dA, dB and L^T K ----
// Every matrix of a slab is kept as the forward's stage 1 keeps Y: X[a][b * 8 + j] = X[(a, b), q0 + j]
// (row stride ly = 8 (o2p + 1), an odd number of 16-byte units), which is also the slab layout of z.
// Then every product is a plain GEMM with ldmatrix fragments, free of bank conflicts:
//   W = A^T K (mode a, M = a', N = (b, j), K = a),  dB[b][b'] = sum_{a', j} W[a'][b * 8 + j] tau[a'][b' * 8 + j]
//     (M = b, N = b', K = (a', j): 8 consecutive k of one row a' are one 16-byte ldmatrix row);
//   V = K x2 B^T (mode b, M = b', N = j, K = b; in place, one row run a per warp);
//   dtau += A^T V (mode a),  dA[a][a'] = sum_{(b, j)} V[a][b * 8 + j] tau[a'][b * 8 + j] (M = a, N = a').
// W is made 16 rows a' at a time (one m tile, TC_WR) and contracted into dB at once; dA and dB stay
// in registers until they are written as this slab's partials.

constexpr int TC_WR = 16;  // rows a' of W per chunk (one m tile)

// What the rows-side backward keeps in shared memory beyond the least (bits of its `mode`): the
// slab of tau for the round's ranks (else read per use), and the slab of dtau, accumulated over the
// round's ranks and written once (else read, added to and written per rank).
constexpr int TC_TAU_RESIDENT = 1, TC_DTAU_RESIDENT = 2;

struct RowsBwdLayout {
  int o1p, o2p, ly, la, lb, ta, lg;
  int64_t kh, kl, wh, wl, th, tl, ath, atl, bth, btl, gs, flag, bytes;
};

// K (then V) [o1p][ly]; W [TC_WR][ly]; tau [ta][ly], all o1p rows with TC_TAU_RESIDENT else TC_WR
// at a time; A^T [o1p][la], B^T [o2p][lb]; with TC_DTAU_RESIDENT dtau in f32 [o1][lg], lg = o2 * 8
// + 8 (rows 32 bytes apart in the banks: a warp's 8-byte pairs of 8 rows a take two wavefronts).
// Rows past o1 and columns b past o2 are zero (K padding of the products that read them).
__host__ __device__ inline RowsBwdLayout rows_bwd_layout(int o1, int o2, TcSplit sp, int mode) {
  RowsBwdLayout l;
  l.o1p = tc_pad(o1);
  l.o2p = tc_pad(o2);
  l.ly = TC_QC * (l.o2p + 1);
  l.la = tc_ld(l.o1p);
  l.lb = tc_ld(l.o2p);
  l.ta = mode & TC_TAU_RESIDENT ? l.o1p : TC_WR;
  l.lg = o2 * TC_QC + 8;
  const int64_t e = 2;
  const int64_t k = (int64_t)l.o1p * l.ly * e, w = (int64_t)TC_WR * l.ly * e, t = (int64_t)l.ta * l.ly * e;
  const int64_t ab = (int64_t)l.o1p * l.la * e, bb = (int64_t)l.o2p * l.lb * e;
  const bool dlo = sp.data_lo, flo = sp.factor_lo;
  l.kh = 0;
  l.kl = l.kh + k;
  l.wh = l.kl + (dlo ? k : 0);
  l.wl = l.wh + w;
  l.th = l.wl + (dlo ? w : 0);
  l.tl = l.th + t;
  l.ath = l.tl + (dlo ? t : 0);
  l.atl = l.ath + ab;
  l.bth = l.atl + (flo ? ab : 0);
  l.btl = l.bth + bb;
  l.gs = (l.btl + (flo ? bb : 0) + 15) / 16 * 16;
  // The rank groups' arrival word (rows_bwd_body): in the dynamic buffer, as no static __shared__
  // may be: the launchers opt in to the device's whole limit for the dynamic buffer alone.
  l.flag = (l.gs + (mode & TC_DTAU_RESIDENT ? (int64_t)o1 * l.lg * 4 : 0) + 15) / 16 * 16;
  l.bytes = l.flag + 16;
  return l;
}

// The rows-side backward's mode under split sp within `lim` bytes: both slabs resident where they
// fit, else tau's (it is read twice per rank otherwise), else dtau's, else neither.
__host__ __device__ inline int rows_bwd_mode(int o1, int o2, TcSplit sp, int64_t lim) {
  const int modes[3] = {TC_TAU_RESIDENT | TC_DTAU_RESIDENT, TC_TAU_RESIDENT, TC_DTAU_RESIDENT};
  for (int i = 0; i < 3; ++i)
    if (rows_bwd_layout(o1, o2, sp, modes[i]).bytes <= lim) return modes[i];
  return 0;
}

// tau = W - E of rows a0..a0+rows (all b) and columns q0..q0+7 into X[a - a0][b * 8 + j] (row stride
// ly), zero for rows past o1 and columns past I; vec: 16-byte loads. With tp.in, from the planes
// (TauPlanes: the same bits, one 16-byte copy per row and plane).
template <typename P, typename T>
__device__ __forceinline__ void load_tau_rows(MmaT *xh, MmaT *xl, int ly, const T *__restrict__ w,
                                              const T *__restrict__ e, int a0, int rows, int o1, int o2, int64_t I,
                                              int64_t q0, bool vec, TauPlanes tp) {
  const int64_t plane = slab_plane(I, tp.O), at0 = slab_at(q0, 0, tp.O);
  for (int64_t x = threadIdx.x; x < (int64_t)rows * o2; x += TC_THREADS) {
    const int al = (int)(x / o2), b = (int)(x % o2), a = a0 + al;
    const int64_t p = (int64_t)a * o2 + b;
    if (tp.in && a < o1) {
      const int64_t at = (int64_t)al * ly + b * TC_QC, from = at0 + p * TC_QC;
      *reinterpret_cast<uint4 *>(xh + at) = *reinterpret_cast<const uint4 *>(tp.in + from);
      if constexpr (P::data_lo) *reinterpret_cast<uint4 *>(xl + at) = *reinterpret_cast<const uint4 *>(tp.in + plane + from);
      continue;
    }
    float v[TC_QC];
    if (a >= o1) {
#pragma unroll
      for (int j = 0; j < TC_QC; ++j) v[j] = 0.f;
    } else if (vec) {
      const uint4 wv = *reinterpret_cast<const uint4 *>(w + p * I + q0);
      const uint4 ev = *reinterpret_cast<const uint4 *>(e + p * I + q0);
      T wt[TC_QC], et[TC_QC];
      memcpy(wt, &wv, 16);
      memcpy(et, &ev, 16);
#pragma unroll
      for (int j = 0; j < TC_QC; ++j) v[j] = to_f32(wt[j]) - to_f32(et[j]);
    } else {
#pragma unroll
      for (int j = 0; j < TC_QC; ++j) {
        const int64_t q = q0 + j;
        v[j] = q < I ? to_f32(w[p * I + q]) - to_f32(e[p * I + q]) : 0.f;
      }
    }
    store_data8<P>(xh, xl, (int64_t)al * ly + b * TC_QC, v);
  }
}

// Mode b in place on the slab: X[a][b' * 8 + j] <- sum_b F[b'][b] X[a][b * 8 + j] for a < o1 (F the
// A operand as stored, M = b', N = j, K = b; X's row a the B operand through ldmatrix.trans). One row
// run per warp at a time: the warp reads the whole row before it writes it back, and no other warp
// touches it. Without factor lo halves each warp keeps all of F's fragments (at most 64 registers).
template <typename P>
__device__ __forceinline__ void slab_mode_b_inplace(const MmaT *fh, const MmaT *fl, int lf, MmaT *xh, MmaT *xl, int ly,
                                                    int o1, int o2, int o2p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int kt = o2p / 16;
  constexpr int KS = TC_KMAX / 16;
  FactorFrags<P> fk;
  factor_frags_load<P>(fk, fh, lf, kt, lane);
  for (int a = warp; a < o1; a += TC_WARPS) {
    MmaT *rh = xh + (int64_t)a * ly, *rl = xl + (int64_t)a * ly;
    uint32_t bh[KS][2], bl[KS][2];
#pragma unroll
    for (int k = 0; k < KS; ++k)
      if (k < kt) {
        ldmatrix_x2<true>(bh[k], rh + (k * 16 + (lane & 15)) * TC_QC);
        if constexpr (P::data_lo) ldmatrix_x2<true>(bl[k], rl + (k * 16 + (lane & 15)) * TC_QC);
      }
    float c[KS][4];
#pragma unroll
    for (int mt = 0; mt < KS; ++mt) {
#pragma unroll
      for (int v = 0; v < 4; ++v) c[mt][v] = 0.f;
      if (mt < kt) factor_frags_tile<P>(c[mt], fk, fh, fl, lf, mt, kt, bh, bl, lane);
    }
    __syncwarp();  // the row is read (ldmatrix is warp-wide) before any lane writes it
#pragma unroll
    for (int mt = 0; mt < KS; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int b = mt * 16 + g + 8 * h;
        if (mt < kt && b < o2) store_data2<P>(rh, rl, b * TC_QC + 2 * t, c[mt][2 * h], c[mt][2 * h + 1]);
      }
  }
}

// dB's units per warp: (m tile of b, pair of n tiles of b') units, unit u taken by warp u % TC_WARPS;
// at most (64 / 16)^2 = 16 units, two per warp. Where a warp's two units share their pair of n
// tiles (o2p / 16 divides TC_WARPS: o2p 16, 32, 64), they share its tau fragments too.
constexpr int TC_DB_UNITS = 2;

// dB += W_chunk tau_chunk over one chunk of TC_WR rows a' (M = b, N = b', K = (a', j): k step s is
// rows 2s and 2s + 1 of the chunk). acc[u]: unit u of this warp, its two n8 tiles' accumulators.
template <typename P>
__device__ __forceinline__ void rows_bwd_db(float acc[TC_DB_UNITS][8], const MmaT *wh, const MmaT *wl, const MmaT *th,
                                            const MmaT *tl, int ly, int o2p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int i = lane >> 3, r = lane & 7;
  const int npb = o2p / 16, units = (o2p / 16) * npb;
#pragma unroll
  for (int s = 0; s < TC_WR / 2; ++s) {
    uint32_t bh[4], bl[4];
    int loaded = -1;  // the pair of n tiles whose tau fragments bh, bl hold
#pragma unroll
    for (int uu = 0; uu < TC_DB_UNITS; ++uu) {
      const int u = warp + uu * TC_WARPS;
      if (u >= units) continue;
      const int mt = u / npb, np = u % npb;
      // A: matrix i = (k half i / 2: row a' = 2s + i / 2, m half i % 2); B: matrix i = (n tile i / 2,
      // k half i % 2), so that d[0..1] and d[2..3] are the two n tiles' fragments.
      const int64_t ao = (int64_t)(2 * s + (i >> 1)) * ly + (mt * 16 + r + 8 * (i & 1)) * TC_QC;
      uint32_t ah[4], al[4];
      ldmatrix_x4<false>(ah, wh + ao);
      if constexpr (P::data_lo) ldmatrix_x4<false>(al, wl + ao);
      if (np != loaded) {
        const int64_t bo = (int64_t)(2 * s + (i & 1)) * ly + (np * 16 + 8 * (i >> 1) + r) * TC_QC;
        ldmatrix_x4<false>(bh, th + bo);
        if constexpr (P::data_lo) ldmatrix_x4<false>(bl, tl + bo);
        loaded = np;
      }
      mma_data<P>(acc[uu], ah, al, bh, bl);
      mma_data<P>(acc[uu] + 4, ah, al, bh + 2, bl + 2);
    }
  }
}

// dA[a][a0 + n] = sum_k V[a][k] tau_view[n][k] for the view's ntiles n tiles (rows a0.. of tau;
// M = a, N = a', K = (b, j) over ks k steps), written to out[a * o1 + a'] (a, a' < o1). Warps
// sharing an m tile split the n tiles, and each takes up to four at once so that its A fragment
// is read once per k step for all of them.
template <typename P>
__device__ __forceinline__ void rows_bwd_da(const MmaT *vh, const MmaT *vl, const MmaT *th, const MmaT *tl, int ly,
                                            int a0, int ntiles, int ks, int o1, int o1p, float *out, bool pairs) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int i = lane >> 3, r = lane & 7;
  const int mta = o1p / 16, wpm = TC_WARPS / mta;  // warps per m tile (mta <= 4: at least two)
  if (warp >= mta * wpm) return;
  const int mt = warp % mta;
  for (int nb = warp / mta; nb < ntiles; nb += 4 * wpm) {
    float c[4][4] = {};
    for (int s = 0; s < ks; ++s) {
      const int64_t ao = (int64_t)(mt * 16 + r + 8 * (i & 1)) * ly + s * 16 + 8 * (i >> 1);
      uint32_t ah[4], al[4];
      ldmatrix_x4<false>(ah, vh + ao);
      if constexpr (P::data_lo) ldmatrix_x4<false>(al, vl + ao);
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const int nt = nb + h * wpm;
        if (nt >= ntiles) continue;
        const int64_t bo = (int64_t)(nt * 8 + r) * ly + s * 16 + 8 * (i & 1);  // lanes 0..15
        uint32_t bh[2], bl[2];
        ldmatrix_x2<false>(bh, th + bo);
        if constexpr (P::data_lo) ldmatrix_x2<false>(bl, tl + bo);
        mma_data<P>(c[h], ah, al, bh, bl);
      }
    }
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const int nt = nb + h * wpm;
      if (nt >= ntiles) continue;
#pragma unroll
      for (int v = 0; v < 4; v += 2) {
        const int a = mt * 16 + g + 8 * (v >> 1), ap = a0 + nt * 8 + 2 * t;
        if (a >= o1 || ap >= o1) continue;
        store_partial_pair(out + a * o1 + ap, c[h][v], c[h][v + 1], pairs, ap + 1 < o1);
      }
    }
  }
}

// One block per SM at the shapes that matter (at T5-base `wi`, bf16: 128 KiB with tau resident,
// 225 KiB with dtau too, on sm_90).
// grid (slabs, groups); block (slab, g) runs ranks r0 + g nr / groups.. of the round (nr / groups
// of them) of its slab in order. z: the round's K_r (BwdZ; a lo plane only with data lo halves,
// f16's); gt: f32 [O][I], dtau, to which this slab's L_r^T K_r is added rank by rank (written by
// the first rank when r0 == 0): a fixed order, so the bits do not depend on the schedule. part:
// f32 [nr][slabs][o1*o1 + o2*o2], this slab's dA and dB contributions. fin (dtau resident, last
// round only): the expert's gradient goes to fin instead of gt.
// groups > 1 (dtau resident, one round: rows_bwd_groups): the slab's dtau is summed over the
// groups in group order by the last of them to arrive (sem: one counter per slab, zero before the
// launch and again after it), from the others' partial sums, which each group leaves in f32 where
// its own K planes were (rows_bwd_partial_at: two 2-byte planes of the slab hold the 4-byte
// partial). Returns whether this block finished the slab (dtau stored): the only one, or the last.
#define CAMEX_ROWS_BWD_PARAMS                                                                                  \
  const T *__restrict__ w, const T *__restrict__ e, MmaT *__restrict__ z, const T *__restrict__ fa,            \
      const T *__restrict__ fb, float *__restrict__ part, float *__restrict__ gt, int o1, int o2, int64_t I,   \
      int64_t nexp, int64_t expert, int64_t r0, int64_t nr, int mode, int groups, unsigned *sem
#define CAMEX_ROWS_BWD_ARGS w, e, z, fa, fb, part, gt, o1, o2, I, nexp, expert, r0, nr, mode, groups, sem

// Element x of group g's partial dtau ([O][8] f32 of slab q0 / 8, flat), in the first two 2-byte
// planes of the group's ranks (gs ranks from round rank g gs, `planes` planes each) at that slab:
// each plane's slab holds O * 8 two-byte values, so O * 4 floats.
__device__ __forceinline__ float *rows_bwd_partial_at(MmaT *z, int64_t plane, int planes, int64_t g, int64_t gs,
                                                      int64_t q0, int64_t O, int64_t x) {
  const int64_t h = x / (O * 4), rank = g * gs + h / planes;
  MmaT *base = z + (rank * planes + h % planes) * plane + slab_at(q0, 0, O);
  return reinterpret_cast<float *>(base) + x % (O * 4);
}

template <typename T>
__device__ __forceinline__ bool rows_bwd_body(char *smem, CAMEX_ROWS_BWD_PARAMS, TauPlanes tp, ExpertFinish<T> fin) {
  using P = RowsBwdPrec<T>;
  const RowsBwdLayout L = rows_bwd_layout(o1, o2, P::split(), mode);
  const bool resident = mode & TC_TAU_RESIDENT, dacc = mode & TC_DTAU_RESIDENT;
  float *Gs = reinterpret_cast<float *>(smem + L.gs);
  MmaT *Kh = reinterpret_cast<MmaT *>(smem + L.kh), *Kl = reinterpret_cast<MmaT *>(smem + L.kl);
  MmaT *Wh = reinterpret_cast<MmaT *>(smem + L.wh), *Wl = reinterpret_cast<MmaT *>(smem + L.wl);
  MmaT *Th = reinterpret_cast<MmaT *>(smem + L.th), *Tl = reinterpret_cast<MmaT *>(smem + L.tl);
  MmaT *Ath = reinterpret_cast<MmaT *>(smem + L.ath), *Atl = reinterpret_cast<MmaT *>(smem + L.atl);
  MmaT *Bth = reinterpret_cast<MmaT *>(smem + L.bth), *Btl = reinterpret_cast<MmaT *>(smem + L.btl);
  const int64_t O = (int64_t)o1 * o2, slabs = (I + TC_QC - 1) / TC_QC, plane = slab_plane(I, O);
  const int64_t slab = blockIdx.x, q0 = slab * TC_QC;
  const int64_t grp = blockIdx.y, gs = nr / groups, rb = grp * gs;  // this block's ranks rb..rb+gs
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int ly = L.ly, kta = L.o1p / 16, chunks = L.o1p / TC_WR;
  const int ks = (o2 * TC_QC + 15) / 16;  // dA's k steps: columns past o2 * 8 are zero
  const bool vec = I % TC_QC == 0 && ((reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(e)) & 15) == 0;
  // dtau's pairs (q, q + 1) as one 8-byte access (q0 and j even): whole sectors per row.
  const bool pairs = I % 2 == 0 && (reinterpret_cast<uintptr_t>(gt) & 7) == 0;
  // The dA and dB partials' pairs likewise: rows of even length o1, o2 (then every slab's and
  // rank's partials start 8 bytes apart too).
  const bool part_pairs = o1 % 2 == 0 && o2 % 2 == 0 && (reinterpret_cast<uintptr_t>(part) & 7) == 0;
  // dtau's slab in shared memory (with TC_DTAU_RESIDENT) at flat index x = p * 8 + j.
  auto gs_at = [&](int64_t x) -> float & {
    return Gs[(x / TC_QC / o2) * L.lg + (x / TC_QC % o2) * TC_QC + x % TC_QC];
  };
  // tau's rows of chunk c: resident, a view of the whole slab; else loaded into the chunk buffer.
  auto tau_chunk = [&](int c, const MmaT *&th, const MmaT *&tl) {
    if (resident) {
      th = Th + (int64_t)c * TC_WR * ly;
      tl = Tl + (int64_t)c * TC_WR * ly;
    } else {
      load_tau_rows<P>(Th, Tl, ly, w, e, c * TC_WR, TC_WR, o1, o2, I, q0, vec, tp);
      th = Th;
      tl = Tl;
    }
  };

  // Every operand's padding stays zero. dtau's slab (L.gs on) is not zeroed: the first rank writes
  // it whole (the earlier rounds' dtau is loaded instead where r0 > 0), so 100 KB at T5-base fewer.
  zero_smem(smem, L.gs);
  __syncthreads();
  if (resident) load_tau_rows<P>(Th, Tl, ly, w, e, 0, o1, o1, o2, I, q0, vec, tp);
  if (dacc && r0 > 0) {  // the earlier rounds' dtau, to add this round's ranks to in order
    for (int64_t x = threadIdx.x; x < O * TC_QC; x += TC_THREADS) {
      const int64_t p = x / TC_QC, j = x % TC_QC;
      if (q0 + j < I) gs_at(x) = gt[p * I + q0 + j];
    }
  }
  for (int64_t rl = rb; rl < rb + gs; ++rl) {
    const int64_t r = r0 + rl;
    // zs[zrow * 8 + j]: this slab of K_r's hi plane, rows in BwdZ's order (z_row_to_p).
    const MmaT *zs = z + rl * ZMem<BwdZ<T>>::planes * plane + slab_at(q0, 0, O);
    float *out = part + (rl * slabs + slab) * ((int64_t)o1 * o1 + (int64_t)o2 * o2);
    __syncthreads();  // the previous rank is done with shared memory
    load_factor_t<P, true>(Ath, Atl, fa + (r * nexp + expert) * o1 * o1, o1, L.la);
    load_factor_t<P, true>(Bth, Btl, fb + (r * nexp + expert) * o2 * o2, o2, L.lb);
    // K's slab: K[a][b * 8 + j] = zs[(b * o1 + a) * 8 + j], one 16-byte copy per plane. Consecutive
    // lanes take consecutive Z rows (whole sectors), rows a whose ly (an odd number of 16-byte
    // units) puts a phase's eight stores in eight bank groups.
    for (int64_t zrow = threadIdx.x; zrow < O; zrow += TC_THREADS) {
      const int64_t at = (zrow % o1) * ly + (zrow / o1) * TC_QC;
      *reinterpret_cast<uint4 *>(Kh + at) = *reinterpret_cast<const uint4 *>(zs + zrow * TC_QC);
      if constexpr (P::data_lo)
        *reinterpret_cast<uint4 *>(Kl + at) = *reinterpret_cast<const uint4 *>(zs + plane + zrow * TC_QC);
    }

    // dB, chunk by chunk of W = A^T K (rows c * 16.., one m tile), accumulated in registers.
    float db[TC_DB_UNITS][8] = {};
    for (int c = 0; c < chunks; ++c) {
      __syncthreads();  // K and the factors are in; the previous chunk's dB is done with W and tau
      const MmaT *th, *tl;
      tau_chunk(c, th, tl);
      slab_fwd_mode_a<P>(Ath, Atl, L.la, Kh, Kl, ly, [&](int, int b, const float v[4]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) store_data2<P>(Wh, Wl, (g + 8 * h) * ly + b * TC_QC + 2 * t, v[2 * h], v[2 * h + 1]);
      }, c, c + 1, kta, o2);
      __syncthreads();
      rows_bwd_db<P>(db, Wh, Wl, th, tl, ly, L.o2p);
    }
    {
      const int npb = L.o2p / 16, units = (L.o2p / 16) * npb, warp = threadIdx.x >> 5;
      float *dbo = out + (int64_t)o1 * o1;
#pragma unroll
      for (int uu = 0; uu < TC_DB_UNITS; ++uu) {
        const int u = warp + uu * TC_WARPS;
        if (u >= units) continue;
#pragma unroll
        for (int v = 0; v < 8; v += 2) {
          const int b = (u / npb) * 16 + g + 8 * ((v & 3) >> 1), bp = (u % npb) * 16 + 8 * (v >> 2) + 2 * t;
          if (b < o2 && bp < o2) store_partial_pair(dbo + b * o2 + bp, db[uu][v], db[uu][v + 1], part_pairs, bp + 1 < o2);
        }
      }
    }
    __syncthreads();  // every W chunk has read K

    // V = K x2 B^T, over K.
    slab_mode_b_inplace<P>(Bth, Btl, L.lb, Kh, Kl, ly, o1, o2, L.o2p);
    __syncthreads();

    // dtau_r = A^T V: dtau[(a', b'), q0 + j] (+)= sum_a A[a][a'] V[a][b' * 8 + j], in shared memory
    // or in gt.
    const bool acc = r0 > 0 || rl > rb;
    slab_fwd_mode_a<P>(Ath, Atl, L.la, Kh, Kl, ly, [&](int mt, int b, const float v[4]) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int a = mt * 16 + g + 8 * h;
        const int64_t q = q0 + 2 * t;
        if (a >= o1) continue;
        if (dacc) {
          float2 *d2 = reinterpret_cast<float2 *>(Gs + a * L.lg + b * TC_QC + 2 * t);
          const float2 o = acc ? *d2 : make_float2(0.f, 0.f);
          *d2 = make_float2(o.x + v[2 * h], o.y + v[2 * h + 1]);
          continue;
        }
        float *d = gt + ((int64_t)a * o2 + b) * I + q;
        const float v0 = v[2 * h], v1 = v[2 * h + 1];
        if (pairs && q + 1 < I) {
          float2 *d2 = reinterpret_cast<float2 *>(d);
          const float2 o = acc ? *d2 : make_float2(0.f, 0.f);
          *d2 = make_float2(o.x + v0, o.y + v1);
        } else {
          if (q < I) d[0] = acc ? d[0] + v0 : v0;
          if (q + 1 < I) d[1] = acc ? d[1] + v1 : v1;
        }
      }
    }, 0, kta, kta, o2);

    // dA[a][a'] = sum_{(b, j)} V[a][b * 8 + j] tau[a'][b * 8 + j]: all of tau at once where it is
    // resident, else chunk by chunk.
    if (resident) {
      rows_bwd_da<P>(Kh, Kl, Th, Tl, ly, 0, L.o1p / 8, ks, o1, L.o1p, out, part_pairs);
    } else {
      for (int c = 0; c < chunks; ++c) {
        __syncthreads();  // the previous chunk's readers are done with tau
        const MmaT *th, *tl;
        tau_chunk(c, th, tl);
        __syncthreads();
        rows_bwd_da<P>(Kh, Kl, th, tl, ly, c * TC_WR, TC_WR / 8, ks, o1, L.o1p, out, part_pairs);
      }
    }
  }
  if (!dacc) return true;
  __syncthreads();
  const int planes = ZMem<BwdZ<T>>::planes;
  if (groups > 1) {
    // This group's partial over its own K planes (read for the last time above), then arrival.
    for (int64_t x = threadIdx.x; x < O * TC_QC; x += TC_THREADS)
      *rows_bwd_partial_at(z, plane, planes, grp, gs, q0, O, x) = gs_at(x);
    __threadfence();  // the partial is visible before the count that says it is there
    __syncthreads();
    unsigned &rows_bwd_arrived = *reinterpret_cast<unsigned *>(smem + L.flag);
    if (threadIdx.x == 0) rows_bwd_arrived = atomicAdd(sem + slab, 1u);
    __syncthreads();
    if (rows_bwd_arrived != (unsigned)groups - 1) return false;
    if (threadIdx.x == 0) sem[slab] = 0;  // every group has arrived: ready for the next launch
    __threadfence();
  }
  // The round's dtau, once, summed over the groups in group order (own partial from shared
  // memory, the others' through L2); after the last round, as finish_expert_kernel would.
  for (int64_t x = threadIdx.x; x < O * TC_QC; x += TC_THREADS) {
    const int64_t p = x / TC_QC, j = x % TC_QC, at = p * I + q0 + j;
    if (q0 + j >= I) continue;
    float v = 0.f;
    for (int64_t k = 0; k < groups; ++k) {
      const float pk = k == grp ? gs_at(x)
                                : *reinterpret_cast<const volatile float *>(
                                      rows_bwd_partial_at(z, plane, planes, k, gs, q0, O, x));
      v = k == 0 ? pk : v + pk;
    }
    if (fin.grad_e) fin.store(at, v);
    else gt[at] = v;
  }
  return true;
}

template <typename T>
__global__ void __launch_bounds__(TC_THREADS, 1)
    kron_rows_bwd_kernel(CAMEX_ROWS_BWD_PARAMS, TauPlanes tp, ExpertFinish<T> fin) {
  CAMEX_DYNAMIC_SMEM(smem);
  rows_bwd_body<T>(smem, CAMEX_ROWS_BWD_ARGS, tp, fin);
}

// A round's rows-side backward (ranks r0..r0+nr; fin as kron_rows_bwd_kernel's where it is the
// expert's last round), then the next round's stage 1 (ranks rn0..rn0+nrn of expert expert1, whose
// weights are w1, kron_rows_split_kernel's work, `resident` its layout, tp1 its tau planes) in the
// same launch: the next round of the same expert, or the first round of the next expert. Each
// block reads K only from its own slab of z and stage 1 writes P only to it, so P of the next round
// can go over K of this one without a grid-wide barrier. One launch fewer per round and per expert
// after the first. Shared memory: the larger of the two layouts, each zeroed by its own body.
template <typename T>
__global__ void __launch_bounds__(TC_THREADS, 1)
    kron_rows_bwd_split_kernel(CAMEX_ROWS_BWD_PARAMS, TauPlanes tp, ExpertFinish<T> fin, const T *__restrict__ w1,
                               int64_t expert1, TauPlanes tp1, int64_t rn0, int64_t nrn, int resident) {
  CAMEX_DYNAMIC_SMEM(smem);
  // With groups, the slab's last group runs the next stage 1, for every rank: P then goes over the
  // others' K and partials only after it has read them.
  if (!rows_bwd_body<T>(smem, CAMEX_ROWS_BWD_ARGS, tp, fin)) return;
  __syncthreads();  // every thread is done with the rows-side layout (and this slab of K)
  // (Unpipelined: the layout it shares with the rows-side backward has no room for more buffers.)
  kron_rows_body<T, RowsSplitPrec<T>, BwdZ<T>>(smem, w1, e, fa, fb, z, o1, o2, I, nexp, expert1, rn0, nrn, resident,
                                              tp1, 0);
}
#undef CAMEX_ROWS_BWD_PARAMS
#undef CAMEX_ROWS_BWD_ARGS

// ---- host side ----

// Factor gradients of ranks f.r0..f.r0+f.nr of expert f.expert (FactorReduce), on their own launch:
// the expert's last call, with no next expert's columns side to take them.
template <typename T> __global__ void kron_bwd_reduce_kernel(FactorReduce<T> f) {
  const int64_t nab = f.nr * f.sab();
  CAMEX_GRID_STRIDE(k, f.nr * (f.sab() + f.scd())) {
    if (k < nab) factor_reduce_ab(f, k);
    else factor_reduce_cd(f, k - nab);
  }
}

// The columns-side backward as kron_backward_tc launches it: the register kernel where it takes
// the shape, else kron_cols_bwd_kernel; its rows per block (which also size the partials:
// kron_tc_bwd_partial_floats) and shared memory.
struct ColsBwdPlan {
  bool reg;
  int pr;
  int64_t bytes;
};
template <typename T> inline ColsBwdPlan cols_bwd_plan(int64_t O, int i1, int i2, int64_t lim) {
  if (cols_bwd_reg_ok<T>(i1, i2)) {
    const int pr = cols_bwd_reg_rows(O, i1, i2, lim);
    return {true, pr, cols_bwd_reg_layout(tc_pad(i1), tc_pad(i2), pr).bytes};
  }
  const int pr = cols_bwd_rows(i1, i2, ColsBwdPrec<T>::split(), lim);
  return {false, pr, cols_bwd_layout(i1, i2, pr, ColsBwdPrec<T>::split()).bytes};
}

// Whether the register kernel takes its pipelined layout (a second P buffer, filled by cp.async:
// load_z_rows' 16-byte plane copies, so i2 % 8 == 0) at pr rows within `lim`. It runs one block per
// SM, so the buffer costs no block; pr stays the plan's, and with it the partials' workspace.
inline bool cols_bwd_reg_pipe(int i1, int i2, int pr, int64_t lim) {
  return i2 % TC_QC == 0 && cols_bwd_reg_layout(tc_pad(i1), tc_pad(i2), pr, true).bytes <= lim;
}

// Shared memory of the three stages (rows forward, columns backward, rows backward), each under
// its own precision policy, in their smallest layouts.
// A 1 x 1 factor makes its gradient one cancelling sum per rank and expert, which bound 1 judges
// over that single entry; with H and P single-pass (bf16) the emulation's worst such case (ca_merge,
// grad_factor_c `[1, 2, 1, 1]`) reached 1.0e-2 > tol 1e-2 (the official einsums: 6.9e-3; H and P
// split: 6.8e-3). Such shapes (a prime O or I) take the scalar chain's f32 backward.
template <typename T> inline bool kron_tc_bwd_fits(const D4 &d4, int64_t lim) {
  const int o1 = (int)d4.d[0], o2 = (int)d4.d[1], i1 = (int)d4.d[2], i2 = (int)d4.d[3];
  if (!ColsBwdPrec<T>::data_lo && (o1 == 1 || o2 == 1 || i1 == 1 || i2 == 1)) return false;
  const ColsBwdPlan cp = cols_bwd_plan<T>((int64_t)o1 * o2, i1, i2, lim);
  return rows_layout(o1, o2, RowsSplitPrec<T>::split(), false).bytes <= lim && cp.bytes <= lim &&
         rows_bwd_layout(o1, o2, RowsBwdPrec<T>::split(), 0).bytes <= lim;
}

// Floats of the partials of every rank of one expert (both sides), sized on the dimensions and the
// current device's shared memory (the columns side's rows per block, cols_bwd_plan): the rounds
// write their ranks' partials side by side, and one reduction per expert sums them, in the next
// expert's columns-side launch where there is one: so the columns side's partials alternate
// between two buffers by expert parity (that launch writes its own while it reads the last
// expert's; the rows side's are written only after it). A workspace
// sized on one device and used on another with less shared memory gets CAMEX_ERR_WORKSPACE.
inline int64_t kron_tc_bwd_partial_floats(const D4 &d4, int64_t r, int dtype) {
  if (!kron_tc_dims_ok(d4)) return 0;
  const int64_t o1 = d4.d[0], o2 = d4.d[1], i1 = d4.d[2], i2 = d4.d[3];
  const int64_t O = o1 * o2, I = i1 * i2;
  const int64_t lim = tc_smem_limit(), slabs = (I + TC_QC - 1) / TC_QC;
  const int64_t pr = dtype == CAMEX_BF16 ? cols_bwd_plan<__nv_bfloat16>(O, (int)i1, (int)i2, lim).pr
                                         : cols_bwd_plan<__half>(O, (int)i1, (int)i2, lim).pr;
  const int64_t cblocks = (O + pr - 1) / pr;
  // then the rows side's arrival counters (rows_bwd_groups), one 4-byte word per slab
  return r * (slabs * (o1 * o1 + o2 * o2) + 2 * cblocks * (i1 * i1 + i2 * i2)) + slabs + 64;
}

// The streaming multiprocessors of the launch's device (the emulation's: the H200's 132).
inline int64_t tc_sm_count() {
#ifdef CAMEX_EMU
  return 132;
#else
  const int v = device_attribute(cudaDevAttrMultiProcessorCount, 132);
  return v > 0 ? v : 132;
#endif
}

// Rank groups of the rows-side backward for a round of nr ranks over `slabs` slab blocks (one block
// per SM): at T5-base `wi` the 96 slabs leave 36 of the H200's 132 SMs idle, and 4 groups of 2
// ranks (384 blocks, 2.9 waves) keep 97 % of them busy. Only with dtau resident in one round of
// every rank (its partials then go over the consumed K, which needs two 2-byte planes per group:
// `planes` per rank), for a divisor of nr; the fewest groups that reach the best utilisation.
inline int rows_bwd_groups(int64_t slabs, int64_t nr, int planes, bool one_round, int mode, int64_t sms) {
  if (!one_round || !(mode & TC_DTAU_RESIDENT)) return 1;
  int best = 1;
  double best_u = 0.0;
  for (int g = 1; g <= 8; g *= 2) {
    if (nr % g != 0 || (g > 1 && (nr / g) * planes < 2)) continue;
    const int64_t blocks = slabs * g, waves = (blocks + sms - 1) / sms;
    const double u = (double)blocks / (double)(waves * sms);
    if (u > best_u + 1e-9) best = g, best_u = u;
  }
  return best;
}

// The columns-side launch's arguments (kron_cols_bwd_kernel's, kron_cols_bwd_reg_kernel's).
template <typename T> struct ColsBwdArgs {
  Opnd h;
  MmaT *z;
  const T *fc, *fd;
  float *part;
  int o1, i1, i2, pr;
  int64_t O, r0, nr, nexp, expert;
  FactorReduce<T> prev;  // the previous expert's factor gradients, or none
  int pipe;              // the register kernel's pipelined layout (cols_bwd_reg_pipe)
};

// The register kernel's instance for i1 x i2 (cols_bwd_reg_ok): with `a`, launched on `grid`
// blocks of `bytes`; without, its opt-in to `lim` bytes of shared memory set. One statement per
// instance, so that each launch names its kernel (the emulation's counters go by the name).
template <typename T>
inline cudaError_t cols_bwd_reg_launch(cudaStream_t s, int i1, int i2, unsigned grid, int64_t bytes, int64_t lim,
                                       const ColsBwdArgs<T> *a) {
  if constexpr (ColsBwdPrec<T>::data_lo || ColsBwdPrec<T>::factor_lo) {
    return cudaErrorInvalidValue;  // cols_bwd_reg_ok is false for such T
  } else {
#define CAMEX_COLS_BWD_REG(C, D)                                                                            \
  if (tc_pad(i1) == C && tc_pad(i2) == D) {                                                                 \
    if (!a) return CAMEX_SET_MAX_SMEM((kron_cols_bwd_reg_kernel<T, C, D>), lim);                            \
    CAMEX_LAUNCH_SMEM((kron_cols_bwd_reg_kernel<T, C, D>), grid, TC_THREADS, bytes, s)(                     \
        a->h, a->z, a->fc, a->fd, a->part, a->o1, a->i1, a->i2, a->pr, a->O, a->r0, a->nr, a->nexp, a->expert,  \
        a->prev, a->pipe);                                                                                  \
    return cudaGetLastError();                                                                              \
  }
    CAMEX_COLS_BWD_REG(16, 16)
    CAMEX_COLS_BWD_REG(16, 32)
    CAMEX_COLS_BWD_REG(32, 16)
    CAMEX_COLS_BWD_REG(32, 32)
#undef CAMEX_COLS_BWD_REG
    return cudaErrorInvalidValue;
  }
}

// The reverse of expert `expert`: gt (f32 [O*I], overwritten) = dL/dtau, and the factor gradients
// of every rank for this expert. h: dL/dU (f32 or storage T); tau: W - E; z: kron_tc_z_bytes, or
// zbytes of it where zbytes >= 0 (a lent buffer: rounds of up to zbytes);
// part: kron_tc_bwd_partial_floats; lim: tc_smem_limit(), checked by kron_tc_bwd_fits. taus
// (taus_bytes; may be null): scratch for tau's planes (TauPlanes), which the first stage-1 launch
// writes and the later launches read, where they fit. nx: the next expert's stage 1, which this
// call's last rows-side launch runs too where nx.w is set (nx.next_ready then says so), and whether
// this expert's first stage 1 already ran in the previous expert's call (nx.ready).
template <typename T> struct NextExpert {
  const T *w = nullptr;  // the next expert's weights (its tau is w - e), or null
  int64_t expert = -1;
  // This expert's first round of P is already in z, and the previous call's expert (expert - 1:
  // the callers go in expert order) left its factor gradients to this call's first columns side.
  bool ready = false;
  bool *next_ready = nullptr;  // set where this call does the same for the next expert
};
template <typename T>
inline int kron_backward_tc(cudaStream_t s, float *gt, Opnd h, Opnd tau, const KronFactors &f, int64_t expert,
                            const D4 &d4, T *ga, T *gb, T *gc, T *gd, float *z, float *part, int64_t lim,
                            ExpertFinish<T> fin, bool *finished, void *taus, int64_t taus_bytes,
                            int64_t zbytes = -1, NextExpert<T> nx = {}) {
  const int o1 = (int)d4.d[0], o2 = (int)d4.d[1], i1 = (int)d4.d[2], i2 = (int)d4.d[3];
  const int64_t O = (int64_t)o1 * o2, I = (int64_t)i1 * i2, slabs = (I + TC_QC - 1) / TC_QC;
  const int resident = rows_resident(o1, o2, RowsSplitPrec<T>::split(), lim) ? 1 : 0;
  const RowsLayout rl = rows_layout(o1, o2, RowsSplitPrec<T>::split(), resident != 0);
  // The columns side, at the rows per block kron_tc_bwd_partial_floats sized the partials for.
  const ColsBwdPlan cp = cols_bwd_plan<T>(O, i1, i2, lim);
  const bool creg = cp.reg;
  const int pr = cp.pr;
  // The register kernel pipelined where its second P buffer fits at the plan's rows.
  const int cpipe = creg && cols_bwd_reg_pipe(i1, i2, pr, lim) && (reinterpret_cast<uintptr_t>(z) & 15) == 0;
  const int64_t cbytes = cpipe ? cols_bwd_reg_layout(tc_pad(i1), tc_pad(i2), pr, true).bytes : cp.bytes;
  const int bmode = rows_bwd_mode(o1, o2, RowsBwdPrec<T>::split(), lim);
  const RowsBwdLayout bl = rows_bwd_layout(o1, o2, RowsBwdPrec<T>::split(), bmode);
  const int64_t cblocks = (O + pr - 1) / pr;
  cudaError_t err = CAMEX_SET_MAX_SMEM(kron_rows_split_kernel<T>, lim);
  if (err == cudaSuccess) err = creg ? cols_bwd_reg_launch<T>(s, i1, i2, 0, 0, lim, nullptr)
                                    : CAMEX_SET_MAX_SMEM(kron_cols_bwd_kernel<T>, lim);
  if (err == cudaSuccess) err = CAMEX_SET_MAX_SMEM(kron_rows_bwd_kernel<T>, lim);
  if (err == cudaSuccess) err = CAMEX_SET_MAX_SMEM(kron_rows_bwd_split_kernel<T>, lim);
  if (err != cudaSuccess) return (int)err;
  const T *w = reinterpret_cast<const T *>(tau.p), *e = reinterpret_cast<const T *>(tau.base);
  const T *fa = reinterpret_cast<const T *>(f.a), *fb = reinterpret_cast<const T *>(f.b);
  const T *fc = reinterpret_cast<const T *>(f.c), *fd = reinterpret_cast<const T *>(f.d);
  MmaT *zs = reinterpret_cast<MmaT *>(z);  // BwdZ: within kron_tc_z_bytes at its element size
  // tau's planes: hi, and lo where the row kernels split data (both take FwdPrec's split).
  static_assert(RowsSplitPrec<T>::data_lo == RowsBwdPrec<T>::data_lo, "one set of tau planes for both");
  const int64_t tau_bytes = (RowsBwdPrec<T>::data_lo ? 2 : 1) * slab_plane(I, O) * 2;
  MmaT *tp = taus && tau_bytes <= taus_bytes ? reinterpret_cast<MmaT *>(taus) : nullptr;
  const TauPlanes tp_out = {nullptr, tp, O}, tp_in = {tp, nullptr, O};
  const int64_t chunk = kron_tc_rank_chunk(d4, f.r, ZMem<BwdZ<T>>::planes * (int64_t)sizeof(MmaT), zbytes);
  const int64_t sab = (int64_t)o1 * o1 + (int64_t)o2 * o2, scd = (int64_t)i1 * i1 + (int64_t)i2 * i2;
  // Every rank's partials, [r][slabs][sab] then [r][cblocks][scd] in the buffer of the expert's
  // parity (kron_tc_bwd_partial_floats): reduced once per expert, by the next expert's first
  // columns-side launch where this call runs that expert's first stage 1 too, else on their own.
  float *pab = part, *pcd0 = part + f.r * slabs * sab;
  float *pcd = pcd0 + (expert & 1) * f.r * cblocks * scd;
  unsigned *sem = reinterpret_cast<unsigned *>(pcd0 + 2 * f.r * cblocks * scd);
  const FactorReduce<T> own = {pab, pcd, ga, gb, gc, gd, slabs, cblocks, o1, o2, i1, i2, 0, f.r, f.n, expert};
  FactorReduce<T> prev = {};
  if (nx.ready) {
    if (expert < 1) return (int)cudaErrorInvalidValue;
    prev = own;
    prev.pcd = pcd0 + ((expert - 1) & 1) * f.r * cblocks * scd;
    prev.expert = expert - 1;
  }
  const int groups = rows_bwd_groups(slabs, chunk, ZMem<BwdZ<T>>::planes, chunk >= f.r, bmode, tc_sm_count());
  // The counters start at zero; the last group of each slab sets its counter back to zero. Zeroed
  // on expert 0, the first call of an op on its (fresh) workspace: both callers go in expert order.
  if (groups > 1 && expert == 0) {
    CAMEX_TRY_RT(cudaMemsetAsync(sem, 0, (size_t)slabs * sizeof(unsigned), s));
  }
  const dim3 bgrid((unsigned)slabs, (unsigned)groups);
  // Stage 1 of each later round runs in the previous round's rows-side launch
  // (kron_rows_bwd_split_kernel): three launches for the first round, two for each later one.
  const int64_t fused_bytes = bl.bytes > rl.bytes ? bl.bytes : rl.bytes;
  for (int64_t r0 = 0; r0 < f.r; r0 += chunk) {
    const int64_t nr = f.r - r0 < chunk ? f.r - r0 : chunk;
    const int64_t rn0 = r0 + nr, nrn = f.r - rn0 < chunk ? f.r - rn0 : chunk;  // the next round

    if (r0 == 0 && !nx.ready) {
      CAMEX_LAUNCH_SMEM(kron_rows_split_kernel<T>, (unsigned)slabs, TC_THREADS, rl.bytes, s)(
          w, e, fa, fb, zs, o1, o2, I, f.n, expert, r0, nr, resident, tp_out, 0);
      CAMEX_CHECK_LAUNCH();
    }
    const ColsBwdArgs<T> ca = {h, zs, fc, fd, pcd + r0 * cblocks * scd, o1, i1, i2, pr, O, r0, nr, f.n, expert,
                               r0 == 0 ? prev : FactorReduce<T>{}, cpipe};
    if (creg) {
      err = cols_bwd_reg_launch<T>(s, i1, i2, (unsigned)cblocks, cbytes, 0, &ca);
      if (err != cudaSuccess) return (int)err;
    } else {
      CAMEX_LAUNCH_SMEM(kron_cols_bwd_kernel<T>, (unsigned)cblocks, TC_THREADS, cbytes, s)(
          ca.h, ca.z, ca.fc, ca.fd, ca.part, o1, i1, i2, pr, O, r0, nr, f.n, expert, ca.prev);
      CAMEX_CHECK_LAUNCH();
    }
    // The expert's last round; with dtau resident it finishes the expert (gt is then not written).
    const bool last = nrn == 0 && (bmode & TC_DTAU_RESIDENT) && fin.grad_e;
    if (nrn > 0 || nx.w) {
      // Stage 1 of this expert's next round, or of the next expert's first round (the same chunk:
      // the same dimensions; its tau planes written as kron_rows_split_kernel's first launch does).
      const bool cross = nrn == 0;
      CAMEX_LAUNCH_SMEM(kron_rows_bwd_split_kernel<T>, bgrid, TC_THREADS, fused_bytes, s)(
          w, e, zs, fa, fb, pab + r0 * slabs * sab, gt, o1, o2, I, f.n, expert, r0, nr, bmode, groups, sem, tp_in,
          last ? fin : ExpertFinish<T>{}, cross ? nx.w : w, cross ? nx.expert : expert, cross ? tp_out : tp_in,
          cross ? 0 : rn0, cross ? chunk : nrn, resident);
      CAMEX_CHECK_LAUNCH();
      if (last) *finished = true;
      if (cross && nx.next_ready) *nx.next_ready = true;
      continue;
    }
    CAMEX_LAUNCH_SMEM(kron_rows_bwd_kernel<T>, bgrid, TC_THREADS, bl.bytes, s)(
        w, e, zs, fa, fb, pab + r0 * slabs * sab, gt, o1, o2, I, f.n, expert, r0, nr, bmode, groups, sem, tp_in,
        last ? fin : ExpertFinish<T>{});
    if (last) *finished = true;
    CAMEX_CHECK_LAUNCH();
  }
  if (nx.w && nx.next_ready) return 0;  // the next expert's first columns side reduces `own`
  CAMEX_LAUNCH_WHOLE(kron_bwd_reduce_kernel<T>, grid_for(f.r * (sab + scd), 256), 256, s)(own);
  CAMEX_CHECK_LAUNCH();
  return 0;
}

// Whether kron_backward_any takes the tensor-core reverse for f16/bf16 storage T at d4: switched on
// for this thread, factors it takes, and shared memory within the device's limit (*lim, set when
// the first two hold).
template <typename T> inline bool kron_tc_bwd_taken(const D4 &d4, int64_t *lim) {
  if (!camex_tensor_cores() || !kron_tc_dims_ok(d4)) return false;
  *lim = tc_smem_limit();
  return kron_tc_bwd_fits<T>(d4, *lim);
}

// The reverse chain of one expert on whichever path takes it (see kron_backward in kron.cuh for
// the arguments). t1 must hold kron_scratch_floats(.., 1), w oi floats (the tensor-core path keeps
// tau's planes there) and partial kron_bwd_partial_floats. lent (lent_bytes; may be null): room the
// caller does not use during the call (it may cover t1 and kk), where the tensor-core path keeps
// Z instead when that makes its rounds of ranks larger (up to tc_z_lent_budget()). nx
// (kron_backward_tc): the next expert, whose first stage 1 this call runs where the tensor-core
// path takes it; the caller passes nx.ready = what the previous call's nx.next_ready said, with
// the same z (t1, lent) and taus (w) throughout.
// Then the expert's gradient goes to `fin` (elementwise.cuh): from the tensor-core path's last
// kernel where it can (one pass fewer over dtau, one launch fewer), else by finish_expert_kernel.
template <typename T>
inline int kron_backward_any(cudaStream_t s, float *gt, Opnd h, Opnd tau, const KronFactors &f, int64_t e, const D4 &d4,
                             T *ga, T *gb, T *gc, T *gd, float *t1, float *kk, float *w, float *partial,
                             ExpertFinish<T> fin, int64_t oi, void *lent = nullptr, int64_t lent_bytes = 0,
                             NextExpert<T> nx = {}) {
  bool finished = false;
  int rc = -1;
  if (nx.next_ready) *nx.next_ready = false;
  if constexpr (is_half_type<T>::value) {
    int64_t lim = 0;
    if (kron_tc_bwd_taken<T>(d4, &lim)) {
      const TcZPlace zp = tc_z_place(d4, f.r, ZMem<BwdZ<T>>::planes * (int64_t)sizeof(MmaT), lent, lent_bytes);
      rc = kron_backward_tc<T>(s, gt, h, tau, f, e, d4, ga, gb, gc, gd, zp.lent ? static_cast<float *>(zp.lent) : t1,
                               partial, lim, fin, &finished, w, oi * (int64_t)sizeof(float), zp.zbytes, nx);
    }
  }
  // The previous call left this one its factor gradients and this expert's first stage 1: only the
  // tensor-core path (which it took at the same dimensions on the same device) takes them.
  if (rc < 0 && nx.ready) return (int)cudaErrorInvalidValue;
  if (rc < 0) rc = kron_backward<T>(s, gt, h, tau, f, e, d4, ga, gb, gc, gd, t1, kk, w, partial);
  if (rc != 0 || finished) return rc;
  CAMEX_LAUNCH(finish_expert_kernel<T>, grid_for(oi, 256), 256, s)(gt, fin, oi);
  CAMEX_CHECK_LAUNCH();
  return 0;
}

// Floats of backward partials: the chain's split-K partials or the tensor-core path's, whichever
// is larger.
inline int64_t kron_bwd_partial_floats(int dtype, const D4 &d4, int64_t r) {
  int64_t f = contract_partial_floats(d4);
  if (dtype == CAMEX_F16 || dtype == CAMEX_BF16) {
    const int64_t tf = kron_tc_bwd_partial_floats(d4, r, dtype);
    if (tf > f) f = tf;
  }
  return f;
}

}  // namespace camex
