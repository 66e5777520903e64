// Probes: tiny kernels whose results and costs are known in closed form, for the tests of the
// emulation's counters and of its ldmatrix / cp.async model (tests/emu_counters.rs). They are built
// for the GPU too, where the same tests can run them.
#include "ldst.cuh"

using namespace camex;

// ---- the counters ----
// One warp: every lane copies the 4-byte (width 4), 8-byte or 16-byte word at element lane * stride
// of a shared array (filled from `src` first) to dst[lane], and that of `src` to dst[32 + lane]
// (whole words, so that the host compiler moves each in one access, as nvcc does). Its counts are
// known in closed form.
namespace {
template <int W> struct Vec;
template <> struct Vec<4> { using T = float; };
template <> struct Vec<8> { using T = float2; };
template <> struct Vec<16> { using T = float4; };

template <int W> __global__ void counter_probe_kernel(const float *src, float *dst, int stride) {
  using V = typename Vec<W>::T;
  __shared__ V sh[32 * 33];
  const int lane = threadIdx.x;
  const V *s = reinterpret_cast<const V *>(src);
  V *d = reinterpret_cast<V *>(dst);
  for (int k = lane; k < 32 * 33; k += 32) sh[k] = s[k];
  __syncthreads();
  d[lane] = sh[lane * stride];
  d[32 + lane] = s[lane * stride];
}
}  // namespace

// width: 4, 8 or 16 bytes; stride in elements of that width (at most 33); src: 32 * 33 elements.
extern "C" int camex_counter_probe(int32_t width, int32_t stride, uint64_t src, uint64_t dst, camex_stream_t stream) {
  if (stride < 0 || stride > 33) return CAMEX_ERR_DIMS;
  const float *s = ptr<const float>(src);
  float *d = ptr<float>(dst);
  cudaStream_t st = (cudaStream_t)stream;
  switch (width) {
    case 4: CAMEX_LAUNCH(counter_probe_kernel<4>, 1, 32, st)(s, d, stride); break;
    case 8: CAMEX_LAUNCH(counter_probe_kernel<8>, 1, 32, st)(s, d, stride); break;
    case 16: CAMEX_LAUNCH(counter_probe_kernel<16>, 1, 32, st)(s, d, stride); break;
    default: return CAMEX_ERR_DIMS;
  }
  CAMEX_CHECK_LAUNCH();
  return 0;
}

// ---- ldmatrix and cp.async ----
// One warp: a 16 x 16 tile of 16-bit values (row-major in `src`) lands in shared memory through
// cp.async (lane l copies row l / 2, columns 8 (l % 2)..+7; the tile is zeroed first), then one
// ldmatrix.x4 (matrix m: rows 8 (m % 2).., columns 8 (m / 2)..) gives each lane four 32-bit words,
// written to dst[4 lane + m]. wait = 0 leaves out the cp.async wait: the tile is then still zero.
namespace {
template <bool TRANS> __global__ void ldst_probe_kernel(const uint16_t *src, uint32_t *dst, int wait) {
  __shared__ __align__(16) uint16_t tile[16][24];  // rows 48 bytes apart: conflict-free ldmatrix
  const int lane = threadIdx.x, row = lane / 2, col = 8 * (lane % 2);
  *reinterpret_cast<uint4 *>(&tile[row][col]) = make_uint4(0, 0, 0, 0);
  __syncthreads();
  cp_async_16(&tile[row][col], src + row * 16 + col);
  cp_async_commit();
  if (wait) cp_async_wait<0>();
  __syncthreads();
  const int m = lane / 8, r = lane % 8;
  uint32_t d[4];
  ldmatrix_x4<TRANS>(d, &tile[8 * (m % 2) + r][8 * (m / 2)]);
  *reinterpret_cast<uint4 *>(dst + 4 * lane) = make_uint4(d[0], d[1], d[2], d[3]);
}
}  // namespace

extern "C" int camex_ldst_probe(int32_t trans, int32_t wait, uint64_t src, uint64_t dst, camex_stream_t stream) {
  const uint16_t *s = ptr<const uint16_t>(src);
  uint32_t *d = ptr<uint32_t>(dst);
  cudaStream_t st = (cudaStream_t)stream;
  if (trans) CAMEX_LAUNCH(ldst_probe_kernel<true>, 1, 32, st)(s, d, wait);
  else CAMEX_LAUNCH(ldst_probe_kernel<false>, 1, 32, st)(s, d, wait);
  CAMEX_CHECK_LAUNCH();
  return 0;
}

// ---- what the GPU faults on, and races ----
// One block of 64 threads. kind 0: lane 0 loads the float of `src` at byte offset `offset` (a
// misaligned load where offset % 4 != 0, one past the end of src's allocation where it is that
// long; the host's own 16-byte vector loads would fault on the CPU first); kind 1: warp 0's ldmatrix.x4 with its rows
// `offset` bytes past 16-byte boundaries of a shared tile; kind 2: lane 0's 16-byte cp.async into
// a shared tile at byte offset `offset`; kind 3 (a race, on purpose): thread 63 stores 1 to a shared
// word that thread 0 reads with no barrier between them, and dst[0] gets what thread 0 read (the
// word starts at 0, so 0 or 1 by who ran first); kind 6: warp 0's lanes diverge at two different
// warp collectives, lanes 0-15 at __syncwarp and 16-31 at an ldmatrix.x4 (undefined on a GPU); kind
// 7: thread 0 stores and loads the int at byte offset `offset` of the launch's 1 KiB of dynamic
// shared memory (past it where offset > 1020).
// Only the emulation runs kinds 0-2 with a bad offset, and kind 6: on a GPU they fail the launch and
// spoil the context (or hang).
namespace {
// Instance K of one kernel: 1 is launched without an opt-in, 2 with one (an opt-in is per kernel).
template <int K> __global__ void fault_probe_kernel(int kind, int offset, const char *src, float *dst) {
  __shared__ __align__(16) uint16_t tile[32 * 24];
  __shared__ int word;
  const int t = threadIdx.x, lane = t & 31;
  if (t == 0) word = 0;
  for (int k = t; k < 32 * 24; k += blockDim.x) tile[k] = 0;
  __syncthreads();
  if (kind == 0 && t == 0) {
    dst[0] = *reinterpret_cast<const float *>(src + offset);
  } else if (kind == 1 && t < 32) {
    uint32_t d[4];
    ldmatrix_x4<false>(d, reinterpret_cast<const char *>(&tile[lane * 24]) + offset);
    dst[lane] = __uint_as_float(d[0]);
  } else if (kind == 2 && t == 0) {
    cp_async_16(reinterpret_cast<char *>(tile) + offset, src);
    cp_async_commit();
    cp_async_wait<0>();
    dst[0] = (float)tile[0];
  } else if (kind == 3) {
    if (t == 63) *reinterpret_cast<volatile int *>(&word) = 1;
    if (t == 0) dst[0] = (float)*reinterpret_cast<volatile int *>(&word);
  } else if (kind == 7 && t == 0) {
    CAMEX_DYNAMIC_SMEM(dyn);
    *reinterpret_cast<volatile int *>(dyn + offset) = 1;
    dst[0] = (float)*reinterpret_cast<volatile int *>(dyn + offset);
  } else if (kind == 6 && t < 32) {
    if (lane < 16) {
      __syncwarp();
    } else {
      uint32_t d[4];
      ldmatrix_x4<false>(d, &tile[lane * 24]);
      dst[lane] = __uint_as_float(d[0]);
    }
  }
}
}  // namespace

// kind and offset: as fault_probe_kernel says (kinds 0-3, 6 and 7), or kind 4: a launch with 64 KiB of
// dynamic shared memory and no opt-in (refused), kind 5: the same after the opt-in (runs kind 3's
// code); src: at least offset + 16 bytes (kind 0: offset + 4, or fewer on purpose), dst 32 floats.
extern "C" int camex_fault_probe(int32_t kind, int32_t offset, uint64_t src, uint64_t dst, camex_stream_t stream) {
  if (kind < 0 || kind > 7 || offset < 0 || offset > (kind == 0 || kind == 7 ? 4096 : 64)) return CAMEX_ERR_DIMS;
  cudaStream_t st = (cudaStream_t)stream;
  const char *s = ptr<const char>(src);
  float *d = ptr<float>(dst);
  constexpr int64_t big = 64 * 1024;
  if (kind == 4) {
    CAMEX_LAUNCH_SMEM(fault_probe_kernel<1>, 1, 64, big, st)(3, offset, s, d);
  } else if (kind == 5) {
    const cudaError_t e = CAMEX_SET_MAX_SMEM(fault_probe_kernel<2>, big);
    if (e != cudaSuccess) return (int)e;
    CAMEX_LAUNCH_SMEM(fault_probe_kernel<2>, 1, 64, big, st)(3, offset, s, d);
  } else if (kind == 7) {
    CAMEX_LAUNCH_SMEM(fault_probe_kernel<3>, 1, 64, 1024, st)(kind, offset, s, d);
  } else {
    CAMEX_LAUNCH(fault_probe_kernel<0>, 1, 64, st)(kind, offset, s, d);
  }
  CAMEX_CHECK_LAUNCH();
  return 0;
}
