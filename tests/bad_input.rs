//! Bad input never panics: every operator returns `camex::Error`, and the message names the tensor
//! (or option) and, for shapes, both the expected and the actual shape. Every call runs under
//! `catch_unwind`, so a panic fails the test with its own message.

mod oracle;

use camex::cpu::{self, CaMergeInputs, Curvature, Factors, MergeInputs};
use camex::{Dare, HostTensor, Mask, MergeOptions, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};

// Sizes of the valid inputs: G = 4, N = 3, O = 6 (2 x 3), I = 10 (5 x 2), R = 2, T = 2.
const G: usize = 4;
const N: usize = 3;
const O: usize = 6;
const I: usize = 10;
const R: usize = 2;
const T: usize = 2;

fn z(shape: &[usize]) -> HostTensor<f32> {
    let mut rng = oracle::glue::Rng::new(shape.iter().product::<usize>() as u64);
    let n = shape.iter().product();
    oracle::glue::tensor(shape, &rng.vec(n))
}

/// Runs `f` under catch_unwind; it must return Err. Returns the error message.
fn err_msg<X>(what: &str, f: impl FnOnce() -> Result<X>) -> String {
    match catch_unwind(AssertUnwindSafe(f)) {
        Err(p) => {
            let m = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what}: panicked instead of returning Err: {m}")
        }
        Ok(Ok(_)) => panic!("{what}: returned Ok"),
        Ok(Err(e)) => e.to_string(),
    }
}

/// The call must fail and its message must contain every needle.
fn expect_err<X>(what: &str, needles: &[&str], f: impl FnOnce() -> Result<X>) {
    let m = err_msg(what, f);
    for n in needles {
        assert!(
            m.contains(n),
            "{what}: message `{m}` does not mention `{n}`"
        );
    }
}

/// Valid inputs, to break one at a time.
struct Good {
    base: HostTensor<f32>,
    experts: HostTensor<f32>,
    scores: HostTensor<f32>,
    a: HostTensor<f32>,
    b: HostTensor<f32>,
    c: HostTensor<f32>,
    d: HostTensor<f32>,
    base_bias: HostTensor<f32>,
    expert_bias: HostTensor<f32>,
    curved: HostTensor<f32>,
    merged: HostTensor<f32>,
    x: HostTensor<f32>,
}

fn good() -> Good {
    Good {
        base: z(&[O, I]),
        experts: z(&[N, O, I]),
        scores: z(&[G, N]),
        a: z(&[R, N, 2, 2]),
        b: z(&[R, N, 3, 3]),
        c: z(&[R, N, 5, 5]),
        d: z(&[R, N, 2, 2]),
        base_bias: z(&[O]),
        expert_bias: z(&[N, O]),
        curved: z(&[N, O, I]),
        merged: z(&[G, O, I]),
        x: z(&[G, T, I]),
    }
}

impl Good {
    fn kron(&self) -> Curvature<'_, f32> {
        Curvature::Kronecker(Factors {
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: &self.d,
        })
    }
    fn ca<'a>(
        &'a self,
        base: &'a HostTensor<f32>,
        experts: &'a HostTensor<f32>,
        scores: &'a HostTensor<f32>,
    ) -> CaMergeInputs<'a, f32> {
        CaMergeInputs {
            base,
            experts,
            scores,
            curvature: self.kron(),
            base_bias: Some(&self.base_bias),
            expert_bias: Some(&self.expert_bias),
        }
    }
    fn mi<'a>(
        &'a self,
        base: &'a HostTensor<f32>,
        curved: &'a HostTensor<f32>,
        scores: &'a HostTensor<f32>,
    ) -> MergeInputs<'a, f32> {
        MergeInputs {
            base,
            curved,
            scores,
            mask: None,
            base_bias: Some(&self.base_bias),
            expert_bias: Some(&self.expert_bias),
        }
    }
}

fn opts() -> MergeOptions {
    MergeOptions {
        alpha: 1.0,
        mask: Mask::TiesSign,
        dare: Dare::Expert { p: 0.1, seed: 1 },
        beta: Some(0.5),
        want_curved: true,
    }
}

/// The valid inputs do work (so each failure below is caused by the one broken input).
#[test]
fn good_inputs_work() {
    let g = good();
    let o = opts();
    cpu::curvature(&g.base, &g.experts, &g.kron()).unwrap();
    cpu::ties_mask(&g.base, &g.experts, Mask::TiesTrim(0.5)).unwrap();
    cpu::merge(&g.mi(&g.base, &g.curved, &g.scores), 1.0, &o.dare).unwrap();
    let ca = g.ca(&g.base, &g.experts, &g.scores);
    cpu::ca_merge(&ca, &o).unwrap();
    cpu::ca_merge_backward(
        &ca,
        &o,
        &z(&[G, O, I]),
        Some(&z(&[G, O])),
        Some(&z(&[O, I])),
    )
    .unwrap();
    cpu::merged_linear(&g.x, &g.merged, Some(&z(&[G, O]))).unwrap();
    cpu::dynamic_merge(&g.base, &g.curved, 0.5).unwrap();
    cpu::segment_scores(&z(&[2, 3, N])).unwrap();
}

#[test]
fn shape_mismatch_experts_vs_base() {
    let g = good();
    let bad = z(&[N, 5, I]);
    let needles = ["experts", "[3, 6, 10]", "[3, 5, 10]"];
    expect_err("curvature", &needles, || {
        cpu::curvature(&g.base, &bad, &Curvature::Identity)
    });
    expect_err("curvature kron", &needles, || {
        cpu::curvature(&g.base, &bad, &g.kron())
    });
    expect_err("ties_mask", &needles, || {
        cpu::ties_mask(&g.base, &bad, Mask::TiesSign)
    });
    expect_err("ca_merge", &needles, || {
        cpu::ca_merge(&g.ca(&g.base, &bad, &g.scores), &opts())
    });
    expect_err("ca_merge_backward", &needles, || {
        cpu::ca_merge_backward(
            &g.ca(&g.base, &bad, &g.scores),
            &opts(),
            &g.merged,
            None,
            None,
        )
    });
    expect_err("curvature_backward", &needles, || {
        cpu::curvature_backward(&g.base, &bad, &g.kron(), &g.curved)
    });
    let needles = ["curved", "[3, 6, 10]", "[3, 5, 10]"];
    expect_err("merge", &needles, || {
        cpu::merge(&g.mi(&g.base, &bad, &g.scores), 1.0, &Dare::None)
    });
    expect_err("merge_backward", &needles, || {
        cpu::merge_backward(
            &g.mi(&g.base, &bad, &g.scores),
            1.0,
            &Dare::None,
            &g.merged,
            None,
        )
    });
    expect_err("dynamic_merge", &needles, || {
        cpu::dynamic_merge(&g.base, &bad, 0.5)
    });
    expect_err("dynamic_merge_backward", &needles, || {
        cpu::dynamic_merge_backward(&g.base, &bad, 0.5, &g.base)
    });
    // scores with the wrong N, a mask and biases of the wrong shape.
    let s2 = z(&[G, 2]);
    expect_err("merge scores N", &["scores", "[4, 3]", "[4, 2]"], || {
        cpu::merge(&g.mi(&g.base, &g.curved, &s2), 1.0, &Dare::None)
    });
    expect_err("ca_merge scores N", &["scores", "[4, 3]", "[4, 2]"], || {
        cpu::ca_merge(&g.ca(&g.base, &g.experts, &s2), &opts())
    });
    let mask = z(&[N, O, 9]);
    let mut mi = g.mi(&g.base, &g.curved, &g.scores);
    mi.mask = Some(&mask);
    expect_err("merge mask", &["mask", "[3, 6, 10]", "[3, 6, 9]"], || {
        cpu::merge(&mi, 1.0, &Dare::None)
    });
    let bb = z(&[5]);
    let mut mi = g.mi(&g.base, &g.curved, &g.scores);
    mi.base_bias = Some(&bb);
    expect_err("merge base_bias", &["base_bias", "[6]", "[5]"], || {
        cpu::merge(&mi, 1.0, &Dare::None)
    });
    let eb = z(&[2, O]);
    let mut ca = g.ca(&g.base, &g.experts, &g.scores);
    ca.expert_bias = Some(&eb);
    expect_err(
        "ca_merge expert_bias",
        &["expert_bias", "[3, 6]", "[2, 6]"],
        || cpu::ca_merge(&ca, &opts()),
    );
    // merged_linear: x with the wrong I, merged_bias with the wrong O.
    let x9 = z(&[G, T, 9]);
    expect_err("merged_linear x", &["x", "[4, 2, 10]", "[4, 2, 9]"], || {
        cpu::merged_linear(&x9, &g.merged, None)
    });
    let mb = z(&[G, 5]);
    expect_err(
        "merged_linear merged_bias",
        &["merged_bias", "[4, 6]", "[4, 5]"],
        || cpu::merged_linear(&g.x, &g.merged, Some(&mb)),
    );
}

#[test]
fn wrong_rank() {
    let g = good();
    let s3 = z(&[G, N, 1]);
    let needles = ["scores", "[4, 3, 1]", "G, N"];
    expect_err("merge", &needles, || {
        cpu::merge(&g.mi(&g.base, &g.curved, &s3), 1.0, &Dare::None)
    });
    expect_err("merge_backward", &needles, || {
        cpu::merge_backward(
            &g.mi(&g.base, &g.curved, &s3),
            1.0,
            &Dare::None,
            &g.merged,
            None,
        )
    });
    expect_err("ca_merge", &needles, || {
        cpu::ca_merge(&g.ca(&g.base, &g.experts, &s3), &opts())
    });
    let b3 = z(&[1, O, I]);
    expect_err("curvature base", &["base", "[1, 6, 10]", "O, I"], || {
        cpu::curvature(&b3, &g.experts, &Curvature::Identity)
    });
    let e2 = z(&[O, I]);
    expect_err(
        "ties_mask experts",
        &["experts", "[6, 10]", "N, O, I"],
        || cpu::ties_mask(&g.base, &e2, Mask::None),
    );
    let a3 = z(&[R, N, 2]);
    let kr = Curvature::Kronecker(Factors {
        a: &a3,
        b: &g.b,
        c: &g.c,
        d: &g.d,
    });
    expect_err("curvature factor_a", &["factor_a", "[2, 3, 2]"], || {
        cpu::curvature(&g.base, &g.experts, &kr)
    });
    let x2 = z(&[G * T, I]);
    expect_err("merged_linear x", &["x", "[8, 10]", "G, T, I"], || {
        cpu::merged_linear(&x2, &g.merged, None)
    });
    let r2 = z(&[2, N]);
    expect_err(
        "segment_scores",
        &["router_scores", "[2, 3]", "B, J, N"],
        || cpu::segment_scores(&r2),
    );
    expect_err(
        "segment_scores_backward",
        &["grad_scores", "[2, 3]", "B, J, N"],
        || cpu::segment_scores_backward(&r2),
    );
}

#[test]
fn factor_split_does_not_divide() {
    let g = good();
    // o1 = 4 does not divide O = 6.
    let a4 = z(&[R, N, 4, 4]);
    let kr = Curvature::Kronecker(Factors {
        a: &a4,
        b: &g.b,
        c: &g.c,
        d: &g.d,
    });
    let needles = ["factor_a", "[2, 3, 4, 4]", "6"];
    expect_err("curvature", &needles, || {
        cpu::curvature(&g.base, &g.experts, &kr)
    });
    let mut ca = g.ca(&g.base, &g.experts, &g.scores);
    ca.curvature = kr;
    expect_err("ca_merge", &needles, || cpu::ca_merge(&ca, &opts()));
    expect_err("ca_merge_backward", &needles, || {
        cpu::ca_merge_backward(&ca, &opts(), &g.merged, None, None)
    });
    // i1 = 3 does not divide I = 10.
    let c3 = z(&[R, N, 3, 3]);
    let kr = Curvature::Kronecker(Factors {
        a: &g.a,
        b: &g.b,
        c: &c3,
        d: &g.d,
    });
    expect_err(
        "curvature factor_c",
        &["factor_c", "[2, 3, 3, 3]", "10"],
        || cpu::curvature(&g.base, &g.experts, &kr),
    );
    // o1 divides O but factor_b is not o2 x o2.
    let b2 = z(&[R, N, 2, 2]);
    let kr = Curvature::Kronecker(Factors {
        a: &g.a,
        b: &b2,
        c: &g.c,
        d: &g.d,
    });
    expect_err(
        "curvature factor_b",
        &["factor_b", "[2, 3, 3, 3]", "[2, 3, 2, 2]"],
        || cpu::curvature(&g.base, &g.experts, &kr),
    );
    // factor_d with another rank than factor_a.
    let d1 = z(&[1, N, 2, 2]);
    let kr = Curvature::Kronecker(Factors {
        a: &g.a,
        b: &g.b,
        c: &g.c,
        d: &d1,
    });
    expect_err(
        "curvature factor_d rank",
        &["factor_d", "[2, 3, 2, 2]", "[1, 3, 2, 2]"],
        || cpu::curvature(&g.base, &g.experts, &kr),
    );
    // factor_a for another N.
    let a_n = z(&[R, 2, 2, 2]);
    let kr = Curvature::Kronecker(Factors {
        a: &a_n,
        b: &g.b,
        c: &g.c,
        d: &g.d,
    });
    expect_err(
        "curvature factor_a N",
        &["factor_a", "[2, 3, 2, 2]", "[2, 2, 2, 2]"],
        || cpu::curvature(&g.base, &g.experts, &kr),
    );
}

#[test]
fn non_finite_alpha_and_beta() {
    let g = good();
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let o = MergeOptions {
            alpha: bad,
            ..opts()
        };
        let ca = g.ca(&g.base, &g.experts, &g.scores);
        expect_err(&format!("ca_merge alpha={bad}"), &["alpha"], || {
            cpu::ca_merge(&ca, &o)
        });
        expect_err(
            &format!("ca_merge_backward alpha={bad}"),
            &["alpha"],
            || cpu::ca_merge_backward(&ca, &o, &g.merged, None, None),
        );
        expect_err(&format!("merge alpha={bad}"), &["alpha"], || {
            cpu::merge(&g.mi(&g.base, &g.curved, &g.scores), bad, &Dare::None)
        });
        expect_err(&format!("merge_backward alpha={bad}"), &["alpha"], || {
            cpu::merge_backward(
                &g.mi(&g.base, &g.curved, &g.scores),
                bad,
                &Dare::None,
                &g.merged,
                None,
            )
        });
        let o = MergeOptions {
            beta: Some(bad),
            ..opts()
        };
        expect_err(&format!("ca_merge beta={bad}"), &["beta"], || {
            cpu::ca_merge(&ca, &o)
        });
        expect_err(&format!("dynamic_merge beta={bad}"), &["beta"], || {
            cpu::dynamic_merge(&g.base, &g.curved, bad)
        });
        expect_err(
            &format!("dynamic_merge_backward beta={bad}"),
            &["beta"],
            || cpu::dynamic_merge_backward(&g.base, &g.curved, bad, &g.base),
        );
    }
}

#[test]
fn empty_tensors() {
    let g = good();
    let b0 = z(&[O, 0]);
    let e0 = z(&[N, O, 0]);
    expect_err("curvature", &["base", "[6, 0]"], || {
        cpu::curvature(&b0, &e0, &Curvature::Identity)
    });
    expect_err("ties_mask", &["base", "[6, 0]"], || {
        cpu::ties_mask(&b0, &e0, Mask::TiesSign)
    });
    let e00 = z(&[0, O, I]);
    expect_err("curvature no experts", &["experts", "[0, 6, 10]"], || {
        cpu::curvature(&g.base, &e00, &Curvature::Identity)
    });
    let s0 = z(&[0, N]);
    expect_err("merge no groups", &["scores", "[0, 3]"], || {
        cpu::merge(&g.mi(&g.base, &g.curved, &s0), 1.0, &Dare::None)
    });
    expect_err("ca_merge no groups", &["scores", "[0, 3]"], || {
        cpu::ca_merge(&g.ca(&g.base, &g.experts, &s0), &opts())
    });
    let a0 = z(&[0, N, 2, 2]);
    let kr = Curvature::Kronecker(Factors {
        a: &a0,
        b: &g.b,
        c: &g.c,
        d: &g.d,
    });
    expect_err("curvature rank 0", &["factor_a", "[0, 3, 2, 2]"], || {
        cpu::curvature(&g.base, &g.experts, &kr)
    });
    let x0 = z(&[G, 0, I]);
    expect_err("merged_linear no tokens", &["x", "[4, 0, 10]"], || {
        cpu::merged_linear(&x0, &g.merged, None)
    });
    let m0 = z(&[0, O, I]);
    expect_err("merged_linear no groups", &["merged", "[0, 6, 10]"], || {
        cpu::merged_linear(&g.x, &m0, None)
    });
    let r0 = z(&[2, 0, N]);
    expect_err("segment_scores", &["router_scores", "[2, 0, 3]"], || {
        cpu::segment_scores(&r0)
    });
    let c0 = z(&[N, O, 0]);
    expect_err("dynamic_merge", &["[6, 0]"], || {
        cpu::dynamic_merge(&b0, &c0, 0.5)
    });
}

#[test]
fn dare_p_out_of_range() {
    let g = good();
    for p in [1.0, 1.5, -0.1, f64::NAN] {
        for dare in [Dare::Expert { p, seed: 1 }, Dare::Element { p, seed: 1 }] {
            expect_err(&format!("validate {dare:?}"), &["dare", "[0, 1)"], || {
                dare.validate()
            });
            let o = MergeOptions { dare, ..opts() };
            let ca = g.ca(&g.base, &g.experts, &g.scores);
            expect_err(&format!("ca_merge {dare:?}"), &["dare"], || {
                cpu::ca_merge(&ca, &o)
            });
            expect_err(&format!("ca_merge_backward {dare:?}"), &["dare"], || {
                cpu::ca_merge_backward(&ca, &o, &g.merged, None, None)
            });
            expect_err(&format!("merge {dare:?}"), &["dare"], || {
                cpu::merge(&g.mi(&g.base, &g.curved, &g.scores), 1.0, &dare)
            });
            expect_err(&format!("merge_backward {dare:?}"), &["dare"], || {
                cpu::merge_backward(
                    &g.mi(&g.base, &g.curved, &g.scores),
                    1.0,
                    &dare,
                    &g.merged,
                    None,
                )
            });
        }
    }
}

#[test]
fn ties_trim_k_out_of_range() {
    let g = good();
    for k in [0.0, -0.5, 1.5, f64::NAN] {
        let mask = Mask::TiesTrim(k);
        expect_err(&format!("validate k={k}"), &["ties_trim", "(0, 1]"], || {
            mask.validate()
        });
        expect_err(&format!("ties_mask k={k}"), &["ties_trim"], || {
            cpu::ties_mask(&g.base, &g.experts, mask)
        });
        let o = MergeOptions { mask, ..opts() };
        let ca = g.ca(&g.base, &g.experts, &g.scores);
        expect_err(&format!("ca_merge k={k}"), &["ties_trim"], || {
            cpu::ca_merge(&ca, &o)
        });
        expect_err(&format!("ca_merge_backward k={k}"), &["ties_trim"], || {
            cpu::ca_merge_backward(&ca, &o, &g.merged, None, None)
        });
    }
}

#[test]
fn grad_shape_mismatch() {
    let g = good();
    let gc = z(&[N, O, 9]);
    expect_err(
        "curvature_backward",
        &["grad_curved", "[3, 6, 10]", "[3, 6, 9]"],
        || cpu::curvature_backward(&g.base, &g.experts, &g.kron(), &gc),
    );
    let gm = z(&[G, O, 9]);
    let mi = g.mi(&g.base, &g.curved, &g.scores);
    expect_err(
        "merge_backward grad_merged",
        &["grad_merged", "[4, 6, 10]", "[4, 6, 9]"],
        || cpu::merge_backward(&mi, 1.0, &Dare::None, &gm, None),
    );
    let gmb = z(&[G, 5]);
    expect_err(
        "merge_backward grad_merged_bias",
        &["grad_merged_bias", "[4, 6]", "[4, 5]"],
        || cpu::merge_backward(&mi, 1.0, &Dare::None, &g.merged, Some(&gmb)),
    );
    let ca = g.ca(&g.base, &g.experts, &g.scores);
    expect_err(
        "ca_merge_backward grad_merged",
        &["grad_merged", "[4, 6, 10]", "[4, 6, 9]"],
        || cpu::ca_merge_backward(&ca, &opts(), &gm, None, None),
    );
    expect_err(
        "ca_merge_backward grad_merged_bias",
        &["grad_merged_bias", "[4, 6]", "[4, 5]"],
        || cpu::ca_merge_backward(&ca, &opts(), &g.merged, Some(&gmb), None),
    );
    let gnb = z(&[O, 9]);
    expect_err(
        "ca_merge_backward grad_next_base",
        &["grad_next_base", "[6, 10]", "[6, 9]"],
        || cpu::ca_merge_backward(&ca, &opts(), &g.merged, None, Some(&gnb)),
    );
    expect_err(
        "dynamic_merge_backward",
        &["grad_next_base", "[6, 10]", "[6, 9]"],
        || cpu::dynamic_merge_backward(&g.base, &g.curved, 0.5, &gnb),
    );
    let gy = z(&[G, T, 5]);
    expect_err(
        "merged_linear_backward",
        &["grad_y", "[4, 2, 6]", "[4, 2, 5]"],
        || cpu::merged_linear_backward(&g.x, &g.merged, None, &gy),
    );
    // A wrong forward input is reported by the backward op too.
    let x9 = z(&[G, T, 9]);
    expect_err(
        "merged_linear_backward x",
        &["x", "[4, 2, 10]", "[4, 2, 9]"],
        || cpu::merged_linear_backward(&x9, &g.merged, None, &z(&[G, T, O])),
    );
}

/// An upstream gradient for an output the forward pass does not have is an error, not ignored.
#[test]
fn grad_for_absent_output() {
    let g = good();
    let mut ca = g.ca(&g.base, &g.experts, &g.scores);
    ca.base_bias = None;
    ca.expert_bias = None;
    let gmb = z(&[G, O]);
    expect_err(
        "ca_merge_backward grad_merged_bias without biases",
        &["grad_merged_bias"],
        || cpu::ca_merge_backward(&ca, &opts(), &g.merged, Some(&gmb), None),
    );
    let o = MergeOptions {
        beta: None,
        ..opts()
    };
    expect_err(
        "ca_merge_backward grad_next_base without beta",
        &["grad_next_base"],
        || cpu::ca_merge_backward(&ca, &o, &g.merged, None, Some(&g.base)),
    );
    let mut mi = g.mi(&g.base, &g.curved, &g.scores);
    mi.base_bias = None;
    mi.expert_bias = None;
    expect_err(
        "merge_backward grad_merged_bias without biases",
        &["grad_merged_bias"],
        || cpu::merge_backward(&mi, 1.0, &Dare::None, &g.merged, Some(&gmb)),
    );
}

#[test]
fn biases_one_without_the_other() {
    let g = good();
    let mut mi = g.mi(&g.base, &g.curved, &g.scores);
    mi.expert_bias = None;
    expect_err("merge base_bias only", &["expert_bias"], || {
        cpu::merge(&mi, 1.0, &Dare::None)
    });
    expect_err("merge_backward base_bias only", &["expert_bias"], || {
        cpu::merge_backward(&mi, 1.0, &Dare::None, &g.merged, Some(&z(&[G, O])))
    });
    let mut ca = g.ca(&g.base, &g.experts, &g.scores);
    ca.base_bias = None;
    expect_err("ca_merge expert_bias only", &["base_bias"], || {
        cpu::ca_merge(&ca, &opts())
    });
    expect_err("ca_merge_backward expert_bias only", &["base_bias"], || {
        cpu::ca_merge_backward(&ca, &opts(), &g.merged, Some(&z(&[G, O])), None)
    });
}

/// HostTensor::new with a data length that does not match the shape is an Err too.
#[test]
fn tensor_new_length_mismatch() {
    expect_err("HostTensor::new", &["[2, 3]", "5"], || {
        HostTensor::new(&[2, 3], vec![0.0f32; 5])
    });
}
