// A plain, obviously-correct strided batched GEMM in f32 (scalar FMA, no tensor cores):
//   C[b][m][n] = alpha * sum_k A[b][m][k] * B[b][k][n]  (+ C_old) (+ bias[b][n])
// with every operand addressed by (batch, row, col) element strides. Strides turn the mode
// products of the Kronecker curvature, their transposes, the factor-gradient contractions and the
// merged linear layer into one kernel, so only one tiled kernel has to be right.
//
// Operands are read from f32 scratch, from storage-dtype tensors, or as tau = W - E computed on
// the fly from two storage tensors (the domain vector is never materialised).
//
// Split-K: with `splits` > 1 each (batch, split) block column writes its own f32 partial tile and
// reduce_partials() sums them in a fixed order (deterministic, no atomics).
#pragma once
#include "mma.cuh"

namespace camex {

enum OpKind { OP_F32 = 0, OP_STORE = 1, OP_TAU = 2 };

// An operand view: element (b, r, c) lives at b*sb + r*sr + c*sc.
struct Opnd {
  const void *p;     // f32 or storage T (OP_TAU: the expert W)
  const void *base;  // OP_TAU only: E, same strides as p
  int kind;
  int64_t sb, sr, sc;
};

struct OutView {
  void *p;
  int f32;           // 1: float, 0: storage T
  int accumulate;    // C += result
  int64_t sb, sr, sc;
  const void *bias;  // storage T, bias[b*bias_sb + n], or null
  int64_t bias_sb;
};

template <typename T>
__device__ __forceinline__ float opnd_ld(const Opnd &o, int64_t off) {
  switch (o.kind) {
    case OP_F32: return reinterpret_cast<const float *>(o.p)[off];
    case OP_STORE: return to_f32(reinterpret_cast<const T *>(o.p)[off]);
    default: return to_f32(reinterpret_cast<const T *>(o.p)[off]) - to_f32(reinterpret_cast<const T *>(o.base)[off]);
  }
}

// One output element of a GEMM tile: to the split-K partials, or alpha * v (+ old) (+ bias) to `out`.
template <typename T>
__device__ __forceinline__ void gemm_store(const OutView &out, float *partial, int to_partial, int64_t z, int64_t bi,
                                           int64_t gm, int64_t gn, int64_t M, int64_t N, float alpha, float acc) {
  if (to_partial) {
    partial[(z * M + gm) * N + gn] = acc;
    return;
  }
  float v = alpha * acc;
  const int64_t off = bi * out.sb + gm * out.sr + gn * out.sc;
  if (out.f32) {
    float *o = reinterpret_cast<float *>(out.p);
    if (out.accumulate) v += o[off];
    if (out.bias) v += to_f32(reinterpret_cast<const T *>(out.bias)[bi * out.bias_sb + gn]);
    o[off] = v;
  } else {
    T *o = reinterpret_cast<T *>(out.p);
    if (out.accumulate) v += to_f32(o[off]);
    if (out.bias) v += to_f32(reinterpret_cast<const T *>(out.bias)[bi * out.bias_sb + gn]);
    o[off] = from_f32<T>(v);
  }
}

constexpr int GEMM_BM = 64, GEMM_BN = 64, GEMM_BK = 16, GEMM_THREADS = 256;

// Where one block of a GEMM launch works: grid x = N tiles, y = M tiles, z = batch * splits.
struct GemmBlock {
  int64_t m0, n0, z, bi, k_begin, k_end, a_off, b_off;
  bool a_kfast, b_nfast;
  __device__ __forceinline__ GemmBlock(const Opnd &a, const Opnd &b, int64_t K, int splits, int64_t k_per_split) {
    m0 = (int64_t)blockIdx.y * GEMM_BM;
    n0 = (int64_t)blockIdx.x * GEMM_BN;
    z = blockIdx.z;
    bi = z / splits;
    k_begin = (z % splits) * k_per_split;
    k_end = min(K, k_begin + k_per_split);
    a_off = bi * a.sb;
    b_off = bi * b.sb;
    // Thread-to-element maps chosen so that the unit-stride dimension is the fast one (coalescing).
    a_kfast = (a.sc == 1);
    b_nfast = (b.sc == 1) || (b.sr != 1);
  }

  // Reads the BM x BK tile of A and the BK x BN tile of B at depth k0 (zero outside the matrices)
  // and hands each value to put_a(m, k, v) / put_b(n, k, v).
  template <typename T, typename PA, typename PB>
  __device__ __forceinline__ void load(const Opnd &a, const Opnd &b, int64_t M, int64_t N, int64_t k0, PA put_a,
                                       PB put_b) const {
    const int tid = threadIdx.x;
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int idx = tid + l * GEMM_THREADS;
      int mm, kk;
      if (a_kfast) { kk = idx % GEMM_BK; mm = idx / GEMM_BK; }
      else { mm = idx % GEMM_BM; kk = idx / GEMM_BM; }
      const int64_t gm = m0 + mm, gk = k0 + kk;
      put_a(mm, kk, (gm < M && gk < k_end) ? opnd_ld<T>(a, a_off + gm * a.sr + gk * a.sc) : 0.f);
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int idx = tid + l * GEMM_THREADS;
      int nn, kk;
      if (b_nfast) { nn = idx % GEMM_BN; kk = idx / GEMM_BN; }
      else { kk = idx % GEMM_BK; nn = idx / GEMM_BK; }
      const int64_t gn = n0 + nn, gk = k0 + kk;
      put_b(nn, kk, (gn < N && gk < k_end) ? opnd_ld<T>(b, b_off + gk * b.sr + gn * b.sc) : 0.f);
    }
  }
};

// grid: x = N tiles, y = M tiles, z = batch * splits (z = b * splits + s).
// to_partial: the output goes to `partial` [z][M][N] (f32, unscaled) instead of `out`.
template <typename T>
__global__ void __launch_bounds__(GEMM_THREADS)
gemm_kernel(Opnd a, Opnd b, OutView out, float *partial, int64_t M, int64_t N, int64_t K, int splits,
            int64_t k_per_split, int to_partial, float alpha) {
  __shared__ float As[GEMM_BK][GEMM_BM + 4];
  __shared__ float Bs[GEMM_BK][GEMM_BN + 4];
  const GemmBlock blk(a, b, K, splits, k_per_split);
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = blk.k_begin; k0 < blk.k_end; k0 += GEMM_BK) {
    blk.load<T>(a, b, M, N, k0, [&](int mm, int kk, float v) { As[kk][mm] = v; },
                [&](int nn, int kk, float v) { Bs[kk][nn] = v; });
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < GEMM_BK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gm = blk.m0 + ty + 16 * i;
    if (gm >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gn = blk.n0 + tx + 16 * j;
      if (gn < N) gemm_store<T>(out, partial, to_partial, blk.z, blk.bi, gm, gn, M, N, alpha, acc[i][j]);
    }
  }
}

// The same GEMM on the tensor cores, for f16/bf16 storage (opt-in: camex_tensor_cores(), camex.h).
// Same tiles, grid, operand loads and output; operands in
// shared memory as bf16 (k-contiguous, row stride BK + 8), f32 accumulation. Precision per storage
// type (TcSplit, mma.cuh; SPEC section 5): where T splits data, each operand is bf16 hi + lo and
// each 16-deep slice three mma.sync m16n8k16 (hi*hi + hi*lo + lo*hi, ~16 significant bits), except
// for bf16 storage operands alone, which are exact in hi (one mma); otherwise one mma, and no lo
// arrays in shared memory. The Kronecker chain's f32 intermediates (kron.cuh, factors over 64) keep
// the split: single-pass there put a 1 x 1 factor's gradient at 0.88 of bound 2 (rel_err 8.8e-3,
// E_off 8.8e-3; tests/gpu.rs emu_kron_chain_on_tensor_cores, [N, O, I] = [2, 67, 80]), against
// 0.17 with it. 8 warps as 4 (rows) x 2 (columns), 16 x 32 outputs each.
template <typename T>
__global__ void __launch_bounds__(GEMM_THREADS)
gemm_tc_kernel(Opnd a, Opnd b, OutView out, float *partial, int64_t M, int64_t N, int64_t K, int splits,
               int64_t k_per_split, int to_partial, float alpha) {
  constexpr int LK = GEMM_BK + 8;
  static_assert(GEMM_BM == GEMM_BN, "one tile size for both operands");
  constexpr int TILE = GEMM_BM * LK;
  // Ah, Bh, then (only where T splits data) Al, Bl.
  __shared__ __align__(16) MmaT sm[(data_lo<T>() ? 4 : 2) * TILE];
  MmaT *Ah = sm, *Bh = sm + TILE;
  MmaT *Al = data_lo<T>() ? sm + 2 * TILE : nullptr, *Bl = data_lo<T>() ? sm + 3 * TILE : nullptr;
  const GemmBlock blk(a, b, K, splits, k_per_split);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp & 3, wn = warp >> 2;
  // bf16 storage operands are exact in hi (lo = 0): when neither operand is f32 or tau (the merged
  // linear layer and its gradients), one mma per product gives the same bits as three. Uniform
  // over the block, so no divergence.
  const bool split = data_lo<T>() && !(std::is_same<T, __nv_bfloat16>::value && a.kind == OP_STORE && b.kind == OP_STORE);

  float acc[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  for (int64_t k0 = blk.k_begin; k0 < blk.k_end; k0 += GEMM_BK) {
    const auto put = [&](MmaT *hi, MmaT *lo, int64_t at, float v) {
      if (split) split_store(hi, lo, at, v);
      else hi[at] = from_f32<MmaT>(v);
    };
    blk.load<T>(a, b, M, N, k0, [&](int mm, int kk, float v) { put(Ah, Al, mm * LK + kk, v); },
                [&](int nn, int kk, float v) { put(Bh, Bl, nn * LK + kk, v); });
    __syncthreads();
    uint32_t ah[4], al[4];
    frag_a(ah, Ah, LK, wm * 16, 0, lane);
    if (split) frag_a(al, Al, LK, wm * 16, 0, lane);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      uint32_t bh[2], bl[2];
      frag_b(bh, Bh, LK, wn * 32 + nt * 8, 0, lane);
      mma_bf16(acc[nt], ah, bh);
      if (split) {
        frag_b(bl, Bl, LK, wn * 32 + nt * 8, 0, lane);
        mma_bf16(acc[nt], ah, bl);
        mma_bf16(acc[nt], al, bh);
      }
    }
    __syncthreads();
  }

  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t gm = blk.m0 + wm * 16 + g + 8 * h;
      if (gm >= M) continue;
#pragma unroll
      for (int v = 0; v < 2; ++v) {
        const int64_t gn = blk.n0 + wn * 32 + nt * 8 + 2 * t + v;
        if (gn < N) gemm_store<T>(out, partial, to_partial, blk.z, blk.bi, gm, gn, M, N, alpha, acc[nt][2 * h + v]);
      }
    }
}

// gemm_kernel or, for f16/bf16 storage with the tensor cores switched on, gemm_tc_kernel.
template <typename T>
inline int gemm_launch(cudaStream_t s, dim3 grid, const Opnd &a, const Opnd &b, const OutView &out, float *partial,
                       int64_t M, int64_t N, int64_t K, int splits, int64_t kps, int to_partial, float alpha) {
  if constexpr (is_half_type<T>::value) {
    if (camex_tensor_cores()) {
      CAMEX_LAUNCH(gemm_tc_kernel<T>, grid, GEMM_THREADS, s)(a, b, out, partial, M, N, K, splits, kps, to_partial, alpha);
      CAMEX_CHECK_LAUNCH();
      return 0;
    }
  }
  CAMEX_LAUNCH(gemm_kernel<T>, grid, GEMM_THREADS, s)(a, b, out, partial, M, N, K, splits, kps, to_partial, alpha);
  CAMEX_CHECK_LAUNCH();
  return 0;
}

// out[m][n] (strides of `out`, batch 0) = alpha * sum_{z < Z} partial[z][m][n], z in order.
template <typename T>
__global__ void reduce_partials_kernel(const float *partial, int64_t Z, int64_t M, int64_t N, OutView out, float alpha) {
  const int64_t total = M * N;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int64_t z = 0; z < Z; ++z) s += partial[z * total + k];
    const int64_t m = k / N, n = k % N;
    const int64_t off = m * out.sr + n * out.sc;
    float v = alpha * s;
    if (out.f32) {
      float *o = reinterpret_cast<float *>(out.p);
      if (out.accumulate) v += o[off];
      o[off] = v;
    } else {
      T *o = reinterpret_cast<T *>(out.p);
      if (out.accumulate) v += to_f32(o[off]);
      o[off] = from_f32<T>(v);
    }
  }
}

// Plain launch: C[b] = alpha * A[b] @ B[b] (+...), batch <= 65535, M/64 <= 65535.
template <typename T>
inline int gemm(cudaStream_t s, const Opnd &a, const Opnd &b, const OutView &out, int64_t M, int64_t N, int64_t K,
                int64_t batch, float alpha = 1.f) {
  if (M <= 0 || N <= 0 || batch <= 0) return 0;
  dim3 grid((unsigned)((N + GEMM_BN - 1) / GEMM_BN), (unsigned)((M + GEMM_BM - 1) / GEMM_BM), (unsigned)batch);
  if (grid.y > 65535 || grid.z > 65535) return CAMEX_ERR_DIMS;
  return gemm_launch<T>(s, grid, a, b, out, nullptr, M, N, K, 1, K, 0, alpha);
}

// Split-K plan for a batched product whose batches and K slices are all summed into one [M, N].
struct SumPlan {
  int64_t splits, k_per_split, z;
};

inline SumPlan sum_plan(int64_t K, int64_t batch) {
  // K slices of about 1024 (a multiple of the tile depth); at most 65535 blocks along z.
  int64_t splits = (K + 1023) / 1024;
  if (splits < 1) splits = 1;
  while (splits > 1 && batch * splits > 65535) splits = (splits + 1) / 2;
  int64_t kps = (K + splits - 1) / splits;
  kps = (kps + GEMM_BK - 1) / GEMM_BK * GEMM_BK;
  splits = (K + kps - 1) / kps;
  if (splits < 1) splits = 1;
  SumPlan p;
  p.splits = splits;
  p.k_per_split = kps;
  p.z = batch * splits;
  return p;
}

// out[M][N] = alpha * sum_b A[b] @ B[b], through `partial` (f32, >= plan.z*M*N floats).
template <typename T>
inline int gemm_sum(cudaStream_t s, const Opnd &a, const Opnd &b, const OutView &out, float *partial, int64_t M,
                    int64_t N, int64_t K, int64_t batch, float alpha = 1.f) {
  SumPlan pl = sum_plan(K, batch);
  if (pl.z > 65535) return CAMEX_ERR_DIMS;
  dim3 grid((unsigned)((N + GEMM_BN - 1) / GEMM_BN), (unsigned)((M + GEMM_BM - 1) / GEMM_BM), (unsigned)pl.z);
  CAMEX_TRY(gemm_launch<T>(s, grid, a, b, out, partial, M, N, K, (int)pl.splits, pl.k_per_split, 1, 1.f));
  CAMEX_LAUNCH_WHOLE(reduce_partials_kernel<T>, grid_for(M * N, 256), 256, s)(partial, pl.z, M, N, out, alpha);
  CAMEX_CHECK_LAUNCH();
  return 0;
}

}  // namespace camex
