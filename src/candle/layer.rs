//! [`CamexLinear`] and the CAMEx FFN layer (SPEC sections 3 and 6) on candle.
//!
//! A CAMEx FFN replaces a dense `wo(act(wi(x)))` by two [`CamexLinear`]s that share one router: the
//! router scores each merge group (a whole sequence, or a causal segment of one), every group gets
//! its own merged weights, and the group's tokens run through them. Active parameters per token
//! are those of the dense FFN.

use super::cerr;
use super::ops::{ca_merge, segment_scores, Factors};
use crate::options::{Dare, MergeOptions};
use crate::shape::Split;
use candle_core::{DType, Device, Result, Tensor, Var, D};

/// Which curvature M_i a [`CamexLinear`] learns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CurvatureKind {
    /// U_i = tau_i: domain-specific merging, the non-curvature baseline.
    Identity,
    /// Kronecker factors of rank `rank`, initialised to the identity (M_i = R * I, or M_i = I with
    /// `normalised`), on the default split of SPEC section 2.
    Kronecker { rank: usize, normalised: bool },
}

/// A small deterministic generator (SplitMix64) for the router noise and initialisations, so that a
/// run is the same on every device and thread count.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    /// A tensor of N(0, std^2) entries.
    pub fn randn(
        &mut self,
        shape: &[usize],
        std: f64,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| self.normal() * std).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }
}

/// A trainable copy of `t` (never shares storage with `t`, even when `t` is itself a variable).
fn var(t: &Tensor) -> Result<Var> {
    Var::from_tensor(&t.detach())
}

fn shape_err(op: &str, name: &str, expected: String, actual: &[usize]) -> candle_core::Error {
    cerr(op, crate::Error::shape(name, expected, actual))
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
    /// alpha, mask and DARE of the merge (beta is not used here).
    pub opts: MergeOptions,
}

impl CamexLinear {
    /// Wraps existing tensors as trainable variables; checks the shapes.
    pub fn new(
        base: &Tensor,
        experts: &Tensor,
        factors: Option<[&Tensor; 4]>,
        biases: Option<(&Tensor, &Tensor)>,
        opts: MergeOptions,
    ) -> Result<Self> {
        const OP: &str = "CamexLinear";
        opts.validate().map_err(|e| cerr(OP, e))?;
        if base.rank() != 2 {
            return Err(shape_err(OP, "base", "[O, I]".into(), base.dims()));
        }
        let (o, i) = (base.dims()[0], base.dims()[1]);
        if experts.rank() != 3 || experts.dims()[1..] != [o, i] {
            return Err(shape_err(
                OP,
                "experts",
                format!("[N, {o}, {i}]"),
                experts.dims(),
            ));
        }
        let n = experts.dims()[0];
        if let Some((eb, b)) = biases {
            if eb.dims() != [o] {
                return Err(shape_err(OP, "base_bias", format!("[{o}]"), eb.dims()));
            }
            if b.dims() != [n, o] {
                return Err(shape_err(
                    OP,
                    "expert_bias",
                    format!("[{n}, {o}]"),
                    b.dims(),
                ));
            }
        }
        Ok(CamexLinear {
            base: var(base)?,
            experts: var(experts)?,
            factors: match factors {
                Some(f) => Some([var(f[0])?, var(f[1])?, var(f[2])?, var(f[3])?]),
                None => None,
            },
            biases: match biases {
                Some((eb, b)) => Some((var(eb)?, var(b)?)),
                None => None,
            },
            opts,
        })
    }

    /// Upcycling from a dense layer (SPEC section 6): every expert and the base are the dense
    /// `weight` `[O, I]` (and `bias` `[O]`), so every tau_i = 0 and the layer starts equal to the dense
    /// one. Factors are the identity of [`CurvatureKind`].
    pub fn upcycle(
        weight: &Tensor,
        bias: Option<&Tensor>,
        n: usize,
        curvature: CurvatureKind,
        opts: MergeOptions,
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
        let experts = weight.unsqueeze(0)?.repeat((n, 1, 1))?;
        let factors = match curvature {
            CurvatureKind::Identity => None,
            CurvatureKind::Kronecker { rank, normalised } => {
                let f = crate::cpu::identity_factors::<f32>(
                    rank,
                    n,
                    Split::default_for(o, i),
                    normalised,
                );
                let mut out = Vec::with_capacity(4);
                for t in f {
                    out.push(
                        Tensor::from_vec(t.data().to_vec(), t.shape(), &Device::Cpu)?
                            .to_dtype(weight.dtype())?
                            .to_device(weight.device())?,
                    );
                }
                Some(out)
            }
        };
        let expert_bias = match bias {
            Some(b) => Some(b.unsqueeze(0)?.repeat((n, 1))?),
            None => None,
        };
        Self::new(
            weight,
            &experts,
            factors.as_ref().map(|f| [&f[0], &f[1], &f[2], &f[3]]),
            bias.zip(expert_bias.as_ref()),
            opts,
        )
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

    /// `merged` [G, O, I] and `merged_bias` [G, O] for `scores` [G, N], with `opts`.
    pub fn merged(&self, scores: &Tensor, opts: &MergeOptions) -> Result<(Tensor, Option<Tensor>)> {
        let merged = ca_merge(
            &self.base,
            &self.experts,
            scores,
            self.candle_factors().as_ref(),
            opts,
        )?;
        let merged_bias = match &self.biases {
            Some((eb, b)) => {
                // bbar_g = e_b + alpha * sum_i s[g,i] (b_i - e_b): no curvature, mask or DARE.
                let diff = b.broadcast_sub(&eb.unsqueeze(0)?)?;
                let mixed = (scores.matmul(&diff)? * opts.alpha)?;
                Some(mixed.broadcast_add(&eb.unsqueeze(0)?)?)
            }
            None => None,
        };
        Ok((merged, merged_bias))
    }

    /// y [G, T, O] = merged_g x[g, t] + merged_bias_g for x [G, T, I] and scores [G, N].
    pub fn forward(&self, x: &Tensor, scores: &Tensor) -> Result<Tensor> {
        self.forward_with(x, scores, &self.opts)
    }

    /// [`CamexLinear::forward`] with other merge options (e.g. DARE off for evaluation).
    pub fn forward_with(&self, x: &Tensor, scores: &Tensor, opts: &MergeOptions) -> Result<Tensor> {
        const OP: &str = "CamexLinear";
        let (n, _, i) = self.dims();
        if x.rank() != 3 || x.dims()[2] != i {
            return Err(shape_err(OP, "x", format!("[G, T, {i}]"), x.dims()));
        }
        let g = x.dims()[0];
        if scores.dims() != [g, n] {
            return Err(shape_err(
                OP,
                "scores",
                format!("[{g}, {n}]"),
                scores.dims(),
            ));
        }
        let (merged, merged_bias) = self.merged(scores, opts)?;
        let y = x.matmul(&merged.transpose(1, 2)?)?;
        match merged_bias {
            Some(b) => y.broadcast_add(&b.unsqueeze(1)?),
            None => Ok(y),
        }
    }
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
    pub fn n(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Scores [G, N] for `h` [G, D]; noise only when `train`, drawn from `rng`.
    pub fn forward(&self, h: &Tensor, train: bool, rng: &mut SplitMix) -> Result<Tensor> {
        let (n, d) = (self.weight.dims()[0], self.weight.dims()[1]);
        if h.rank() != 2 || h.dims()[1] != d {
            return Err(shape_err("Router", "h", format!("[G, {d}]"), h.dims()));
        }
        let mut logits = h.matmul(&self.weight.t()?)?;
        if let (true, Some(w)) = (train, &self.noise_weight) {
            let std = softplus(&h.matmul(&w.t()?)?)?;
            let eps = rng.randn(logits.dims(), 1.0, logits.dtype(), logits.device())?;
            logits = (logits + (eps * std)?)?;
        }
        if self.k < n {
            logits = (logits.clone() + top_k_mask(&logits, self.k)?)?;
        }
        candle_nn::ops::softmax(&logits, D::Minus1)
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
    /// alpha, mask, DARE (DARE applies only in training).
    pub opts: MergeOptions,
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
            opts: MergeOptions {
                dare: Dare::Expert { p: 0.1, seed: 0 },
                ..MergeOptions::default()
            },
        }
    }
}

/// The activation between the two linears of an FFN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// GELU with the exact erf (candle's backward of it uses 1/sqrt(2 pi) rounded to 6 digits).
    #[default]
    GeluErf,
    Silu,
    Relu,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::GeluErf => x.gelu_erf(),
            Activation::Silu => x.silu(),
            Activation::Relu => x.relu(),
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
    /// Random init N(0, std^2) for the weights, zero biases.
    pub fn new(
        d_model: usize,
        d_ff: usize,
        std: f64,
        rng: &mut SplitMix,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        Ok(DenseFfn {
            w1: Var::from_tensor(&rng.randn(&[d_ff, d_model], std, dtype, dev)?)?,
            b1: Var::zeros(d_ff, dtype, dev)?,
            w2: Var::from_tensor(&rng.randn(&[d_model, d_ff], std, dtype, dev)?)?,
            b2: Var::zeros(d_model, dtype, dev)?,
            activation: Activation::GeluErf,
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
    /// x [.., D] -> [.., D].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = self.w1.dims()[1];
        if x.dims().last() != Some(&d) {
            return Err(shape_err("DenseFfn", "x", format!("[.., {d}]"), x.dims()));
        }
        let h = self
            .activation
            .apply(&x.broadcast_matmul(&self.w1.t()?)?.broadcast_add(&self.b1)?)?;
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
#[derive(Debug, Clone)]
pub struct CamexFfn {
    pub router: Router,
    pub wi: CamexLinear,
    pub wo: CamexLinear,
    pub activation: Activation,
    pub config: CamexFfnConfig,
}

impl CamexFfn {
    /// Upcycles a dense FFN (SPEC section 6): both linears start as the dense ones (tau_i = 0), with
    /// the dense activation, so the layer starts equal to `dense`; the router is random N(0, 1/D) (never left uninitialised).
    pub fn upcycle(dense: &DenseFfn, config: CamexFfnConfig, rng: &mut SplitMix) -> Result<Self> {
        let n = config.n_experts;
        let d = dense.w1.dims()[1];
        if let Some(k) = config.top_k {
            if k == 0 || k > n {
                return Err(cerr(
                    "CamexFfn",
                    crate::Error::option("top_k", format!("must be in 1..={n}, got {k}")),
                ));
            }
        }
        let (dtype, dev) = (dense.w1.dtype(), dense.w1.device());
        let std = 1.0 / (d as f64).sqrt();
        let router = Router {
            weight: Var::from_tensor(&rng.randn(&[n, d], std, dtype, dev)?)?,
            noise_weight: if config.noisy {
                Some(Var::zeros((n, d), dtype, dev)?)
            } else {
                None
            },
            k: config.top_k.unwrap_or(n),
        };
        Ok(CamexFfn {
            router,
            wi: CamexLinear::upcycle(&dense.w1, Some(&dense.b1), n, config.curvature, config.opts)?,
            wo: CamexLinear::upcycle(&dense.w2, Some(&dense.b2), n, config.curvature, config.opts)?,
            activation: dense.activation,
            config,
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

    /// x [B, L, D] -> y [B, L, D]. In training (`train`), router noise and DARE draw from `seed`;
    /// in evaluation both are off.
    pub fn forward(&self, x: &Tensor, train: bool, seed: u64) -> Result<FfnOutput> {
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
        let mut rng = SplitMix(seed ^ 0x5EED_CA3E);
        let h = xg.mean(1)?;
        let router_scores = self.router.forward(&h, train, &mut rng)?;
        let n = self.router.n();
        let scores = match self.config.routing {
            Routing::PerSequence => router_scores.clone(),
            Routing::CausalSegments { .. } => {
                segment_scores(&router_scores.reshape((b, j, n))?)?.reshape((b * j, n))?
            }
        };
        let mut opts = self.config.opts;
        opts.dare = match (train, opts.dare) {
            (false, _) | (_, Dare::None) => Dare::None,
            (true, Dare::Expert { p, seed: s }) => Dare::Expert {
                p,
                seed: s ^ rng.next_u64(),
            },
            (true, Dare::Element { p, seed: s }) => Dare::Element {
                p,
                seed: s ^ rng.next_u64(),
            },
        };
        let hid = self
            .activation
            .apply(&self.wi.forward_with(&xg, &scores, &opts)?)?;
        let y = self
            .wo
            .forward_with(&hid, &scores, &opts)?
            .reshape((b, l, d))?;
        let balance_loss = balance_loss(&router_scores)?;
        Ok(FfnOutput {
            y,
            router_scores,
            balance_loss,
        })
    }
}

/// Upcycles a dense FFN into a CAMEx FFN: [`CamexFfn::upcycle`].
pub fn upcycle(dense: &DenseFfn, config: CamexFfnConfig, rng: &mut SplitMix) -> Result<CamexFfn> {
    CamexFfn::upcycle(dense, config, rng)
}
