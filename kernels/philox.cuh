// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11) and the DARE keep draw of SPEC section 3.
// Bit-identical to src/philox.rs: same constants, same round structure, same counter layout
// (e low, e high, stream, 0) and key (seed low, seed high). Checked on the GPU by the known-answer
// test in tests/gpu.rs (through camex_philox_test).
#pragma once
#include <stdint.h>

namespace camex {

struct Philox4 { uint32_t x[4]; };

__host__ __device__ __forceinline__ Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                            uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) { k0 += W0; k1 += W1; }
    uint64_t p0 = (uint64_t)M0 * c0;
    uint64_t p1 = (uint64_t)M1 * c2;
    uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
  }
  Philox4 r;
  r.x[0] = c0; r.x[1] = c1; r.x[2] = c2; r.x[3] = c3;
  return r;
}

// First output word for element counter e on `stream` (STREAM_ELEMENT = 0, STREAM_EXPERT = 1).
__host__ __device__ __forceinline__ uint32_t philox_draw(uint64_t seed, uint64_t e, uint32_t stream) {
  return philox4x32_10((uint32_t)e, (uint32_t)(e >> 32), stream, 0u, (uint32_t)seed, (uint32_t)(seed >> 32)).x[0];
}

// zeta for one (g, i[, p, q]): scale when kept, 0 when dropped, 1 without DARE.
__device__ __forceinline__ float dare_zeta(const camex_dare &d, int64_t g, int64_t i, int64_t n, int64_t oi, int64_t q) {
  if (d.kind == CAMEX_DARE_NONE) return 1.f;
  uint64_t e;
  uint32_t stream;
  if (d.kind == CAMEX_DARE_EXPERT) {
    e = (uint64_t)(g * n + i);
    stream = 1u;
  } else {
    e = (uint64_t)(g * n + i) * (uint64_t)oi + (uint64_t)q;  // ((g*N + i)*O + p)*I + q with q = p*I + q
    stream = 0u;
  }
  return philox_draw(d.seed, e, stream) >= d.threshold ? (float)d.scale : 0.f;
}

}  // namespace camex
