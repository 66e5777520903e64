//! Properties of the CPU operators that hold without an oracle: special cases that reduce to simpler
//! operators, the official identity and upcycled initialisations, TIES sign semantics at exact zeros,
//! DARE statistics and reproducibility, bitwise determinism, and NaN propagation.

mod oracle;

use camex::cpu::{self, CaMergeInputs, Curvature, Factors, MergeInputs};
use camex::{Dare, Float, HostTensor, Mask, MergeOptions, Split};
use oracle::glue::{dare_of, dares, mask_of, masks, rel_err, shapes, tensor, vals, Case, Rng};

fn bits<F: Float>(t: &HostTensor<F>) -> Vec<u64> {
    t.data().iter().map(|x| x.to_f64().to_bits()).collect()
}

fn ca_inputs<'a, F: Float>(
    t: &'a oracle::glue::CaseT<F>,
    curvature: Curvature<'a, F>,
    with_bias: bool,
) -> CaMergeInputs<'a, F> {
    CaMergeInputs {
        base: &t.base,
        experts: &t.experts,
        scores: &t.scores,
        curvature,
        base_bias: with_bias.then_some(&t.base_bias),
        expert_bias: with_bias.then_some(&t.expert_bias),
    }
}

fn opts(mask: Mask, dare: Dare) -> MergeOptions {
    MergeOptions {
        alpha: 0.9,
        mask,
        dare,
        beta: None,
        want_curved: false,
    }
}

/// Tolerance for two computations of the same value in different operation orders.
fn same_tol<F: Float>() -> f64 {
    match F::DTYPE {
        camex::DType::F64 => 1e-14,
        _ => 1e-6,
    }
}

// ---------------------------------------------------------------------------------------------
// ca_merge reduces to merge
// ---------------------------------------------------------------------------------------------

/// ca_merge with the identity curvature is domain-specific merging: merge with curved = experts - base
/// (and the mask of ties_mask); with the Kronecker curvature it is merge of `curvature`'s output.
fn ca_merge_is_merge_of_curved<F: Float>() {
    for (k, s) in shapes().iter().enumerate() {
        let c = Case::random(*s, 1000 + k as u64).rounded::<F>();
        let t = c.tensors::<F>();
        let d = s.d;
        let tau: HostTensor<F> = HostTensor::from_fn(&[d.n, d.o, d.i], |idx| {
            t.experts.data()[idx] - t.base.data()[idx % d.oi()]
        });
        for kron in [false, true] {
            let curved = if kron {
                cpu::curvature(&t.base, &t.experts, &t.curvature(true)).unwrap()
            } else {
                tau.clone()
            };
            for m in masks() {
                let mask = cpu::ties_mask(&t.base, &t.experts, mask_of(m)).unwrap();
                for dare in dares() {
                    let what = format!("{s:?} kronecker={kron} mask={m:?} dare={dare:?}");
                    let o = opts(mask_of(m), dare_of(dare));
                    let ca = cpu::ca_merge(&ca_inputs(&t, t.curvature(kron), true), &o).unwrap();
                    let mi = MergeInputs {
                        base: &t.base,
                        curved: &curved,
                        scores: &t.scores,
                        mask: Some(&mask),
                        base_bias: Some(&t.base_bias),
                        expert_bias: Some(&t.expert_bias),
                    };
                    let mg = cpu::merge(&mi, o.alpha, &o.dare).unwrap();
                    let e = rel_err(&vals(&ca.merged), &vals(&mg.merged));
                    assert!(e < same_tol::<F>(), "{what}: ca_merge vs merge: {e:e}");
                    let e = rel_err(
                        &vals(ca.merged_bias.as_ref().unwrap()),
                        &vals(mg.merged_bias.as_ref().unwrap()),
                    );
                    assert!(e < same_tol::<F>(), "{what}: merged_bias: {e:e}");
                }
            }
        }
    }
}

#[test]
fn ca_merge_is_merge_of_curved_f64() {
    ca_merge_is_merge_of_curved::<f64>();
}

#[test]
fn ca_merge_is_merge_of_curved_f32() {
    ca_merge_is_merge_of_curved::<f32>();
}

// ---------------------------------------------------------------------------------------------
// Identity factors (the official initialisation)
// ---------------------------------------------------------------------------------------------

fn identity_factors_give_r_tau<F: Float>() {
    for (k, s) in shapes().iter().enumerate() {
        // Dyadic base/experts: R * tau and sums of R copies of tau are exact, so equality is exact.
        let c = Case::random(*s, 1100 + k as u64).rounded::<F>();
        let t = c.tensors::<F>();
        let d = s.d;
        let sp = s.split;
        let split = Split {
            o1: sp.o1,
            o2: sp.o2,
            i1: sp.i1,
            i2: sp.i2,
        };
        for r in [1usize, 2, 3, 8] {
            let what = format!("{s:?} R={r} ({})", F::DTYPE.name());
            let [a, b, cc, dd] = cpu::identity_factors::<F>(r, d.n, split, false);
            assert_eq!(a.shape(), &[r, d.n, sp.o1, sp.o1], "{what}: factor_a shape");
            assert_eq!(b.shape(), &[r, d.n, sp.o2, sp.o2], "{what}: factor_b shape");
            assert_eq!(
                cc.shape(),
                &[r, d.n, sp.i1, sp.i1],
                "{what}: factor_c shape"
            );
            assert_eq!(
                dd.shape(),
                &[r, d.n, sp.i2, sp.i2],
                "{what}: factor_d shape"
            );
            let curv = Curvature::Kronecker(Factors {
                a: &a,
                b: &b,
                c: &cc,
                d: &dd,
            });
            let u = cpu::curvature(&t.base, &t.experts, &curv).unwrap();
            let want: Vec<f64> = (0..d.n * d.oi())
                .map(|idx| r as f64 * (c.experts[idx] - c.base[idx % d.oi()]))
                .collect();
            assert_eq!(
                vals(&u),
                want,
                "{what}: M_i = R * I must give curved = R * tau exactly"
            );

            let [a, b, cc, dd] = cpu::identity_factors::<F>(r, d.n, split, true);
            let curv = Curvature::Kronecker(Factors {
                a: &a,
                b: &b,
                c: &cc,
                d: &dd,
            });
            let u = cpu::curvature(&t.base, &t.experts, &curv).unwrap();
            let tau: Vec<f64> = (0..d.n * d.oi())
                .map(|idx| c.experts[idx] - c.base[idx % d.oi()])
                .collect();
            let e = rel_err(&vals(&u), &tau);
            // 1/R is rounded once, and R terms are summed.
            let tol = match F::DTYPE {
                camex::DType::F64 => 1e-15,
                _ => 1e-6,
            };
            assert!(
                e < tol,
                "{what}: normalised identity factors must give curved = tau: {e:e}"
            );
        }
    }
}

#[test]
fn identity_factors_give_r_tau_f64() {
    identity_factors_give_r_tau::<f64>();
}

#[test]
fn identity_factors_give_r_tau_f32() {
    identity_factors_give_r_tau::<f32>();
}

// ---------------------------------------------------------------------------------------------
// Upcycled initialisation
// ---------------------------------------------------------------------------------------------

/// Every expert equal to the base (and every expert bias equal to the base bias): tau = 0, so the
/// merged layer is exactly the dense one for every group, curvature, mask and DARE, and so is
/// next_base.
fn upcycled_is_exact<F: Float>() {
    for (k, s) in shapes().iter().enumerate() {
        let mut c = Case::random(*s, 1200 + k as u64).rounded::<F>();
        let d = s.d;
        c.experts = (0..d.n * d.oi()).map(|idx| c.base[idx % d.oi()]).collect();
        c.expert_bias = (0..d.n * d.o).map(|idx| c.base_bias[idx % d.o]).collect();
        let t = c.tensors::<F>();
        for kron in [false, true] {
            for m in masks() {
                for dare in dares() {
                    let what = format!("{s:?} kronecker={kron} mask={m:?} dare={dare:?}");
                    let o = MergeOptions {
                        alpha: 1.0,
                        mask: mask_of(m),
                        dare: dare_of(dare),
                        beta: Some(0.5),
                        want_curved: true,
                    };
                    let out = cpu::ca_merge(&ca_inputs(&t, t.curvature(kron), true), &o).unwrap();
                    for g in 0..d.g {
                        let mg = &out.merged.data()[g * d.oi()..(g + 1) * d.oi()];
                        assert!(
                            mg.iter()
                                .zip(t.base.data())
                                .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits()),
                            "{what}: merged[{g}] != base"
                        );
                        let mb = &out.merged_bias.as_ref().unwrap().data()[g * d.o..(g + 1) * d.o];
                        assert_eq!(
                            mb,
                            t.base_bias.data(),
                            "{what}: merged_bias[{g}] != base_bias"
                        );
                    }
                    assert_eq!(
                        bits(out.next_base.as_ref().unwrap()),
                        bits(&t.base),
                        "{what}: next_base != base"
                    );
                    assert!(
                        out.curved
                            .as_ref()
                            .unwrap()
                            .data()
                            .iter()
                            .all(|&x| x == F::ZERO),
                        "{what}: curved != 0"
                    );
                }
            }
        }
    }
}

#[test]
fn upcycled_is_exact_f64() {
    upcycled_is_exact::<f64>();
}

#[test]
fn upcycled_is_exact_f32() {
    upcycled_is_exact::<f32>();
}

// ---------------------------------------------------------------------------------------------
// TIES sign semantics at exact zeros
// ---------------------------------------------------------------------------------------------

fn sgn(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// N = 3 experts and one column for each of the 27 sign patterns of (tau_0, tau_1, tau_2) in
/// {-1, 0, 1}^3 (magnitudes vary so sums do not cancel by accident, except where they must).
#[test]
fn ties_sign_with_exact_zeros() {
    let n = 3;
    let cols = 27;
    let base = vec![0.25; cols];
    let mut experts = vec![0.0; n * cols];
    let mag = [1.0, 2.0, 4.0];
    for col in 0..cols {
        let mut p = col;
        for e in 0..n {
            let sign = (p % 3) as f64 - 1.0;
            p /= 3;
            experts[e * cols + col] = base[col] + sign * mag[e];
        }
    }
    let bt: HostTensor<f64> = tensor(&[1, cols], &base);
    let et: HostTensor<f64> = tensor(&[n, 1, cols], &experts);
    let m = vals(&cpu::ties_mask(&bt, &et, Mask::TiesSign).unwrap());
    let tm = vals(&cpu::ties_mask(&bt, &et, Mask::TiesTrim(1.0)).unwrap());
    for col in 0..cols {
        let tau: Vec<f64> = (0..n)
            .map(|e| experts[e * cols + col] - base[col])
            .collect();
        let elect = sgn(tau.iter().sum());
        for e in 0..n {
            let want = if sgn(tau[e]) == elect { 1.0 } else { 0.0 };
            assert_eq!(m[e * cols + col], want, "ties_sign tau {tau:?} expert {e}");
            // ties_trim(1) keeps everything non-zero: a zero tau is never kept.
            let want_trim = if tau[e] != 0.0 && sgn(tau[e]) == elect {
                1.0
            } else {
                0.0
            };
            assert_eq!(
                tm[e * cols + col],
                want_trim,
                "ties_trim(1) tau {tau:?} expert {e}"
            );
        }
    }
    // The two cases the rule is about: all zero (sgn 0 == sgn 0: kept by ties_sign) ...
    let all_zero = 13; // (0, 0, 0)
    for e in 0..n {
        assert_eq!(m[e * cols + all_zero], 1.0);
        assert_eq!(tm[e * cols + all_zero], 0.0);
    }
    // ... and one zero among signed values: (0, +, -) with 2 - 4 < 0 elects -, drops the zero.
    let col = 1 + 2 * 3; // tau = (0, +2, -4)
    assert_eq!(
        (0..n).map(|e| m[e * cols + col]).collect::<Vec<_>>(),
        vec![0.0, 0.0, 1.0]
    );
}

/// ties_trim keeps ties at the threshold: with every |tau| equal, any k keeps them all.
#[test]
fn ties_trim_keeps_ties() {
    let (o, i) = (4, 5);
    let base = vec![0.0; o * i];
    let mut rng = Rng::new(77);
    let experts: Vec<f64> = (0..o * i)
        .map(|_| if rng.unit() < 0.5 { -0.5 } else { 0.5 })
        .collect();
    let bt: HostTensor<f64> = tensor(&[o, i], &base);
    let et: HostTensor<f64> = tensor(&[1, o, i], &experts);
    for k in [0.05, 0.3, 1.0] {
        let m = vals(&cpu::ties_mask(&bt, &et, Mask::TiesTrim(k)).unwrap());
        assert!(m.iter().all(|&x| x == 1.0), "k = {k}: {m:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// DARE
// ---------------------------------------------------------------------------------------------

/// p = 0 keeps everything with scale 1: the same merge as no DARE (up to rounding order).
#[test]
fn dare_p0_is_identity() {
    for (k, s) in shapes().iter().enumerate() {
        let c = Case::random(*s, 1300 + k as u64);
        let t = c.tensors::<f64>();
        let base_opts = opts(Mask::TiesSign, Dare::None);
        let none = cpu::ca_merge(&ca_inputs(&t, t.curvature(true), true), &base_opts).unwrap();
        for dare in [
            Dare::Expert { p: 0.0, seed: 1 },
            Dare::Element { p: 0.0, seed: 2 },
        ] {
            let o = opts(Mask::TiesSign, dare);
            let out = cpu::ca_merge(&ca_inputs(&t, t.curvature(true), true), &o).unwrap();
            // Same value; the element path may round differently from the plain one (ulps).
            let e = rel_err(&vals(&out.merged), &vals(&none.merged));
            assert!(e < 1e-15, "{s:?} {dare:?}: {e:e}");
        }
    }
}

/// The same seed gives the same bits; another seed gives another draw.
#[test]
fn dare_seed_reproducible_and_distinct() {
    let s = shapes()[1];
    let c = Case::random(s, 1400);
    let t = c.tensors::<f32>();
    let makers: [fn(u64) -> Dare; 2] = [
        |seed| Dare::Expert { p: 0.5, seed },
        |seed| Dare::Element { p: 0.5, seed },
    ];
    for mk in makers {
        let run = |seed: u64| {
            cpu::ca_merge(
                &ca_inputs(&t, t.curvature(true), false),
                &opts(Mask::None, mk(seed)),
            )
            .unwrap()
            .merged
        };
        let a = run(42);
        let b = run(42);
        assert_eq!(
            bits(&a),
            bits(&b),
            "{:?}: same seed, different bits",
            mk(42)
        );
        let c2 = run(43);
        assert_ne!(
            bits(&a),
            bits(&c2),
            "{:?}: seeds 42 and 43 gave the same draw",
            mk(42)
        );
        // Seeds that differ only in the high 32 bits are different keys too.
        let c3 = run(42 + (1 << 32));
        assert_ne!(bits(&a), bits(&c3), "{:?}: high seed bits ignored", mk(42));
    }
}

/// Fraction kept is 1 - p within 5 sigma, and kept values are scaled by exactly 1/(1-p).
#[test]
fn dare_keep_fraction() {
    for p in [0.1, 0.5, 0.9] {
        // Expert granularity: G groups, N = 2 experts, 1 x 1 weights; expert 1 is zero so merged[g]
        // is expert 0's zeta.
        let (g, n) = (3000, 2);
        let base: HostTensor<f64> = HostTensor::zeros(&[1, 1]);
        let curved: HostTensor<f64> = tensor(&[n, 1, 1], &[1.0, 0.0]);
        let scores: HostTensor<f64> = HostTensor::full(&[g, n], 1.0);
        let mi = MergeInputs {
            base: &base,
            curved: &curved,
            scores: &scores,
            mask: None,
            base_bias: None,
            expert_bias: None,
        };
        let check = |what: &str, merged: &HostTensor<f64>| {
            let scale = 1.0 / (1.0 - p);
            let total = merged.len() as f64;
            let kept = merged.data().iter().filter(|&&x| x != 0.0).count() as f64;
            for &x in merged.data() {
                assert!(
                    x == 0.0 || (x - scale).abs() <= 1e-15 * scale,
                    "{what} p={p}: value {x}"
                );
            }
            let sigma = (p * (1.0 - p) / total).sqrt();
            let frac = kept / total;
            assert!(
                (frac - (1.0 - p)).abs() < 5.0 * sigma,
                "{what} p={p}: kept {frac} of {total}, want {} +- {}",
                1.0 - p,
                5.0 * sigma
            );
        };
        let out = cpu::merge(&mi, 1.0, &Dare::Expert { p, seed: 2024 }).unwrap();
        check("expert", &out.merged);

        // Element granularity: one group, one expert of 64 x 64 ones.
        let (o, i) = (64, 64);
        let base: HostTensor<f64> = HostTensor::zeros(&[o, i]);
        let curved: HostTensor<f64> = HostTensor::full(&[1, o, i], 1.0);
        let scores: HostTensor<f64> = HostTensor::full(&[1, 1], 1.0);
        let mi = MergeInputs {
            base: &base,
            curved: &curved,
            scores: &scores,
            mask: None,
            base_bias: None,
            expert_bias: None,
        };
        let out = cpu::merge(&mi, 1.0, &Dare::Element { p, seed: 99 }).unwrap();
        check("element", &out.merged);
    }
}

// ---------------------------------------------------------------------------------------------
// Determinism
// ---------------------------------------------------------------------------------------------

/// ca_merge forward and backward give the same bits twice, and on 1 or 3 rayon threads.
#[test]
fn ca_merge_is_deterministic() {
    ca_merge_deterministic_at(oracle::glue::shape(4, 4, (6, 8), (5, 8), 3, 2));
}

/// The same where the CPU path splits each slab into several column blocks (o2 * I = 3600), so
/// threads share one expert's mode-1 products and dA contraction.
#[test]
fn ca_merge_is_deterministic_across_blocks() {
    ca_merge_deterministic_at(oracle::glue::shape(2, 3, (6, 20), (9, 20), 2, 2));
}

fn ca_merge_deterministic_at(s: oracle::glue::Shape) {
    let c = Case::random(s, 1500);
    let d = s.d;
    let mut rng = Rng::new(1501);
    let gm: HostTensor<f32> = tensor(&[d.g, d.o, d.i], &rng.vec(d.g * d.oi()));
    let gmb: HostTensor<f32> = tensor(&[d.g, d.o], &rng.vec(d.g * d.o));
    let gnb: HostTensor<f32> = tensor(&[d.o, d.i], &rng.vec(d.oi()));
    let t = c.tensors::<f32>();
    let o = MergeOptions {
        alpha: 1.0,
        mask: Mask::TiesSign,
        dare: Dare::Element { p: 0.1, seed: 3 },
        beta: Some(0.3),
        want_curved: true,
    };
    let run = || {
        let inputs = ca_inputs(&t, t.curvature(true), true);
        let out = cpu::ca_merge(&inputs, &o).unwrap();
        let g = cpu::ca_merge_backward(&inputs, &o, &gm, Some(&gmb), Some(&gnb)).unwrap();
        let f = g.factors.as_ref().unwrap();
        let mut all = vec![
            bits(&out.merged),
            bits(out.merged_bias.as_ref().unwrap()),
            bits(out.next_base.as_ref().unwrap()),
            bits(&g.grad_base),
            bits(&g.grad_experts),
            bits(&g.grad_scores),
            bits(&f.grad_factor_a),
            bits(&f.grad_factor_b),
            bits(&f.grad_factor_c),
            bits(&f.grad_factor_d),
            bits(g.grad_base_bias.as_ref().unwrap()),
            bits(g.grad_expert_bias.as_ref().unwrap()),
        ];
        all.push(vec![
            g.grad_alpha.to_f64().to_bits(),
            g.grad_beta.unwrap().to_f64().to_bits(),
        ]);
        all
    };
    let first = run();
    assert_eq!(first, run(), "two runs differ");
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        assert_eq!(
            first,
            pool.install(run),
            "{threads} threads differ from the default pool"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// NaN propagation
// ---------------------------------------------------------------------------------------------

/// A NaN in base, an expert or a score shows up in merged (where it touches, for the identity
/// curvature), for every mask, with no panic; the backward pass runs too.
#[test]
fn nan_propagates_to_merged() {
    let s = shapes()[1];
    let d = s.d;
    let (p, q) = (2usize, 3usize);
    let at = p * d.i + q;
    for m in masks() {
        for kron in [false, true] {
            for which in ["base", "experts", "scores"] {
                let what = format!("NaN in {which}, mask={m:?} kronecker={kron}");
                let mut c = Case::random(s, 1600);
                match which {
                    "base" => c.base[at] = f64::NAN,
                    "experts" => c.experts[d.oi() + at] = f64::NAN,
                    _ => c.scores[d.n + 1] = f64::NAN, // group 1, expert 1
                }
                let t = c.tensors::<f32>();
                let o = opts(mask_of(m), Dare::None);
                let inputs = ca_inputs(&t, t.curvature(kron), false);
                let out = cpu::ca_merge(&inputs, &o).unwrap();
                let mg = out.merged.data();
                match which {
                    "scores" => assert!(
                        mg[d.oi()..2 * d.oi()].iter().all(|x| x.is_nan()),
                        "{what}: group 1 not all NaN"
                    ),
                    _ if !kron => {
                        for g in 0..d.g {
                            assert!(
                                mg[g * d.oi() + at].is_nan(),
                                "{what}: merged[{g}, {p}, {q}] not NaN"
                            );
                        }
                    }
                    _ => assert!(mg.iter().any(|x| x.is_nan()), "{what}: NaN hidden"),
                }
                let gm: HostTensor<f32> = HostTensor::full(&[d.g, d.o, d.i], 1.0);
                let g = cpu::ca_merge_backward(&inputs, &o, &gm, None, None).unwrap();
                // grad_scores reads the curved experts, grad_experts reads the scores.
                let touched = if which == "scores" {
                    &g.grad_experts
                } else {
                    &g.grad_scores
                };
                assert!(
                    touched.data().iter().any(|x| x.is_nan()),
                    "{what}: the backward pass hides the NaN"
                );
            }
        }
    }
}

/// ties_trim with NaN in tau: a NaN magnitude counts as the largest (it takes one of the kept
/// slots), it is never sign-equal, and the elected sign where it sits is NaN (mask 0 for everyone).
#[test]
fn ties_trim_with_nan_matches_oracle() {
    let s = shapes()[1];
    let d = s.d;
    let mut c = Case::random(s, 1700);
    c.experts[3] = f64::NAN;
    c.experts[d.oi() + 17] = f64::NAN;
    c.base[40] = f64::NAN;
    let t = c.tensors::<f64>();
    let tau = oracle::domain_vectors(&c.base, &c.experts, d.n, d.oi());
    for k in [0.1, 0.25, 0.5, 1.0] {
        for m in [oracle::MaskRef::Trim(k), oracle::MaskRef::Sign] {
            let got = vals(&cpu::ties_mask(&t.base, &t.experts, mask_of(m)).unwrap());
            let want = oracle::ties_mask(&tau, d.n, d.oi(), m);
            assert_eq!(got, want, "{m:?}");
        }
    }
}

/// +-Inf in an expert reaches merged as a non-finite value (no panic).
#[test]
fn inf_propagates_to_merged() {
    let s = shapes()[1];
    let d = s.d;
    let at = 2 * d.i + 3;
    for kron in [false, true] {
        for m in masks() {
            let mut c = Case::random(s, 1800);
            c.experts[at] = f64::INFINITY;
            c.experts[2 * d.oi() + at] = f64::NEG_INFINITY;
            let t = c.tensors::<f32>();
            let out = cpu::ca_merge(
                &ca_inputs(&t, t.curvature(kron), false),
                &opts(mask_of(m), Dare::None),
            )
            .unwrap();
            for g in 0..d.g {
                assert!(
                    !out.merged.data()[g * d.oi() + at].is_finite() || kron,
                    "kronecker={kron} mask={m:?}: merged[{g}] at the Inf is finite"
                );
            }
            assert!(
                out.merged.data().iter().any(|x| !x.is_finite()),
                "kronecker={kron} mask={m:?}: Inf hidden"
            );
        }
    }
}
