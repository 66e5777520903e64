//! Random named-tensor cases shared by tests/named.rs and tests/cli.rs: every operator, forward
//! and backward, with every variant of inputs (identity/Kronecker, biases, beta, masks, DARE).
#![allow(dead_code)]

use camex::named::RunOptions;
use camex::{AnyTensor, DType, Dare, HostTensor, Mask};
use std::collections::BTreeMap;

pub const N: usize = 3;
pub const O: usize = 6;
pub const I: usize = 4;
pub const O1: usize = 2;
pub const I1: usize = 2;
pub const R: usize = 2;
pub const G: usize = 2;
pub const T: usize = 3;
pub const B: usize = 2;
pub const J: usize = 3;

#[path = "../rng/mod.rs"]
mod rng;
pub use rng::Rng;

/// One test input: named f64 values (converted to the dtype under test) and options.
#[derive(Clone)]
pub struct Case {
    pub label: String,
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    pub opts: RunOptions,
}

impl Case {
    pub fn new(label: &str, opts: RunOptions) -> Case {
        Case {
            label: label.to_string(),
            tensors: BTreeMap::new(),
            opts,
        }
    }
    pub fn add(&mut self, rng: &mut Rng, name: &str, shape: &[usize]) {
        let n: usize = shape.iter().product();
        let v = if name == "mask" {
            (0..n)
                .map(|_| if rng.uniform() > 0.0 { 1.0 } else { 0.0 })
                .collect()
        } else {
            (0..n).map(|_| rng.uniform()).collect()
        };
        self.tensors.insert(name.to_string(), (shape.to_vec(), v));
    }
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    pub fn any(&self, dtype: DType) -> BTreeMap<String, AnyTensor> {
        self.tensors
            .iter()
            .map(|(k, (s, v))| {
                let t = HostTensor::new(s, v.clone()).unwrap();
                (k.clone(), AnyTensor::from_f64(&t, dtype))
            })
            .collect()
    }
}

pub fn opts_with(f: impl FnOnce(&mut RunOptions)) -> RunOptions {
    let mut o = RunOptions::default();
    f(&mut o);
    o
}

pub fn add_factors(c: &mut Case, rng: &mut Rng) {
    let (o2, i2) = (O / O1, I / I1);
    c.add(rng, "factor_a", &[R, N, O1, O1]);
    c.add(rng, "factor_b", &[R, N, o2, o2]);
    c.add(rng, "factor_c", &[R, N, I1, I1]);
    c.add(rng, "factor_d", &[R, N, i2, i2]);
}

pub fn add_biases(c: &mut Case, rng: &mut Rng) {
    c.add(rng, "base_bias", &[O]);
    c.add(rng, "expert_bias", &[N, O]);
}

/// Every input variant of `op` (forward or backward), seeded by `seed`.
pub fn cases(op: &str, seed: u64) -> Vec<Case> {
    let fwd = op.strip_suffix("_backward").unwrap_or(op);
    let backward = fwd != op;
    let mut rng = Rng::new(seed);
    let rng = &mut rng;
    let mut out = Vec::new();
    match fwd {
        "curvature" => {
            for kron in [false, true] {
                let mut c = Case::new(
                    if kron { "kronecker" } else { "identity" },
                    opts_with(|_| {}),
                );
                c.add(rng, "base", &[O, I]);
                c.add(rng, "experts", &[N, O, I]);
                if kron {
                    add_factors(&mut c, rng);
                }
                out.push(c);
            }
        }
        "ties_mask" => {
            for (label, mask) in [
                ("none", Mask::None),
                ("ties_sign", Mask::TiesSign),
                ("ties_trim", Mask::TiesTrim(0.3)),
            ] {
                let mut c = Case::new(label, opts_with(|o| o.mask = mask));
                c.add(rng, "base", &[O, I]);
                c.add(rng, "experts", &[N, O, I]);
                out.push(c);
            }
        }
        "merge" => {
            let variants = [
                ("plain", false, false, Dare::None, 1.0),
                (
                    "mask+bias+dare_expert",
                    true,
                    true,
                    Dare::Expert { p: 0.3, seed: 7 },
                    0.7,
                ),
                (
                    "bias+dare_element",
                    false,
                    true,
                    Dare::Element { p: 0.2, seed: 9 },
                    1.3,
                ),
            ];
            for (label, mask, bias, dare, alpha) in variants {
                let mut c = Case::new(
                    label,
                    opts_with(|o| {
                        o.dare = dare;
                        o.alpha = alpha;
                    }),
                );
                c.add(rng, "base", &[O, I]);
                c.add(rng, "curved", &[N, O, I]);
                c.add(rng, "scores", &[G, N]);
                if mask {
                    c.add(rng, "mask", &[N, O, I]);
                }
                if bias {
                    add_biases(&mut c, rng);
                }
                out.push(c);
            }
        }
        "ca_merge" => {
            let variants = [
                ("identity", false, false, None, Mask::None, Dare::None, 1.0),
                (
                    "kron+bias+beta+ties_sign+dare_element",
                    true,
                    true,
                    Some(0.4),
                    Mask::TiesSign,
                    Dare::Element { p: 0.25, seed: 3 },
                    0.8,
                ),
                (
                    "kron+ties_trim+dare_expert",
                    true,
                    false,
                    None,
                    Mask::TiesTrim(0.5),
                    Dare::Expert { p: 0.4, seed: 11 },
                    1.0,
                ),
                (
                    "identity+beta",
                    false,
                    false,
                    Some(-0.6),
                    Mask::None,
                    Dare::None,
                    1.5,
                ),
            ];
            for (label, kron, bias, beta, mask, dare, alpha) in variants {
                let mut c = Case::new(
                    label,
                    opts_with(|o| {
                        o.beta = beta;
                        o.mask = mask;
                        o.dare = dare;
                        o.alpha = alpha;
                    }),
                );
                c.add(rng, "base", &[O, I]);
                c.add(rng, "experts", &[N, O, I]);
                c.add(rng, "scores", &[G, N]);
                if kron {
                    add_factors(&mut c, rng);
                }
                if bias {
                    add_biases(&mut c, rng);
                }
                out.push(c);
            }
        }
        "merged_linear" => {
            for bias in [false, true] {
                let mut c = Case::new(if bias { "bias" } else { "no_bias" }, opts_with(|_| {}));
                c.add(rng, "x", &[G, T, I]);
                c.add(rng, "merged", &[G, O, I]);
                if bias {
                    c.add(rng, "merged_bias", &[G, O]);
                }
                out.push(c);
            }
        }
        "dynamic_merge" => {
            let mut c = Case::new("beta", opts_with(|o| o.beta = Some(0.3)));
            c.add(rng, "base", &[O, I]);
            c.add(rng, "curved", &[N, O, I]);
            out.push(c);
        }
        "segment_scores" => {
            let mut c = Case::new("plain", opts_with(|_| {}));
            c.add(rng, "router_scores", &[B, J, N]);
            out.push(c);
        }
        other => panic!("no cases for operator `{other}`: add them here"),
    }
    if backward {
        for c in &mut out {
            match fwd {
                "curvature" => c.add(rng, "grad_curved", &[N, O, I]),
                "merge" | "ca_merge" => {
                    c.add(rng, "grad_merged", &[G, O, I]);
                    if c.has("base_bias") {
                        c.add(rng, "grad_merged_bias", &[G, O]);
                    }
                    if c.opts.beta.is_some() {
                        c.add(rng, "grad_next_base", &[O, I]);
                    }
                }
                "merged_linear" => c.add(rng, "grad_y", &[G, T, O]),
                "dynamic_merge" => c.add(rng, "grad_next_base", &[O, I]),
                "segment_scores" => c.add(rng, "grad_scores", &[B, J, N]),
                _ => {}
            }
        }
    }
    out
}
