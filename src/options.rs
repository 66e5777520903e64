//! Operator options: mask, DARE dropout, alpha, beta (SPEC sections 3 and 6).

use crate::error::{Error, Result};
use crate::tensor::DType;

/// Errors unless the scalar option `name` (alpha, beta) is finite and stays finite when stored in
/// `dtype`: 1e300 is finite in f64 but infinite in f32, and f16 holds at most 65504.
pub fn check_scalar(name: &str, v: f64, dtype: DType) -> Result<()> {
    let stored_finite = match dtype {
        DType::F64 => v.is_finite(),
        DType::F32 => (v as f32).is_finite(),
        DType::F16 => half::f16::from_f64(v).is_finite(),
        DType::BF16 => half::bf16::from_f64(v).is_finite(),
    };
    if !v.is_finite() {
        return Err(Error::option(name, format!("must be finite, got {v}")));
    }
    if !stored_finite {
        let max = match dtype {
            DType::F64 => f64::MAX,
            DType::F32 => f32::MAX as f64,
            DType::F16 => half::f16::MAX.to_f64(),
            DType::BF16 => half::bf16::MAX.to_f64(),
        };
        return Err(Error::option(
            name,
            format!(
                "{v:e} is not representable in the storage dtype {} (largest finite value \
                 {max:e}; it would be infinite)",
                dtype.name()
            ),
        ));
    }
    Ok(())
}

/// The TIES-style mask m_i, computed on the raw domain vectors and applied after the curvature.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Mask {
    /// m_i = 1.
    #[default]
    None,
    /// m_i = [sgn(tau_i) == sgn(sum_j tau_j)], sgn(0) = 0: what the official code does.
    TiesSign,
    /// The original TIES: keep the top-k fraction of |tau_i| per expert (ties at the threshold kept),
    /// elect the sign of the sum of the trimmed vectors, m_i = [trimmed tau_i != 0 and sign agrees].
    /// k in (0, 1]; the kept count is ceil(k * O * I).
    TiesTrim(f64),
}

/// Parses `none`, `ties_sign` or `ties_trim:K`.
impl std::str::FromStr for Mask {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mask> {
        let m = match s {
            "none" => Mask::None,
            "ties_sign" => Mask::TiesSign,
            _ => match s.strip_prefix("ties_trim:") {
                Some(k) => Mask::TiesTrim(k.parse().map_err(|_| {
                    Error::option("mask", format!("ties_trim:K needs a number K, got `{k}`"))
                })?),
                None => {
                    return Err(Error::option(
                        "mask",
                        format!("expected none|ties_sign|ties_trim:K, got `{s}`"),
                    ))
                }
            },
        };
        m.validate()?;
        Ok(m)
    }
}

impl Mask {
    pub fn validate(&self) -> Result<()> {
        if let Mask::TiesTrim(k) = *self {
            if !(k > 0.0 && k <= 1.0) {
                return Err(Error::option(
                    "mask",
                    format!("ties_trim k must be in (0, 1], got {k}"),
                ));
            }
        }
        Ok(())
    }
}

/// The spelling [`FromStr`](std::str::FromStr) reads: `none`, `ties_sign`, `ties_trim:K`.
impl std::fmt::Display for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mask::None => f.write_str("none"),
            Mask::TiesSign => f.write_str("ties_sign"),
            Mask::TiesTrim(k) => write!(f, "ties_trim:{k}"),
        }
    }
}

/// DARE dropout of the masked, curved domain vectors, rescaled by 1/(1-p). Training only.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Dare {
    #[default]
    None,
    /// z[g, i]: drops expert i's whole contribution in group g (the official Dropout2d).
    Expert { p: f64, seed: u64 },
    /// z[g, i, p, q] per element (the original DARE paper).
    Element { p: f64, seed: u64 },
}

/// Parses `none`, `expert:P:SEED` or `element:P:SEED`.
impl std::str::FromStr for Dare {
    type Err = Error;
    fn from_str(s: &str) -> Result<Dare> {
        if s == "none" {
            return Ok(Dare::None);
        }
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || {
            Error::option(
                "dare",
                format!("expected none|expert:P:SEED|element:P:SEED, got `{s}`"),
            )
        };
        if parts.len() != 3 {
            return Err(bad());
        }
        let p: f64 = parts[1].parse().map_err(|_| bad())?;
        let seed: u64 = parts[2].parse().map_err(|_| bad())?;
        let d = match parts[0] {
            "expert" => Dare::Expert { p, seed },
            "element" => Dare::Element { p, seed },
            _ => return Err(bad()),
        };
        d.validate()?;
        Ok(d)
    }
}

impl Dare {
    pub fn validate(&self) -> Result<()> {
        match *self {
            Dare::None => Ok(()),
            Dare::Expert { p, .. } | Dare::Element { p, .. } => {
                if (0.0..1.0).contains(&p) {
                    Ok(())
                } else {
                    Err(Error::option(
                        "dare",
                        format!("p must be in [0, 1), got {p}"),
                    ))
                }
            }
        }
    }
}

/// The spelling [`FromStr`](std::str::FromStr) reads: `none`, `expert:P:SEED`, `element:P:SEED`.
impl std::fmt::Display for Dare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dare::None => f.write_str("none"),
            Dare::Expert { p, seed } => write!(f, "expert:{p}:{seed}"),
            Dare::Element { p, seed } => write!(f, "element:{p}:{seed}"),
        }
    }
}

/// Where an operator runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The fused CUDA kernels (crate feature `cuda`).
    Cuda,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses `cpu` or `cuda`.
impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            _ => Err(Error::option(
                "device",
                format!("expected cpu|cuda, got `{s}`"),
            )),
        }
    }
}

/// Options shared by `merge` and `ca_merge`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergeOptions {
    /// Scale of the merged domain vectors (default 1, as the official code).
    pub alpha: f64,
    pub mask: Mask,
    pub dare: Dare,
    /// When set, `ca_merge` also writes the dynamic-merge output `next_base` with this beta.
    pub beta: Option<f64>,
    /// When true, `ca_merge` also returns `curved` (U_i, before the mask).
    pub want_curved: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            alpha: 1.0,
            mask: Mask::None,
            dare: Dare::None,
            beta: None,
            want_curved: false,
        }
    }
}

impl MergeOptions {
    pub fn validate(&self) -> Result<()> {
        if !self.alpha.is_finite() {
            return Err(Error::option(
                "alpha",
                format!("must be finite, got {}", self.alpha),
            ));
        }
        if let Some(b) = self.beta {
            if !b.is_finite() {
                return Err(Error::option("beta", format!("must be finite, got {b}")));
            }
        }
        self.mask.validate()?;
        self.dare.validate()
    }
    /// [`MergeOptions::validate`], and alpha and beta finite in the storage dtype
    /// ([`check_scalar`]).
    pub fn validate_for(&self, dtype: DType) -> Result<()> {
        self.validate()?;
        check_scalar("alpha", self.alpha, dtype)?;
        if let Some(b) = self.beta {
            check_scalar("beta", b, dtype)?;
        }
        Ok(())
    }
}
