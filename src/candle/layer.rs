//! [`CamexLinear`] and the CAMEx FFN layer (SPEC sections 3 and 6) on candle.
//!
//! A CAMEx FFN replaces a dense `wo(act(wi(x)))` by two [`CamexLinear`]s that share one router: the
//! router scores each merge group (a whole sequence, or a causal segment of one), every group gets
//! its own merged weights, and the group's tokens run through them. Active parameters per token
//! are those of the dense FFN.
//!
//! Every layer is built from a [`VarBuilder`]: over a `VarMap` its variables are created (or, when
//! the map holds them already, shared) and train and save with the map; over safetensors or a
//! tensor map they are loaded. [`crate::candle::SeededInit`] makes the new variables reproducible.

use super::cerr;
use super::ops::{ca_merge, segment_scores, Factors};
use super::ChaCha8Rng;
use crate::options::{Dare, Mask, MergeOptions};
use crate::shape::Split;
use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, Var, D};
use candle_nn::{Activation, Init, VarBuilder};
use rand::Rng;
use std::sync::{Arc, Mutex};

/// Which curvature M_i a [`CamexLinear`] learns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CurvatureKind {
    /// U_i = tau_i: domain-specific merging, the non-curvature baseline.
    Identity,
    /// Kronecker factors of rank `rank` on the default split of SPEC section 2, initialised to the
    /// identity (M_i = R * I, or M_i = I with `normalised`).
    Kronecker { rank: usize, normalised: bool },
}

/// The merge of a [`CamexLinear`]: every field is honoured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CamexLayerConfig {
    /// Scale of the merged domain vectors (default 1).
    pub alpha: f64,
    /// TIES mask m_i (default none).
    pub mask: Mask,
    /// DARE dropout of the domain vectors, only in training; its seed is mixed with the seed of
    /// each training forward, so every step draws anew (default none).
    pub dare: Dare,
}

impl Default for CamexLayerConfig {
    fn default() -> Self {
        CamexLayerConfig {
            alpha: 1.0,
            mask: Mask::None,
            dare: Dare::None,
        }
    }
}

impl CamexLayerConfig {
    /// The operator's options: DARE with its seed mixed with `dare_seed` in training (`Some`), off
    /// in evaluation (`None`).
    pub fn merge_options(&self, dare_seed: Option<u64>) -> MergeOptions {
        MergeOptions {
            alpha: self.alpha,
            mask: self.mask,
            dare: match (dare_seed, self.dare) {
                (None, _) | (_, Dare::None) => Dare::None,
                (Some(s), Dare::Expert { p, seed }) => Dare::Expert { p, seed: seed ^ s },
                (Some(s), Dare::Element { p, seed }) => Dare::Element { p, seed: seed ^ s },
            },
            ..MergeOptions::default()
        }
    }

    fn validate(&self) -> Result<()> {
        Ok(self.merge_options(Some(0)).validate()?)
    }
}

fn shape_err(op: &str, name: &str, expected: String, actual: &[usize]) -> candle_core::Error {
    cerr(op, crate::Error::shape(name, expected, actual))
}

/// `name` [shape] from `vb` as a trainable variable: the builder's own variable when it has one
/// (a `VarMap`), else a variable holding the loaded tensor.
fn get(vb: &VarBuilder, shape: &[usize], name: &str, init: Init) -> Result<Var> {
    Var::from_tensor(&vb.get_with_hints(shape, name, init)?)
}

/// [`get`], and a new variable starts as `value` (e.g. identity factors, which `Init` cannot
/// express); a variable that the builder already holds or loads keeps its value.
fn get_or(
    vb: &VarBuilder,
    shape: &[usize],
    name: &str,
    value: impl FnOnce() -> Result<Tensor>,
) -> Result<Var> {
    let fresh = !vb.contains_tensor(name);
    let v = get(vb, shape, name, Init::Const(0.0))?;
    if fresh {
        v.set(&value()?)?;
    }
    Ok(v)
}

/// `t` in `v`'s dtype and on its device.
fn like(t: &Tensor, v: &Var) -> Result<Tensor> {
    t.to_dtype(v.dtype())?.to_device(v.device())
}

/// A CAMEx linear layer: base expert, N experts, optional Kronecker factors, optional biases.
#[derive(Debug, Clone)]
pub struct CamexLinear {
    /// `base` [O, I].
    pub base: Var,
    /// `experts` [N, O, I].
    pub experts: Var,
    /// `factor_a..factor_d`; `None` for the identity curvature.
    pub factors: Option<[Var; 4]>,
    /// `base_bias` `[O]` and `expert_bias` `[N, O]`, together or not at all.
    pub biases: Option<(Var, Var)>,
    pub config: CamexLayerConfig,
}

/// The weights of a [`CamexLinear`] merged for G groups: applies them as a [`Module`].
#[derive(Debug, Clone)]
pub struct MergedLinear {
    /// [G, O, I].
    pub weight: Tensor,
    /// [G, O].
    pub bias: Option<Tensor>,
}

impl Module for MergedLinear {
    /// y [G, T, O] = weight_g x[g, t] + bias_g for x [G, T, I].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (g, o, i) = self.weight.dims3()?;
        if x.rank() != 3 || x.dims()[0] != g || x.dims()[2] != i {
            return Err(shape_err(
                "CamexLinear",
                "x",
                format!("[{g}, T, {i}]"),
                x.dims(),
            ));
        }
        let y = x.matmul(&self.weight.transpose(1, 2)?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((g, 1, o))?),
            None => Ok(y),
        }
    }
}

impl CamexLinear {
    /// A layer of `n` experts from `in_dim` to `out_dim` from `vb`, SPEC section 7's names: `base`
    /// `[O, I]`, `experts` `[N, O, I]`, `factor_a`..`factor_d` `[R, N, k, k]` (Kronecker
    /// curvature), `base_bias` `[O]` and `expert_bias` `[N, O]` (`bias`). New variables: base and experts
    /// N(0, 1/I), the identity factors of `curvature`, zero biases.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        n: usize,
        curvature: CurvatureKind,
        bias: bool,
        config: CamexLayerConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let w = Init::Randn {
            mean: 0.0,
            stdev: 1.0 / (in_dim.max(1) as f64).sqrt(),
        };
        Self::build(in_dim, out_dim, n, curvature, bias, config, vb, w)
    }

    /// [`Self::new`] with new base and experts from `w`.
    #[allow(clippy::too_many_arguments)]
    fn build(
        in_dim: usize,
        out_dim: usize,
        n: usize,
        curvature: CurvatureKind,
        bias: bool,
        config: CamexLayerConfig,
        vb: VarBuilder,
        w: Init,
    ) -> Result<Self> {
        config
            .validate()
            .map_err(|e| e.context("camex CamexLinear"))?;
        let (o, i) = (out_dim, in_dim);
        let base = get(&vb, &[o, i], "base", w)?;
        let experts = get(&vb, &[n, o, i], "experts", w)?;
        let factors = match curvature {
            CurvatureKind::Identity => None,
            CurvatureKind::Kronecker { rank, normalised } => {
                let eye = identity_factors(rank, n, o, i, normalised, vb.dtype(), vb.device())?;
                let mut f = Vec::with_capacity(4);
                for (name, t) in ["factor_a", "factor_b", "factor_c", "factor_d"]
                    .into_iter()
                    .zip(eye)
                {
                    let shape = t.shape().clone();
                    f.push(get_or(&vb, shape.dims(), name, || Ok(t))?);
                }
                let [a, b, c, d]: [Var; 4] = f.try_into().map_err(|_| {
                    candle_core::Error::Msg("camex CamexLinear: four factors".into())
                })?;
                Some([a, b, c, d])
            }
        };
        let biases = if bias {
            Some((
                get(&vb, &[o], "base_bias", Init::Const(0.0))?,
                get(&vb, &[n, o], "expert_bias", Init::Const(0.0))?,
            ))
        } else {
            None
        };
        Ok(CamexLinear {
            base,
            experts,
            factors,
            biases,
            config,
        })
    }

    /// Upcycling from a dense layer (SPEC section 6): a layer from `vb` whose base and every
    /// expert are the dense `weight` `[O, I]` (and `bias` `[O]`), so every tau_i = 0 and the layer
    /// starts equal to the dense one; the factors are the identity of `curvature`.
    pub fn upcycle(
        weight: &Tensor,
        bias: Option<&Tensor>,
        n: usize,
        curvature: CurvatureKind,
        config: CamexLayerConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        if weight.rank() != 2 {
            return Err(shape_err(
                "CamexLinear::upcycle",
                "weight",
                "[O, I]".into(),
                weight.dims(),
            ));
        }
        let (o, i) = (weight.dims()[0], weight.dims()[1]);
        if let Some(b) = bias {
            if b.dims() != [o] {
                return Err(shape_err(
                    "CamexLinear::upcycle",
                    "bias",
                    format!("[{o}]"),
                    b.dims(),
                ));
            }
        }
        // Zeros, not random draws: every value is set below.
        let zero = Init::Const(0.0);
        let lin = Self::build(i, o, n, curvature, bias.is_some(), config, vb, zero)?;
        lin.base.set(&like(weight, &lin.base)?)?;
        let experts = weight.unsqueeze(0)?.repeat((n, 1, 1))?;
        lin.experts.set(&like(&experts, &lin.experts)?)?;
        if let (Some(f), CurvatureKind::Kronecker { rank, normalised }) = (&lin.factors, curvature)
        {
            let eye = identity_factors(rank, n, o, i, normalised, f[0].dtype(), f[0].device())?;
            for (v, t) in f.iter().zip(eye) {
                v.set(&t)?;
            }
        }
        if let (Some((eb, b)), Some(dense)) = (&lin.biases, bias) {
            eb.set(&like(dense, eb)?)?;
            b.set(&like(&dense.unsqueeze(0)?.repeat((n, 1))?, b)?)?;
        }
        Ok(lin)
    }

    /// N, O, I.
    pub fn dims(&self) -> (usize, usize, usize) {
        let d = self.experts.dims();
        (d[0], d[1], d[2])
    }

    /// Every trainable variable.
    pub fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.base.clone(), self.experts.clone()];
        if let Some(f) = &self.factors {
            v.extend(f.iter().cloned());
        }
        if let Some((eb, b)) = &self.biases {
            v.push(eb.clone());
            v.push(b.clone());
        }
        v
    }

    fn candle_factors(&self) -> Option<Factors> {
        self.factors.as_ref().map(|f| Factors {
            a: f[0].as_tensor().clone(),
            b: f[1].as_tensor().clone(),
            c: f[2].as_tensor().clone(),
            d: f[3].as_tensor().clone(),
        })
    }

    /// The weights merged for `scores` [G, N]: DARE drawn with `dare_seed` in training (`Some`),
    /// off in evaluation (`None`).
    pub fn merge(&self, scores: &Tensor, dare_seed: Option<u64>) -> Result<MergedLinear> {
        let n = self.dims().0;
        if scores.rank() != 2 || scores.dims()[1] != n {
            return Err(shape_err(
                "CamexLinear",
                "scores",
                format!("[G, {n}]"),
                scores.dims(),
            ));
        }
        let opts = self.config.merge_options(dare_seed);
        let weight = ca_merge(
            &self.base,
            &self.experts,
            scores,
            self.candle_factors().as_ref(),
            &opts,
        )?;
        let bias = match &self.biases {
            Some((eb, b)) => {
                // bbar_g = e_b + alpha * sum_i s[g,i] (b_i - e_b): no curvature, mask or DARE.
                let diff = b.broadcast_sub(&eb.unsqueeze(0)?)?;
                let mixed = (scores.matmul(&diff)? * opts.alpha)?;
                Some(mixed.broadcast_add(&eb.unsqueeze(0)?)?)
            }
            None => None,
        };
        Ok(MergedLinear { weight, bias })
    }

    /// y [G, T, O] for x [G, T, I] and scores [G, N], in evaluation (no DARE): [`Self::merge`]
    /// then [`MergedLinear`]'s `forward`.
    pub fn forward(&self, x: &Tensor, scores: &Tensor) -> Result<Tensor> {
        self.forward_with(x, scores, None)
    }

    /// [`Self::forward`] with DARE drawn from `dare_seed` (training) or off (`None`).
    pub fn forward_with(
        &self,
        x: &Tensor,
        scores: &Tensor,
        dare_seed: Option<u64>,
    ) -> Result<Tensor> {
        let i = self.dims().2;
        if x.rank() != 3 || x.dims()[2] != i {
            return Err(shape_err(
                "CamexLinear",
                "x",
                format!("[G, T, {i}]"),
                x.dims(),
            ));
        }
        let g = x.dims()[0];
        if scores.rank() != 2 || scores.dims()[0] != g {
            return Err(shape_err(
                "CamexLinear",
                "scores",
                format!("[{g}, {}]", self.dims().0),
                scores.dims(),
            ));
        }
        self.merge(scores, dare_seed)?.forward(x)
    }
}

/// The four identity factors of a Kronecker curvature of rank `r` for N experts of [O, I].
fn identity_factors(
    r: usize,
    n: usize,
    o: usize,
    i: usize,
    normalised: bool,
    dtype: DType,
    dev: &Device,
) -> Result<Vec<Tensor>> {
    crate::cpu::identity_factors::<f32>(r, n, Split::default_for(o, i), normalised)
        .into_iter()
        .map(|t| {
            Tensor::from_vec(t.data().to_vec(), t.shape(), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(dev)
        })
        .collect()
}

/// The router: a linear layer from the group's mean hidden state to N logits, noisy top-k softmax.
#[derive(Debug, Clone)]
pub struct Router {
    /// [N, D].
    pub weight: Var,
    /// [N, D]: the noise scale softplus(h W_noise^T) of noisy top-k gating; `None` for no noise.
    pub noise_weight: Option<Var>,
    /// Experts kept per group (k = N: a dense softmax, the default of SPEC section 6).
    pub k: usize,
}

impl Router {
    /// A router from `d` features to `n` experts from `vb`: `weight` [N, D] (new: N(0, 1/D)) and,
    /// with `noisy`, `noise_weight` [N, D] (new: zero); `k` experts kept (`None`: k = N).
    pub fn new(d: usize, n: usize, k: Option<usize>, noisy: bool, vb: VarBuilder) -> Result<Self> {
        let k = k.unwrap_or(n);
        if k == 0 || k > n {
            return Err(cerr(
                "Router",
                crate::Error::option("top_k", format!("must be in 1..={n}, got {k}")),
            ));
        }
        let stdev = 1.0 / (d.max(1) as f64).sqrt();
        Ok(Router {
            weight: get(&vb, &[n, d], "weight", Init::Randn { mean: 0.0, stdev })?,
            noise_weight: if noisy {
                Some(get(&vb, &[n, d], "noise_weight", Init::Const(0.0))?)
            } else {
                None
            },
            k,
        })
    }

    pub fn n(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Scores [G, N] for `h` [G, D]; with `noise` (training), noisy gating draws from it.
    pub fn scores(&self, h: &Tensor, noise: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let (n, d) = (self.weight.dims()[0], self.weight.dims()[1]);
        if h.rank() != 2 || h.dims()[1] != d {
            return Err(shape_err("Router", "h", format!("[G, {d}]"), h.dims()));
        }
        let mut logits = h.matmul(&self.weight.t()?)?;
        if let (Some(rng), Some(w)) = (noise, &self.noise_weight) {
            let std = softplus(&h.matmul(&w.t()?)?)?;
            let eps = super::randn(rng, logits.dims(), 1.0, logits.dtype(), logits.device())?;
            logits = (logits + (eps * std)?)?;
        }
        if self.k < n {
            logits = (logits.clone() + top_k_mask(&logits, self.k)?)?;
        }
        candle_nn::ops::softmax(&logits, D::Minus1)
    }
}

impl Module for Router {
    /// The scores without noise (evaluation).
    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        self.scores(h, None)
    }
}

fn softplus(x: &Tensor) -> Result<Tensor> {
    // log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), stable for large |x|.
    let relu = x.relu()?;
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    relu + tail
}

/// 0 for the k largest logits of each row, a large negative number for the others (a constant).
fn top_k_mask(logits: &Tensor, k: usize) -> Result<Tensor> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut out = Vec::with_capacity(rows.len() * rows.first().map_or(0, |r| r.len()));
    for r in &rows {
        let mut sorted = r.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let thr = sorted[k.clamp(1, sorted.len()) - 1];
        out.extend(r.iter().map(|&v| if v >= thr { 0f32 } else { -1e30 }));
    }
    Tensor::from_vec(out, logits.dims(), &Device::Cpu)?
        .to_dtype(logits.dtype())?
        .to_device(logits.device())
}

/// Squared coefficient of variation var(v) / mean(v)^2 of a vector (population variance).
fn cv_squared(v: &Tensor) -> Result<Tensor> {
    let mean = v.mean_all()?;
    let var = v.broadcast_sub(&mean)?.sqr()?.mean_all()?;
    var / (mean.sqr()? + 1e-10)?
}

/// The load-balancing loss of the router: cv^2(importance) + cv^2(load), importance_i = sum_g
/// scores[g, i], load_i = #{g : scores[g, i] > 0}. The load is a count and carries no gradient (with
/// k = N it is G for every expert and its term is 0); the importance term trains the router.
pub fn balance_loss(scores: &Tensor) -> Result<Tensor> {
    let importance = scores.sum(0)?;
    let load = scores.gt(0.0)?.to_dtype(scores.dtype())?.sum(0)?.detach();
    cv_squared(&importance)? + cv_squared(&load)?
}

/// How tokens are grouped for merging (SPEC section 3 and 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// One group per sequence; router input = the sequence's mean hidden state (T5).
    PerSequence,
    /// Causal segments of `segment_len` tokens; segment j merges with the router scores of segment
    /// j-1 (segment 0 with its own, gradient stopped) (GPT-2, Lory style).
    CausalSegments { segment_len: usize },
}

/// Configuration of a [`CamexFfn`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CamexFfnConfig {
    pub n_experts: usize,
    pub curvature: CurvatureKind,
    pub routing: Routing,
    /// Experts kept by the router (None: k = N).
    pub top_k: Option<usize>,
    /// Noisy gating during training.
    pub noisy: bool,
    /// alpha, mask and DARE of both linears (DARE only in training).
    pub layer: CamexLayerConfig,
    /// Seed of the stream that [`ModuleT::forward_t`] draws each training step's router noise
    /// and DARE seed from.
    pub seed: u64,
}

impl Default for CamexFfnConfig {
    /// SPEC section 6: N = 7, R = 8 (identity init, M_i = R I), k = N, noisy gating, DARE p = 0.1
    /// per expert, alpha = 1, per-sequence routing.
    fn default() -> Self {
        CamexFfnConfig {
            n_experts: 7,
            curvature: CurvatureKind::Kronecker {
                rank: 8,
                normalised: false,
            },
            routing: Routing::PerSequence,
            top_k: None,
            noisy: true,
            layer: CamexLayerConfig {
                dare: Dare::Expert { p: 0.1, seed: 0 },
                ..CamexLayerConfig::default()
            },
            seed: 0,
        }
    }
}

/// The dense FFN `w2 act(w1 x + b1) + b2`: the baseline and the source of upcycling.
#[derive(Debug, Clone)]
pub struct DenseFfn {
    /// `[F, D]` and `[F]`.
    pub w1: Var,
    pub b1: Var,
    /// [D, F] and [D].
    pub w2: Var,
    pub b2: Var,
    pub activation: Activation,
}

impl DenseFfn {
    /// `w1` `[F, D]`, `b1` `[F]`, `w2` `[D, F]`, `b2` `[D]` from `vb`; new weights N(0, std^2),
    /// new biases zero.
    pub fn new(
        d_model: usize,
        d_ff: usize,
        std: f64,
        activation: Activation,
        vb: VarBuilder,
    ) -> Result<Self> {
        let w = Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        Ok(DenseFfn {
            w1: get(&vb, &[d_ff, d_model], "w1", w)?,
            b1: get(&vb, &[d_ff], "b1", Init::Const(0.0))?,
            w2: get(&vb, &[d_model, d_ff], "w2", w)?,
            b2: get(&vb, &[d_model], "b2", Init::Const(0.0))?,
            activation,
        })
    }

    pub fn vars(&self) -> Vec<Var> {
        vec![
            self.w1.clone(),
            self.b1.clone(),
            self.w2.clone(),
            self.b2.clone(),
        ]
    }
}

impl Module for DenseFfn {
    /// x [.., D] -> [.., D].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = self.w1.dims()[1];
        if x.dims().last() != Some(&d) {
            return Err(shape_err("DenseFfn", "x", format!("[.., {d}]"), x.dims()));
        }
        let h = self
            .activation
            .forward(&x.broadcast_matmul(&self.w1.t()?)?.broadcast_add(&self.b1)?)?;
        h.broadcast_matmul(&self.w2.t()?)?.broadcast_add(&self.b2)
    }
}

/// What a [`CamexFfn`] returns: the output, the router's scores (before the segment shift) and the
/// load-balancing loss.
#[derive(Debug, Clone)]
pub struct FfnOutput {
    /// [B, L, D].
    pub y: Tensor,
    /// [G, N].
    pub router_scores: Tensor,
    /// A scalar.
    pub balance_loss: Tensor,
}

/// The CAMEx FFN: router, `wi` [F, D] and `wo` [D, F] as [`CamexLinear`]s, the activation between.
/// As a [`ModuleT`] it returns `y`; [`CamexFfn::forward_full`] also returns the balance loss.
#[derive(Debug, Clone)]
pub struct CamexFfn {
    pub router: Router,
    pub wi: CamexLinear,
    pub wo: CamexLinear,
    pub activation: Activation,
    pub config: CamexFfnConfig,
    /// Draws the seed of each training forward (`forward_t`); shared by clones.
    stream: Arc<Mutex<ChaCha8Rng>>,
}

impl CamexFfn {
    /// A CAMEx FFN from `vb`: `router.*` ([`Router::new`]), `wi.*` and `wo.*` ([`CamexLinear::new`],
    /// with biases).
    pub fn new(
        d_model: usize,
        d_ff: usize,
        activation: Activation,
        config: CamexFfnConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let n = config.n_experts;
        let c = config.curvature;
        Ok(CamexFfn {
            router: Router::new(d_model, n, config.top_k, config.noisy, vb.pp("router"))?,
            wi: CamexLinear::new(d_model, d_ff, n, c, true, config.layer, vb.pp("wi"))?,
            wo: CamexLinear::new(d_ff, d_model, n, c, true, config.layer, vb.pp("wo"))?,
            activation,
            config,
            stream: Arc::new(Mutex::new(super::rng(config.seed))),
        })
    }

    /// Upcycles a dense FFN (SPEC section 6) into a CAMEx FFN from `vb`: both linears start as the
    /// dense ones (tau_i = 0), with the dense activation, so the layer starts equal to `dense`;
    /// the router is new (N(0, 1/D), never left uninitialised) unless `vb` holds one.
    pub fn upcycle(dense: &DenseFfn, config: CamexFfnConfig, vb: VarBuilder) -> Result<Self> {
        let n = config.n_experts;
        let d = dense.w1.dims()[1];
        let c = config.curvature;
        let (w1, w2) = (dense.w1.as_tensor(), dense.w2.as_tensor());
        let (b1, b2) = (dense.b1.as_tensor(), dense.b2.as_tensor());
        Ok(CamexFfn {
            router: Router::new(d, n, config.top_k, config.noisy, vb.pp("router"))?,
            wi: CamexLinear::upcycle(w1, Some(b1), n, c, config.layer, vb.pp("wi"))?,
            wo: CamexLinear::upcycle(w2, Some(b2), n, c, config.layer, vb.pp("wo"))?,
            activation: dense.activation,
            config,
            stream: Arc::new(Mutex::new(super::rng(config.seed))),
        })
    }

    pub fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.router.weight.clone()];
        if let Some(w) = &self.router.noise_weight {
            v.push(w.clone());
        }
        v.extend(self.wi.vars());
        v.extend(self.wo.vars());
        v
    }

    /// x [B, L, D] -> y [B, L, D], the router's scores and the balance loss. In training
    /// (`train = Some(seed)`), router noise and DARE draw from `seed`; in evaluation (`None`) both
    /// are off.
    pub fn forward_full(&self, x: &Tensor, train: Option<u64>) -> Result<FfnOutput> {
        const OP: &str = "CamexFfn";
        let d = self.router.weight.dims()[1];
        if x.rank() != 3 || x.dims()[2] != d {
            return Err(shape_err(OP, "x", format!("[B, L, {d}]"), x.dims()));
        }
        let (b, l) = (x.dims()[0], x.dims()[1]);
        let (xg, j) = match self.config.routing {
            Routing::PerSequence => (x.clone(), 1),
            Routing::CausalSegments { segment_len: t } => {
                if t == 0 || l % t != 0 {
                    return Err(shape_err(
                        OP,
                        "x",
                        format!("[B, L, {d}] with L a multiple of segment_len = {t}"),
                        x.dims(),
                    ));
                }
                (x.reshape((b * (l / t), t, d))?, l / t)
            }
        };
        let mut rng = train.map(|s| super::rng(s ^ 0x5EED_CA3E));
        let h = xg.mean(1)?;
        let router_scores = self.router.scores(&h, rng.as_mut())?;
        let n = self.router.n();
        let scores = match self.config.routing {
            Routing::PerSequence => router_scores.clone(),
            Routing::CausalSegments { .. } => {
                segment_scores(&router_scores.reshape((b, j, n))?)?.reshape((b * j, n))?
            }
        };
        let dare_seed = rng.as_mut().map(|r| r.next_u64());
        let hid = self
            .activation
            .forward(&self.wi.forward_with(&xg, &scores, dare_seed)?)?;
        let y = self
            .wo
            .forward_with(&hid, &scores, dare_seed)?
            .reshape((b, l, d))?;
        let balance_loss = balance_loss(&router_scores)?;
        Ok(FfnOutput {
            y,
            router_scores,
            balance_loss,
        })
    }
}

impl ModuleT for CamexFfn {
    /// `y` of [`CamexFfn::forward_full`]; in training with the next seed of the layer's stream
    /// (`config.seed`).
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let seed = if train {
            let mut s = self
                .stream
                .lock()
                .map_err(|_| candle_core::Error::Msg("CamexFfn: lock poisoned".into()))?;
            Some(s.next_u64())
        } else {
            None
        };
        Ok(self.forward_full(x, seed)?.y)
    }
}
