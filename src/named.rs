//! Every operator by name over named tensors (SPEC section 7): the one interface every frontend
//! (the `camex` CLI, tests against other frameworks, adapters) goes through.
//!
//! - [`ops`] is the table of operators: what each reads (required and optional), what it writes and
//!   which scalar options it uses. The CLI's `--help` is generated from it.
//! - [`run_op`] runs one operator on a map of [`AnyTensor`]s and returns the map of outputs.
//! - [`read_safetensors`] / [`write_safetensors`] move such maps to and from safetensors files
//!   (F32, F64, F16, BF16; scalars as 0-d tensors), writing atomically.
//!
//! Naming follows SPEC section 7: the gradient of `t` is `grad_t`; scalars (alpha, beta) are options
//! and their gradients 0-d tensors. A `<op>_backward` reads what `<op>` reads plus `grad_` of its
//! outputs and writes `grad_` of its differentiable inputs (masks and DARE draws are constants, so
//! `ties_mask` has no backward and `merge_backward` writes no `grad_mask`).
//!
//! dtypes: all inputs share one dtype (the storage dtype, unless [`RunOptions::dtype`] overrides it,
//! in which case the inputs are first rounded to that dtype). f32 and f64 are computed natively;
//! f16 and bf16 are widened to f32, computed there (every reduction in f32, SPEC section 5), and the
//! outputs rounded back to the storage dtype.
//!
//! Devices: [`Device::Cpu`] runs [`crate::cpu`]; [`Device::Cuda`] (feature `cuda`) runs the CUDA
//! kernels through the same table.
//!
//! Strictness: a tensor the operator does not read is an error (a misspelt `factor_A` would otherwise
//! silently select the identity curvature). Options an operator does not use are ignored by
//! [`run_op`] (so one [`RunOptions`] can serve several calls); the CLI rejects them.

use crate::backend::{
    Backend, CaMergeInputs, Cpu, Curvature, FactorGrads, Factors, MergeInputs, Shaped,
};
use crate::cpu;
use crate::error::{Error, Result};
use crate::memory::{self, MemoryLimit};
use crate::options::{check_scalar, Dare, Mask, MergeOptions};
use crate::tensor::{AnyTensor, DType, HostTensor};
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::path::Path;

/// Where `run_op` runs: the crate's one [`Device`].
pub use crate::options::Device;

/// Scalar options of [`run_op`]. Each operator uses the subset listed in its [`OpInfo::options`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunOptions {
    /// Scale of the merged domain vectors (`merge`, `ca_merge`); default 1.
    pub alpha: f64,
    /// Dynamic-merge step: required by `dynamic_merge`; with `ca_merge` it adds `next_base`.
    pub beta: Option<f64>,
    /// TIES mask (`ties_mask`, `ca_merge`).
    pub mask: Mask,
    /// DARE dropout (`merge`, `ca_merge`).
    pub dare: Dare,
    /// Storage (and so compute) dtype override; `None`: the inputs' dtype.
    pub dtype: Option<DType>,
    pub device: Device,
    /// Memory limit for this call's outputs and workspaces ([`crate::memory`]); `None`: the
    /// process-wide limit ([`crate::memory::set_limit`]), by default the available memory.
    pub memory_limit: Option<MemoryLimit>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            alpha: 1.0,
            beta: None,
            mask: Mask::None,
            dare: Dare::None,
            dtype: None,
            device: Device::Cpu,
            memory_limit: None,
        }
    }
}

/// One tensor an operator reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub name: &'static str,
    /// Shape in SPEC section 2 symbols (`[]` for a 0-d scalar).
    pub shape: &'static str,
    /// `None`: always read (required) or always written. `Some(when)`: optional input, or an
    /// output written only in the situation described.
    pub when: Option<&'static str>,
}

/// One operator of SPEC section 7.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpInfo {
    pub name: &'static str,
    pub summary: &'static str,
    pub reads: &'static [Slot],
    pub writes: &'static [Slot],
    /// The [`RunOptions`] fields it uses: any of `alpha`, `beta`, `mask`, `dare`.
    pub options: &'static [&'static str],
}

impl OpInfo {
    /// Names of the tensors it must be given.
    pub fn required(&self) -> impl Iterator<Item = &'static str> {
        self.reads
            .iter()
            .filter(|s| s.when.is_none())
            .map(|s| s.name)
    }
    /// Names of the tensors it may be given.
    pub fn optional(&self) -> impl Iterator<Item = &'static str> {
        self.reads
            .iter()
            .filter(|s| s.when.is_some())
            .map(|s| s.name)
    }
    pub fn reads_tensor(&self, name: &str) -> bool {
        self.reads.iter().any(|s| s.name == name)
    }
    pub fn uses_option(&self, name: &str) -> bool {
        self.options.contains(&name)
    }
}

const fn req(name: &'static str, shape: &'static str) -> Slot {
    Slot {
        name,
        shape,
        when: None,
    }
}
const fn opt(name: &'static str, shape: &'static str, when: &'static str) -> Slot {
    Slot {
        name,
        shape,
        when: Some(when),
    }
}

const KRON: &str = "Kronecker curvature: all four factors, or none for identity";
const KRON_OUT: &str = "with the Kronecker factors";
const BIAS: &str = "both biases, or neither";
const BIAS_OUT: &str = "when the biases are given";
const BETA_OUT: &str = "when beta is given";

const BASE: Slot = req("base", "[O, I]");
const EXPERTS: Slot = req("experts", "[N, O, I]");
const SCORES: Slot = req("scores", "[G, N]");
const CURVED: Slot = req("curved", "[N, O, I]");
const FA: Slot = opt("factor_a", "[R, N, o1, o1]", KRON);
const FB: Slot = opt("factor_b", "[R, N, o2, o2]", KRON);
const FC: Slot = opt("factor_c", "[R, N, i1, i1]", KRON);
const FD: Slot = opt("factor_d", "[R, N, i2, i2]", KRON);
const BASE_BIAS: Slot = opt("base_bias", "[O]", BIAS);
const EXPERT_BIAS: Slot = opt("expert_bias", "[N, O]", BIAS);
const GRAD_FACTORS: [Slot; 4] = [
    opt("grad_factor_a", "[R, N, o1, o1]", KRON_OUT),
    opt("grad_factor_b", "[R, N, o2, o2]", KRON_OUT),
    opt("grad_factor_c", "[R, N, i1, i1]", KRON_OUT),
    opt("grad_factor_d", "[R, N, i2, i2]", KRON_OUT),
];
const GRAD_BIASES: [Slot; 2] = [
    opt("grad_base_bias", "[O]", BIAS_OUT),
    opt("grad_expert_bias", "[N, O]", BIAS_OUT),
];

static OPS: &[OpInfo] = &[
    OpInfo {
        name: "curvature",
        summary: "curved U_i = M_i(experts[i] - base)",
        reads: &[BASE, EXPERTS, FA, FB, FC, FD],
        writes: &[req("curved", "[N, O, I]")],
        options: &[],
    },
    OpInfo {
        name: "curvature_backward",
        summary: "gradients of curvature",
        reads: &[
            BASE,
            EXPERTS,
            FA,
            FB,
            FC,
            FD,
            req("grad_curved", "[N, O, I]"),
        ],
        writes: &[
            req("grad_base", "[O, I]"),
            req("grad_experts", "[N, O, I]"),
            GRAD_FACTORS[0],
            GRAD_FACTORS[1],
            GRAD_FACTORS[2],
            GRAD_FACTORS[3],
        ],
        options: &[],
    },
    OpInfo {
        name: "ties_mask",
        summary: "TIES mask m_i (0 or 1) on the raw domain vectors; a constant, no backward",
        reads: &[BASE, EXPERTS],
        writes: &[req("mask", "[N, O, I]")],
        options: &["mask"],
    },
    OpInfo {
        name: "merge",
        summary: "merged_g = base + alpha * sum_i scores[g,i] zeta[g,i] (mask_i * curved_i)",
        reads: &[
            BASE,
            CURVED,
            SCORES,
            opt("mask", "[N, O, I]", "0/1 mask; absent: all ones"),
            BASE_BIAS,
            EXPERT_BIAS,
        ],
        writes: &[
            req("merged", "[G, O, I]"),
            opt("merged_bias", "[G, O]", BIAS_OUT),
        ],
        options: &["alpha", "dare"],
    },
    OpInfo {
        name: "merge_backward",
        summary: "gradients of merge (the mask and the DARE draw are constants)",
        reads: &[
            BASE,
            CURVED,
            SCORES,
            opt("mask", "[N, O, I]", "0/1 mask; absent: all ones"),
            BASE_BIAS,
            EXPERT_BIAS,
            req("grad_merged", "[G, O, I]"),
            opt("grad_merged_bias", "[G, O]", "with the biases; absent: zero"),
        ],
        writes: &[
            req("grad_base", "[O, I]"),
            req("grad_curved", "[N, O, I]"),
            req("grad_scores", "[G, N]"),
            req("grad_alpha", "[]"),
            GRAD_BIASES[0],
            GRAD_BIASES[1],
        ],
        options: &["alpha", "dare"],
    },
    OpInfo {
        name: "ca_merge",
        summary: "fused curvature, mask, DARE and merge; next_base = base + beta/N sum_i U_i with beta",
        reads: &[BASE, EXPERTS, SCORES, FA, FB, FC, FD, BASE_BIAS, EXPERT_BIAS],
        writes: &[
            req("merged", "[G, O, I]"),
            opt("merged_bias", "[G, O]", BIAS_OUT),
            opt("next_base", "[O, I]", BETA_OUT),
        ],
        options: &["alpha", "beta", "mask", "dare"],
    },
    OpInfo {
        name: "ca_merge_backward",
        summary: "gradients of ca_merge",
        reads: &[
            BASE,
            EXPERTS,
            SCORES,
            FA,
            FB,
            FC,
            FD,
            BASE_BIAS,
            EXPERT_BIAS,
            req("grad_merged", "[G, O, I]"),
            opt("grad_merged_bias", "[G, O]", "with the biases; absent: zero"),
            opt("grad_next_base", "[O, I]", "with beta; absent: zero"),
        ],
        writes: &[
            req("grad_base", "[O, I]"),
            req("grad_experts", "[N, O, I]"),
            req("grad_scores", "[G, N]"),
            GRAD_FACTORS[0],
            GRAD_FACTORS[1],
            GRAD_FACTORS[2],
            GRAD_FACTORS[3],
            req("grad_alpha", "[]"),
            opt("grad_beta", "[]", BETA_OUT),
            GRAD_BIASES[0],
            GRAD_BIASES[1],
        ],
        options: &["alpha", "beta", "mask", "dare"],
    },
    OpInfo {
        name: "merged_linear",
        summary: "y[g,t,:] = merged_g x[g,t,:] + merged_bias_g",
        reads: &[
            req("x", "[G, T, I]"),
            req("merged", "[G, O, I]"),
            opt("merged_bias", "[G, O]", "absent: no bias"),
        ],
        writes: &[req("y", "[G, T, O]")],
        options: &[],
    },
    OpInfo {
        name: "merged_linear_backward",
        summary: "gradients of merged_linear",
        reads: &[
            req("x", "[G, T, I]"),
            req("merged", "[G, O, I]"),
            opt("merged_bias", "[G, O]", "absent: no bias"),
            req("grad_y", "[G, T, O]"),
        ],
        writes: &[
            req("grad_x", "[G, T, I]"),
            req("grad_merged", "[G, O, I]"),
            opt("grad_merged_bias", "[G, O]", "when merged_bias is given"),
        ],
        options: &[],
    },
    OpInfo {
        name: "dynamic_merge",
        summary: "next_base = base + beta/N * sum_i curved_i (beta required)",
        reads: &[BASE, CURVED],
        writes: &[req("next_base", "[O, I]")],
        options: &["beta"],
    },
    OpInfo {
        name: "dynamic_merge_backward",
        summary: "gradients of dynamic_merge (beta required)",
        reads: &[BASE, CURVED, req("grad_next_base", "[O, I]")],
        writes: &[
            req("grad_base", "[O, I]"),
            req("grad_curved", "[N, O, I]"),
            req("grad_beta", "[]"),
        ],
        options: &["beta"],
    },
    OpInfo {
        name: "segment_scores",
        summary: "causal segment scores: scores[b,0] = router_scores[b,0], scores[b,j] = router_scores[b,j-1]",
        reads: &[req("router_scores", "[B, J, N]")],
        writes: &[req("scores", "[B, J, N]")],
        options: &[],
    },
    OpInfo {
        name: "segment_scores_backward",
        summary: "gradient of segment_scores (nothing flows through scores[b,0])",
        reads: &[
            req("router_scores", "[B, J, N]"),
            req("grad_scores", "[B, J, N]"),
        ],
        writes: &[req("grad_router_scores", "[B, J, N]")],
        options: &[],
    },
];

/// Every operator of SPEC section 7, forward and backward, in a fixed order.
pub fn ops() -> &'static [OpInfo] {
    OPS
}

/// The table entry of `op`, or [`Error::UnknownOp`].
pub fn op_info(op: &str) -> Result<&'static OpInfo> {
    OPS.iter()
        .find(|o| o.name == op)
        .ok_or_else(|| Error::UnknownOp(op.to_string()))
}

/// Runs operator `op` on named `inputs`; returns its named outputs (SPEC section 7).
///
/// Errors: [`Error::UnknownOp`]; [`Error::Missing`] for an absent required tensor (or one of the
/// four factors when only some are given); [`Error::Unexpected`] for a tensor the operator does not
/// read; [`Error::Option`] for a missing `beta` where it is required, or an alpha or beta that is
/// not finite in the storage dtype; [`Error::DType`] when the inputs' dtypes differ;
/// [`Error::Shape`] from the operator's checks; [`Error::Value`] for a mask that is not 0/1;
/// [`Error::Memory`] when the outputs and workspaces are over the memory limit
/// ([`RunOptions::memory_limit`]); [`Error::Cuda`] from the CUDA path.
///
/// On [`Device::Cuda`], with the `cuda` feature, it runs the `camex::cuda` kernels on device 0
/// (storage dtypes f32, f16, bf16; f64 is an [`Error::DType`]). Without the feature it returns
/// [`Error::Cuda`] saying the crate was built without `cuda`; it never falls back to the CPU.
pub fn run_op(
    op: &str,
    inputs: &BTreeMap<String, AnyTensor>,
    opts: &RunOptions,
) -> Result<BTreeMap<String, AnyTensor>> {
    match opts.memory_limit {
        Some(l) => memory::with_limit(l, || run_op_in_limit(op, inputs, opts)),
        None => run_op_in_limit(op, inputs, opts),
    }
}

fn run_op_in_limit(
    op: &str,
    inputs: &BTreeMap<String, AnyTensor>,
    opts: &RunOptions,
) -> Result<BTreeMap<String, AnyTensor>> {
    let info = op_info(op)?;
    for name in info.required() {
        if !inputs.contains_key(name) {
            return Err(Error::Missing {
                tensor: name.to_string(),
                op: op.to_string(),
                note: String::new(),
            });
        }
    }
    if let Some(name) = inputs.keys().find(|k| !info.reads_tensor(k)) {
        return Err(Error::Unexpected {
            tensor: name.clone(),
            op: op.to_string(),
            reads: info.reads.iter().map(|s| s.name.to_string()).collect(),
        });
    }
    let in_dtype = common_dtype(inputs)?;
    let dtype = opts.dtype.unwrap_or(in_dtype);
    // alpha and beta as the storage dtype holds them: 1e300 is finite in f64, not in f32.
    if info.uses_option("alpha") {
        check_scalar("alpha", opts.alpha, dtype)?;
    }
    if let (true, Some(b)) = (info.uses_option("beta"), opts.beta) {
        check_scalar("beta", b, dtype)?;
    }
    // The copies in the compute dtype (f64 for f64 storage, f32 otherwise).
    let compute_bytes = if dtype == DType::F64 { 8 } else { 4 };
    let copies: Vec<(String, &[usize])> = inputs
        .iter()
        .map(|(k, v)| (format!("{k} (copy in the compute dtype)"), v.shape()))
        .collect();
    memory::check(
        &copies
            .iter()
            .map(|(k, s)| memory::need(k, s, compute_bytes))
            .collect::<Vec<_>>(),
    )?;
    match opts.device {
        Device::Cpu => {}
        Device::Cuda => {
            if let Some(m) = inputs.get("mask") {
                cpu::merge::check_binary_mask(&m.to_f32())?;
            }
            return run_cuda(info, inputs, opts, dtype);
        }
    }
    if dtype == DType::F64 {
        let t: BTreeMap<String, HostTensor<f64>> = inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.to_f64()))
            .collect();
        let out = exec(&Cpu, info, &t, opts)?;
        Ok(out
            .into_iter()
            .map(|(k, v)| (k, AnyTensor::F64(v)))
            .collect())
    } else {
        // f32 compute; inputs given in another dtype are first rounded to the storage dtype.
        let t: BTreeMap<String, HostTensor<f32>> = inputs
            .iter()
            .map(|(k, v)| (k.clone(), rounded_f32(v, dtype)))
            .collect();
        let out = exec(&Cpu, info, &t, opts)?;
        Ok(out
            .into_iter()
            .map(|(k, v)| {
                // f32 results move (no copy of outputs that may be large); others are rounded.
                let v = match dtype {
                    DType::F32 => AnyTensor::F32(v),
                    _ => AnyTensor::from_f32(&v, dtype),
                };
                (k, v)
            })
            .collect())
    }
}

/// The CUDA dispatch (feature `cuda`): uploads the inputs in the storage dtype, runs the
/// `camex::cuda` operator on a fresh stream of device 0, downloads the outputs.
///
/// The kernels store f32, f16 and bf16 (accumulating in f32); f64 is refused.
#[cfg(feature = "cuda")]
fn run_cuda(
    info: &'static OpInfo,
    inputs: &BTreeMap<String, AnyTensor>,
    opts: &RunOptions,
    dtype: DType,
) -> Result<BTreeMap<String, AnyTensor>> {
    match dtype {
        DType::F32 => on_cuda::exec_on_device::<f32>(info, inputs, opts, dtype),
        DType::F16 => on_cuda::exec_on_device::<f16>(info, inputs, opts, dtype),
        DType::BF16 => on_cuda::exec_on_device::<bf16>(info, inputs, opts, dtype),
        DType::F64 => Err(Error::DType {
            tensor: inputs.keys().next().cloned().unwrap_or_default(),
            expected: "f32, f16 or bf16 (the CUDA kernels' storage dtypes; use --dtype)".into(),
            actual: "f64".into(),
        }),
    }
}

#[cfg(feature = "cuda")]
mod on_cuda {
    use super::{exec, OpInfo, RunOptions};
    use crate::cuda::{self, Cuda, CudaTensor, Element};
    use crate::error::Result;
    use crate::tensor::{AnyTensor, DType, HostTensor};
    use std::collections::BTreeMap;

    pub(super) fn exec_on_device<T: Element>(
        info: &'static OpInfo,
        inputs: &BTreeMap<String, AnyTensor>,
        opts: &RunOptions,
        dtype: DType,
    ) -> Result<BTreeMap<String, AnyTensor>> {
        let dev = Cuda::new(cuda::new_stream(0)?);
        let mut map = BTreeMap::new();
        for (k, v) in inputs {
            // Rounded to the storage dtype as on the CPU path, then stored as T exactly.
            let v = super::rounded_f32(v, dtype);
            map.insert(
                k.clone(),
                CudaTensor::upload(&dev.stream, &v.map(T::from_f32))?,
            );
        }
        let out = exec::<T, Cuda>(&dev, info, &map, opts)?;
        // download waits for the stream's work on each tensor.
        let mut host = BTreeMap::new();
        for (k, v) in out {
            let t: HostTensor<T> = v.download(&dev.stream)?;
            host.insert(k, AnyTensor::from_f32(&t.map(T::to_f32), dtype));
        }
        Ok(host)
    }
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(
    info: &OpInfo,
    _inputs: &BTreeMap<String, AnyTensor>,
    _opts: &RunOptions,
    _dtype: DType,
) -> Result<BTreeMap<String, AnyTensor>> {
    Err(Error::cuda(format!(
        "operator `{}` on device cuda: this camex was built without the `cuda` feature \
         (rebuild with `--features cuda`, or use --device cpu)",
        info.name
    )))
}

/// `v` rounded to the storage dtype `dtype` (once, from f64, when it is stored in another one), in
/// f32.
fn rounded_f32(v: &AnyTensor, dtype: DType) -> HostTensor<f32> {
    if v.dtype() == dtype {
        v.to_f32()
    } else {
        AnyTensor::from_f64(&v.to_f64(), dtype).to_f32()
    }
}

/// The one dtype of all inputs, or [`Error::DType`] naming the first tensor that differs.
fn common_dtype(inputs: &BTreeMap<String, AnyTensor>) -> Result<DType> {
    let mut it = inputs.iter();
    let Some((first_name, first)) = it.next() else {
        // Every operator has a required input, so this is only reached through a bug.
        return Err(Error::option("inputs", "no tensors given"));
    };
    let d = first.dtype();
    for (name, t) in it {
        if t.dtype() != d {
            return Err(Error::DType {
                tensor: name.clone(),
                expected: format!("{} (the dtype of `{first_name}`)", d.name()),
                actual: t.dtype().name().to_string(),
            });
        }
    }
    Ok(d)
}

/// (`base_bias`, `expert_bias`): both or neither.
type BiasPair<'a, V> = (Option<&'a V>, Option<&'a V>);

/// Named inputs of one call (host or device tensors `V`), with the operator's name for the errors.
struct Named<'a, V> {
    op: &'static str,
    map: &'a BTreeMap<String, V>,
}

impl<'a, V> Named<'a, V> {
    fn req(&self, name: &str) -> Result<&'a V> {
        self.map.get(name).ok_or_else(|| Error::Missing {
            tensor: name.to_string(),
            op: self.op.to_string(),
            note: String::new(),
        })
    }
    fn opt(&self, name: &str) -> Option<&'a V> {
        self.map.get(name)
    }
    /// `Some([a, b, c, d])` when all four factors are present (Kronecker), `None` when none is
    /// (identity); otherwise [`Error::Missing`] naming the first absent one.
    fn factors(&self) -> Result<Option<[&'a V; 4]>> {
        const NAMES: [&str; 4] = ["factor_a", "factor_b", "factor_c", "factor_d"];
        let f = NAMES.map(|n| self.opt(n));
        match f {
            [None, None, None, None] => Ok(None),
            [Some(a), Some(b), Some(c), Some(d)] => Ok(Some([a, b, c, d])),
            _ => {
                let i = f.iter().position(|t| t.is_none()).unwrap_or(0);
                let given: Vec<&str> = NAMES
                    .iter()
                    .zip(&f)
                    .filter(|(_, t)| t.is_some())
                    .map(|(n, _)| *n)
                    .collect();
                Err(Error::Missing {
                    tensor: NAMES[i].to_string(),
                    op: self.op.to_string(),
                    note: format!(
                        "the Kronecker curvature needs all four of factor_a, factor_b, factor_c \
                         and factor_d, or none of them for the identity; given: {}",
                        given.join(", ")
                    ),
                })
            }
        }
    }
    /// Both biases or neither.
    fn biases(&self) -> Result<BiasPair<'a, V>> {
        let (eb, b) = (self.opt("base_bias"), self.opt("expert_bias"));
        let missing = match (eb, b) {
            (Some(_), None) => "expert_bias",
            (None, Some(_)) => "base_bias",
            _ => return Ok((eb, b)),
        };
        let given = if missing == "base_bias" {
            "expert_bias"
        } else {
            "base_bias"
        };
        Err(Error::Missing {
            tensor: missing.to_string(),
            op: self.op.to_string(),
            note: format!("biases come in pairs, and {given} was given"),
        })
    }
    fn curvature(&self) -> Result<Curvature<'a, V>> {
        Ok(match self.factors()? {
            None => Curvature::Identity,
            Some([a, b, c, d]) => Curvature::Kronecker(Factors { a, b, c, d }),
        })
    }
    fn beta(&self, opts: &RunOptions) -> Result<f64> {
        opts.beta
            .ok_or_else(|| Error::option("beta", format!("operator `{}` needs beta", self.op)))
    }
}

/// Output map under construction.
struct Out<V>(BTreeMap<String, V>);

impl<V> Out<V> {
    fn put(&mut self, name: &str, t: V) {
        self.0.insert(name.to_string(), t);
    }
    fn put_opt(&mut self, name: &str, t: Option<V>) {
        if let Some(t) = t {
            self.put(name, t);
        }
    }
    /// grad_factor_a..d, in that order.
    fn put_factors(&mut self, f: Option<[V; 4]>) {
        if let Some(f) = f {
            for (name, t) in [
                "grad_factor_a",
                "grad_factor_b",
                "grad_factor_c",
                "grad_factor_d",
            ]
            .into_iter()
            .zip(f)
            {
                self.put(name, t);
            }
        }
    }
}

fn merge_options(opts: &RunOptions) -> MergeOptions {
    MergeOptions {
        alpha: opts.alpha,
        mask: opts.mask,
        dare: opts.dare,
        beta: opts.beta,
        want_curved: false,
    }
}

/// The one dispatch of every operator, on any backend `B` in element type `E`.
fn exec<E, B: Backend<E>>(
    b: &B,
    info: &'static OpInfo,
    map: &BTreeMap<String, B::Tensor>,
    opts: &RunOptions,
) -> Result<BTreeMap<String, B::Tensor>> {
    let n = Named { op: info.name, map };
    let mut out = Out(BTreeMap::new());
    match info.name {
        "curvature" => {
            let curv = n.curvature()?;
            out.put(
                "curved",
                b.curvature(n.req("base")?, n.req("experts")?, &curv)?,
            );
        }
        "curvature_backward" => {
            let curv = n.curvature()?;
            let g = b.curvature_backward(
                n.req("base")?,
                n.req("experts")?,
                &curv,
                n.req("grad_curved")?,
            )?;
            out.put("grad_base", g.grad_base);
            out.put("grad_experts", g.grad_experts);
            out.put_factors(g.factors.map(FactorGrads::into_array));
        }
        "ties_mask" => {
            out.put(
                "mask",
                b.ties_mask(n.req("base")?, n.req("experts")?, opts.mask)?,
            );
        }
        "merge" | "merge_backward" => {
            let (base_bias, expert_bias) = n.biases()?;
            let inputs = MergeInputs {
                base: n.req("base")?,
                curved: n.req("curved")?,
                scores: n.req("scores")?,
                mask: n.opt("mask"),
                base_bias,
                expert_bias,
            };
            if info.name == "merge" {
                let o = b.merge(&inputs, opts.alpha, &opts.dare)?;
                out.put("merged", o.merged);
                out.put_opt("merged_bias", o.merged_bias);
            } else {
                let g = b.merge_backward(
                    &inputs,
                    opts.alpha,
                    &opts.dare,
                    n.req("grad_merged")?,
                    n.opt("grad_merged_bias"),
                )?;
                out.put("grad_base", g.grad_base);
                out.put("grad_curved", g.grad_curved);
                out.put("grad_scores", g.grad_scores);
                out.put("grad_alpha", b.scalar_tensor(g.grad_alpha)?);
                out.put_opt("grad_base_bias", g.grad_base_bias);
                out.put_opt("grad_expert_bias", g.grad_expert_bias);
            }
        }
        "ca_merge" | "ca_merge_backward" => {
            let (base_bias, expert_bias) = n.biases()?;
            let inputs = CaMergeInputs {
                base: n.req("base")?,
                experts: n.req("experts")?,
                scores: n.req("scores")?,
                curvature: n.curvature()?,
                base_bias,
                expert_bias,
            };
            let mo = merge_options(opts);
            if info.name == "ca_merge" {
                let o = b.ca_merge(&inputs, &mo)?;
                out.put("merged", o.merged);
                out.put_opt("merged_bias", o.merged_bias);
                out.put_opt("next_base", o.next_base);
            } else {
                let g = b.ca_merge_backward(
                    &inputs,
                    &mo,
                    n.req("grad_merged")?,
                    n.opt("grad_merged_bias"),
                    n.opt("grad_next_base"),
                )?;
                out.put("grad_base", g.grad_base);
                out.put("grad_experts", g.grad_experts);
                out.put("grad_scores", g.grad_scores);
                out.put_factors(g.factors.map(FactorGrads::into_array));
                out.put("grad_alpha", b.scalar_tensor(g.grad_alpha)?);
                out.put_opt(
                    "grad_beta",
                    g.grad_beta.map(|s| b.scalar_tensor(s)).transpose()?,
                );
                out.put_opt("grad_base_bias", g.grad_base_bias);
                out.put_opt("grad_expert_bias", g.grad_expert_bias);
            }
        }
        "merged_linear" => {
            out.put(
                "y",
                b.merged_linear(n.req("x")?, n.req("merged")?, n.opt("merged_bias"))?,
            );
        }
        "merged_linear_backward" => {
            let g = b.merged_linear_backward(
                n.req("x")?,
                n.req("merged")?,
                n.opt("merged_bias"),
                n.req("grad_y")?,
            )?;
            out.put("grad_x", g.grad_x);
            out.put("grad_merged", g.grad_merged);
            out.put_opt("grad_merged_bias", g.grad_merged_bias);
        }
        "dynamic_merge" => {
            let beta = n.beta(opts)?;
            out.put(
                "next_base",
                b.dynamic_merge(n.req("base")?, n.req("curved")?, beta)?,
            );
        }
        "dynamic_merge_backward" => {
            let beta = n.beta(opts)?;
            let g = b.dynamic_merge_backward(
                n.req("base")?,
                n.req("curved")?,
                beta,
                n.req("grad_next_base")?,
            )?;
            out.put("grad_base", g.grad_base);
            out.put("grad_curved", g.grad_curved);
            out.put("grad_beta", b.scalar_tensor(g.grad_beta)?);
        }
        "segment_scores" => {
            out.put("scores", b.segment_scores(n.req("router_scores")?)?);
        }
        "segment_scores_backward" => {
            let r = n.req("router_scores")?;
            // router_scores as the forward checks it, then the same shape of the grad.
            crate::shape::expect_rank("router_scores", r.shape(), 3, "[B, J, N]")?;
            crate::shape::expect_nonempty("router_scores", r.shape())?;
            let gs = n.req("grad_scores")?;
            crate::shape::expect_shape("grad_scores", gs.shape(), r.shape())?;
            out.put("grad_router_scores", b.segment_scores_backward(gs)?);
        }
        // Every table entry has an arm above; the table and this match are kept in step by the tests.
        other => return Err(Error::UnknownOp(other.to_string())),
    }
    Ok(out.0)
}

// ---------------------------------------------------------------------------------------------
// safetensors I/O
// ---------------------------------------------------------------------------------------------

/// camex's own refusal of `path` (no underlying error).
fn io_err(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::io(format!("{}: {what}", path.display()))
}

/// `path` failed with `e`, which stays the error's source; `what` says what was being done (empty
/// when `e` says it all).
fn io_fail<E>(path: &Path, what: &str, e: E) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    Error::io_source(format!("{}: {what}{e}", path.display()), e)
}

/// Reads every tensor of a safetensors file. Accepted dtypes: F32, F64, F16, BF16 (anything else is
/// [`Error::DType`] naming the tensor).
///
/// Hostile input:
/// - only regular files are read (a pipe, a character device such as `/dev/zero`, a socket or a
///   directory is an [`Error::Io`] naming the path): they are memory-mapped and deserialised
///   without a copy by the `safetensors` crate, so a file is never read whole into memory;
/// - a header that names a tensor twice is an [`Error::Io`] naming the tensor (the `safetensors`
///   crate would keep the last entry);
/// - the decoded tensors are checked against the memory limit ([`crate::memory`]) before they are
///   allocated, and allocated fallibly.
///
/// The file must not be truncated by another process while it is read (the mapping would fault).
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<BTreeMap<String, AnyTensor>> {
    let path = path.as_ref();
    let file = open_regular(path)?;
    let len = file.metadata().map_err(|e| io_fail(path, "", e))?.len();
    if len < 8 {
        return Err(io_err(
            path,
            format!(
                "not a valid safetensors file: {len} bytes, shorter than the 8-byte header length"
            ),
        ));
    }
    // SAFETY: the mapping is read-only and lives until the tensors are decoded into owned memory
    // below. Another process truncating the file meanwhile would make reads fault (SIGBUS); that
    // is the documented contract of reading a file through a mapping.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| io_fail(path, "cannot memory-map: ", e))?;
    check_unique_names(path, &map)?;
    let st = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| io_fail(path, "not a valid safetensors file: ", e))?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    let mut needs = Vec::with_capacity(views.len());
    for (name, view) in &views {
        let elem = match view.dtype() {
            safetensors::Dtype::F32 => 4,
            safetensors::Dtype::F64 => 8,
            safetensors::Dtype::F16 | safetensors::Dtype::BF16 => 2,
            other => {
                return Err(Error::DType {
                    tensor: name.to_string(),
                    expected: "F32, F64, F16 or BF16".into(),
                    actual: format!("{other:?}"),
                })
            }
        };
        needs.push(memory::need(name, view.shape(), elem));
    }
    memory::check(&needs)?;
    let mut out = BTreeMap::new();
    for (name, view) in &views {
        let shape = view.shape();
        let data = view.data();
        let t = match view.dtype() {
            safetensors::Dtype::F32 => AnyTensor::F32(HostTensor::new(
                shape,
                le_words::<4, _>(name, shape, data, f32::from_le_bytes)?,
            )?),
            safetensors::Dtype::F64 => AnyTensor::F64(HostTensor::new(
                shape,
                le_words::<8, _>(name, shape, data, f64::from_le_bytes)?,
            )?),
            safetensors::Dtype::F16 => AnyTensor::F16(HostTensor::new(
                shape,
                le_words::<2, _>(name, shape, data, |b| f16::from_bits(u16::from_le_bytes(b)))?,
            )?),
            safetensors::Dtype::BF16 => AnyTensor::BF16(HostTensor::new(
                shape,
                le_words::<2, _>(name, shape, data, |b| {
                    bf16::from_bits(u16::from_le_bytes(b))
                })?,
            )?),
            // Refused above.
            other => {
                return Err(Error::DType {
                    tensor: name.to_string(),
                    expected: "F32, F64, F16 or BF16".into(),
                    actual: format!("{other:?}"),
                })
            }
        };
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// What kind of file `meta` describes, for the messages.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let ft = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a pipe (FIFO)";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// (device, inode) of a file, where the platform has them.
#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}
#[cfg(not(unix))]
fn file_id(_meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

/// Opens `path` for reading if it is a regular file (checked before opening, since opening a
/// FIFO blocks, and again on the open file).
fn open_regular(path: &Path) -> Result<std::fs::File> {
    let refuse = |meta: &std::fs::Metadata| {
        io_err(
            path,
            format!(
                "is {}, not a regular file: camex reads safetensors inputs only from regular \
                 files (memory-mapped), since a pipe or a device may never end",
                file_kind(meta)
            ),
        )
    };
    let meta = std::fs::metadata(path).map_err(|e| io_fail(path, "", e))?;
    if !meta.is_file() {
        return Err(refuse(&meta));
    }
    let file = std::fs::File::open(path).map_err(|e| io_fail(path, "", e))?;
    let opened = file.metadata().map_err(|e| io_fail(path, "", e))?;
    if !opened.is_file() {
        return Err(refuse(&opened));
    }
    if file_id(&meta) != file_id(&opened) {
        return Err(io_err(path, "was replaced while being opened"));
    }
    Ok(file)
}

/// Refuses a header that names a tensor twice: the `safetensors` crate reads the header into a
/// map, where the last entry silently wins. Anything that is not a well-formed header is left to
/// the crate's own checks.
fn check_unique_names(path: &Path, bytes: &[u8]) -> Result<()> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    let Some(n) = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .and_then(|n| usize::try_from(n).ok())
    else {
        return Ok(());
    };
    let Some(header) = n.checked_add(8).and_then(|end| bytes.get(8..end)) else {
        return Ok(());
    };
    let Ok(header) = std::str::from_utf8(header) else {
        return Ok(());
    };
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = None;
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if dup.is_none() && !seen.insert(k.clone()) {
                    dup = Some(k);
                }
            }
            Ok(dup)
        }
    }
    let mut de = serde_json::Deserializer::from_str(header);
    if let Ok(Some(name)) = (&mut de).deserialize_map(Keys) {
        return Err(io_err(
            path,
            format!(
                "not a valid safetensors file: the header names tensor `{name}` more than once"
            ),
        ));
    }
    Ok(())
}

/// Little-endian words of `W` bytes (the safetensors layout), decoded by `f` into a vector
/// allocated fallibly (its size comes from the file).
fn le_words<const W: usize, T>(
    name: &str,
    shape: &[usize],
    data: &[u8],
    f: impl Fn([u8; W]) -> T,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    memory::try_reserve(&mut out, name, shape, data.len() / W)?;
    out.extend(data.chunks_exact(W).map(|c| {
        let mut b = [0u8; W];
        b.copy_from_slice(c);
        f(b)
    }));
    Ok(out)
}

/// Refuses to write `output` over `input`: the same file (same device and inode, so also through
/// a symlink or a hard link), not only the same path. An absent `output` is fine.
pub fn check_output_is_not_input(input: impl AsRef<Path>, output: impl AsRef<Path>) -> Result<()> {
    let (input, output) = (input.as_ref(), output.as_ref());
    let Ok(out_meta) = std::fs::metadata(output) else {
        return Ok(());
    };
    let in_meta = std::fs::metadata(input).map_err(|e| io_fail(input, "", e))?;
    let same = match (file_id(&in_meta), file_id(&out_meta)) {
        (Some(a), Some(b)) => a == b,
        _ => {
            std::fs::canonicalize(input).ok().is_some()
                && std::fs::canonicalize(input).ok() == std::fs::canonicalize(output).ok()
        }
    };
    if same {
        return Err(io_err(
            output,
            format!(
                "is the same file as the input `{}`: writing the outputs would replace the \
                 inputs; choose another output path",
                input.display()
            ),
        ));
    }
    Ok(())
}

/// The bytes of one tensor in safetensors layout (little-endian): the tensor's own memory, cast
/// with `bytemuck`, where the host is little-endian; a little-endian copy elsewhere.
fn tensor_bytes(t: &AnyTensor) -> std::borrow::Cow<'_, [u8]> {
    use std::borrow::Cow;
    #[cfg(target_endian = "little")]
    {
        Cow::Borrowed(match t {
            AnyTensor::F32(t) => bytemuck::cast_slice(t.data()),
            AnyTensor::F64(t) => bytemuck::cast_slice(t.data()),
            AnyTensor::F16(t) => bytemuck::cast_slice(t.data()),
            AnyTensor::BF16(t) => bytemuck::cast_slice(t.data()),
        })
    }
    #[cfg(not(target_endian = "little"))]
    {
        Cow::Owned(match t {
            AnyTensor::F32(t) => t.data().iter().flat_map(|v| v.to_le_bytes()).collect(),
            AnyTensor::F64(t) => t.data().iter().flat_map(|v| v.to_le_bytes()).collect(),
            AnyTensor::F16(t) => t
                .data()
                .iter()
                .flat_map(|v| v.to_bits().to_le_bytes())
                .collect(),
            AnyTensor::BF16(t) => t
                .data()
                .iter()
                .flat_map(|v| v.to_bits().to_le_bytes())
                .collect(),
        })
    }
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::F64 => safetensors::Dtype::F64,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
    }
}

/// One tensor as the `safetensors` crate's serialisation sees it; the data is borrowed (see
/// [`tensor_bytes`]) while the file is written.
struct StView<'a>(&'a AnyTensor);

impl safetensors::View for StView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        st_dtype(self.0.dtype())
    }
    fn shape(&self) -> &[usize] {
        self.0.shape()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        tensor_bytes(self.0)
    }
    fn data_len(&self) -> usize {
        match self.0 {
            AnyTensor::F32(t) => std::mem::size_of_val(t.data()),
            AnyTensor::F64(t) => std::mem::size_of_val(t.data()),
            AnyTensor::F16(t) => std::mem::size_of_val(t.data()),
            AnyTensor::BF16(t) => std::mem::size_of_val(t.data()),
        }
    }
}

/// Writes `tensors` as a safetensors file at `path`, atomically: the file is written in full under
/// a temporary name in the same directory, synced, and then renamed over `path`; on any failure the
/// temporary file is removed and `path` is left as it was (absent, or the previous file). The
/// `safetensors` crate lays out the header and streams the tensors to the file, without first
/// serialising them in memory. An existing `path` that is not a regular file (a device, a pipe, a
/// directory) is refused. The file gets the permissions of any new file here (the umask), not the
/// owner-only ones of the crate's own temporary file.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, AnyTensor>,
) -> Result<()> {
    let path = path.as_ref();
    if let Ok(meta) = std::fs::metadata(path) {
        if !meta.is_file() {
            return Err(io_err(
                path,
                format!(
                    "is {}: camex writes its outputs only to regular files (it would replace it)",
                    file_kind(&meta)
                ),
            ));
        }
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| io_err(path, "not a file path"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}-{nanos}", std::process::id()));
    let tmp = dir.join(tmp_name);
    // create_new: never clobber a file we did not create. Its permissions are those a new file
    // gets here; the crate's temporary file (which replaces it below) would be owner-only.
    let perms = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|f| f.metadata())
        .map_err(|e| io_fail(&tmp, "", e))?
        .permissions();
    let result = (|| {
        let views = tensors.iter().map(|(name, t)| (name.as_str(), StView(t)));
        safetensors::serialize_to_file(views, None, &tmp).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(e) => io_fail(path, "", e),
            e => io_fail(path, "cannot serialize: ", e),
        })?;
        let sync = || {
            std::fs::set_permissions(&tmp, perms)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        sync().map_err(|e| io_fail(path, "", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
