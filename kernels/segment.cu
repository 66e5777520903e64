// Family `segment`: causal segment scores S[b,0] = R[b,0], S[b,j] = R[b,j-1], and the reverse
// dR[b,j] = dS[b,j+1] for j < J-1, 0 for j = J-1 (SPEC sections 3, 4; src/cpu/segment.rs).
// Pure data movement, exact in every dtype.
#include "elementwise.cuh"

using namespace camex;

namespace {

template <typename T> __global__ void segment_fwd_kernel(const T *r, T *s, int64_t b, int64_t j, int64_t n) {
  CAMEX_GRID_STRIDE(k, b * j * n) {
    const int64_t bb = k / (j * n), jj = (k / n) % j, e = k % n;
    const int64_t src = jj == 0 ? 0 : jj - 1;
    s[k] = r[(bb * j + src) * n + e];
  }
}

template <typename T> __global__ void segment_bwd_kernel(const T *gs, T *gr, int64_t b, int64_t j, int64_t n) {
  CAMEX_GRID_STRIDE(k, b * j * n) {
    const int64_t bb = k / (j * n), jj = (k / n) % j, e = k % n;
    gr[k] = jj + 1 < j ? gs[(bb * j + jj + 1) * n + e] : from_f32<T>(0.f);
  }
}

template <typename T> int segment_forward_t(const camex_segment_params &p, cudaStream_t s) {
  CAMEX_LAUNCH(segment_fwd_kernel<T>, grid_for(p.b * p.j * p.n, 256), 256, s)(ptr<const T>(p.router_scores), ptr<T>(p.scores),
                                                                        p.b, p.j, p.n);
  CAMEX_CHECK_LAUNCH();
  return 0;
}

template <typename T> int segment_backward_t(const camex_segment_params &p, cudaStream_t s) {
  CAMEX_LAUNCH(segment_bwd_kernel<T>, grid_for(p.b * p.j * p.n, 256), 256, s)(ptr<const T>(p.grad_scores),
                                                                        ptr<T>(p.grad_router_scores), p.b, p.j, p.n);
  CAMEX_CHECK_LAUNCH();
  return 0;
}

}  // namespace

extern "C" int camex_segment_forward(const camex_segment_params *p, camex_stream_t stream) {
  if (p->b <= 0 || p->j <= 0 || p->n <= 0) return CAMEX_ERR_DIMS;
  CAMEX_DISPATCH(p->dtype, segment_forward_t, *p, (cudaStream_t)stream);
}

extern "C" int camex_segment_backward(const camex_segment_params *p, camex_stream_t stream) {
  if (p->b <= 0 || p->j <= 0 || p->n <= 0) return CAMEX_ERR_DIMS;
  CAMEX_DISPATCH(p->dtype, segment_backward_t, *p, (cudaStream_t)stream);
}

extern "C" int camex_emulated(void) {
#ifdef CAMEX_EMU
  return 1;
#else
  return 0;
#endif
}

// The CUDA runtime's own names and descriptions of its codes (the emulation build has stand-ins,
// kernels/emu.h); the launchers return these codes and the Rust side prints them.
extern "C" const char *camex_error_name(int code) { return cudaGetErrorName((cudaError_t)code); }
extern "C" const char *camex_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

#ifndef CAMEX_EMU
// The emulation's cost counters (kernels/emu_runtime.cpp); a GPU build has none.
extern "C" int32_t camex_emu_counting(int32_t) { return 0; }
extern "C" int64_t camex_emu_sample_above(int64_t) { return 0; }
extern "C" int64_t camex_emu_smem_limit(int64_t) { return 0; }
extern "C" int32_t camex_emu_reverse_blocks(int32_t) { return 0; }
extern "C" int32_t camex_emu_thread_order(int32_t) { return 0; }
extern "C" void camex_emu_reset(void) {}
extern "C" void camex_emu_register(uint64_t, int64_t, int32_t) {}
extern "C" void camex_emu_track(uint64_t, int64_t, int32_t) {}
extern "C" int64_t camex_emu_launches(camex_emu_launch *, int64_t) { return 0; }
#endif
