//! Saving and loading layers as safetensors (candle-nn's [`VarMap`]), and upcycling a CAMEx FFN
//! from a dense FFN checkpoint file.
//!
//! Every layer names its variables ([`DenseFfn::named_vars`], [`CamexLinear::named_vars`],
//! [`CamexFfn::named_vars`]) under a prefix, so a whole model is one flat list of `(name, Var)`
//! that [`save`] writes with [`VarMap::save`] and [`load`] reads back into the same variables. The
//! names of a [`CamexLinear`] are SPEC section 7's (`base`, `experts`, `factor_a`..`factor_d`,
//! `base_bias`, `expert_bias`); a dense FFN's are `w1`, `b1`, `w2`, `b2`.

use super::cerr;
use super::layer::{CamexFfn, CamexFfnConfig, CamexLinear, DenseFfn};
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::Path;

/// `prefix.name`, or `name` for an empty prefix.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn err(what: String) -> candle_core::Error {
    cerr("checkpoint", crate::Error::io(what))
}

/// A [`VarMap`] holding exactly these variables (shared, not copied: setting the map sets them).
/// Two variables under one name are an error naming it.
pub fn var_map(named: &[(String, Var)]) -> Result<VarMap> {
    let map = VarMap::new();
    {
        let mut data = map
            .data()
            .lock()
            .map_err(|_| err("VarMap lock poisoned".into()))?;
        for (name, v) in named {
            if data.insert(name.clone(), v.clone()).is_some() {
                return Err(err(format!("two variables are named `{name}`")));
            }
        }
    }
    Ok(map)
}

/// Writes the variables to a safetensors file ([`VarMap::save`]).
pub fn save(named: &[(String, Var)], path: impl AsRef<Path>) -> Result<()> {
    var_map(named)?.save(path)
}

/// Reads the tensors of a safetensors file (onto the CPU).
fn read(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| err(format!("{}: {e}", path.display())))
}

/// Checks a file tensor against what a variable expects: the name, shape and dtype in the error.
fn check(path: &Path, name: &str, t: Option<&Tensor>, dims: &[usize], dtype: DType) -> Result<()> {
    let p = path.display();
    let t = t.ok_or_else(|| {
        err(format!(
            "{p}: no tensor `{name}` (expected {dims:?} {dtype:?})"
        ))
    })?;
    if t.dims() != dims {
        return Err(cerr(
            "checkpoint",
            crate::Error::shape(format!("{name} in {p}"), format!("{dims:?}"), t.dims()),
        ));
    }
    if t.dtype() != dtype {
        return Err(err(format!(
            "{p}: tensor `{name}` has dtype {:?}, expected {dtype:?}",
            t.dtype()
        )));
    }
    Ok(())
}

/// Sets the variables from a safetensors file written by [`save`] for the same layers: every
/// variable must be in the file with its shape and dtype, and the file must hold nothing else (a
/// checkpoint of another model is an error naming the first tensor that does not fit). Nothing is
/// set unless everything fits.
pub fn load(named: &[(String, Var)], path: impl AsRef<Path>) -> Result<()> {
    load_impl(named, path.as_ref(), true)
}

/// [`load`] for part of a model: the file may hold other tensors too (e.g. the attention weights of
/// a dense checkpoint whose FFNs are upcycled separately).
pub fn load_subset(named: &[(String, Var)], path: impl AsRef<Path>) -> Result<()> {
    load_impl(named, path.as_ref(), false)
}

fn load_impl(named: &[(String, Var)], path: &Path, strict: bool) -> Result<()> {
    let file = read(path)?;
    for (name, v) in named {
        check(path, name, file.get(name), v.dims(), v.dtype())?;
    }
    let mut map = var_map(named)?;
    if strict {
        if let Some(extra) = file.keys().filter(|k| map_lacks(named, k)).min() {
            return Err(err(format!(
                "{}: tensor `{extra}` belongs to no variable of this model",
                path.display()
            )));
        }
    }
    // Onto each variable's device, then candle's VarMap sets them in place.
    let mut values = Vec::with_capacity(named.len());
    for (name, v) in named {
        values.push((name.clone(), file[name].to_device(v.device())?));
    }
    map.set(values.into_iter())
}

fn map_lacks(named: &[(String, Var)], k: &str) -> bool {
    !named.iter().any(|(n, _)| n == k)
}

impl DenseFfn {
    /// `w1` `[F, D]`, `b1` `[F]`, `w2` `[D, F]`, `b2` `[D]` from a safetensors file, under
    /// `prefix` (e.g. `blocks.0.ffn`; "" for none), onto `dev` in `dtype`. Missing tensors and
    /// wrong shapes are errors naming the tensor; the file's dtype must be a float dtype.
    pub fn from_safetensors(
        path: impl AsRef<Path>,
        prefix: &str,
        dtype: DType,
        dev: &Device,
    ) -> Result<DenseFfn> {
        let path = path.as_ref();
        let p = path.display();
        let file = read(path)?;
        let get = |n: &str| -> Result<Tensor> {
            let name = join(prefix, n);
            let t = file
                .get(&name)
                .ok_or_else(|| err(format!("{p}: no tensor `{name}` (a dense FFN's {n})")))?;
            if !t.dtype().is_float() {
                return Err(err(format!(
                    "{p}: tensor `{name}` has dtype {:?}, expected a float dtype",
                    t.dtype()
                )));
            }
            Ok(t.clone())
        };
        let (w1, b1, w2, b2) = (get("w1")?, get("b1")?, get("w2")?, get("b2")?);
        if w1.rank() != 2 {
            return Err(shape(path, &join(prefix, "w1"), "[F, D]".into(), w1.dims()));
        }
        let (f, d) = (w1.dims()[0], w1.dims()[1]);
        for (n, t, want) in [
            ("b1", &b1, vec![f]),
            ("w2", &w2, vec![d, f]),
            ("b2", &b2, vec![d]),
        ] {
            if t.dims() != want.as_slice() {
                return Err(shape(path, &join(prefix, n), format!("{want:?}"), t.dims()));
            }
        }
        let v = |t: Tensor| Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?);
        Ok(DenseFfn {
            w1: v(w1)?,
            b1: v(b1)?,
            w2: v(w2)?,
            b2: v(b2)?,
            activation: Default::default(),
        })
    }
}

fn shape(path: &Path, name: &str, expected: String, actual: &[usize]) -> candle_core::Error {
    cerr(
        "checkpoint",
        crate::Error::shape(format!("{name} in {}", path.display()), expected, actual),
    )
}

impl CamexFfn {
    /// Upcycles the dense FFN stored under `prefix` in a safetensors checkpoint (SPEC section 6)
    /// into a CAMEx FFN from `vb`: [`DenseFfn::from_safetensors`] (in `vb`'s dtype, on its device)
    /// then [`CamexFfn::upcycle`], so the layer starts equal to the dense FFN of the file (GELU,
    /// the dense default activation).
    pub fn upcycle_from_safetensors(
        path: impl AsRef<Path>,
        prefix: &str,
        config: CamexFfnConfig,
        vb: VarBuilder,
    ) -> Result<CamexFfn> {
        let dense = DenseFfn::from_safetensors(path, prefix, vb.dtype(), vb.device())?;
        CamexFfn::upcycle(&dense, config, vb)
    }
}

impl DenseFfn {
    /// `prefix.w1`, `prefix.b1`, `prefix.w2`, `prefix.b2`.
    pub fn named_vars(&self, prefix: &str) -> Vec<(String, Var)> {
        [
            ("w1", &self.w1),
            ("b1", &self.b1),
            ("w2", &self.w2),
            ("b2", &self.b2),
        ]
        .into_iter()
        .map(|(n, v)| (join(prefix, n), v.clone()))
        .collect()
    }
}

impl CamexLinear {
    /// SPEC section 7's names under `prefix`: `base`, `experts`, `factor_a`..`factor_d` (Kronecker
    /// curvature), `base_bias`, `expert_bias` (with biases).
    pub fn named_vars(&self, prefix: &str) -> Vec<(String, Var)> {
        let mut v = vec![
            (join(prefix, "base"), self.base.clone()),
            (join(prefix, "experts"), self.experts.clone()),
        ];
        if let Some(f) = &self.factors {
            for (n, x) in ["factor_a", "factor_b", "factor_c", "factor_d"]
                .iter()
                .zip(f)
            {
                v.push((join(prefix, n), x.clone()));
            }
        }
        if let Some((eb, b)) = &self.biases {
            v.push((join(prefix, "base_bias"), eb.clone()));
            v.push((join(prefix, "expert_bias"), b.clone()));
        }
        v
    }
}

impl CamexFfn {
    /// `prefix.router.weight`, `prefix.router.noise_weight` (noisy gating), `prefix.wi.*`,
    /// `prefix.wo.*` ([`CamexLinear::named_vars`]).
    pub fn named_vars(&self, prefix: &str) -> Vec<(String, Var)> {
        let r = join(prefix, "router");
        let mut v = vec![(join(&r, "weight"), self.router.weight.clone())];
        if let Some(w) = &self.router.noise_weight {
            v.push((join(&r, "noise_weight"), w.clone()));
        }
        v.extend(self.wi.named_vars(&join(prefix, "wi")));
        v.extend(self.wo.named_vars(&join(prefix, "wo")));
        v
    }
}
