// Tensor-core forward of the Kronecker curvature for f16/bf16 storage:
//   U = sum_r (A_r (x) B_r) tau (C_r (x) D_r)^T        (SPEC section 3), one expert at a time,
// with mma.sync m16n8k16 (f16/bf16 operands, f32 accumulation; sm_80 and sm_90).
//
// Opt-in (camex_set_tensor_cores, CAMEX_TENSOR_CORES=1; camex.h); the scalar path is the default
// (the README's "Status" says why). In the CPU emulation (kernels/emu.h models mma.sync with the PTX
// ISA fragment layout) tests/gpu.rs `emu` matches the f64 CPU path to 1e-7..4e-6 before output
// rounding; tests/gpu.rs `tensor_core_path_matches_cpu` checks it on a GPU.
//
// Why two stages: the row side (modes a, b) mixes whole columns of tau and the column side (modes c,
// d) whole rows, so no tile of an expert is closed under both; the exchange goes through one
// intermediate per rank, Z_r = (A_r (x) B_r) tau (bf16 for bf16 storage, f32 for f16: FwdZ), a few
// ranks at a time so that it stays in L2 between the stages (tc_z_budget(); never [R, N, O, I]).
//   stage 1 (rows_kernel): one block per 8-column slab, looping over the round's ranks: tau = W - E
//     of the slab, held in shared memory across the ranks where it fits (rows_layout's `resident`;
//     else in chunks of row runs, read again per rank), mode b (B_r on each o2-row run), then mode a
//     (A_r across them) on the whole slab; Z_r written slab-contiguous ([r][slab][O][8], rows in
//     store_z_tile's order);
//   stage 2 (cols_kernel): one block per run of PR rows, looping over the ranks: Z_r rows into
//     shared memory, mode d (D_r) then mode c (C_r), accumulating sum_r in registers; U in f32.
// For bf16 with factor sizes that are multiples of 8, each stage loads the next rank's operands by
// cp.async into a second set of buffers while it multiplies this rank's (stage 1: A_r and B_r;
// stage 2: Z_r's rows, C_r and D_r; rows_pipe, cols_pipe), where they fit without costing a block
// per SM (otherwise every warp of a block waits on those loads once per rank).
// Every matrix product is a padded (to 16) GEMM on shared-memory operands. Operands read with
// k contiguous have a row stride of kp + 8 elements (fragment loads free of bank conflicts); the
// intermediates between two modes (stage 1's Y, stage 2's Y) are kept as the producing mma writes
// them, as 32-bit pairs, and the next mode reads them with ldmatrix.trans (row strides of an odd
// number of 16-byte units). Each warp keeps a fragment in registers across the tiles that share it.
//
// Precision (SPEC section 5's two bounds; TcSplit and FwdPrec in mma.cuh have the measurements):
// for bf16 storage every operand goes through the tensor cores once, as bf16 (tau = W - E and the
// f32 intermediate Z rounded once; factors exact); for f16 storage data and factors go as bf16
// hi + lo (~16 significant bits; one bf16 rounding is 4x f16's and breaks bound 2). f32
// accumulation throughout. f32 storage keeps the scalar path (kron.cuh): 1e-5 needs f32 products.
// Factors larger than 64 also take the scalar path.
#pragma once
#include <cstdlib>

#include "kron.cuh"
#include "ldst.cuh"
#include "mma.cuh"

namespace camex {

constexpr int TC_THREADS = 256, TC_WARPS = TC_THREADS / 32;
constexpr int TC_QC = 8;    // columns per stage-1 slab: one n8 tile
constexpr int TC_KMAX = 64; // largest factor size the tensor-core path takes
constexpr int TC_ACC = 8;   // m16n8 f32 accumulator tiles per warp in stage 2 (32 registers)
constexpr int TC_AC = 8;    // row runs (values of a) per tau chunk in stage 1
constexpr int64_t TC_SMEM_MAX = 227 * 1024;  // sm_90's opt-in maximum

// Copies a k x k factor into zero-padded [kp][ld] shared matrices as bf16 hi + lo; bf16 storage is
// exact in hi and has no lo array (the padding is zeroed once).
template <typename P, typename T>
__device__ __forceinline__ void load_factor(MmaT *hi, MmaT *lo, const T *f, int k, int ld) {
  for (int x = threadIdx.x; x < k * k; x += TC_THREADS) {
    const int64_t at = (x / k) * ld + x % k;
    if constexpr (P::factor_lo) split_store(hi, lo, at, to_f32(f[x]));
    else hi[at] = from_f32<MmaT>(to_f32(f[x]));
  }
}

// A k x k factor whose storage is bf16 without a lo half (load_factor's bits, as they are) into
// [kp][ld] by 16-byte cp.async: for k % 8 == 0 and f 16-byte aligned (ld is a multiple of 8). The
// padding is not written (the caller zeroes it once).
__device__ __forceinline__ void load_factor_async(MmaT *hi, const MmaT *f, int k, int ld) {
  const int runs = k / 8;  // 16-byte runs per row
  for (int x = threadIdx.x; x < k * runs; x += TC_THREADS) {
    const int row = x / runs, col = x % runs * 8;
    cp_async_16(hi + (int64_t)row * ld + col, f + (int64_t)row * k + col);
  }
}

// One rank's step of the two-buffer cp.async pipelines (rows_pipe, cols_pipe, cols_bwd_reg_pipe): rank
// rl + 1's copies go into the other buffers (prefetch(rl + 1, buf ^ 1), which commits their group),
// or an empty group after the last rank, so that one wait serves every rank; then rank rl's land.
template <typename F>
__device__ __forceinline__ void pipe_next_rank(int64_t rl, int64_t nr, int buf, F &&prefetch) {
  if (rl + 1 < nr) prefetch(rl + 1, buf ^ 1);
  else cp_async_commit();
  cp_async_wait<1>();  // all groups but the newest: this rank's
}

// c += F X for a factor F (the A operand) and data X (the B operand): F_hi X_hi, plus F_hi X_lo and
// F_lo X_hi where storage T splits data and factors (TcSplit).
template <typename P>
__device__ __forceinline__ void mma_split(float c[4], const uint32_t ah[4], const uint32_t al[4], const uint32_t bh[2],
                                          const uint32_t bl[2]) {
  mma_bf16(c, ah, bh);
  if constexpr (P::data_lo) mma_bf16(c, ah, bl);
  if constexpr (P::factor_lo) mma_bf16(c, al, bh);
}

__device__ __forceinline__ void zero_smem(char *smem, int64_t bytes) {
  uint4 z = make_uint4(0, 0, 0, 0);
  for (int64_t x = threadIdx.x; x < bytes / 16; x += TC_THREADS) reinterpret_cast<uint4 *>(smem)[x] = z;
}

// Stage 1 (both the forward's and the backward's P = L tau) keeps Y as [a'][b * 8 + j]: mode b's
// outputs go out as 32-bit pairs and mode a's B fragments come through ldmatrix.trans, both free of
// bank conflicts, and each warp keeps in registers the factor fragments that its tiles share.

// A square factor's A-operand fragments ([m tile][k step], kt x kt tiles of 16, F as stored) for
// the products whose B fragments a warp holds for every k step. Without factor lo halves they are
// loaded once and kept in registers (at most 64; the kernels that keep them run one block per SM);
// with them (f16), whose hi and lo would not fit, factor_frags_tile reads them per use.
template <typename P>
using FactorFrags = uint32_t[P::factor_lo ? 1 : TC_KMAX / 16][P::factor_lo ? 1 : TC_KMAX / 16][4];
template <typename P>
__device__ __forceinline__ void factor_frags_load(FactorFrags<P> &fk, const MmaT *fh, int lf, int kt, int lane) {
  if constexpr (!P::factor_lo) {
#pragma unroll
    for (int mt = 0; mt < TC_KMAX / 16; ++mt)
#pragma unroll
      for (int k = 0; k < TC_KMAX / 16; ++k)
        if (mt < kt && k < kt) frag_a(fk[mt][k], fh, lf, mt * 16, k * 16, lane);
  }
}
// c += sum_k F[m tile mt][k step k] X[k step k] over kt k steps (X's fragments bh, bl per k step).
template <typename P>
__device__ __forceinline__ void factor_frags_tile(float c[4], const FactorFrags<P> &fk, const MmaT *fh, const MmaT *fl,
                                                  int lf, int mt, int kt, const uint32_t (*bh)[2],
                                                  const uint32_t (*bl)[2], int lane) {
#pragma unroll
  for (int k = 0; k < TC_KMAX / 16; ++k)
    if (k < kt) {
      if constexpr (!P::factor_lo) {
        mma_split<P>(c, fk[mt][k], fk[mt][k], bh[k], bl[k]);
      } else {
        uint32_t ah[4], al[4];
        frag_a(ah, fh, lf, mt * 16, k * 16, lane);
        frag_a(al, fl, lf, mt * 16, k * 16, lane);
        mma_split<P>(c, ah, al, bh[k], bl[k]);
      }
    }
}

// Mode b on ac row runs of an 8-column slab (X[al][j][b'], row stride lx):
// Y[a0 + al][b * 8 + j] = sum_b' F[b][b'] X[al][j][b'] (M = b, N = j, K = b').
// Without factor lo halves (bf16 storage) each warp holds all of F's fragments (kt x kt tiles, at
// most 64 registers) for the whole call and takes row runs: it reads a run's X fragments once for
// every m tile (one 2-wavefront fragment per k step, shared by kt mma), instead of once per m tile.
// With them (f16), whose hi and lo would not fit, tiles (m tile of b, row run) are taken
// m-tile-major, so that a warp loads F's fragments of an m tile once for all its row runs of it.
template <typename P>
__device__ __forceinline__ void slab_fwd_mode_b(const MmaT *fh, const MmaT *fl, int lf, const MmaT *xh, const MmaT *xl,
                                                int lx, MmaT *yh, MmaT *yl, int ly, int a0, int ac, int o2, int o2p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int kt = o2p / 16;
  constexpr int KS = TC_KMAX / 16;
  // The m16n8 tile (m tile mt of b, row run al) into Y's row a0 + al.
  auto store_y = [&](int al, int mt, const float c[4]) {
    MmaT *yrh = yh + (int64_t)(a0 + al) * ly, *yrl = yl + (int64_t)(a0 + al) * ly;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int b = mt * 16 + g + 8 * h;
      if (b < o2) store_data2<P>(yrh, yrl, b * TC_QC + 2 * t, c[2 * h], c[2 * h + 1]);
    }
  };
  if constexpr (!P::factor_lo) {
    FactorFrags<P> fk;
    factor_frags_load<P>(fk, fh, lf, kt, lane);
    for (int al = warp; al < ac; al += TC_WARPS) {
      uint32_t bh[KS][2], bl[KS][2];
#pragma unroll
      for (int k = 0; k < KS; ++k)
        if (k < kt) {
          frag_b(bh[k], xh + al * TC_QC * lx, lx, 0, k * 16, lane);
          if constexpr (P::data_lo) frag_b(bl[k], xl + al * TC_QC * lx, lx, 0, k * 16, lane);
        }
#pragma unroll
      for (int mt = 0; mt < KS; ++mt)
        if (mt < kt) {
          float c[4] = {0.f, 0.f, 0.f, 0.f};
          factor_frags_tile<P>(c, fk, fh, fl, lf, mt, kt, bh, bl, lane);
          store_y(al, mt, c);
        }
    }
  } else {
    uint32_t ah[KS][4], alo[KS][4];
    int cached = -1;
    for (int tile = warp; tile < kt * ac; tile += TC_WARPS) {
      const int mt = tile / ac, al = tile % ac;
      if (mt != cached) {
#pragma unroll
        for (int k = 0; k < KS; ++k)
          if (k < kt) {
            frag_a(ah[k], fh, lf, mt * 16, k * 16, lane);
            frag_a(alo[k], fl, lf, mt * 16, k * 16, lane);
          }
        cached = mt;
      }
      float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int k = 0; k < KS; ++k)
        if (k < kt) {
          uint32_t bh[2], bl[2];
          frag_b(bh, xh + al * TC_QC * lx, lx, 0, k * 16, lane);
          if constexpr (P::data_lo) frag_b(bl, xl + al * TC_QC * lx, lx, 0, k * 16, lane);
          mma_split<P>(c, ah[k], alo[k], bh, bl);
        }
      store_y(al, mt, c);
    }
  }
}

// The slab layout [slab][O][8] (Z, and tau's planes): the element of column q in row zrow, and the
// elements of one such array (I rounded up to whole slabs).
__host__ __device__ inline int64_t slab_at(int64_t q, int64_t zrow, int64_t O) {
  return ((q / TC_QC) * O + zrow) * TC_QC + q % TC_QC;
}
__host__ __device__ inline int64_t slab_plane(int64_t I, int64_t O) { return (I + TC_QC - 1) / TC_QC * O * TC_QC; }

// The backward's Z (P = L tau, then K written over it): each value v as two bf16 planes, hi =
// bf16(v) and lo = bf16(v - hi), the split store_data makes of an f32 value, so the columns side
// loads the bits it would have split from f32 Z; per rank [hi, lo][slab][O][8]. The same 4 bytes per
// value as f32 Z, but a reader without data lo halves (bf16's rows-side backward) reads the hi plane
// alone: half the bytes. A tag: the memory is MmaT (ZMem).
struct ZSplit {};
template <typename Z> struct ZMem {
  using type = Z;
  static constexpr int planes = 1;
};
template <> struct ZMem<ZSplit> {
  using type = MmaT;
  static constexpr int planes = 2;
};
template <typename Z> using ZPtr = typename ZMem<Z>::type *;

// Z's row of output row p = (a, b) within a slab: p itself for f32 Z (a row is one 32-byte sector),
// b * o1 + a for bf16 planes (the forward's FwdZ, the backward's ZSplit), so that the eight rows a
// of one mma tile are 128 contiguous bytes (four whole sectors) instead of eight half sectors; the
// readers take runs of Z rows and map them back (z_row_to_p).
template <typename Z> __host__ __device__ constexpr bool z_rows_by_b() { return sizeof(typename ZMem<Z>::type) == 2; }
template <typename Z> __host__ __device__ inline int64_t z_row_to_p(int64_t zr, int o1, int64_t O) {
  return z_rows_by_b<Z>() ? (zr % o1) * (O / o1) + zr / o1 : zr;
}

// One m16n8 tile of mode a's output, slab-contiguous: out[zrow(a, b) * 8 + j], f32 or bf16 (Z), or
// both bf16 planes of ZSplit (the lo plane `plane` elements past the hi one).
template <typename Z>
__device__ __forceinline__ void store_z_tile(ZPtr<Z> out, int64_t plane, const float c[4], int mt, int b, int o1,
                                             int o2, int g, int t) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int a = mt * 16 + g + 8 * h;
    if (a >= o1) continue;
    const int64_t zrow = z_rows_by_b<Z>() ? (int64_t)b * o1 + a : (int64_t)a * o2 + b;
    ZPtr<Z> dst = out + zrow * TC_QC + 2 * t;
    if constexpr (std::is_same<Z, float>::value) *reinterpret_cast<float2 *>(dst) = make_float2(c[2 * h], c[2 * h + 1]);
    else if constexpr (std::is_same<Z, ZSplit>::value) store_data2<Prec<true, false>>(dst, dst + plane, 0, c[2 * h], c[2 * h + 1]);
    else store_data2<Prec<false, false>>(dst, nullptr, 0, c[2 * h], c[2 * h + 1]);
  }
}

// Mode a on a slab, m tiles mt0..mt1 of the output: c = sum_a' F[a][a'] Y[a'][b * 8 + j] for a in
// the m tile (M = a, N = (b, j), K = a' over kt k steps), handed per m16n8 tile to st(mt, b, c).
// Warps take n tiles b. Without factor lo halves a warp keeps F's fragments of TC_MH m tiles at a
// time (48 registers; o1 <= 48, as at every SPEC section 8 shape, in one pass; all four, 64, spilled
// when stage 1 ran two blocks per SM) and reads its n tiles' fragments once per TC_MH m tiles; with
// them (f16), whose hi and lo would spill, it loads F's fragments per m tile and reads the n tiles'
// once per m tile. Used by the forward (Z = A Y) and by the rows-side backward (A^T K and A^T V).
constexpr int TC_MH = 3;
template <typename P, typename St>
__device__ __forceinline__ void slab_fwd_mode_a(const MmaT *fh, const MmaT *fl, int lf, const MmaT *yh, const MmaT *yl,
                                                int ly, St st, int mt0, int mt1, int kt, int o2) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t lrow = (lane & 15) * (int64_t)ly;  // ldmatrix.x2: lanes 0..15 give rows k0..k0+15
  if constexpr (!P::factor_lo) {
    for (int m0 = mt0; m0 < mt1; m0 += TC_MH) {
      uint32_t ah[TC_MH][TC_KMAX / 16][4];  // [m tile - m0][k step]
#pragma unroll
      for (int mh = 0; mh < TC_MH; ++mh)
#pragma unroll
        for (int k = 0; k < TC_KMAX / 16; ++k)
          if (m0 + mh < mt1 && k < kt) frag_a(ah[mh][k], fh, lf, (m0 + mh) * 16, k * 16, lane);
      for (int b = warp; b < o2; b += TC_WARPS) {
        uint32_t bh[TC_KMAX / 16][2], bl[TC_KMAX / 16][2];
#pragma unroll
        for (int k = 0; k < TC_KMAX / 16; ++k)
          if (k < kt) {
            ldmatrix_x2<true>(bh[k], yh + (int64_t)k * 16 * ly + lrow + b * TC_QC);
            if constexpr (P::data_lo) ldmatrix_x2<true>(bl[k], yl + (int64_t)k * 16 * ly + lrow + b * TC_QC);
          }
#pragma unroll
        for (int mh = 0; mh < TC_MH; ++mh)
          if (m0 + mh < mt1) {
            float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int k = 0; k < TC_KMAX / 16; ++k)
              if (k < kt) mma_split<P>(c, ah[mh][k], ah[mh][k], bh[k], bl[k]);
            st(m0 + mh, b, c);
          }
      }
    }
  } else {
    for (int mt = mt0; mt < mt1; ++mt) {
      uint32_t ah[TC_KMAX / 16][4], alo[TC_KMAX / 16][4];
#pragma unroll
      for (int k = 0; k < TC_KMAX / 16; ++k)
        if (k < kt) {
          frag_a(ah[k], fh, lf, mt * 16, k * 16, lane);
          frag_a(alo[k], fl, lf, mt * 16, k * 16, lane);
        }
      for (int b = warp; b < o2; b += TC_WARPS) {
        float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int k = 0; k < TC_KMAX / 16; ++k)
          if (k < kt) {
            uint32_t bh[2], bl[2];
            ldmatrix_x2<true>(bh, yh + (int64_t)k * 16 * ly + lrow + b * TC_QC);
            if constexpr (P::data_lo) ldmatrix_x2<true>(bl, yl + (int64_t)k * 16 * ly + lrow + b * TC_QC);
            mma_split<P>(c, ah[k], alo[k], bh, bl);
          }
        st(mt, b, c);
      }
    }
  }
}

// ---- stage 1: rows ----

struct RowsLayout {
  int o1p, o2p, xa, lx, ly, la, lb;
  int64_t xh, xl, yh, yl, ah, al, bh, bl, bytes;  // byte offsets
  int64_t astep, bstep;                           // elements between A's and B's two buffers (pipe), or 0
};

// sp: which operands have lo halves (the kernel's Prec); the others' lo arrays are empty.
// X [xa][8][lx] holds xa row runs of tau (X[a][q][b'] = tau[(a, b'), q]): all o1 when `resident`, so
// that a block reads its slab of W and E once for all its ranks, else TC_AC at a time, read again
// per rank. Y [o1p][ly] with Y[a'][b * 8 + q] and ly = 8 u for an odd u, so that ldmatrix's eight
// 16-byte rows fall in eight distinct bank groups (rows past o1: mode a's K padding, zero).
// pipe (exact factors only): two buffers each of A and B, so that the next rank's come in by cp.async
// while this rank's are multiplied (kron_rows_body).
__host__ __device__ inline RowsLayout rows_layout(int o1, int o2, TcSplit sp, bool resident, bool pipe = false) {
  RowsLayout l;
  l.o1p = tc_pad(o1);
  l.o2p = tc_pad(o2);
  l.xa = resident ? o1 : TC_AC;
  l.lx = tc_ld(l.o2p);
  l.ly = TC_QC * (o2 + 1 + (o2 & 1));
  l.la = tc_ld(l.o1p);
  l.lb = tc_ld(l.o2p);
  const int64_t e = 2;  // bytes per f16/bf16 element
  const int64_t x = (int64_t)l.xa * TC_QC * l.lx * e;
  const int64_t y = (int64_t)l.o1p * l.ly * e;
  const bool dlo = sp.data_lo, flo = sp.factor_lo;
  l.xh = 0;
  l.xl = l.xh + x;
  l.yh = l.xl + (dlo ? x : 0);
  l.yl = l.yh + y;
  pipe = pipe && !flo;
  const int64_t nb = pipe ? 2 : 1;  // buffers of A and B
  const int64_t ab = (int64_t)l.o1p * l.la * e, bb = (int64_t)l.o2p * l.lb * e;
  l.ah = l.yl + (dlo ? y : 0);  // A hi, lo [o1p][la] (or with pipe two hi buffers)
  l.al = l.ah + ab;
  l.astep = pipe ? (int64_t)l.o1p * l.la : 0;
  l.bh = l.ah + (flo ? 2 : nb) * ab;  // B hi, lo [o2p][lb] (likewise)
  l.bl = l.bh + bb;
  l.bstep = pipe ? (int64_t)l.o2p * l.lb : 0;
  l.bytes = (l.bh + (flo ? 2 : nb) * bb + 15) / 16 * 16;
  return l;
}

// Whether stage 1 under split sp keeps the whole slab of tau resident within `lim` bytes.
__host__ __device__ inline bool rows_resident(int o1, int o2, TcSplit sp, int64_t lim) {
  return rows_layout(o1, o2, sp, true).bytes <= lim;
}

// The backward's tau = W - E as the expert's first stage-1 launch leaves it for the later kernels
// (kron_backward_tc): its hi and lo halves under the kernels' data split (hi = bf16(v), and lo =
// bf16(v - hi) where P has data lo halves; the bits store_data makes of v), [hi, lo][slab][O][8],
// rows p = (a, b) in order. A later kernel then reads one 16-byte run per row and plane instead of
// half a sector of each of W and E. `in`: read tau from the planes; `out`: write them; neither:
// W and E alone (the forward, and shapes whose planes do not fit the scratch).
struct TauPlanes {
  const MmaT *in;
  MmaT *out;
  int64_t O;
};

// tau = W - E of rows (a0..a0+ac, all b) and columns q0..q0+7 into shared X[al][j][b] (row
// stride lx; exact in f32, then a data operand under P, store_data); vec: 16-byte loads. With
// tp.in, from the planes instead (the same bits); with tp.out, also into them.
template <typename P, typename T>
__device__ __forceinline__ void load_tau_chunk(MmaT *Xh, MmaT *Xl, int lx, const T *__restrict__ w,
                                               const T *__restrict__ e, int a0, int ac, int o2, int64_t I,
                                               int64_t q0, bool vec, TauPlanes tp) {
  const int64_t rows = (int64_t)ac * o2, pbase = (int64_t)a0 * o2;
  const int64_t plane = slab_plane(I, tp.O), at0 = slab_at(q0, 0, tp.O);  // at0: this slab's row 0
  if (tp.in) {
    for (int64_t x = threadIdx.x; x < rows; x += TC_THREADS) {
      const int64_t p = pbase + x, al = x / o2, b = x % o2;
      const uint4 hv = *reinterpret_cast<const uint4 *>(tp.in + at0 + p * TC_QC);
      uint4 lv = make_uint4(0, 0, 0, 0);
      if constexpr (P::data_lo) lv = *reinterpret_cast<const uint4 *>(tp.in + plane + at0 + p * TC_QC);
      MmaT ht[TC_QC], lt[TC_QC];
      memcpy(ht, &hv, 16);
      memcpy(lt, &lv, 16);
#pragma unroll
      for (int j = 0; j < TC_QC; ++j) {
        Xh[(al * TC_QC + j) * lx + b] = ht[j];
        if constexpr (P::data_lo) Xl[(al * TC_QC + j) * lx + b] = lt[j];
      }
    }
  } else if (vec) {
    for (int64_t x = threadIdx.x; x < rows; x += TC_THREADS) {
      const int64_t p = pbase + x;
      const uint4 wv = *reinterpret_cast<const uint4 *>(w + p * I + q0);
      const uint4 ev = *reinterpret_cast<const uint4 *>(e + p * I + q0);
      T wt[TC_QC], et[TC_QC];
      memcpy(wt, &wv, 16);
      memcpy(et, &ev, 16);
      const int64_t al = x / o2, b = x % o2;
      float v[TC_QC];
#pragma unroll
      for (int j = 0; j < TC_QC; ++j) {
        v[j] = to_f32(wt[j]) - to_f32(et[j]);
        store_data<P>(Xh, Xl, (al * TC_QC + j) * lx + b, v[j]);
      }
      if (tp.out) store_data8<P>(tp.out, tp.out + plane, at0 + p * TC_QC, v);
    }
  } else {
    for (int64_t x = threadIdx.x; x < rows * TC_QC; x += TC_THREADS) {
      const int64_t pl = x / TC_QC, j = x % TC_QC, q = q0 + j, p = pbase + pl;
      const int64_t al = pl / o2, b = pl % o2;
      const float v = q < I ? to_f32(w[p * I + q]) - to_f32(e[p * I + q]) : 0.f;
      store_data<P>(Xh, Xl, (al * TC_QC + j) * lx + b, v);
      if (tp.out) store_data<P>(tp.out, tp.out + plane, at0 + p * TC_QC + j, v);
    }
  }
}

// The element type of Z as the forward keeps it: bf16 where stage 2 takes it single-pass (FwdPrec;
// rounding it in stage 1 gives the bits stage 2 would, in half the bytes), else f32.
template <typename T> using FwdZ = typename std::conditional<FwdPrec<T>::data_lo, float, MmaT>::type;

// The backward's stage 1 (P = L tau, which feeds dC and dD): single-pass bf16 as the forward's
// (FwdPrec); mma.cuh has the measurements.
template <typename T> using RowsSplitPrec = FwdPrec<T>;
// The backward's Z: ZSplit's two planes where the columns side reads P with lo halves (f16), else
// one bf16 plane (bf16: P single-pass, K hi alone), 2 bytes per value, so a round holds twice the
// ranks (kron_tc_rank_chunk).
template <typename T> using BwdZ = typename std::conditional<FwdPrec<T>::data_lo, ZSplit, MmaT>::type;

// The body of stage 1 under precision policy P: kron_rows_kernel (the forward's, FwdPrec, bf16 or
// f32 Z: FwdZ) and kron_rows_split_kernel (the backward's P = L tau, BwdZ) below.
// grid (slabs = ceil(I / 8)); each block runs ranks r0..r0+nr of its slab, tau resident in X across
// them where `resident` (rows_layout). z: [nr][slabs][O][8] = ((A_r (x) B_r) tau)[p, slab*8 + j].
// tp: tau from the backward's planes, or into them (the first rank's load; TauPlanes).
template <typename T, typename P, typename Z>
__device__ __forceinline__ void kron_rows_body(char *smem, const T *__restrict__ w, const T *__restrict__ e,
                                               const T *__restrict__ fa, const T *__restrict__ fb,
                                               ZPtr<Z> __restrict__ z, int o1, int o2, int64_t I, int64_t nexp,
                                               int64_t expert, int64_t r0, int64_t nr, int resident, TauPlanes tp,
                                               int pipe) {
  const RowsLayout L = rows_layout(o1, o2, P::split(), resident != 0, pipe != 0);
  MmaT *Xh = reinterpret_cast<MmaT *>(smem + L.xh), *Xl = reinterpret_cast<MmaT *>(smem + L.xl);
  MmaT *Yh = reinterpret_cast<MmaT *>(smem + L.yh), *Yl = reinterpret_cast<MmaT *>(smem + L.yl);
  MmaT *Ah = reinterpret_cast<MmaT *>(smem + L.ah), *Al = reinterpret_cast<MmaT *>(smem + L.al);
  MmaT *Bh = reinterpret_cast<MmaT *>(smem + L.bh), *Bl = reinterpret_cast<MmaT *>(smem + L.bl);
  const int64_t O = (int64_t)o1 * o2;
  const int64_t slab = blockIdx.x;
  const int64_t q0 = slab * TC_QC;
  const bool vec = I % TC_QC == 0 && ((reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(e)) & 15) == 0;

  // Pipelined (rows_pipe): rank rl + 1's factors go in by cp.async, one group per rank, into the
  // other buffers, while rank rl's are multiplied; the bits are the unpipelined path's.
  constexpr bool can_pipe = !P::factor_lo && std::is_same<T, MmaT>::value;  // bf16 factors as they are
  const bool piped = can_pipe && L.astep != 0;
  [[maybe_unused]] auto prefetch = [&](int64_t rl, int buf) {
    if constexpr (can_pipe) {
      const int64_t r = r0 + rl;
      load_factor_async(Ah + buf * L.astep, fa + (r * nexp + expert) * o1 * o1, o1, L.la);
      load_factor_async(Bh + buf * L.bstep, fb + (r * nexp + expert) * o2 * o2, o2, L.lb);
    }
    cp_async_commit();
  };
  zero_smem(smem, L.bytes);  // the K padding of every operand stays zero
  if (piped) {
    __syncthreads();  // the zeroing is done before the copies land
    prefetch(0, 0);
  }
  for (int64_t rl = 0; rl < nr; ++rl) {
    const int64_t r = r0 + rl;
    // The previous rank's mode a is done with A, B (the buffers the next copies overwrite) and Y,
    // and the zeroing is visible.
    __syncthreads();
    const int buf = piped ? (int)(rl & 1) : 0;
    if (piped) {
      pipe_next_rank(rl, nr, buf, prefetch);
    } else {
      load_factor<P>(Ah, Al, fa + (r * nexp + expert) * o1 * o1, o1, L.la);
      load_factor<P>(Bh, Bl, fb + (r * nexp + expert) * o2 * o2, o2, L.lb);
    }
    for (int a0 = 0; a0 < o1; a0 += L.xa) {
      const int ac = o1 - a0 < L.xa ? o1 - a0 : L.xa;
      if (!resident || rl == 0) {  // resident: one chunk (xa = o1), loaded for the first rank only
        __syncthreads();             // the previous chunk's mode b is done with X
        load_tau_chunk<P>(Xh, Xl, L.lx, w, e, a0, ac, o2, I, q0, vec, rl == 0 ? tp : TauPlanes{tp.in, nullptr, tp.O});
      }
      __syncthreads();  // X and the factors are visible
      // Mode b, per row run a: Y[a][b * 8 + q] = sum_b' B[b][b'] X[a][q][b'].
      slab_fwd_mode_b<P>(Bh + buf * L.bstep, Bl, L.lb, Xh, Xl, L.lx, Yh, Yl, L.ly, a0, ac, o2, L.o2p);
    }
    __syncthreads();
    // Mode a: Z[a][(b, q)] = sum_a' A[a][a'] Y[a'][b * 8 + q], slab-contiguous.
    const int64_t plane = slab_plane(I, O);
    ZPtr<Z> out = z + rl * ZMem<Z>::planes * plane + slab_at(q0, 0, O);
    const int kt = L.o1p / 16, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    slab_fwd_mode_a<P>(Ah + buf * L.astep, Al, L.la, Yh, Yl, L.ly,
        [&](int mt, int b, const float c[4]) { store_z_tile<Z>(out, plane, c, mt, b, o1, o2, g, t); }, 0, kt, kt, o2);
  }
}

#define CAMEX_KRON_ROWS_PARAMS(ZT)                                                                         \
  const T *__restrict__ w, const T *__restrict__ e, const T *__restrict__ fa, const T *__restrict__ fb,   \
      ZPtr<ZT> __restrict__ z, int o1, int o2, int64_t I, int64_t nexp, int64_t expert, int64_t r0, int64_t nr, \
      int resident, TauPlanes tp, int pipe
#define CAMEX_KRON_ROWS_ARGS w, e, fa, fb, z, o1, o2, I, nexp, expert, r0, nr, resident, tp, pipe
// Launch bounds: with factor lo halves (f16) two blocks per SM (at most 128 registers; with the
// default, ptxas 13.0 capped that instance at 64 registers and spilled mode a's factor fragments, hi
// and lo); without them (bf16) one, for mode b's 64 registers of factor fragments (at 128 they
// spilled). No SPEC section 8 shape loses a block per SM by it: their I / 8 slabs are fewer than the
// SMs (T5-base's 117 KB block takes one SM alone anyway).
template <typename P> constexpr int tc_rows_min_blocks() { return P::factor_lo ? 2 : 1; }
template <typename T>
__global__ void __launch_bounds__(TC_THREADS, tc_rows_min_blocks<FwdPrec<T>>())
    kron_rows_kernel(CAMEX_KRON_ROWS_PARAMS(FwdZ<T>)) {
  CAMEX_DYNAMIC_SMEM(smem);
  kron_rows_body<T, FwdPrec<T>, FwdZ<T>>(smem, CAMEX_KRON_ROWS_ARGS);
}
template <typename T>
__global__ void __launch_bounds__(TC_THREADS, tc_rows_min_blocks<RowsSplitPrec<T>>())
    kron_rows_split_kernel(CAMEX_KRON_ROWS_PARAMS(BwdZ<T>)) {
  CAMEX_DYNAMIC_SMEM(smem);
  kron_rows_body<T, RowsSplitPrec<T>, BwdZ<T>>(smem, CAMEX_KRON_ROWS_ARGS);
}
#undef CAMEX_KRON_ROWS_PARAMS
#undef CAMEX_KRON_ROWS_ARGS

// Rows p0..p0+pr of one rank of Z (slab layout [slab][O][8], f32 or bf16: FwdZ; or ZSplit's two
// planes) into shared X[p][c][d] (row stride lx, p stride ps), a data operand under P (store_data;
// ZSplit's planes as they are, which are the bits store_data would have split); rows past O are
// left as they are. Async: the 16-byte plane copies go as cp.async (cp_async_16), which land at the
// caller's cp_async_wait; the other paths store as they load.
template <typename P, typename Z, bool Async = false>
__device__ __forceinline__ void load_z_rows(MmaT *xh, MmaT *xl, int lx, int64_t ps, const typename ZMem<Z>::type *zr,
                                            int64_t p0, int pr, int64_t O, int i1, int i2) {
  const int64_t I = (int64_t)i1 * i2, slabs = (I + TC_QC - 1) / TC_QC;
  constexpr bool split = std::is_same<Z, ZSplit>::value;
  if constexpr (split || (std::is_same<Z, MmaT>::value && !P::data_lo)) {
    // bf16 planes taken as they are: where a slab's 8 values are one run of d (i2 % 8 == 0, so
    // I % 8 == 0 too), one 16-byte copy per plane instead of eight 2-byte stores. Consecutive lanes
    // take consecutive rows p of one slab, so that a warp reads whole 32-byte sectors
    // ([slab][O][8]), and ps (an odd number of 16-byte units past a multiple of 128 bytes:
    // cols_layout, cols_bwd_layout) puts their eight 16-byte stores of a phase in eight bank groups.
    const int64_t plane = slab_plane(I, O);
    if (i2 % TC_QC == 0) {
      for (int64_t x = threadIdx.x; x < (int64_t)pr * slabs; x += TC_THREADS) {
        const int64_t sl = x / pr, pl = x % pr, p = p0 + pl, q = sl * TC_QC;
        if (p >= O) continue;
        const int64_t at = pl * ps + (q / i2) * lx + q % i2, from = slab_at(q, p, O);
        if constexpr (Async) {
          cp_async_16(xh + at, zr + from);
          if constexpr (split && P::data_lo) cp_async_16(xl + at, zr + plane + from);
        } else {
          *reinterpret_cast<uint4 *>(xh + at) = *reinterpret_cast<const uint4 *>(zr + from);
          if constexpr (split && P::data_lo)
            *reinterpret_cast<uint4 *>(xl + at) = *reinterpret_cast<const uint4 *>(zr + plane + from);
        }
      }
      return;
    }
    if constexpr (split) {
      for (int64_t x = threadIdx.x; x < (int64_t)pr * I; x += TC_THREADS) {
        const int64_t pl = x / I, q = x % I, p = p0 + pl;
        if (p >= O) continue;
        const int64_t at = pl * ps + (q / i2) * lx + q % i2, from = slab_at(q, p, O);
        xh[at] = zr[from];
        if constexpr (P::data_lo) xl[at] = zr[plane + from];
      }
      return;
    }
  }
  if constexpr (!split) {
    // Consecutive lanes take consecutive slabs of one row p: each reads a whole 32-byte sector.
    for (int64_t x = threadIdx.x; x < (int64_t)pr * slabs; x += TC_THREADS) {
      const int64_t pl = x / slabs, sl = x % slabs, p = p0 + pl;
      if (p >= O) continue;
      float vt[TC_QC];
      if constexpr (std::is_same<Z, float>::value) {
        const float4 *src = reinterpret_cast<const float4 *>(zr + (sl * O + p) * TC_QC);
        const float4 v0 = src[0], v1 = src[1];
        vt[0] = v0.x, vt[1] = v0.y, vt[2] = v0.z, vt[3] = v0.w, vt[4] = v1.x, vt[5] = v1.y, vt[6] = v1.z, vt[7] = v1.w;
      } else {
        const uint4 v = *reinterpret_cast<const uint4 *>(zr + (sl * O + p) * TC_QC);
        Z zt[TC_QC];
        memcpy(zt, &v, 16);
#pragma unroll
        for (int j = 0; j < TC_QC; ++j) vt[j] = to_f32(zt[j]);
      }
      const int64_t q0 = sl * TC_QC;
      if (i2 % TC_QC == 0) {  // the slab is one run of d: one 16-byte store per half
        store_data8<P>(xh, xl, pl * ps + (q0 / i2) * lx + q0 % i2, vt);
        continue;
      }
#pragma unroll
      for (int j = 0; j < TC_QC; ++j) {
        const int64_t q = q0 + j;
        if (q < I) store_data<P>(xh, xl, pl * ps + (q / i2) * lx + q % i2, vt[j]);
      }
    }
  }
}

// ---- stage 2: columns ----

// The forward's mode d on rows (p, c') of X, mt16 m tiles of 16 (M = (p, c'), N = d, K = d'):
// Y[(p, c')][d] = sum_d' X[(p, c')][d'] F[d][d'], Y's rows (p, c') at p yps + c' ly, written as
// 32-bit pairs (split as PS says). X's rows are at p ps + c' lx (mtp m tiles per p). Each warp keeps
// an m tile's data fragments across the n tiles where Keep (by default without data lo halves: with
// them, kept, they spill on sm_80 at two blocks per SM; the backward, at one, keeps them), and with
// KeepF (no factor lo halves) all of F's fragments across its m tiles (at most 64 registers: the
// backward's one block per SM has them; the forward's 128-register cap has not).
template <typename P, bool Keep = !P::data_lo, typename PS = P, bool KeepF = false>
__device__ __forceinline__ void cols_fwd_mode_d(const MmaT *xh, const MmaT *xl, int lx, int64_t ps, int mtp,
                                                const MmaT *fh, const MmaT *fl, int lf, MmaT *yh, MmaT *yl, int ly,
                                                int64_t yps, int mt16, int i2p) {
  static_assert(!KeepF || !P::factor_lo, "factor lo halves are read per use");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int kt = i2p / 16, ntn = i2p / 8;
  constexpr bool keep = Keep;
  constexpr int KS = TC_KMAX / 16, NS = KeepF ? TC_KMAX / 8 : 1;
  // One m16n8 tile c of Y (the m tile's first row at y0, n tile nt), as 32-bit pairs.
  auto store_tile = [&](int64_t y0, int nt, const float c[4]) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      store_data2<PS>(yh, yl, y0 + (int64_t)(g + 8 * h) * ly + nt * 8 + 2 * t, c[2 * h], c[2 * h + 1]);
  };
  // Single-pass operands with F read per use (the forward's bf16) and at most two k steps (i2p <=
  // 32, every SPEC shape): a warp takes its m tiles two at a time (mt, mt + TC_WARPS), so that each
  // F fragment it reads serves both, in the registers one m tile's four k steps would take.
  if constexpr (keep && !KeepF && !P::data_lo && !P::factor_lo) {
    if (kt <= 2) {
      for (int m0 = warp; m0 < mt16; m0 += 2 * TC_WARPS) {
        int64_t y0[2];
        uint32_t ah[2][2][4];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int mt = m0 + u * TC_WARPS;
          y0[u] = (mt / mtp) * yps + (int64_t)(mt % mtp) * 16 * ly;
          if (mt >= mt16) continue;
          const int64_t x0 = (mt / mtp) * ps + (int64_t)(mt % mtp) * 16 * lx;
#pragma unroll
          for (int k = 0; k < 2; ++k)
            if (k < kt) frag_a(ah[u][k], xh + x0, lx, 0, k * 16, lane);
        }
        const bool two = m0 + TC_WARPS < mt16;
        for (int nt = 0; nt < ntn; ++nt) {
          float c[2][4] = {};
#pragma unroll
          for (int k = 0; k < 2; ++k)
            if (k < kt) {
              uint32_t bh[2];
              frag_b(bh, fh, lf, nt * 8, k * 16, lane);
              mma_bf16(c[0], ah[0][k], bh);
              if (two) mma_bf16(c[1], ah[1][k], bh);
            }
          store_tile(y0[0], nt, c[0]);
          if (two) store_tile(y0[1], nt, c[1]);
        }
      }
      return;
    }
  }
  uint32_t fk[KeepF ? KS : 1][NS][2];
  if constexpr (KeepF) {
#pragma unroll
    for (int k = 0; k < KS; ++k)
#pragma unroll
      for (int nt = 0; nt < NS; ++nt)
        if (k < kt && nt < ntn) frag_b(fk[k][nt], fh, lf, nt * 8, k * 16, lane);
  }
  for (int mt = warp; mt < mt16; mt += TC_WARPS) {
    const int64_t x0 = (mt / mtp) * ps + (int64_t)(mt % mtp) * 16 * lx;  // the m tile's first row
    const int64_t y0 = (mt / mtp) * yps + (int64_t)(mt % mtp) * 16 * ly;
    uint32_t ah[keep ? KS : 1][4], al[keep && P::data_lo ? KS : 1][4];
    if constexpr (keep) {
#pragma unroll
      for (int k = 0; k < KS; ++k)
        if (k < kt) {
          frag_a(ah[k], xh + x0, lx, 0, k * 16, lane);
          if constexpr (P::data_lo) frag_a(al[k], xl + x0, lx, 0, k * 16, lane);
        }
    }
    // One n tile; fb(k) gives F's fragment of k step k.
    auto tile = [&](int nt, auto fb) {
      float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int k = 0; k < KS; ++k)
        if (k < kt) {
          uint32_t *a = ah[keep ? k : 0];
          [[maybe_unused]] uint32_t *alo = al[keep && P::data_lo ? k : 0];
          if constexpr (!keep) {
            frag_a(a, xh + x0, lx, 0, k * 16, lane);
            if constexpr (P::data_lo) frag_a(alo, xl + x0, lx, 0, k * 16, lane);
          }
          const uint32_t *bh = fb(k);
          mma_bf16(c, a, bh);
          if constexpr (P::data_lo) mma_bf16(c, alo, bh);
          if constexpr (P::factor_lo) {
            uint32_t bl[2];
            frag_b(bl, fl, lf, nt * 8, k * 16, lane);
            mma_bf16(c, a, bl);
          }
        }
      store_tile(y0, nt, c);
    };
    if constexpr (KeepF) {
#pragma unroll
      for (int nt = 0; nt < NS; ++nt)
        if (nt < ntn) tile(nt, [&](int k) -> const uint32_t * { return fk[k][nt]; });
    } else {
      for (int nt = 0; nt < ntn; ++nt) {
        uint32_t bh[2];
        tile(nt, [&](int k) -> const uint32_t * {
          frag_b(bh, fh, lf, nt * 8, k * 16, lane);
          return bh;
        });
      }
    }
  }
}

struct ColsLayout {
  int i1p, i2p, lz, ly, lc, ld, pr, tpr;
  int64_t ps, zh, zl, zstep, yh, yl, ch, cl, cstep, dh, dl, dstep, bytes;
};

// pipe (single-plane data and exact factors only): two buffers each of Z's rows, C and D, zstep,
// cstep and dstep elements apart (else 0), so that the next rank's come in by cp.async while this
// rank's are multiplied (kron_cols_kernel).
__host__ __device__ inline ColsLayout cols_layout(int i1, int i2, TcSplit sp, bool pipe = false) {
  ColsLayout l;
  l.i1p = tc_pad(i1);
  l.i2p = tc_pad(i2);
  l.lz = tc_ld(l.i2p);
  l.ly = tc_ld(l.i2p);
  l.lc = tc_ld(l.i1p);
  l.ld = tc_ld(l.i2p);
  l.tpr = (l.i1p / 16) * (l.i2p / 8);       // accumulator tiles per row
  l.pr = TC_ACC * TC_WARPS / l.tpr;          // rows per block: every warp holds at most TC_ACC tiles
  if (l.pr < 1) l.pr = 1;
  const int64_t e = 2;
  // Z [pr][ps]: Z[p][c'][d'] = Z_r[p, (c', d')] at p ps + c' lz; ps = i1p lz + 8 is 16 bytes past a
  // multiple of 128 (i1p lz is a multiple of 128 elements), so rows p of one 16-byte column fall in
  // eight distinct bank groups (load_z_rows' stores).
  l.ps = (int64_t)l.i1p * l.lz + 8;
  const int64_t zb = (int64_t)l.pr * l.ps * e;
  // Y [pr * i1p][ly]: Y[p][c'][d] = (Z_r x4 D)[p, (c', d)], the B operand of mode c through
  // ldmatrix.trans (ly = i2p + 8: an odd number of 16-byte units, eight rows in eight bank groups).
  const int64_t yb = (int64_t)l.pr * l.i1p * l.ly * e;
  const bool dlo = sp.data_lo, flo = sp.factor_lo;
  pipe = pipe && !dlo && !flo;
  const int64_t nb = pipe ? 2 : 1;  // buffers of Z, C and D
  const int64_t cb = (int64_t)l.i1p * l.lc * e, db = (int64_t)l.i2p * l.ld * e;
  l.zh = 0;
  l.zl = l.zh + zb;  // Z lo (dlo), or with pipe Z's second buffer
  l.zstep = pipe ? (int64_t)l.pr * l.ps : 0;
  l.yh = l.zh + (dlo ? 2 : nb) * zb;
  l.yl = l.yh + yb;
  l.ch = l.yl + (dlo ? yb : 0);  // C hi, lo [i1p][lc] (or with pipe two hi buffers)
  l.cl = l.ch + cb;
  l.cstep = pipe ? (int64_t)l.i1p * l.lc : 0;
  l.dh = l.ch + (flo ? 2 : nb) * cb;  // D hi, lo [i2p][ld] (likewise)
  l.dl = l.dh + db;
  l.dstep = pipe ? (int64_t)l.i2p * l.ld : 0;
  l.bytes = (l.dh + (flo ? 2 : nb) * db + 15) / 16 * 16;
  return l;
}

// grid (ceil(O / pr)): each block a run of pr Z rows (store_z_tile's order; for bf16 Z, row zr is
// output row (zr % o1, zr / o1)). u: f32 [O][I] of this expert; ranks r0..r0+nr of z; accumulate:
// the sum is added to u's. ut (the expert's last round, or null): U goes out rounded to storage T
// there instead of to u, in half the bytes where bf16/f16 U is what the caller keeps (the CA-merge
// forward's epilogue and `curved`). Two blocks per SM (at most 128 registers): the default let the
// f16 instance take 174.
template <typename T>
__global__ void __launch_bounds__(TC_THREADS, 2)
kron_cols_kernel(const FwdZ<T> *__restrict__ z, const T *__restrict__ fc, const T *__restrict__ fd, float *__restrict__ u,
                 T *__restrict__ ut, int o1, int i1, int i2, int64_t O, int64_t r0, int64_t nr, int64_t nexp,
                 int64_t expert, int accumulate, int pipe) {
  CAMEX_DYNAMIC_SMEM(smem);
  using P = FwdPrec<T>;  // only the forward runs stage 2
  const ColsLayout L = cols_layout(i1, i2, P::split(), pipe != 0);
  MmaT *Zh = reinterpret_cast<MmaT *>(smem + L.zh), *Zl = reinterpret_cast<MmaT *>(smem + L.zl);
  MmaT *Yh = reinterpret_cast<MmaT *>(smem + L.yh), *Yl = reinterpret_cast<MmaT *>(smem + L.yl);
  MmaT *Ch = reinterpret_cast<MmaT *>(smem + L.ch), *Cl = reinterpret_cast<MmaT *>(smem + L.cl);
  MmaT *Dh = reinterpret_cast<MmaT *>(smem + L.dh), *Dl = reinterpret_cast<MmaT *>(smem + L.dl);
  const int64_t I = (int64_t)i1 * i2, slabs = (I + TC_QC - 1) / TC_QC;
  const int64_t p0 = (int64_t)blockIdx.x * L.pr;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int ntc = L.i2p / 8;  // n tiles per row
  // U's pairs (d, d + 1) as one 8-byte access (4-byte in T): a warp's 32 lanes then cover whole
  // sectors.
  const bool pairs = i2 % 2 == 0 && (reinterpret_cast<uintptr_t>(u) & 7) == 0 &&
                     (reinterpret_cast<uintptr_t>(ut) & 3) == 0;

  float acc[TC_ACC][4];
#pragma unroll
  for (int j = 0; j < TC_ACC; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  const int64_t zrank = slabs * O * TC_QC;  // Z's elements per rank
  // Pipelined (cols_pipe): rank rl + 1's Z rows and factors go in by cp.async, one group per rank,
  // into the other buffers, while rank rl's are multiplied; the bits are the unpipelined path's.
  constexpr bool can_pipe = !P::data_lo && !P::factor_lo && std::is_same<T, MmaT>::value;  // bf16, as they are
  const bool piped = can_pipe && L.zstep != 0;
  [[maybe_unused]] auto prefetch = [&](int64_t rl, int buf) {
    if constexpr (can_pipe) {
      const int64_t r = r0 + rl;
      load_z_rows<P, FwdZ<T>, true>(Zh + buf * L.zstep, nullptr, L.lz, L.ps, z + rl * zrank, p0, L.pr, O, i1, i2);
      load_factor_async(Ch + buf * L.cstep, fc + (r * nexp + expert) * i1 * i1, i1, L.lc);
      load_factor_async(Dh + buf * L.dstep, fd + (r * nexp + expert) * i2 * i2, i2, L.ld);
    }
    cp_async_commit();
  };
  // The K padding of Z and the factors stays zero; Y is not zeroed: mode d writes all of it (rows
  // past O and c' past i1 included) before mode c reads it.
  zero_smem(smem, L.yh);
  zero_smem(smem + L.ch, L.bytes - L.ch);
  if (piped) {
    __syncthreads();  // the zeroing is done before the copies land
    prefetch(0, 0);
  }
  for (int64_t rl = 0; rl < nr; ++rl) {
    const int64_t r = r0 + rl;
    // The previous rank's readers are done (of the factors, of Y and of the buffers the next copies
    // overwrite), and the zeroing is visible.
    __syncthreads();
    const int buf = piped ? (int)(rl & 1) : 0;
    if (piped) {
      pipe_next_rank(rl, nr, buf, prefetch);
    } else {
      load_factor<P>(Ch, Cl, fc + (r * nexp + expert) * i1 * i1, i1, L.lc);
      load_factor<P>(Dh, Dl, fd + (r * nexp + expert) * i2 * i2, i2, L.ld);
      load_z_rows<P, FwdZ<T>>(Zh, Zl, L.lz, L.ps, z + rl * zrank, p0, L.pr, O, i1, i2);
    }
    __syncthreads();

    // Mode d: Y[p][c'][d] = sum_d' Z[p][c'][d'] D[d][d'].
    cols_fwd_mode_d<P>(Zh + buf * L.zstep, Zl, L.lz, L.ps, L.i1p / 16, Dh + buf * L.dstep, Dl, L.ld, Yh, Yl, L.ly,
                       (int64_t)L.i1p * L.ly, L.pr * L.i1p / 16, L.i2p);
    __syncthreads();

    // Mode c, accumulated over r: U[p][c][d] += sum_c' C[c][c'] Y[p][c'][d]  (M = c, N = d, K = c').
    // Without factor lo halves, C's fragments stay in registers while a warp's consecutive tiles
    // share their m tile (with them, f16's, they would spill at two blocks per SM).
    constexpr bool keep = !P::factor_lo;
    const int kt = L.i1p / 16;
    const MmaT *ccur = Ch + buf * L.cstep;
    const int64_t lrow = (lane & 15) * (int64_t)L.ly;  // ldmatrix.x2: lanes 0..15 give rows k0..k0+15
    uint32_t ch[keep ? TC_KMAX / 16 : 1][4], cl[4];
    int cached = -1;
#pragma unroll
    for (int j = 0; j < TC_ACC; ++j) {
      const int tile = warp + TC_WARPS * j;
      if (tile < L.pr * L.tpr) {
        const int pl = tile / L.tpr, mt = (tile % L.tpr) / ntc, nt = tile % ntc;
        if constexpr (keep) {
          if (mt != cached) {
#pragma unroll
            for (int k = 0; k < TC_KMAX / 16; ++k)
              if (k < kt) frag_a(ch[k], ccur, L.lc, mt * 16, k * 16, lane);
            cached = mt;
          }
        }
        const int64_t y0 = (int64_t)pl * L.i1p * L.ly + lrow + nt * 8;
#pragma unroll
        for (int k = 0; k < TC_KMAX / 16; ++k)
          if (k < kt) {
            uint32_t *a = ch[keep ? k : 0];
            if constexpr (!keep) {
              frag_a(a, ccur, L.lc, mt * 16, k * 16, lane);
              frag_a(cl, Cl, L.lc, mt * 16, k * 16, lane);
            }
            uint32_t bh[2], bl[2];
            ldmatrix_x2<true>(bh, Yh + y0 + (int64_t)k * 16 * L.ly);
            if constexpr (P::data_lo) ldmatrix_x2<true>(bl, Yl + y0 + (int64_t)k * 16 * L.ly);
            mma_split<P>(acc[j], a, cl, bh, bl);
          }
      }
    }
  }

#pragma unroll
  for (int j = 0; j < TC_ACC; ++j) {
    const int tile = warp + TC_WARPS * j;
    const int pl = tile / L.tpr, mt = (tile % L.tpr) / ntc, nt = tile % ntc;
    const int64_t zr = p0 + pl;
    if (tile >= L.pr * L.tpr || zr >= O) continue;
    const int64_t p = z_row_to_p<FwdZ<T>>(zr, o1, O);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int cc = mt * 16 + g + 8 * h, d = nt * 8 + 2 * t;
      if (cc >= i1 || d >= i2) continue;
      const int64_t at = p * I + (int64_t)cc * i2 + d;
      float *dst = u + at;
      float v0 = acc[j][2 * h], v1 = acc[j][2 * h + 1];
      if (pairs) {  // d + 1 < i2 too (i2 even); 8-byte aligned (u is, and I and i2 are even)
        float2 *d2 = reinterpret_cast<float2 *>(dst);
        if (accumulate) {
          const float2 o = *d2;
          v0 += o.x;
          v1 += o.y;
        }
        if (ut) {
          const float v[2] = {v0, v1};
          store_pair(ut + at, v);
        }
        else *d2 = make_float2(v0, v1);
      } else {
        const bool two = d + 1 < i2;
        if (accumulate) {
          v0 += dst[0];
          if (two) v1 += dst[1];
        }
        if (ut) {
          ut[at] = from_f32<T>(v0);
          if (two) ut[at + 1] = from_f32<T>(v1);
        } else {
          dst[0] = v0;
          if (two) dst[1] = v1;
        }
      }
    }
  }
}

// ---- host side ----

// Dimensions the tensor-core path can take (every factor at most TC_KMAX).
inline bool kron_tc_dims_ok(const D4 &d4) {
  for (int m = 0; m < 4; ++m)
    if (d4.d[m] < 1 || d4.d[m] > TC_KMAX) return false;
  return true;
}

// CAMEX_TC_SMEM_LIMIT (bytes; read once): a lower cap on tc_smem_limit, so that a GPU check can run
// the layouts a device with less shared memory takes (sm_80's 166912 bytes, on the H200:
// scripts/gpu-check.sh). Unset, 0 or unparsable: TC_SMEM_MAX.
inline int64_t tc_smem_cap() {
  static const int64_t cap = [] {
    const char *v = std::getenv("CAMEX_TC_SMEM_LIMIT");
    const long long x = v ? std::atoll(v) : 0;
    return x > 0 && x < TC_SMEM_MAX ? (int64_t)x : TC_SMEM_MAX;
  }();
  return cap;
}

// Shared memory one block may opt in to on the current device (sm_86/89 allow 99 KB, sm_80 163 KB,
// sm_90 227 KB), capped at TC_SMEM_MAX and tc_smem_cap().
inline int64_t tc_smem_limit() {
#ifdef CAMEX_EMU
  const int64_t v = ::emu::smem_limit();  // the emulated device's (camex_emu_smem_limit)
#else
  const int64_t v = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, 48 * 1024);
#endif
  const int64_t cap = tc_smem_cap();
  return v < cap ? v : cap;
}

// Whether the two stages' shared memory fits `lim` (tc_smem_limit() of the launch's device).
inline bool kron_tc_fits(const D4 &d4, TcSplit sp, int64_t lim) {
  return rows_layout((int)d4.d[0], (int)d4.d[1], sp, false).bytes <= lim &&
         cols_layout((int)d4.d[2], (int)d4.d[3], sp).bytes <= lim;
}

// Whether stage 2 takes its pipelined layout (cols_layout's pipe) under `lim`: where its Z rows and
// factors are 16-byte copies (bf16: single-plane Z and exact factors; i1 and i2 multiples of 8:
// load_z_rows' and load_factor_async's cp.async paths) and two blocks still fit an SM (the kernel's
// launch bounds allow two; per-SM shared memory is the per-block limit plus 1 KB, and each block
// reserves 1 KB), so that no device loses a block per SM for it.
inline bool cols_pipe(int i1, int i2, TcSplit sp, int64_t lim) {
  return !sp.data_lo && !sp.factor_lo && i1 % 8 == 0 && i2 % TC_QC == 0 &&
         2 * cols_layout(i1, i2, sp, true).bytes + 1024 <= lim;
}

// Whether stage 1 takes its pipelined layout (rows_layout's pipe) under `lim`, with tau resident
// or not as rows_resident chose: where its factors are 16-byte copies (bf16, exact; o1 and o2
// multiples of 8: load_factor_async) and the two extra buffers fit. Its launch bounds give bf16 one
// block per SM (registers), so no block per SM is lost for them.
inline bool rows_pipe(int o1, int o2, TcSplit sp, bool resident, int64_t lim) {
  return !sp.factor_lo && o1 % 8 == 0 && o2 % 8 == 0 && rows_layout(o1, o2, sp, resident, true).bytes <= lim;
}

// Ranks per stage-1/stage-2 round: as many as keep Z within tc_z_budget() bytes, so that it stays in
// L2 between the two stages (at T5-base `wi`: 2 ranks, 19 MB, of 4-byte Z, f32 or f16's ZSplit; 5
// ranks, 24 MB, of 2-byte Z, the forward's or the backward's for bf16; the H200's L2 is 50 MB).
#ifdef CAMEX_TC_Z_BUDGET  // tests: small budgets exercise the accumulation across rounds
inline int64_t tc_z_budget() { return CAMEX_TC_Z_BUDGET; }
#elif defined(CAMEX_EMU)
// The emulation's test shapes: one or two ranks per round (both the in-round rank loops and the
// accumulation across rounds are exercised). While its cost counters run, the GPU's budget, so
// that the counts are the GPU build's launches.
inline int64_t tc_z_budget() { return ::emu::counting() ? 24ll << 20 : 3000; }
#else
inline int64_t tc_z_budget() { return 24ll << 20; }
#endif
// The larger round a caller may ask for where it lends Z a buffer of its own (kron_forward_any's
// `lent`): 40 MB, 80 % of the H200's 50 MB L2, which holds all 8 ranks of T5-base's bf16 Z
// (37.7 MB) in one round: one stage-1 and one stage-2 launch per expert, tau read once and U
// written once instead of read back and added to. The workspace stays sized by tc_z_budget().
#ifdef CAMEX_TC_Z_BUDGET
inline int64_t tc_z_lent_budget() { return 2 * CAMEX_TC_Z_BUDGET; }
#elif defined(CAMEX_EMU)
// Tests: twice the scratch's budget, so that a lent buffer changes the rounds there too.
inline int64_t tc_z_lent_budget() { return ::emu::counting() ? 40ll << 20 : 6000; }
#else
inline int64_t tc_z_lent_budget() { return 40ll << 20; }
#endif
// esize: bytes per element of Z (4, or 2 for the forward's bf16 Z: FwdZ); budget: Z's bytes per
// round (tc_z_budget(), the scratch's, unless a caller lends more).
inline int64_t kron_tc_rank_chunk(const D4 &d4, int64_t r, int64_t esize = 4, int64_t budget = -1) {
  const int64_t o = d4.d[0] * d4.d[1], i = d4.d[2] * d4.d[3];
  const int64_t per_rank = slab_plane(i, o) * esize;
  int64_t c = (budget < 0 ? tc_z_budget() : budget) / per_rank;
  if (c < 1) c = 1;
  if (c > r) c = r;
  if (c > 65535) c = 65535;  // a plain bound: ranks index no grid dimension (stage 1: a block per slab)
  return c;
}

// Bytes of the stage-1 intermediate Z: kron_tc_rank_chunk ranks of [slabs][O][8], for whichever
// element size needs more (the workspace is sized before the path and dtype's Z are known).
inline int64_t kron_tc_z_bytes(const D4 &d4, int64_t r) {
  const int64_t o = d4.d[0] * d4.d[1], i = d4.d[2] * d4.d[3];
  const int64_t b4 = kron_tc_rank_chunk(d4, r, 4) * slab_plane(i, o) * 4;
  const int64_t b2 = kron_tc_rank_chunk(d4, r, 2) * slab_plane(i, o) * 2;
  return b4 > b2 ? b4 : b2;
}

// u (f32 [O*I], overwritten) = the curvature of expert `expert` (tau = w - e); z: room for Z, zbytes
// of it (kron_tc_z_bytes where -1: the scratch, rounds of tc_z_budget()); lim: tc_smem_limit(),
// which kron_tc_fits checked the layouts against. ut (may be null): the last round writes U to ut
// in storage T instead of to u (which then holds only the earlier rounds' sum, if any).
template <typename T>
inline int kron_forward_tc(cudaStream_t s, float *u, const T *w, const T *e, const KronFactors &f, int64_t expert,
                           const D4 &d4, void *z, int64_t zbytes, int64_t lim, T *ut = nullptr) {
  const int o1 = (int)d4.d[0], o2 = (int)d4.d[1], i1 = (int)d4.d[2], i2 = (int)d4.d[3];
  const int64_t O = (int64_t)o1 * o2, I = (int64_t)i1 * i2;
  using P = FwdPrec<T>;
  const int resident = rows_resident(o1, o2, P::split(), lim) ? 1 : 0;
  // The pipelined layouts where they fit (cols_pipe, rows_pipe); cp.async also needs 16-byte
  // aligned sources: Z's buffer and the factor tensors.
  const bool aligned = ((reinterpret_cast<uintptr_t>(z) | reinterpret_cast<uintptr_t>(f.a) |
                         reinterpret_cast<uintptr_t>(f.b) | reinterpret_cast<uintptr_t>(f.c) |
                         reinterpret_cast<uintptr_t>(f.d)) & 15) == 0;
  const int rpipe = aligned && rows_pipe(o1, o2, P::split(), resident != 0, lim) ? 1 : 0;
  const int pipe = aligned && cols_pipe(i1, i2, P::split(), lim) ? 1 : 0;
  const RowsLayout rl = rows_layout(o1, o2, P::split(), resident != 0, rpipe != 0);
  const ColsLayout cl = cols_layout(i1, i2, P::split(), pipe != 0);
  // The opt-in is a process-wide attribute of each kernel: always the device's limit (>= every size
  // kron_tc_fits accepts), so concurrent calls with other shapes cannot lower it under a launch.
  cudaError_t err = CAMEX_SET_MAX_SMEM(kron_rows_kernel<T>, lim);
  if (err != cudaSuccess) return (int)err;
  err = CAMEX_SET_MAX_SMEM(kron_cols_kernel<T>, lim);
  if (err != cudaSuccess) return (int)err;
  FwdZ<T> *zt = static_cast<FwdZ<T> *>(z);
  const int64_t chunk = kron_tc_rank_chunk(d4, f.r, sizeof(FwdZ<T>), zbytes);
  for (int64_t r0 = 0; r0 < f.r; r0 += chunk) {
    const int64_t nr = f.r - r0 < chunk ? f.r - r0 : chunk;
    CAMEX_LAUNCH_SMEM(kron_rows_kernel<T>, (unsigned)((I + TC_QC - 1) / TC_QC), TC_THREADS, rl.bytes, s)(
        w, e, reinterpret_cast<const T *>(f.a), reinterpret_cast<const T *>(f.b), zt, o1, o2, I, f.n, expert, r0, nr,
        resident, TauPlanes{}, rpipe);
    CAMEX_CHECK_LAUNCH();
    const unsigned g2 = (unsigned)((O + cl.pr - 1) / cl.pr);
    CAMEX_LAUNCH_SMEM(kron_cols_kernel<T>, g2, TC_THREADS, cl.bytes, s)(
        zt, reinterpret_cast<const T *>(f.c), reinterpret_cast<const T *>(f.d), u, r0 + nr < f.r ? nullptr : ut, o1, i1,
        i2, O, r0, nr, f.n, expert, r0 > 0 ? 1 : 0, pipe);
    CAMEX_CHECK_LAUNCH();
  }
  return 0;
}

// Where the tensor-core chain (forward and backward) keeps Z and how many ranks go in one round:
// `lent` (lent_bytes; may be null), room the caller does not use meanwhile (the CA-merge forward's
// merged output, free until its epilogue; half of the backward's H buffer), where that makes the
// rounds larger (up to tc_z_lent_budget()), at no cost in memory; else the scratch (zbytes -1:
// rounds of tc_z_budget()). esize: bytes per element of Z (FwdZ, or BwdZ's planes).
struct TcZPlace {
  void *lent;
  int64_t zbytes, chunk;
};
inline TcZPlace tc_z_place(const D4 &d4, int64_t r, int64_t esize, void *lent, int64_t lent_bytes) {
  const int64_t cap = lent_bytes < tc_z_lent_budget() ? lent_bytes : tc_z_lent_budget();
  const int64_t own = kron_tc_rank_chunk(d4, r, esize), more = lent ? kron_tc_rank_chunk(d4, r, esize, cap) : 0;
  return more > own ? TcZPlace{lent, cap, more} : TcZPlace{nullptr, -1, own};
}

// Whether kron_forward_any takes the tensor-core forward for storage T at d4: switched on for this
// thread, factors small enough, and the blocks' shared memory within the device's limit (*lim,
// where given, set when the first two hold), as kron_tc_bwd_taken for the backward.
template <typename T> inline bool kron_tc_fwd_taken(const D4 &d4, int64_t *lim = nullptr) {
  if constexpr (is_half_type<T>::value) {
    if (!camex_tensor_cores() || !kron_tc_dims_ok(d4)) return false;
    const int64_t l = tc_smem_limit();
    if (lim) *lim = l;
    return kron_tc_fits(d4, FwdPrec<T>::split(), l);
  } else {
    return false;
  }
}

// The forward chain of one expert on whichever path takes it: u (f32, overwritten) = M_e(w - base).
// s1, s2: the scratch of kron_scratch_floats (the tensor-core path keeps Z there, or in `lent`:
// tc_z_place). ut (may be null): where the tensor-core path takes it, U goes to ut in storage T
// instead (its last round's output; u holds the earlier rounds' f32 sum), and *stored says so.
template <typename T>
inline int kron_forward_any(cudaStream_t s, float *u, const T *base, const T *w, const KronFactors &f, int64_t expert,
                            const D4 &d4, float *s1, float *s2, void *lent = nullptr, int64_t lent_bytes = 0,
                            T *ut = nullptr, bool *stored = nullptr) {
  if (stored) *stored = false;
  if constexpr (is_half_type<T>::value) {
    int64_t lim = 0;
    if (kron_tc_fwd_taken<T>(d4, &lim)) {
      const TcZPlace zp = tc_z_place(d4, f.r, sizeof(FwdZ<T>), lent, lent_bytes);
      if (stored) *stored = ut != nullptr;
      return kron_forward_tc<T>(s, u, w, base, f, expert, d4, zp.lent ? zp.lent : s1, zp.zbytes, lim, ut);
    }
  }
  return kron_forward<T>(s, u, tau_opnd<T>(w, base), f, expert, d4, s1, s2);
}

// Floats of Kronecker scratch per call: `buffers` expert-sized f32 buffers for the scalar path (the
// forward's s1, s2 = s1 + O*I; the backward's t1 alone), or Z for the tensor-core path, whichever is
// larger. Sized on the dimensions alone (not the device or the thread's switch) so that it fits
// whichever path a launch then takes.
inline int64_t kron_scratch_floats(int dtype, const D4 &d4, int64_t r, int64_t buffers = 2) {
  int64_t f = buffers * d4.total();
  if ((dtype == CAMEX_F16 || dtype == CAMEX_BF16) && kron_tc_dims_ok(d4)) {
    const int64_t zf = (kron_tc_z_bytes(d4, r) + 3) / 4;
    if (zf > f) f = zf;
  }
  return f;
}

}  // namespace camex
