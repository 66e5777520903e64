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

pub use candle_nn::Activation;
pub use layer::{
    balance_loss, CamexFfn, CamexFfnConfig, CamexLayerConfig, CamexLinear, CurvatureKind, DenseFfn,
    FfnOutput, MergedLinear, Router, Routing,
};
pub use ops::{ca_merge, curvature, merge, segment_scores, Factors};
pub use rand::rngs::ChaCha8Rng;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{RngExt, SeedableRng};
use std::sync::{Arc, Mutex};

impl From<crate::Error> for candle_core::Error {
    fn from(e: crate::Error) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// A `camex` error as a candle error, prefixed with the op (the message names the tensor and both
/// shapes or dtypes).
pub(crate) fn cerr(op: &str, e: crate::Error) -> candle_core::Error {
    candle_core::Error::from(e).context(format!("camex {op}"))
}

/// The crate's one host generator, for everything random in the candle layers (initialisation,
/// router noise, the DARE seeds): seeded, so a run is the same on every device and thread count.
pub(crate) fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A tensor of N(0, std^2) entries from `rng` (Box-Muller in f64), in `dtype` on `dev`. candle's
/// own `Tensor::randn` cannot be seeded on the CPU.
pub fn randn(
    rng: &mut ChaCha8Rng,
    shape: impl Into<Shape>,
    std: f64,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let v: Vec<f64> = (0..shape.elem_count()).map(|_| normal(rng) * std).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // 1 - u is in (0, 1], so the log is finite.
    let (u, v) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

/// Seeded initial values for [`VarBuilder`]s: candle's `Init::Randn` and `Init::Uniform` draw from
/// an unseeded generator on the CPU, this draws them from one seeded [`ChaCha8Rng`] stream, in the
/// order the variables are created. Clones share the stream, so builders over different maps (a
/// model's and a scratch one) can take turns on it.
#[derive(Debug, Clone)]
pub struct SeededInit(Arc<Mutex<ChaCha8Rng>>);

impl SeededInit {
    pub fn new(seed: u64) -> Self {
        SeededInit(Arc::new(Mutex::new(rng(seed))))
    }

    /// A [`VarBuilder`] over `map` (like `VarBuilder::from_varmap`): a name already in the map is
    /// that variable (shape checked); a new one is created from its `Init` with this stream.
    pub fn var_builder(&self, map: &VarMap, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(SeededMap {
                map: map.clone(),
                init: self.clone(),
            }),
            dtype,
            dev.clone(),
        )
    }

    fn draw(&self, shape: &Shape, init: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut rng = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("SeededInit: lock poisoned".into()))?;
        let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Result<Tensor> {
            let v: Vec<f64> = (0..shape.elem_count())
                .map(|_| lo + (up - lo) * rng.random::<f64>())
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(dev)
        };
        match init {
            Init::Const(v) => Tensor::full(v, shape, dev)?.to_dtype(dtype),
            Init::Randn { mean, stdev } => randn(&mut rng, shape, stdev, dtype, dev)? + mean,
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    candle_nn::init::NormalOrUniform::Normal => {
                        randn(&mut rng, shape, std, dtype, dev)
                    }
                    candle_nn::init::NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, -bound, bound)
                    }
                }
            }
        }
    }
}

struct SeededMap {
    map: VarMap,
    init: SeededInit,
}

impl candle_nn::var_builder::SimpleBackend for SeededMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self
            .map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                return Err(cerr(
                    "VarBuilder",
                    crate::Error::shape(name, format!("{:?}", s.dims()), v.dims()),
                ));
            }
            return Ok(v.as_tensor().clone());
        }
        let v = candle_core::Var::from_tensor(&self.init.draw(&s, h, dtype, dev)?)?;
        data.insert(name.to_string(), v.clone());
        Ok(v.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self
            .map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => Err(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}
