//! CAMEx for candle (feature `candle`): the operators as candle custom ops with autograd, the
//! [`CamexLinear`] layer and the CAMEx FFN layer ([`CamexFfn`]).
//!
//! - [`ops`]: `ca_merge` (fused curvature, mask, DARE and merge), `curvature`, `merge` and
//!   `segment_scores` as `CustomOp1/3` ops whose forward and backward call [`crate::cpu`]. candle's
//!   autograd reaches every differentiable input: the Kronecker factors (and, for `ca_merge`, the
//!   scores) travel packed into one flat tensor made by `cat`, whose own backward splits the packed
//!   gradient back onto each of them.
//! - [`checkpoint`]: layers saved to and loaded from safetensors (candle-nn's `VarMap`), and a
//!   CAMEx FFN upcycled from a dense FFN checkpoint file.
//! - [`layer`]: [`CamexLinear`], the router (noisy top-k softmax), per-sequence or causal-segment
//!   routing, the load-balancing loss, [`CamexFfn`], [`DenseFfn`] and upcycling (SPEC section 6).
//!
//! Device support: on the CPU the forward and backward run the CPU operators ([`crate::cpu`]). On a
//! CUDA device (features `candle` and `cuda`; candle's own `cuda` feature comes with them) they run
//! the crate's fused kernels (`camex::cuda`) on the device's stream, in f32, f16 or bf16 storage
//! (f64 on CUDA is refused with an error); that adapter has not yet run on a GPU, see the `cuda`
//! module's source. On the CPU, f32 and f64 are computed as they are; f16 and bf16
//! are widened to f32, computed, and rounded back (SPEC section 5: reductions in f32 at least).
//! Other dtypes are refused with an error. Strided (non-contiguous) inputs are copied to a
//! contiguous buffer first.

pub mod checkpoint;
#[cfg(feature = "cuda")]
mod cuda;
pub mod layer;
pub mod ops;

pub use layer::{
    balance_loss, upcycle, Activation, CamexFfn, CamexFfnConfig, CamexLinear, CurvatureKind,
    DenseFfn, FfnOutput, Router, Routing, SplitMix,
};
pub use ops::{ca_merge, curvature, merge, segment_scores, Factors};

/// A `camex` error as a candle error (the message names the tensor and both shapes or dtypes).
pub(crate) fn cerr(op: &str, e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("camex {op}: {e}"))
}
