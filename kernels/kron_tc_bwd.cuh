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
//   K = H R   = H x3 C^T x4 D^T            (columns side)
//   dC[c][c'] = sum_{p,d} H[p,(c,d)] (P x4 D)[p,(c',d)]
//   dD[d][d'] = sum_{p,c} H[p,(c,d)] (P x3 C)[p,(c,d')]
//   V = K x2 B^T,  dA[a][a'] = sum_{b,q} V[(a,b),q] tau[(a',b),q]
//   W = K x1 A^T,  dB[b][b'] = sum_{a,q} W[(a,b),q] tau[(a,b'),q]
//   dtau += V x1 A^T = L^T H R
// which is the chain of SPEC section 4 regrouped (every factor gradient contracts H with tau
// transformed by the other three factors). Per round of ranks (kron_tc_rank_chunk, Z in f32):
//   1. kron_rows_split_kernel: Z_r = P_r (slab layout [r][slab][O][8], as the forward), one block
//      per 8-column slab looping over the round's ranks;
//   2. kron_cols_bwd_kernel, one block per run of rows, looping over the round's ranks: H's rows
//      stay in shared memory; P's rows in, dC and dD partials out, and K's rows written over P's;
//   3. kron_rows_bwd_kernel, one block per 8-column slab looping over the round's ranks: K's slab
//      and tau in, dA and dB partials out, and L^T K added to dtau's slab, rank by rank;
//   4. one fixed-order reduction of the partials into the factor gradients. No atomics: the same
//      inputs give the same bits.
// Every product goes through the tensor cores as in kron_tc.cuh, under a precision policy per
// kernel (ColsBwdPrec, RowsBwdPrec below; Prec in mma.cuh): bf16 is single-pass except on the
// columns side (dC, dD), which splits data into bf16 hi + lo; f16 splits data and factors;
// data-by-data contractions with split data take three mma (hi hi, hi lo, lo hi). f32 accumulation
// throughout.
#pragma once
#include "elementwise.cuh"
#include "kron_tc.cuh"

namespace camex {

// The backward's precision policies (mma.cuh, Prec), per kernel: the columns side (H's and P's
// contractions into dC and dD) keeps bf16's data split, the rows side (dA, dB, dtau) is
// single-pass bf16 like the forward (FwdPrec); mma.cuh has the measurements.
template <typename T> using ColsBwdPrec = PrecOf<T>;
template <typename T> using RowsBwdPrec = FwdPrec<T>;

// Fragments gathered through an accessor at(row, col) -> MmaT (zero outside the matrix), for
// operands stored with k as the slow index (the paired loads of frag_a/frag_b need k contiguous).
// A: rows m0.., k k0..; B: k k0.., columns n0...
template <typename F> __device__ __forceinline__ void frag_a_at(uint32_t a[4], F at, int m0, int k0, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int m = m0 + g + 8 * (j & 1), k = k0 + 2 * t + 8 * (j >> 1);
    a[j] = mma_bits(at(m, k)) | (mma_bits(at(m, k + 1)) << 16);
  }
}
template <typename F> __device__ __forceinline__ void frag_b_at(uint32_t b[2], F at, int n0, int k0, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int k = k0 + 2 * t + 8 * j;
    b[j] = mma_bits(at(k, n0 + g)) | (mma_bits(at(k + 1, n0 + g)) << 16);
  }
}

// The same fragments where the k-major matrix is a plain shared array with k's row stride ld (A[m][k]
// = s[k * ld + m], B[k][n] = s[k * ld + n]; ld * 2 bytes an odd multiple of 16, m0 and n0 multiples
// of 8): ldmatrix.trans, one 128-byte phase per 8 x 8 matrix and free of bank conflicts, where the
// gathers above take eight 2-byte loads per lane.
__device__ __forceinline__ void frag_a_kmajor(uint32_t a[4], const MmaT *s, int ld, int m0, int k0, int lane) {
  const int i = lane >> 3, r = lane & 7;  // lanes 8i..8i+7: matrix i = (k half i / 2, m half i % 2)
  ldmatrix_x4<true>(a, s + (int64_t)(k0 + r + 8 * (i >> 1)) * ld + m0 + 8 * (i & 1));
}
__device__ __forceinline__ void frag_b_kmajor(uint32_t b[2], const MmaT *s, int ld, int n0, int k0, int lane) {
  ldmatrix_x2<true>(b, s + (int64_t)(k0 + (lane & 15)) * ld + n0);  // lanes 0..15: rows k0..k0+15
}

// Copies a k x k factor transposed (dst[j'][j] = f[j][j']) into zero-padded shared matrices.
template <typename P, typename T>
__device__ __forceinline__ void load_factor_t(MmaT *hi, MmaT *lo, const T *f, int k, int ld) {
  for (int x = threadIdx.x; x < k * k; x += TC_THREADS) {
    const int64_t at = (x % k) * ld + x / k;
    if constexpr (P::factor_lo) split_store(hi, lo, at, to_f32(f[x]));
    else hi[at] = from_f32<MmaT>(to_f32(f[x]));
  }
}

// ---- columns side: dC, dD and K = H R ----

struct ColsBwdLayout {
  int i1p, i2p, lz, lyt, lc, ld, pr;
  int64_t hh, hl, ph, pl, yh, yl, ch, cl, cth, ctl, dh, dl, dth, dtl, dcs, dds, bytes;
};

// pr: rows per block. Shared matrices: Hs, Ps [pr * i1p][lz] (X[p][c][d]); Y, the products,
// [max(pr * i2p * lyt, pr * i1p * lz)]; C, C^T [i1p][lc]; D, D^T [i2p][ld]; dC, dD in f32.
__host__ __device__ inline ColsBwdLayout cols_bwd_layout(int i1, int i2, int pr, TcSplit sp) {
  ColsBwdLayout l;
  l.pr = pr;
  l.i1p = tc_pad(i1);
  l.i2p = tc_pad(i2);
  l.lz = tc_ld(l.i2p);
  l.lyt = tc_ld(l.i1p);
  l.lc = tc_ld(l.i1p);
  l.ld = tc_ld(l.i2p);
  const int64_t e = 2;
  const int64_t xb = (int64_t)pr * l.i1p * l.lz * e;
  const int64_t ya = (int64_t)pr * l.i2p * l.lyt, yb2 = (int64_t)pr * l.i1p * l.lz;
  const int64_t yb = (ya > yb2 ? ya : yb2) * e;
  const int64_t cb = (int64_t)l.i1p * l.lc * e, db = (int64_t)l.i2p * l.ld * e;
  const bool dlo = sp.data_lo, flo = sp.factor_lo;
  l.hh = 0;
  l.hl = l.hh + xb;
  l.ph = l.hl + (dlo ? xb : 0);
  l.pl = l.ph + xb;
  l.yh = l.pl + (dlo ? xb : 0);
  l.yl = l.yh + yb;
  l.ch = l.yl + (dlo ? yb : 0);
  l.cl = l.ch + cb;
  l.cth = l.cl + (flo ? cb : 0);
  l.ctl = l.cth + cb;
  l.dh = l.ctl + (flo ? cb : 0);
  l.dl = l.dh + db;
  l.dth = l.dl + (flo ? db : 0);
  l.dtl = l.dth + db;
  l.dcs = l.dtl + (flo ? db : 0);
  l.dds = l.dcs + (int64_t)i1 * i1 * 4;
  l.bytes = (l.dds + (int64_t)i2 * i2 * 4 + 15) / 16 * 16;
  return l;
}

// Rows per block of the columns-side kernel: the most (up to 8) whose shared memory fits
// TC_SMEM_MAX, fixed by the dimensions alone so that the workspace does not depend on the device.
__host__ __device__ inline int cols_bwd_rows(int i1, int i2, TcSplit sp) {
  for (int pr = 8; pr > 1; --pr)
    if (cols_bwd_layout(i1, i2, pr, sp).bytes <= TC_SMEM_MAX) return pr;
  return 1;
}

// grid (ceil(O / pr)). z: the round's P_r, overwritten with K_r (slab layout, ranks r0..r0+nr);
// part: f32 [nr][blocks][i1*i1 + i2*i2], this block's dC and dD contributions per rank.
// Launch bounds of two blocks per SM (at most 128 registers): with the default, ptxas 13.0 capped
// the bf16 instance at 64 registers and spilled.
template <typename T>
__global__ void __launch_bounds__(TC_THREADS, 2)
kron_cols_bwd_kernel(Opnd h, float *__restrict__ z, const T *__restrict__ fc, const T *__restrict__ fd,
                     float *__restrict__ part, int i1, int i2, int pr, int64_t O, int64_t r0, int64_t nr, int64_t nexp,
                     int64_t expert) {
  CAMEX_DYNAMIC_SMEM(smem);
  using P = ColsBwdPrec<T>;
  const ColsBwdLayout L = cols_bwd_layout(i1, i2, pr, P::split());
  MmaT *Hh = reinterpret_cast<MmaT *>(smem + L.hh), *Hl = reinterpret_cast<MmaT *>(smem + L.hl);
  MmaT *Ph = reinterpret_cast<MmaT *>(smem + L.ph), *Pl = reinterpret_cast<MmaT *>(smem + L.pl);
  MmaT *Yh = reinterpret_cast<MmaT *>(smem + L.yh), *Yl = reinterpret_cast<MmaT *>(smem + L.yl);
  MmaT *Ch = reinterpret_cast<MmaT *>(smem + L.ch), *Cl = reinterpret_cast<MmaT *>(smem + L.cl);
  MmaT *Cth = reinterpret_cast<MmaT *>(smem + L.cth), *Ctl = reinterpret_cast<MmaT *>(smem + L.ctl);
  MmaT *Dh = reinterpret_cast<MmaT *>(smem + L.dh), *Dl = reinterpret_cast<MmaT *>(smem + L.dl);
  MmaT *Dth = reinterpret_cast<MmaT *>(smem + L.dth), *Dtl = reinterpret_cast<MmaT *>(smem + L.dtl);
  float *dCs = reinterpret_cast<float *>(smem + L.dcs), *dDs = reinterpret_cast<float *>(smem + L.dds);
  const int64_t I = (int64_t)i1 * i2, slabs = (I + TC_QC - 1) / TC_QC;
  const int64_t p0 = (int64_t)blockIdx.x * pr, blocks = gridDim.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int i1p = L.i1p, i2p = L.i2p;
  const int ntd = i2p / 8;

  zero_smem(smem, L.bytes);  // K padding, rows past O, and the f32 accumulators
  __syncthreads();
  // H's rows, once for every rank: Hs[p][c][d] = H[p, c*i2 + d].
  for (int64_t x = threadIdx.x; x < (int64_t)pr * I; x += TC_THREADS) {
    const int64_t pl = x / I, q = x % I, p = p0 + pl;
    if (p < O) store_data<P>(Hh, Hl, (pl * i1p + q / i2) * L.lz + q % i2, opnd_ld<T>(h, p * I + q));
  }

  for (int64_t rl = 0; rl < nr; ++rl) {
    const int64_t r = r0 + rl;
    __syncthreads();  // the previous rank's readers are done
    load_factor<P>(Ch, Cl, fc + (r * nexp + expert) * i1 * i1, i1, L.lc);
    load_factor_t<P>(Cth, Ctl, fc + (r * nexp + expert) * i1 * i1, i1, L.lc);
    load_factor<P>(Dh, Dl, fd + (r * nexp + expert) * i2 * i2, i2, L.ld);
    load_factor_t<P>(Dth, Dtl, fd + (r * nexp + expert) * i2 * i2, i2, L.ld);
    float *zr = z + rl * slabs * O * TC_QC;
    load_z_rows<P>(Ph, Pl, L.lz, (int64_t)i1p * L.lz, zr, p0, pr, O, i1, i2);
    __syncthreads();

    // YD[p][d][c'] = sum_d' P[p][c'][d'] D[d][d'], as the forward's mode d.
    rows_by_factor<P>(Ph, Pl, L.lz, Dh, Dl, L.ld, Yh, Yl, L.lyt, pr, i1p, i2p);
    __syncthreads();

    // dC[c][c'] += sum_{p,d} H[p][c][d] YD[p][d][c']  (M = c, N = c', K = (p, d)).
    {
      const int mtc = i1p / 16, ntc = i1p / 8;
      for (int tile = warp; tile < mtc * ntc; tile += TC_WARPS) {
        const int mt = tile / ntc, nt = tile % ntc;
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        for (int pl = 0; pl < pr; ++pl) {
          const MmaT *yh = Yh + (int64_t)pl * i2p * L.lyt, *yl = Yl + (int64_t)pl * i2p * L.lyt;
          for (int k0 = 0; k0 < i2p; k0 += 16) {
            uint32_t ah[4], al[4], bh[2], bl[2];
            frag_a(ah, Hh + (int64_t)pl * i1p * L.lz, L.lz, mt * 16, k0, lane);
            frag_b_kmajor(bh, yh, L.lyt, nt * 8, k0, lane);
            if constexpr (P::data_lo) {
              frag_a(al, Hl + (int64_t)pl * i1p * L.lz, L.lz, mt * 16, k0, lane);
              frag_b_kmajor(bl, yl, L.lyt, nt * 8, k0, lane);
            }
            mma_data<P>(c, ah, al, bh, bl);
          }
        }
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int cc = mt * 16 + g + 8 * (v >> 1), cp = nt * 8 + 2 * t + (v & 1);
          if (cc < i1 && cp < i1) dCs[cc * i1 + cp] += c[v];
        }
      }
    }
    __syncthreads();

    // YC[p][c][d'] = sum_c' C[c][c'] P[p][c'][d']  (M = c, N = d', K = c'), one row p at a time.
    {
      const int mtc = i1p / 16;
      for (int tile = warp; tile < pr * mtc * ntd; tile += TC_WARPS) {
        const int pl = tile / (mtc * ntd), mt = (tile / ntd) % mtc, nt = tile % ntd;
        const MmaT *xh = Ph + (int64_t)pl * i1p * L.lz, *xl = Pl + (int64_t)pl * i1p * L.lz;
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        for (int k0 = 0; k0 < i1p; k0 += 16) {
          uint32_t fh[4], fl[4], bh[2], bl[2];
          frag_a(fh, Ch, L.lc, mt * 16, k0, lane);
          if constexpr (P::factor_lo) frag_a(fl, Cl, L.lc, mt * 16, k0, lane);
          frag_b_kmajor(bh, xh, L.lz, nt * 8, k0, lane);
          if constexpr (P::data_lo) frag_b_kmajor(bl, xl, L.lz, nt * 8, k0, lane);
          mma_split<P>(c, fh, fl, bh, bl);
        }
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int cc = mt * 16 + g + 8 * (v >> 1), d = nt * 8 + 2 * t + (v & 1);
          store_data<P>(Yh, Yl, (pl * i1p + cc) * L.lz + d, c[v]);
        }
      }
    }
    __syncthreads();

    // dD[d][d'] += sum_{p,c} H[p][c][d] YC[p][c][d']  (M = d, N = d', K = (p, c)).
    {
      const int mtd = i2p / 16;
      for (int tile = warp; tile < mtd * ntd; tile += TC_WARPS) {
        const int mt = tile / ntd, nt = tile % ntd;
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        for (int pl = 0; pl < pr; ++pl) {
          const int64_t off = (int64_t)pl * i1p * L.lz;
          for (int k0 = 0; k0 < i1p; k0 += 16) {
            uint32_t ah[4], al[4], bh[2], bl[2];
            frag_a_kmajor(ah, Hh + off, L.lz, mt * 16, k0, lane);
            frag_b_kmajor(bh, Yh + off, L.lz, nt * 8, k0, lane);
            if constexpr (P::data_lo) {
              frag_a_kmajor(al, Hl + off, L.lz, mt * 16, k0, lane);
              frag_b_kmajor(bl, Yl + off, L.lz, nt * 8, k0, lane);
            }
            mma_data<P>(c, ah, al, bh, bl);
          }
        }
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int d = mt * 16 + g + 8 * (v >> 1), dp = nt * 8 + 2 * t + (v & 1);
          if (d < i2 && dp < i2) dDs[d * i2 + dp] += c[v];
        }
      }
    }
    __syncthreads();

    // T1[p][d'][c] = sum_d H[p][c][d] D[d][d'] (the factor operand is D^T as stored).
    rows_by_factor<P>(Hh, Hl, L.lz, Dth, Dtl, L.ld, Yh, Yl, L.lyt, pr, i1p, i2p);
    __syncthreads();

    // K[p][c'][d'] = sum_c C[c][c'] T1[p][d'][c]  (M = c', N = d', K = c; A = C^T stored), over P.
    {
      const int mtc = i1p / 16;
      for (int tile = warp; tile < pr * mtc * ntd; tile += TC_WARPS) {
        const int pl = tile / (mtc * ntd), mt = (tile / ntd) % mtc, nt = tile % ntd;
        const int64_t p = p0 + pl;
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        factor_by_data<P>(c, Cth, Ctl, L.lc, mt * 16,
            Yh + (int64_t)pl * i2p * L.lyt, Yl + (int64_t)pl * i2p * L.lyt, L.lyt, nt * 8, i1p, lane);
        if (p >= O) continue;
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int cc = mt * 16 + g + 8 * (v >> 1), d = nt * 8 + 2 * t + (v & 1);
          if (cc >= i1 || d >= i2) continue;
          const int64_t q = (int64_t)cc * i2 + d;
          zr[((q / TC_QC) * O + p) * TC_QC + q % TC_QC] = c[v];
        }
      }
    }
    __syncthreads();
    float *out = part + (rl * blocks + blockIdx.x) * ((int64_t)i1 * i1 + (int64_t)i2 * i2);
    for (int x = threadIdx.x; x < i1 * i1 + i2 * i2; x += TC_THREADS) {
      if (x < i1 * i1) {
        out[x] = dCs[x];
        dCs[x] = 0.f;
      } else {
        out[x] = dDs[x - i1 * i1];
        dDs[x - i1 * i1] = 0.f;
      }
    }
  }
}

// ---- rows side: dA, dB and L^T K ----

struct RowsBwdLayout {
  int o1p, o2p, lx, ly, lw, la, lb;
  int64_t yh, yl, xh, xl, wh, wl, th, tl, ath, atl, bth, btl, das, dbs, red, bytes;
};

// Y [o2 * 8][ly] (Y[b][j][a]: K's slab, then V); a union of X [TC_AC * 8][lx] (X[a][j][b]: row runs
// of K or tau) with Wc, Tc [o2p][lw] (k = (a, j) over TC_AC row runs); A^T [o1p + 16][la] (one
// 16-row tile past the end is read and discarded), B^T [o2p][lb]; dA, dB and dA's split-K partials
// in f32.
__host__ __device__ inline RowsBwdLayout rows_bwd_layout(int o1, int o2, TcSplit sp) {
  RowsBwdLayout l;
  l.o1p = tc_pad(o1);
  l.o2p = tc_pad(o2);
  l.lx = tc_ld(l.o2p);
  l.ly = tc_ld(l.o1p);
  l.lw = tc_ld(TC_AC * TC_QC);
  l.la = tc_ld(l.o1p);
  l.lb = tc_ld(l.o2p);
  const int64_t e = 2;
  const int64_t y = (int64_t)o2 * TC_QC * l.ly * e;
  const int64_t x = (int64_t)TC_AC * TC_QC * l.lx * e;
  const int64_t w = (int64_t)l.o2p * l.lw * e;
  const bool dlo = sp.data_lo, flo = sp.factor_lo;
  const int64_t h = dlo ? 2 : 1;  // halves per data operand
  const int64_t uni = (h * x > 2 * h * w ? h * x : 2 * h * w);
  const int64_t ab = (int64_t)(l.o1p + 16) * l.la * e, bb = (int64_t)l.o2p * l.lb * e;
  l.yh = 0;
  l.yl = l.yh + y;
  l.xh = l.yl + (dlo ? y : 0);  // the union starts here
  l.xl = l.xh + x;
  l.wh = l.xh;
  l.wl = l.wh + w;
  l.th = l.wl + (dlo ? w : 0);
  l.tl = l.th + w;
  l.ath = l.xh + uni;
  l.atl = l.ath + ab;
  l.bth = l.atl + (flo ? ab : 0);
  l.btl = l.bth + bb;
  l.das = l.btl + (flo ? bb : 0);
  l.dbs = l.das + (int64_t)o1 * o1 * 4;
  l.red = (l.dbs + (int64_t)o2 * o2 * 4 + 15) / 16 * 16;  // dA's split-K partials [warps][32][4]
  l.bytes = l.red + (int64_t)TC_WARPS * 32 * 4 * 4;
  return l;
}

// tau = W - E (an OP_TAU operand) at (row p, column q) of the expert, 0 past the last column.
template <typename T> __device__ __forceinline__ float tau_at(const Opnd &tau, int64_t p, int64_t q, int64_t I) {
  return q < I ? opnd_ld<T>(tau, p * I + q) : 0.f;
}

// One block per SM at the shapes that matter (about 200 KB of shared memory at T5-base `wi`), so
// the launch bounds ask for one: with the default, ptxas 13.0 capped registers at 80 and spilled.
// grid (slabs); each block runs ranks r0..r0+nr of its slab in order. z: the round's K_r (slab
// layout); gt: f32 [O][I], dtau, to which this slab's L_r^T K_r is added rank by rank (written by
// the first rank when r0 == 0): a fixed order, so the bits do not depend on the schedule.
// part: f32 [nr][slabs][o1*o1 + o2*o2], this slab's dA and dB contributions.
template <typename T>
__global__ void __launch_bounds__(TC_THREADS, 1)
kron_rows_bwd_kernel(Opnd tau, const float *__restrict__ z, const T *__restrict__ fa, const T *__restrict__ fb,
                     float *__restrict__ part, float *__restrict__ gt, int o1, int o2, int64_t I, int64_t nexp,
                     int64_t expert, int64_t r0, int64_t nr) {
  CAMEX_DYNAMIC_SMEM(smem);
  using P = RowsBwdPrec<T>;
  const RowsBwdLayout L = rows_bwd_layout(o1, o2, P::split());
  MmaT *Yh = reinterpret_cast<MmaT *>(smem + L.yh), *Yl = reinterpret_cast<MmaT *>(smem + L.yl);
  MmaT *Xh = reinterpret_cast<MmaT *>(smem + L.xh), *Xl = reinterpret_cast<MmaT *>(smem + L.xl);
  MmaT *Wh = reinterpret_cast<MmaT *>(smem + L.wh), *Wl = reinterpret_cast<MmaT *>(smem + L.wl);
  MmaT *Th = reinterpret_cast<MmaT *>(smem + L.th), *Tl = reinterpret_cast<MmaT *>(smem + L.tl);
  MmaT *Ath = reinterpret_cast<MmaT *>(smem + L.ath), *Atl = reinterpret_cast<MmaT *>(smem + L.atl);
  MmaT *Bth = reinterpret_cast<MmaT *>(smem + L.bth), *Btl = reinterpret_cast<MmaT *>(smem + L.btl);
  float *dAs = reinterpret_cast<float *>(smem + L.das), *dBs = reinterpret_cast<float *>(smem + L.dbs);
  const int64_t O = (int64_t)o1 * o2, slabs = (I + TC_QC - 1) / TC_QC;
  const int64_t slab = blockIdx.x;
  const int64_t q0 = slab * TC_QC;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int o1p = L.o1p, o2p = L.o2p;
  // dtau's pairs (q, q + 1) as one 8-byte access (q0 and j even): whole sectors per row.
  const bool pairs = I % 2 == 0 && (reinterpret_cast<uintptr_t>(gt) & 7) == 0;

  for (int64_t rl = 0; rl < nr; ++rl) {
    const int64_t r = r0 + rl;
    const float *zs = z + (rl * slabs + slab) * O * TC_QC;  // zs[p * 8 + j]: this slab of K_r
    __syncthreads();  // the previous rank is done with shared memory
    zero_smem(smem, L.bytes);
    __syncthreads();
    load_factor_t<P>(Ath, Atl, fa + (r * nexp + expert) * o1 * o1, o1, L.la);
    load_factor_t<P>(Bth, Btl, fb + (r * nexp + expert) * o2 * o2, o2, L.lb);
    // K's slab as the B operand of a mode-a product: Y[b][j][a] = K[(a, b), q0 + j].
    for (int64_t x = threadIdx.x; x < O * TC_QC; x += TC_THREADS) {
      const int64_t p = x / TC_QC, j = x % TC_QC, a = p / o2, b = p % o2;
      store_data<P>(Yh, Yl, (b * TC_QC + j) * L.ly + a, zs[x]);
    }

    // dB, TC_AC rows of W = K x1 A^T at a time (M = a', N = (b, j), K = a; a 16-row tile of which
    // the first TC_AC rows are kept), then dB[b][b'] += sum_{(a', j)} W[(a', b), j] tau[(a', b'), j].
    const int mtb = o2p / 16, ntb = o2p / 8;
    for (int a0 = 0; a0 < o1; a0 += TC_AC) {
      __syncthreads();  // Y and the factors are in; the previous chunk's contraction is done
      for (int64_t x = threadIdx.x; x < (int64_t)o2 * TC_AC * TC_QC; x += TC_THREADS) {
        const int b = (int)(x / (TC_AC * TC_QC)), k = (int)(x % (TC_AC * TC_QC)), a = a0 + k / TC_QC;
        store_data<P>(Th, Tl, b * L.lw + k, a < o1 ? tau_at<T>(tau, (int64_t)a * o2 + b, q0 + k % TC_QC, I) : 0.f);
      }
      for (int b = warp; b < o2; b += TC_WARPS) {
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        factor_by_data<P>(c, Ath, Atl, L.la, a0,
            Yh + (int64_t)b * TC_QC * L.ly, Yl + (int64_t)b * TC_QC * L.ly, L.ly, 0, o1p, lane);
        // Rows g (kept when a0 + g < o1) of the tile; rows g + 8 belong to the next chunk.
        const bool in = a0 + g < o1;
        store_data<P>(Wh, Wl, b * L.lw + g * TC_QC + 2 * t, in ? c[0] : 0.f);
        store_data<P>(Wh, Wl, b * L.lw + g * TC_QC + 2 * t + 1, in ? c[1] : 0.f);
      }
      __syncthreads();
      for (int tile = warp; tile < mtb * ntb; tile += TC_WARPS) {
        const int mt = tile / ntb, nt = tile % ntb;
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        for (int k0 = 0; k0 < TC_AC * TC_QC; k0 += 16) {
          uint32_t ah[4], al[4], bh[2], bl[2];
          frag_a(ah, Wh, L.lw, mt * 16, k0, lane);
          frag_b(bh, Th, L.lw, nt * 8, k0, lane);
          if constexpr (P::data_lo) {
            frag_a(al, Wl, L.lw, mt * 16, k0, lane);
            frag_b(bl, Tl, L.lw, nt * 8, k0, lane);
          }
          mma_data<P>(c, ah, al, bh, bl);
        }
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int b = mt * 16 + g + 8 * (v >> 1), bp = nt * 8 + 2 * t + (v & 1);
          if (b < o2 && bp < o2) dBs[b * o2 + bp] += c[v];
        }
      }
    }
    __syncthreads();
    zero_smem(smem + L.xh, L.ath - L.xh);  // X's K padding (columns b >= o2) must read zero again

    // V = K x2 B^T, TC_AC row runs of K (read again from z) at a time:
    // V[(a, b'), j] = sum_b B[b][b'] X[a][j][b]  (M = b', N = j, K = b), into Y[b'][j][a] over K's copy.
    for (int a0 = 0; a0 < o1; a0 += TC_AC) {
      const int ac = o1 - a0 < TC_AC ? o1 - a0 : TC_AC;
      __syncthreads();
      for (int64_t x = threadIdx.x; x < (int64_t)ac * o2 * TC_QC; x += TC_THREADS) {
        const int64_t pl = x / TC_QC, j = x % TC_QC, al = pl / o2, b = pl % o2;
        store_data<P>(Xh, Xl, (al * TC_QC + j) * L.lx + b, zs[(a0 * o2 + pl) * TC_QC + j]);
      }
      __syncthreads();
      slab_mode_b<P>(Bth, Btl, L.lb, Xh, Xl, L.lx, Yh, Yl, L.ly, a0, ac, o2, o2p);
    }
    __syncthreads();

    // dtau_r = V x1 A^T: gt[(a', b'), q0 + j] (+)= sum_a A[a][a'] Y[b'][j][a].
    const bool acc = r0 > 0 || rl > 0;
    slab_mode_a<P>(Ath, Atl, L.la, Yh, Yl, L.ly, [&](int a, int b, int j, float v0, float v1) {
      const int64_t q = q0 + j;
      float *d = gt + ((int64_t)a * o2 + b) * I + q;
      if (pairs && q + 1 < I) {
        float2 *d2 = reinterpret_cast<float2 *>(d);
        const float2 o = acc ? *d2 : make_float2(0.f, 0.f);
        *d2 = acc ? make_float2(o.x + v0, o.y + v1) : make_float2(v0, v1);
      } else {
        if (q < I) d[0] = acc ? d[0] + v0 : v0;
        if (q + 1 < I) d[1] = acc ? d[1] + v1 : v1;
      }
    }, o1, o1p, o2);
    const int mta = o1p / 16;

    // dA[a][a'] += sum_{(b, j)} V[(a, b), j] tau[(a', b), j], TC_AC rows a' (one n8 tile) at a time
    // (M = a, N = a', K = (b, j) = o2 * 8, padded to 16). There are only o1p / 16 <= 4 tiles, so the
    // warps split K: warp w takes tile w % mta and slice w / mta; the slices' partials are summed in
    // slice order through shared memory (red), the same order every run.
    const int kv = o2 * TC_QC, kvp = tc_pad(kv);
    const int slices = TC_WARPS / mta, ksteps = kvp / 16, per = (ksteps + slices - 1) / slices;
    const int mt_a = warp % mta, sl_a = warp / mta;
    float *red = reinterpret_cast<float *>(smem + L.red);
    const MmaT zero = from_f32<MmaT>(0.f);
    for (int a0 = 0; a0 < o1; a0 += TC_AC) {
      const int ac = o1 - a0 < TC_AC ? o1 - a0 : TC_AC;
      __syncthreads();
      for (int64_t x = threadIdx.x; x < (int64_t)ac * o2 * TC_QC; x += TC_THREADS) {
        const int64_t pl = x / TC_QC, j = x % TC_QC, al = pl / o2, b = pl % o2;
        store_data<P>(Xh, Xl, (al * TC_QC + j) * L.lx + b, tau_at<T>(tau, a0 * o2 + pl, q0 + j, I));
      }
      __syncthreads();
      float c[4] = {0.f, 0.f, 0.f, 0.f};
      const int k_end = sl_a < slices ? min((sl_a + 1) * per, ksteps) : 0;
      for (int ks = sl_a * per; ks < k_end; ++ks) {
        const int k0 = ks * 16;
        uint32_t ah[4], al[4], bh[2], bl[2];
        frag_a_at(ah, [&](int m, int k) { return k < kv ? Yh[(int64_t)k * L.ly + m] : zero; }, mt_a * 16, k0, lane);
        frag_b_at(bh, [&](int k, int n) { return k < kv && n < ac ? Xh[(n * TC_QC + k % TC_QC) * L.lx + k / TC_QC] : zero; },
                  0, k0, lane);
        if constexpr (P::data_lo) {
          frag_a_at(al, [&](int m, int k) { return k < kv ? Yl[(int64_t)k * L.ly + m] : zero; }, mt_a * 16, k0, lane);
          frag_b_at(bl, [&](int k, int n) { return k < kv && n < ac ? Xl[(n * TC_QC + k % TC_QC) * L.lx + k / TC_QC] : zero; },
                    0, k0, lane);
        }
        mma_data<P>(c, ah, al, bh, bl);
      }
#pragma unroll
      for (int v = 0; v < 4; ++v) red[(warp * 32 + lane) * 4 + v] = c[v];
      __syncthreads();
      if (sl_a == 0) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          float sum = 0.f;
          for (int sl = 0; sl < slices; ++sl) sum += red[((sl * mta + mt_a) * 32 + lane) * 4 + v];
          const int a = mt_a * 16 + g + 8 * (v >> 1), ap = a0 + 2 * t + (v & 1);
          if (a < o1 && 2 * t + (v & 1) < ac) dAs[a * o1 + ap] += sum;
        }
      }
    }
    __syncthreads();
    float *out = part + (rl * slabs + slab) * ((int64_t)o1 * o1 + (int64_t)o2 * o2);
    for (int x = threadIdx.x; x < o1 * o1 + o2 * o2; x += TC_THREADS) out[x] = x < o1 * o1 ? dAs[x] : dBs[x - o1 * o1];
  }
}

// ---- host side ----

// Factor gradients of the round: grad_f[(r*n + e)][...] = sum over blocks of part, blocks in order.
// parts: the rows side [nr][slabs][o1^2 + o2^2] at pab, the columns side [nr][cblocks][i1^2 + i2^2]
// at pcd.
template <typename T>
__global__ void kron_bwd_reduce_kernel(const float *pab, const float *pcd, T *ga, T *gb, T *gc, T *gd, int64_t slabs,
                                       int64_t cblocks, int o1, int o2, int i1, int i2, int64_t r0, int64_t nr,
                                       int64_t nexp, int64_t expert) {
  const int64_t sab = (int64_t)o1 * o1 + (int64_t)o2 * o2, scd = (int64_t)i1 * i1 + (int64_t)i2 * i2;
  CAMEX_GRID_STRIDE(k, nr * (sab + scd)) {
    const int64_t rl = k / (sab + scd), x = k % (sab + scd), re = (r0 + rl) * nexp + expert;
    float s = 0.f;
    if (x < sab) {
      for (int64_t b = 0; b < slabs; ++b) s += pab[(rl * slabs + b) * sab + x];
      if (x < (int64_t)o1 * o1) ga[re * o1 * o1 + x] = from_f32<T>(s);
      else gb[re * o2 * o2 + x - (int64_t)o1 * o1] = from_f32<T>(s);
    } else {
      const int64_t y = x - sab;
      for (int64_t b = 0; b < cblocks; ++b) s += pcd[(rl * cblocks + b) * scd + y];
      if (y < (int64_t)i1 * i1) gc[re * i1 * i1 + y] = from_f32<T>(s);
      else gd[re * i2 * i2 + y - (int64_t)i1 * i1] = from_f32<T>(s);
    }
  }
}

// Shared memory of the three stages (rows forward, columns backward, rows backward).
inline bool kron_tc_bwd_fits(const D4 &d4, TcSplit sp, int64_t lim) {
  const int i1 = (int)d4.d[2], i2 = (int)d4.d[3];
  return rows_layout((int)d4.d[0], (int)d4.d[1], sp, false).bytes <= lim &&
         cols_bwd_layout(i1, i2, cols_bwd_rows(i1, i2, sp), sp).bytes <= lim &&
         rows_bwd_layout((int)d4.d[0], (int)d4.d[1], sp).bytes <= lim;
}

// Floats of the partials of one round (both sides), sized on the dimensions alone.
inline int64_t kron_tc_bwd_partial_floats(const D4 &d4, int64_t r, TcSplit sp) {
  if (!kron_tc_dims_ok(d4)) return 0;
  const int64_t o1 = d4.d[0], o2 = d4.d[1], i1 = d4.d[2], i2 = d4.d[3];
  const int64_t O = o1 * o2, I = i1 * i2, nr = kron_tc_rank_chunk(d4, r);
  const int64_t slabs = (I + TC_QC - 1) / TC_QC, pr = cols_bwd_rows((int)i1, (int)i2, sp);
  const int64_t cblocks = (O + pr - 1) / pr;
  return nr * (slabs * (o1 * o1 + o2 * o2) + cblocks * (i1 * i1 + i2 * i2)) + 64;
}

// The reverse of expert `expert`: gt (f32 [O*I], overwritten) = dL/dtau, and the factor gradients
// of every rank for this expert. h: dL/dU (f32 or storage T); tau: W - E; z: kron_tc_z_bytes;
// part: kron_tc_bwd_partial_floats; lim: tc_smem_limit(), checked by kron_tc_bwd_fits.
template <typename T>
inline int kron_backward_tc(cudaStream_t s, float *gt, Opnd h, Opnd tau, const KronFactors &f, int64_t expert,
                            const D4 &d4, T *ga, T *gb, T *gc, T *gd, float *z, float *part, int64_t lim) {
  const int o1 = (int)d4.d[0], o2 = (int)d4.d[1], i1 = (int)d4.d[2], i2 = (int)d4.d[3];
  const int64_t O = (int64_t)o1 * o2, I = (int64_t)i1 * i2, slabs = (I + TC_QC - 1) / TC_QC;
  constexpr TcSplit sp = PrecOf<T>::split();  // the partials' sizing (kron_tc_bwd_partial_floats)
  const int resident = rows_resident(o1, o2, RowsSplitPrec<T>::split(), lim) ? 1 : 0;
  const RowsLayout rl = rows_layout(o1, o2, RowsSplitPrec<T>::split(), resident != 0);
  const int pr = cols_bwd_rows(i1, i2, sp);
  const ColsBwdLayout cl = cols_bwd_layout(i1, i2, pr, ColsBwdPrec<T>::split());
  const RowsBwdLayout bl = rows_bwd_layout(o1, o2, RowsBwdPrec<T>::split());
  const int64_t cblocks = (O + pr - 1) / pr;
  cudaError_t err = CAMEX_SET_MAX_SMEM(kron_rows_split_kernel<T>, lim);
  if (err == cudaSuccess) err = CAMEX_SET_MAX_SMEM(kron_cols_bwd_kernel<T>, lim);
  if (err == cudaSuccess) err = CAMEX_SET_MAX_SMEM(kron_rows_bwd_kernel<T>, lim);
  if (err != cudaSuccess) return (int)err;
  const T *w = reinterpret_cast<const T *>(tau.p), *e = reinterpret_cast<const T *>(tau.base);
  const T *fa = reinterpret_cast<const T *>(f.a), *fb = reinterpret_cast<const T *>(f.b);
  const T *fc = reinterpret_cast<const T *>(f.c), *fd = reinterpret_cast<const T *>(f.d);
  const int64_t chunk = kron_tc_rank_chunk(d4, f.r);
  float *pab = part, *pcd = part + chunk * slabs * ((int64_t)o1 * o1 + (int64_t)o2 * o2);
  for (int64_t r0 = 0; r0 < f.r; r0 += chunk) {
    const int64_t nr = f.r - r0 < chunk ? f.r - r0 : chunk;

    CAMEX_LAUNCH_SMEM(kron_rows_split_kernel<T>, (unsigned)slabs, TC_THREADS, rl.bytes, s)(w, e, fa, fb, z, o1, o2, I, f.n,
                                                                                         expert, r0, nr, resident);
    CAMEX_CHECK_LAUNCH();
    CAMEX_LAUNCH_SMEM(kron_cols_bwd_kernel<T>, (unsigned)cblocks, TC_THREADS, cl.bytes, s)(
        h, z, fc, fd, pcd, i1, i2, pr, O, r0, nr, f.n, expert);
    CAMEX_CHECK_LAUNCH();
    CAMEX_LAUNCH_SMEM(kron_rows_bwd_kernel<T>, (unsigned)slabs, TC_THREADS, bl.bytes, s)(tau, z, fa, fb, pab, gt, o1, o2,
                                                                                        I, f.n, expert, r0, nr);
    CAMEX_CHECK_LAUNCH();
    const int64_t nred = nr * ((int64_t)o1 * o1 + (int64_t)o2 * o2 + (int64_t)i1 * i1 + (int64_t)i2 * i2);
    CAMEX_LAUNCH(kron_bwd_reduce_kernel<T>, grid_for(nred, 256), 256, s)(pab, pcd, ga, gb, gc, gd, slabs, cblocks, o1, o2,
                                                                       i1, i2, r0, nr, f.n, expert);
    CAMEX_CHECK_LAUNCH();
  }
  return 0;
}

// The reverse chain of one expert on whichever path takes it (see kron_backward in kron.cuh for
// the arguments). t1 must hold kron_scratch_floats(.., 1) and partial kron_bwd_partial_floats.
template <typename T>
inline int kron_backward_any(cudaStream_t s, float *gt, Opnd h, Opnd tau, const KronFactors &f, int64_t e, const D4 &d4,
                             T *ga, T *gb, T *gc, T *gd, float *t1, float *kk, float *w, float *partial) {
  if constexpr (is_half_type<T>::value) {
    if (camex_tensor_cores() && kron_tc_dims_ok(d4)) {
      const int64_t lim = tc_smem_limit();
      if (kron_tc_bwd_fits(d4, PrecOf<T>::split(), lim))
        return kron_backward_tc<T>(s, gt, h, tau, f, e, d4, ga, gb, gc, gd, t1, partial, lim);
    }
  }
  return kron_backward<T>(s, gt, h, tau, f, e, d4, ga, gb, gc, gd, t1, kk, w, partial);
}

// Floats of backward partials: the chain's split-K partials or the tensor-core path's, whichever
// is larger.
inline int64_t kron_bwd_partial_floats(int dtype, const D4 &d4, int64_t r) {
  int64_t f = contract_partial_floats(d4);
  if (dtype == CAMEX_F16 || dtype == CAMEX_BF16) {
    const int64_t tf = kron_tc_bwd_partial_floats(d4, r, tc_split_of(dtype));
    if (tf > f) f = tf;
  }
  return f;
}

}  // namespace camex
