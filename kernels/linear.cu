// Family `linear`: y[g,t,:] = Wbar_g x[g,t,:] + bbar_g and its reverse, one tiled GEMM per group
// (gemm.cuh, batched over g).
//
// Cost model (why merged is materialised rather than fused into the GEMM): at T5-base `wi`
// (G = 16, T = 128, O = 3072, I = 768) writing and re-reading merged [G, O, I] moves
// 2 * G*O*I = 75.5 M elements (151 MB in bf16, ~0.03 ms at H200's ~4.8 TB/s), while the linear
// itself is 2*G*T*O*I = 9.7 GFLOP. Recomputing Wbar tiles inside the GEMM instead would redo
// the N-expert weighted sum for every T tile it is used in (N+1 weights read per tile), which costs
// more traffic than it saves as soon as more than one token tile exists per group. So merged is
// written once by the merge epilogue and read here; the GEMM dominates.
//
// Scalar f32 FMA, no tensor cores yet (45x its bf16 floor at T5-base, BENCHMARKS.md).
#include "elementwise.cuh"
#include "kron.cuh"

using namespace camex;

namespace {

// grad_bias[g][o] = sum_t dy[g][t][o], t in order.
template <typename T> __global__ void bias_grad_kernel(const T *dy, T *out, int64_t g, int64_t t, int64_t o) {
  CAMEX_GRID_STRIDE(k, g * o) {
    const int64_t gg = k / o, oo = k % o;
    float s = 0.f;
    for (int64_t tt = 0; tt < t; ++tt) s += to_f32(dy[(gg * t + tt) * o + oo]);
    out[k] = from_f32<T>(s);
  }
}

template <typename T> int linear_forward_t(const camex_linear_params &p, cudaStream_t s) {
  // y[g] [T x O] = x[g] [T x I] @ merged[g]^T [I x O] (+ bias[g] per column o)
  Opnd a = with_strides(store_opnd<T>(ptr<const T>(p.x)), p.t * p.i, p.i, 1);
  Opnd b = with_strides(store_opnd<T>(ptr<const T>(p.merged)), p.o * p.i, 1, p.i);
  OutView out = store_out<T>(ptr<T>(p.y), false);
  out.sb = p.t * p.o; out.sr = p.o; out.sc = 1;
  out.bias = ptr<const T>(p.merged_bias);
  out.bias_sb = p.o;
  return gemm<T>(s, a, b, out, p.t, p.o, p.i, p.g);
}

template <typename T> int linear_backward_t(const camex_linear_params &p, cudaStream_t s) {
  const T *dy = ptr<const T>(p.grad_y);
  {  // grad_x[g] [T x I] = dy[g] [T x O] @ merged[g] [O x I]
    Opnd a = with_strides(store_opnd<T>(dy), p.t * p.o, p.o, 1);
    Opnd b = with_strides(store_opnd<T>(ptr<const T>(p.merged)), p.o * p.i, p.i, 1);
    OutView out = store_out<T>(ptr<T>(p.grad_x), false);
    out.sb = p.t * p.i; out.sr = p.i; out.sc = 1;
    CAMEX_TRY(gemm<T>(s, a, b, out, p.t, p.i, p.o, p.g));
  }
  {  // grad_merged[g] [O x I] = dy[g]^T [O x T] @ x[g] [T x I]
    Opnd a = with_strides(store_opnd<T>(dy), p.t * p.o, 1, p.o);
    Opnd b = with_strides(store_opnd<T>(ptr<const T>(p.x)), p.t * p.i, p.i, 1);
    OutView out = store_out<T>(ptr<T>(p.grad_merged), false);
    out.sb = p.o * p.i; out.sr = p.i; out.sc = 1;
    CAMEX_TRY(gemm<T>(s, a, b, out, p.o, p.i, p.t, p.g));
  }
  if (p.grad_merged_bias) {
    CAMEX_LAUNCH(bias_grad_kernel<T>, grid_for(p.g * p.o, 256), 256, s)(dy, ptr<T>(p.grad_merged_bias), p.g, p.t, p.o);
    CAMEX_CHECK_LAUNCH();
  }
  return 0;
}

bool bad(const camex_linear_params *p) { return p->g <= 0 || p->t <= 0 || p->o <= 0 || p->i <= 0 || p->g > 65535; }

}  // namespace

extern "C" int camex_linear_forward(const camex_linear_params *p, camex_stream_t stream) {
  if (bad(p)) return CAMEX_ERR_DIMS;
  CAMEX_DISPATCH(p->dtype, linear_forward_t, *p, (cudaStream_t)stream);
}

extern "C" int camex_linear_backward(const camex_linear_params *p, camex_stream_t stream) {
  if (bad(p)) return CAMEX_ERR_DIMS;
  CAMEX_DISPATCH(p->dtype, linear_backward_t, *p, (cudaStream_t)stream);
}
