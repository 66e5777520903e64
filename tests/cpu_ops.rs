//! Every CPU operator, forward and backward, f32 and f64, against the float64 oracle
//! (`tests/oracle`) on random inputs at small shapes: splits with a 1 and non-square ones, R in
//! {1,2,3}, N in {1,3}, G in {1,4}, every mask kind and both DARE granularities.
//! Metric (SPEC section 5, bound 1): ||out - ref|| / ||ref|| (Frobenius) below 1e-12 (f64) or 1e-5
//! (f32); grad_alpha, grad_beta and each grad_scores entry |out - ref| <= tol * S, S the sum of the
//! absolute values of its terms. (f16/bf16, and bound 2, are checked on the kernels in tests/gpu.rs.)

mod oracle;

use camex::cpu::{self, CaMergeInputs, MergeInputs};
use camex::{Dare, Float, HostTensor, Mask, MergeOptions};
use oracle::glue::{
    check, check_scalar, check_sums, dare_of, dares, mask_of, masks, rounded, shapes, tensor, vals,
    Case, CaseT, Rng,
};
use oracle::{self as orc, CaRefIn, DareRef, Dims, MaskRef};

/// Random values rounded to F: (as f64 for the oracle, as a tensor for the operator).
fn rand_t<F: Float>(rng: &mut Rng, shape: &[usize]) -> (Vec<f64>, HostTensor<F>) {
    let n = shape.iter().product();
    let v = rounded::<F>(&rng.vec(n));
    let t = tensor(shape, &v);
    (v, t)
}

// ---------------------------------------------------------------------------------------------
// The oracle's own checks
// ---------------------------------------------------------------------------------------------

/// Random123's published kat_vectors for philox4x32_10.
#[test]
fn oracle_philox_known_answers() {
    assert_eq!(
        orc::philox4x32_10([0, 0, 0, 0], [0, 0]),
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    );
    assert_eq!(
        orc::philox4x32_10([0xffff_ffff; 4], [0xffff_ffff; 2]),
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
    );
    assert_eq!(
        orc::philox4x32_10(
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0]
        ),
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    );
}

/// camex's Philox equals the oracle's on random counters and keys.
#[test]
fn philox_matches_oracle() {
    let mut rng = Rng::new(11);
    for _ in 0..2000 {
        let w = rng.next_u64();
        let v = rng.next_u64();
        let k = rng.next_u64();
        let ctr = [w as u32, (w >> 32) as u32, v as u32, (v >> 32) as u32];
        let key = [k as u32, (k >> 32) as u32];
        assert_eq!(
            camex::philox::philox4x32_10(ctr, key),
            orc::philox4x32_10(ctr, key),
            "ctr {ctr:x?} key {key:x?}"
        );
    }
}

/// The oracle's factor gradients (from the explicit Kronecker matrices) equal SPEC section 4's
/// 4-D contraction formula.
#[test]
fn oracle_factor_grads_two_routes_agree() {
    for (k, s) in shapes().iter().enumerate() {
        let c = Case::random(*s, 500 + k as u64);
        let d = s.d;
        let h = Rng::new(900 + k as u64).vec(d.n * d.oi());
        let tau = orc::domain_vectors(&c.base, &c.experts, d.n, d.oi());
        let (_, f) = orc::curve_tau_backward(&tau, Some(&c.kron), d.n, d.o, d.i, &h);
        let f = f.unwrap();
        let sp = s.split;
        let ks = [sp.o1, sp.o2, sp.i1, sp.i2];
        for r in 0..s.r {
            for e in 0..d.n {
                let oi = d.oi();
                let g4 = orc::factor_grads_4d(
                    &tau[e * oi..(e + 1) * oi],
                    &h[e * oi..(e + 1) * oi],
                    &c.kron,
                    r,
                    e,
                    d.n,
                );
                for m in 0..4 {
                    let kk = ks[m] * ks[m];
                    let off = (r * d.n + e) * kk;
                    let err = oracle::glue::rel_err(&f[m][off..off + kk], &g4[m]);
                    assert!(err < 1e-12, "{s:?} r={r} e={e} factor {m}: {err:e}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// curvature
// ---------------------------------------------------------------------------------------------

fn curvature_vs_oracle<F: Float>() {
    for (k, s) in shapes().iter().enumerate() {
        let c = Case::random(*s, 100 + k as u64).rounded::<F>();
        let t = c.tensors::<F>();
        let d = s.d;
        let mut rng = Rng::new(200 + k as u64);
        for kron in [false, true] {
            let what = format!("{s:?} kronecker={kron}");
            let kr = kron.then_some(&c.kron);
            let curv = t.curvature(kron);
            let out = cpu::curvature(&t.base, &t.experts, &curv).unwrap();
            let reference = orc::curvature(&c.base, &c.experts, kr, d.n, d.o, d.i);
            check(
                &format!("curved {what}"),
                &out,
                &[d.n, d.o, d.i],
                &reference,
            );

            let (gc, gc_t) = rand_t::<F>(&mut rng, &[d.n, d.o, d.i]);
            let g = cpu::curvature_backward(&t.base, &t.experts, &curv, &gc_t).unwrap();
            let rg = orc::curvature_backward(&c.base, &c.experts, kr, d.n, d.o, d.i, &gc);
            check(
                &format!("grad_base {what}"),
                &g.grad_base,
                &[d.o, d.i],
                &rg.grad_base,
            );
            check(
                &format!("grad_experts {what}"),
                &g.grad_experts,
                &[d.n, d.o, d.i],
                &rg.grad_experts,
            );
            match (&g.factors, &rg.factors) {
                (None, None) => assert!(!kron),
                (Some(f), Some(rf)) => {
                    let sp = s.split;
                    let r = s.r;
                    check(
                        &format!("grad_factor_a {what}"),
                        &f.grad_factor_a,
                        &[r, d.n, sp.o1, sp.o1],
                        &rf[0],
                    );
                    check(
                        &format!("grad_factor_b {what}"),
                        &f.grad_factor_b,
                        &[r, d.n, sp.o2, sp.o2],
                        &rf[1],
                    );
                    check(
                        &format!("grad_factor_c {what}"),
                        &f.grad_factor_c,
                        &[r, d.n, sp.i1, sp.i1],
                        &rf[2],
                    );
                    check(
                        &format!("grad_factor_d {what}"),
                        &f.grad_factor_d,
                        &[r, d.n, sp.i2, sp.i2],
                        &rf[3],
                    );
                }
                (a, b) => panic!(
                    "{what}: factor grads present: camex {} oracle {}",
                    a.is_some(),
                    b.is_some()
                ),
            }
        }
    }
}

#[test]
fn curvature_f64() {
    curvature_vs_oracle::<f64>();
}

#[test]
fn curvature_f32() {
    curvature_vs_oracle::<f32>();
}

// ---------------------------------------------------------------------------------------------
// ties_mask
// ---------------------------------------------------------------------------------------------

fn ties_mask_vs_oracle<F: Float>() {
    for (k, s) in shapes().iter().enumerate() {
        let c = Case::random(*s, 300 + k as u64).rounded::<F>();
        let t = c.tensors::<F>();
        let d = s.d;
        let tau = orc::domain_vectors(&c.base, &c.experts, d.n, d.oi());
        for m in masks() {
            let out = cpu::ties_mask(&t.base, &t.experts, mask_of(m)).unwrap();
            assert_eq!(out.shape(), &[d.n, d.o, d.i]);
            let reference = orc::ties_mask(&tau, d.n, d.oi(), m);
            // A mask is 0/1: it must match exactly.
            assert_eq!(
                vals(&out),
                reference,
                "mask {m:?} at {s:?} ({})",
                F::DTYPE.name()
            );
        }
    }
}

#[test]
fn ties_mask_f64() {
    ties_mask_vs_oracle::<f64>();
}

#[test]
fn ties_mask_f32() {
    ties_mask_vs_oracle::<f32>();
}

// ---------------------------------------------------------------------------------------------
// merge
// ---------------------------------------------------------------------------------------------

fn merge_vs_oracle<F: Float>() {
    let alpha = 0.7;
    for (k, s) in shapes().iter().enumerate() {
        let c = Case::random(*s, 400 + k as u64).rounded::<F>();
        let t = c.tensors::<F>();
        let d = s.d;
        let mut rng = Rng::new(450 + k as u64);
        let (curved, curved_t) = rand_t::<F>(&mut rng, &[d.n, d.o, d.i]);
        let tau = orc::domain_vectors(&c.base, &c.experts, d.n, d.oi());
        for m in masks() {
            let mask = (m != MaskRef::None).then(|| orc::ties_mask(&tau, d.n, d.oi(), m));
            let mask_t: Option<HostTensor<F>> = mask.as_ref().map(|v| tensor(&[d.n, d.o, d.i], v));
            for dare in dares() {
                for with_bias in [false, true] {
                    let what = format!("{s:?} mask={m:?} dare={dare:?} bias={with_bias}");
                    let inputs = MergeInputs {
                        base: &t.base,
                        curved: &curved_t,
                        scores: &t.scores,
                        mask: mask_t.as_ref(),
                        base_bias: with_bias.then_some(&t.base_bias),
                        expert_bias: with_bias.then_some(&t.expert_bias),
                    };
                    let biases =
                        with_bias.then_some((c.base_bias.as_slice(), c.expert_bias.as_slice()));
                    let out = cpu::merge(&inputs, alpha, &dare_of(dare)).unwrap();
                    let r = orc::merge(
                        d,
                        &c.base,
                        &curved,
                        &c.scores,
                        mask.as_deref(),
                        biases,
                        alpha,
                        dare,
                    );
                    check(
                        &format!("merged {what}"),
                        &out.merged,
                        &[d.g, d.o, d.i],
                        &r.merged,
                    );
                    match (&out.merged_bias, &r.merged_bias) {
                        (Some(o), Some(rb)) => {
                            check(&format!("merged_bias {what}"), o, &[d.g, d.o], rb)
                        }
                        (None, None) => {}
                        _ => panic!("{what}: merged_bias presence differs"),
                    }

                    let (gm, gm_t) = rand_t::<F>(&mut rng, &[d.g, d.o, d.i]);
                    let (gmb, gmb_t) = rand_t::<F>(&mut rng, &[d.g, d.o]);
                    let gmb_opt = with_bias.then_some(gmb.as_slice());
                    let g = cpu::merge_backward(
                        &inputs,
                        alpha,
                        &dare_of(dare),
                        &gm_t,
                        with_bias.then_some(&gmb_t),
                    )
                    .unwrap();
                    let rg = orc::merge_backward(
                        d,
                        &c.base,
                        &curved,
                        &c.scores,
                        mask.as_deref(),
                        biases,
                        alpha,
                        dare,
                        &gm,
                        gmb_opt,
                    );
                    check(
                        &format!("grad_base {what}"),
                        &g.grad_base,
                        &[d.o, d.i],
                        &rg.grad_base,
                    );
                    check(
                        &format!("grad_curved {what}"),
                        &g.grad_curved,
                        &[d.n, d.o, d.i],
                        &rg.grad_curved,
                    );
                    let (s_alpha, s_scores) = orc::merge_backward_scales(
                        d,
                        &curved,
                        &c.scores,
                        mask.as_deref(),
                        biases,
                        alpha,
                        dare,
                        &gm,
                        gmb_opt,
                    );
                    check_sums(
                        &format!("grad_scores {what}"),
                        &g.grad_scores,
                        &[d.g, d.n],
                        &rg.grad_scores,
                        &s_scores,
                    );
                    check_scalar(
                        &format!("grad_alpha {what}"),
                        g.grad_alpha,
                        rg.grad_alpha,
                        s_alpha,
                    );
                    if with_bias {
                        let gbb = g.grad_base_bias.as_ref().expect("grad_base_bias");
                        let geb = g.grad_expert_bias.as_ref().expect("grad_expert_bias");
                        check(
                            &format!("grad_base_bias {what}"),
                            gbb,
                            &[d.o],
                            rg.grad_base_bias.as_ref().unwrap(),
                        );
                        check(
                            &format!("grad_expert_bias {what}"),
                            geb,
                            &[d.n, d.o],
                            rg.grad_expert_bias.as_ref().unwrap(),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn merge_f64() {
    merge_vs_oracle::<f64>();
}

#[test]
fn merge_f32() {
    merge_vs_oracle::<f32>();
}

// ---------------------------------------------------------------------------------------------
// ca_merge (fused curvature + mask + merge + dynamic merge)
// ---------------------------------------------------------------------------------------------

fn ca_merge_vs_oracle<F: Float>() {
    let alpha = 1.3;
    let beta_v = 0.6;
    let mut combo = 0usize;
    for (k, s) in shapes().iter().enumerate() {
        let c = Case::random(*s, 600 + k as u64).rounded::<F>();
        let t = c.tensors::<F>();
        let d = s.d;
        let mut rng = Rng::new(650 + k as u64);
        for kron in [false, true] {
            for m in masks() {
                for dare in dares() {
                    // Alternate biases and beta over the combinations so every pairing occurs.
                    combo += 1;
                    let with_bias = combo.is_multiple_of(2);
                    let beta = (!combo.is_multiple_of(3)).then_some(beta_v);
                    let what = format!(
                        "{s:?} kronecker={kron} mask={m:?} dare={dare:?} bias={with_bias} beta={beta:?}"
                    );
                    let opts = MergeOptions {
                        alpha,
                        mask: mask_of(m),
                        dare: dare_of(dare),
                        beta,
                        want_curved: true,
                    };
                    let inputs = CaMergeInputs {
                        base: &t.base,
                        experts: &t.experts,
                        scores: &t.scores,
                        curvature: t.curvature(kron),
                        base_bias: with_bias.then_some(&t.base_bias),
                        expert_bias: with_bias.then_some(&t.expert_bias),
                    };
                    let x = CaRefIn {
                        d,
                        base: &c.base,
                        experts: &c.experts,
                        scores: &c.scores,
                        kron: kron.then_some(&c.kron),
                        biases: with_bias
                            .then_some((c.base_bias.as_slice(), c.expert_bias.as_slice())),
                        alpha,
                        mask: m,
                        dare,
                        beta,
                    };
                    let out = cpu::ca_merge(&inputs, &opts).unwrap();
                    let r = orc::ca_merge(&x);
                    check(
                        &format!("merged {what}"),
                        &out.merged,
                        &[d.g, d.o, d.i],
                        &r.merged,
                    );
                    match (&out.merged_bias, &r.merged_bias) {
                        (Some(o), Some(rb)) => {
                            check(&format!("merged_bias {what}"), o, &[d.g, d.o], rb)
                        }
                        (None, None) => {}
                        _ => panic!("{what}: merged_bias presence differs"),
                    }
                    match (&out.next_base, &r.next_base) {
                        (Some(o), Some(rb)) => {
                            check(&format!("next_base {what}"), o, &[d.o, d.i], rb)
                        }
                        (None, None) => {}
                        _ => panic!("{what}: next_base presence differs"),
                    }
                    let curved = out.curved.as_ref().expect("want_curved gives curved");
                    check(
                        &format!("curved {what}"),
                        curved,
                        &[d.n, d.o, d.i],
                        &r.curved,
                    );

                    let (gm, gm_t) = rand_t::<F>(&mut rng, &[d.g, d.o, d.i]);
                    let (gmb, gmb_t) = rand_t::<F>(&mut rng, &[d.g, d.o]);
                    let (gnb, gnb_t) = rand_t::<F>(&mut rng, &[d.o, d.i]);
                    let g = cpu::ca_merge_backward(
                        &inputs,
                        &opts,
                        &gm_t,
                        with_bias.then_some(&gmb_t),
                        beta.map(|_| &gnb_t),
                    )
                    .unwrap();
                    // Given the forward's U instead of recomputing it: the same bits.
                    let gu = cpu::ca_merge_backward_with_curved(
                        &inputs,
                        &opts,
                        curved,
                        &gm_t,
                        with_bias.then_some(&gmb_t),
                        beta.map(|_| &gnb_t),
                    )
                    .unwrap();
                    assert_same_grads(&what, &g, &gu);
                    let gmb_opt = with_bias.then_some(gmb.as_slice());
                    let rg = orc::ca_merge_backward(&x, &gm, gmb_opt, beta.map(|_| gnb.as_slice()));
                    check(
                        &format!("grad_base {what}"),
                        &g.grad_base,
                        &[d.o, d.i],
                        &rg.grad_base,
                    );
                    check(
                        &format!("grad_experts {what}"),
                        &g.grad_experts,
                        &[d.n, d.o, d.i],
                        &rg.grad_experts,
                    );
                    let tau = orc::domain_vectors(&c.base, &c.experts, d.n, d.oi());
                    let mask = orc::ties_mask(&tau, d.n, d.oi(), m);
                    let (s_alpha, s_scores) = orc::merge_backward_scales(
                        d,
                        &r.curved,
                        &c.scores,
                        Some(&mask),
                        x.biases,
                        alpha,
                        dare,
                        &gm,
                        gmb_opt,
                    );
                    check_sums(
                        &format!("grad_scores {what}"),
                        &g.grad_scores,
                        &[d.g, d.n],
                        &rg.grad_scores,
                        &s_scores,
                    );
                    check_scalar(
                        &format!("grad_alpha {what}"),
                        g.grad_alpha,
                        rg.grad_alpha,
                        s_alpha,
                    );
                    match (g.grad_beta, rg.grad_beta) {
                        (Some(gb), Some(rb)) => {
                            let sc = orc::beta_scale(&r.curved, d.n, &gnb);
                            check_scalar(&format!("grad_beta {what}"), gb, rb, sc);
                        }
                        (None, None) => {}
                        _ => panic!("{what}: grad_beta presence differs"),
                    }
                    match (&g.factors, &rg.factors) {
                        (None, None) => assert!(!kron, "{what}: no factor grads"),
                        (Some(f), Some(rf)) => {
                            let sp = s.split;
                            let rr = s.r;
                            check(
                                &format!("grad_factor_a {what}"),
                                &f.grad_factor_a,
                                &[rr, d.n, sp.o1, sp.o1],
                                &rf[0],
                            );
                            check(
                                &format!("grad_factor_b {what}"),
                                &f.grad_factor_b,
                                &[rr, d.n, sp.o2, sp.o2],
                                &rf[1],
                            );
                            check(
                                &format!("grad_factor_c {what}"),
                                &f.grad_factor_c,
                                &[rr, d.n, sp.i1, sp.i1],
                                &rf[2],
                            );
                            check(
                                &format!("grad_factor_d {what}"),
                                &f.grad_factor_d,
                                &[rr, d.n, sp.i2, sp.i2],
                                &rf[3],
                            );
                        }
                        (a, b) => panic!(
                            "{what}: factor grads present: camex {} oracle {}",
                            a.is_some(),
                            b.is_some()
                        ),
                    }
                    if with_bias {
                        let gbb = g.grad_base_bias.as_ref().expect("grad_base_bias");
                        let geb = g.grad_expert_bias.as_ref().expect("grad_expert_bias");
                        check(
                            &format!("grad_base_bias {what}"),
                            gbb,
                            &[d.o],
                            rg.grad_base_bias.as_ref().unwrap(),
                        );
                        check(
                            &format!("grad_expert_bias {what}"),
                            geb,
                            &[d.n, d.o],
                            rg.grad_expert_bias.as_ref().unwrap(),
                        );
                    }
                }
            }
        }
    }
}

/// Every gradient of `a` and `b` has the same bits (and the same presence).
fn assert_same_grads<F: Float>(what: &str, a: &cpu::CaMergeGrads<F>, b: &cpu::CaMergeGrads<F>) {
    let bits = |x: &[F]| x.iter().map(|v| v.to_f64().to_bits()).collect::<Vec<_>>();
    let same = |name: &str, x: Option<&HostTensor<F>>, y: Option<&HostTensor<F>>| match (x, y) {
        (Some(x), Some(y)) => {
            assert_eq!(x.shape(), y.shape(), "{what}: {name} shape");
            assert!(
                bits(x.data()) == bits(y.data()),
                "{what}: {name} bits differ"
            );
        }
        (None, None) => {}
        _ => panic!("{what}: {name} presence differs"),
    };
    same("grad_base", Some(&a.grad_base), Some(&b.grad_base));
    same("grad_experts", Some(&a.grad_experts), Some(&b.grad_experts));
    same("grad_scores", Some(&a.grad_scores), Some(&b.grad_scores));
    same(
        "grad_base_bias",
        a.grad_base_bias.as_ref(),
        b.grad_base_bias.as_ref(),
    );
    same(
        "grad_expert_bias",
        a.grad_expert_bias.as_ref(),
        b.grad_expert_bias.as_ref(),
    );
    let (fa, fb) = (a.factors.as_ref(), b.factors.as_ref());
    same(
        "grad_factor_a",
        fa.map(|f| &f.grad_factor_a),
        fb.map(|f| &f.grad_factor_a),
    );
    same(
        "grad_factor_b",
        fa.map(|f| &f.grad_factor_b),
        fb.map(|f| &f.grad_factor_b),
    );
    same(
        "grad_factor_c",
        fa.map(|f| &f.grad_factor_c),
        fb.map(|f| &f.grad_factor_c),
    );
    same(
        "grad_factor_d",
        fa.map(|f| &f.grad_factor_d),
        fb.map(|f| &f.grad_factor_d),
    );
    let scalar = |v: Option<F>| v.map(|v| v.to_f64().to_bits());
    assert_eq!(
        scalar(Some(a.grad_alpha)),
        scalar(Some(b.grad_alpha)),
        "{what}: grad_alpha"
    );
    assert_eq!(
        scalar(a.grad_beta),
        scalar(b.grad_beta),
        "{what}: grad_beta"
    );
}

/// CA-merge inputs of a case with Kronecker factors and no biases.
fn kronecker_inputs<F: Float>(t: &CaseT<F>) -> CaMergeInputs<'_, F> {
    CaMergeInputs {
        base: &t.base,
        experts: &t.experts,
        scores: &t.scores,
        curvature: t.curvature(true),
        base_bias: None,
        expert_bias: None,
    }
}

/// `ca_merge_backward_with_curved` names `curved` when its shape is wrong.
#[test]
fn backward_with_curved_checks_its_shape() {
    let s = shapes()[0];
    let c = Case::random(s, 5).rounded::<f32>();
    let t = c.tensors::<f32>();
    let d = s.d;
    let inputs = kronecker_inputs(&t);
    let opts = MergeOptions::default();
    let gm = tensor::<f32>(&[d.g, d.o, d.i], &vec![1.0; d.g * d.o * d.i]);
    let wrong = tensor::<f32>(&[d.n + 1, d.o, d.i], &vec![0.0; (d.n + 1) * d.o * d.i]);
    let err = cpu::ca_merge_backward_with_curved(&inputs, &opts, &wrong, &gm, None, None)
        .expect_err("a curved of N + 1 experts is refused")
        .to_string();
    let expected = format!("{:?}", [d.n, d.o, d.i]);
    let actual = format!("{:?}", [d.n + 1, d.o, d.i]);
    assert!(err.contains("`curved`"), "{err}");
    assert!(err.contains(&expected) && err.contains(&actual), "{err}");
}

#[test]
fn ca_merge_f64() {
    ca_merge_vs_oracle::<f64>();
}

#[test]
fn ca_merge_f32() {
    ca_merge_vs_oracle::<f32>();
}

// ---------------------------------------------------------------------------------------------
// merged_linear
// ---------------------------------------------------------------------------------------------

fn merged_linear_vs_oracle<F: Float>() {
    for (k, s) in shapes().iter().enumerate() {
        let c = Case::random(*s, 700 + k as u64).rounded::<F>();
        let t = c.tensors::<F>();
        let d = s.d;
        let tt = s.t;
        let mut rng = Rng::new(750 + k as u64);
        let (merged, merged_t) = rand_t::<F>(&mut rng, &[d.g, d.o, d.i]);
        let (bias, bias_t) = rand_t::<F>(&mut rng, &[d.g, d.o]);
        for with_bias in [false, true] {
            let what = format!("{s:?} bias={with_bias}");
            let b_opt = with_bias.then_some(&bias_t);
            let y = cpu::merged_linear(&t.x, &merged_t, b_opt).unwrap();
            let r = orc::merged_linear(d, tt, &c.x, &merged, with_bias.then_some(bias.as_slice()));
            check(&format!("y {what}"), &y, &[d.g, tt, d.o], &r);
            let (gy, gy_t) = rand_t::<F>(&mut rng, &[d.g, tt, d.o]);
            let g = cpu::merged_linear_backward(&t.x, &merged_t, b_opt, &gy_t).unwrap();
            let (rgx, rgm, rgb) = orc::merged_linear_backward(d, tt, &c.x, &merged, &gy);
            check(&format!("grad_x {what}"), &g.grad_x, &[d.g, tt, d.i], &rgx);
            check(
                &format!("grad_merged {what}"),
                &g.grad_merged,
                &[d.g, d.o, d.i],
                &rgm,
            );
            if with_bias {
                let gb = g.grad_merged_bias.as_ref().expect("grad_merged_bias");
                check(&format!("grad_merged_bias {what}"), gb, &[d.g, d.o], &rgb);
            }
        }
    }
}

#[test]
fn merged_linear_f64() {
    merged_linear_vs_oracle::<f64>();
}

#[test]
fn merged_linear_f32() {
    merged_linear_vs_oracle::<f32>();
}

// ---------------------------------------------------------------------------------------------
// dynamic_merge
// ---------------------------------------------------------------------------------------------

fn dynamic_merge_vs_oracle<F: Float>() {
    for (k, s) in shapes().iter().enumerate() {
        let d = s.d;
        let mut rng = Rng::new(800 + k as u64);
        let (base, base_t) = rand_t::<F>(&mut rng, &[d.o, d.i]);
        let (curved, curved_t) = rand_t::<F>(&mut rng, &[d.n, d.o, d.i]);
        for beta in [0.8, -1.7] {
            let what = format!("{s:?} beta={beta}");
            let nb = cpu::dynamic_merge(&base_t, &curved_t, beta).unwrap();
            check(
                &format!("next_base {what}"),
                &nb,
                &[d.o, d.i],
                &orc::dynamic_merge(&base, &curved, d.n, beta),
            );
            let (gnb, gnb_t) = rand_t::<F>(&mut rng, &[d.o, d.i]);
            let g = cpu::dynamic_merge_backward(&base_t, &curved_t, beta, &gnb_t).unwrap();
            let (rgb, rgc, rgbeta) = orc::dynamic_merge_backward(&curved, d.n, beta, &gnb);
            check(
                &format!("grad_base {what}"),
                &g.grad_base,
                &[d.o, d.i],
                &rgb,
            );
            check(
                &format!("grad_curved {what}"),
                &g.grad_curved,
                &[d.n, d.o, d.i],
                &rgc,
            );
            let scale = orc::beta_scale(&curved, d.n, &gnb);
            check_scalar(&format!("grad_beta {what}"), g.grad_beta, rgbeta, scale);
        }
    }
}

#[test]
fn dynamic_merge_f64() {
    dynamic_merge_vs_oracle::<f64>();
}

#[test]
fn dynamic_merge_f32() {
    dynamic_merge_vs_oracle::<f32>();
}

// ---------------------------------------------------------------------------------------------
// segment_scores
// ---------------------------------------------------------------------------------------------

fn segment_scores_vs_oracle<F: Float>() {
    let mut rng = Rng::new(900);
    for (b, j, n) in [(1, 1, 1), (2, 4, 3), (3, 2, 7), (1, 5, 1)] {
        let what = format!("B={b} J={j} N={n}");
        let (router, router_t) = rand_t::<F>(&mut rng, &[b, j, n]);
        let s = cpu::segment_scores(&router_t).unwrap();
        check(
            &format!("scores {what}"),
            &s,
            &[b, j, n],
            &orc::segment_scores(&router, b, j, n),
        );
        let (gs, gs_t) = rand_t::<F>(&mut rng, &[b, j, n]);
        let g = cpu::segment_scores_backward(&gs_t).unwrap();
        check(
            &format!("grad_router_scores {what}"),
            &g,
            &[b, j, n],
            &orc::segment_scores_backward(&gs, b, j, n),
        );
    }
}

#[test]
fn segment_scores_f64() {
    segment_scores_vs_oracle::<f64>();
}

#[test]
fn segment_scores_f32() {
    segment_scores_vs_oracle::<f32>();
}

// ---------------------------------------------------------------------------------------------
// Larger counters and a medium shape
// ---------------------------------------------------------------------------------------------

/// The DARE keep draws equal the oracle's also where the element counter passes 2^32 (its high
/// word is used) and for large seeds.
#[test]
fn dare_draws_match_oracle_with_large_counters() {
    let mut rng = Rng::new(31);
    for _ in 0..3000 {
        let d = Dims {
            g: 64,
            n: 8,
            o: 3072,
            i: 1 + (rng.next_u64() % 4096) as usize,
        };
        let (g, i) = (
            (rng.next_u64() % 64) as usize,
            (rng.next_u64() % 8) as usize,
        );
        let (p, q) = (
            (rng.next_u64() % 3072) as usize,
            (rng.next_u64() as usize) % d.i,
        );
        let seed = rng.next_u64();
        let prob = rng.unit();
        let dd =
            camex::philox::DareDraw::from_options(&camex::Dare::Element { p: prob, seed }).unwrap();
        let kept = dd.keep_element(g, i, p * d.i + q, d.n, d.oi());
        let want = orc::dare_zeta(DareRef::Element { p: prob, seed }, d, g, i, p, q) != 0.0;
        assert_eq!(
            kept, want,
            "element g={g} i={i} p={p} q={q} dims={d:?} seed={seed} prob={prob}"
        );
        let de =
            camex::philox::DareDraw::from_options(&camex::Dare::Expert { p: prob, seed }).unwrap();
        let kept = de.keep_expert(g, i, d.n);
        let want = orc::dare_zeta(DareRef::Expert { p: prob, seed }, d, g, i, 0, 0) != 0.0;
        assert_eq!(kept, want, "expert g={g} i={i} seed={seed} prob={prob}");
    }
}

/// A medium shape (O = 48 as 6 x 8, I = 40 as 5 x 8, N = 4, R = 3, G = 2): longer reductions.
fn ca_merge_medium<F: Float>() {
    ca_merge_at::<F>(oracle::glue::shape(2, 4, (6, 8), (5, 8), 3, 4));
}

/// A shape whose slabs span several of the CPU path's 1024-column blocks, none of them full
/// (o2 * I = 3600), with factor sizes that leave edges in the contraction kernel's 4 x 2 blocks
/// and tails in its vector steps (6, 20, 9, 20).
fn ca_merge_blocks<F: Float>() {
    ca_merge_at::<F>(oracle::glue::shape(2, 2, (6, 20), (9, 20), 2, 2));
}

fn ca_merge_at<F: Float>(s: oracle::glue::Shape) {
    let (rk, sp) = (s.r, s.split);
    let c = Case::random(s, 77).rounded::<F>();
    let t = c.tensors::<F>();
    let d = s.d;
    let mut rng = Rng::new(78);
    for (m, dare) in [
        (MaskRef::Sign, DareRef::Element { p: 0.1, seed: 5 }),
        (MaskRef::Trim(0.3), DareRef::Expert { p: 0.2, seed: 6 }),
    ] {
        let what = format!("medium {s:?} mask={m:?} dare={dare:?}");
        let opts = MergeOptions {
            alpha: 1.0,
            mask: mask_of(m),
            dare: dare_of(dare),
            beta: Some(0.25),
            want_curved: false,
        };
        let inputs = CaMergeInputs {
            base: &t.base,
            experts: &t.experts,
            scores: &t.scores,
            curvature: t.curvature(true),
            base_bias: Some(&t.base_bias),
            expert_bias: Some(&t.expert_bias),
        };
        let x = CaRefIn {
            d,
            base: &c.base,
            experts: &c.experts,
            scores: &c.scores,
            kron: Some(&c.kron),
            biases: Some((c.base_bias.as_slice(), c.expert_bias.as_slice())),
            alpha: 1.0,
            mask: m,
            dare,
            beta: Some(0.25),
        };
        let out = cpu::ca_merge(&inputs, &opts).unwrap();
        assert!(out.curved.is_none(), "{what}: curved without want_curved");
        let r = orc::ca_merge(&x);
        check(
            &format!("merged {what}"),
            &out.merged,
            &[d.g, d.o, d.i],
            &r.merged,
        );
        check(
            &format!("next_base {what}"),
            out.next_base.as_ref().unwrap(),
            &[d.o, d.i],
            r.next_base.as_ref().unwrap(),
        );
        let (gm, gm_t) = rand_t::<F>(&mut rng, &[d.g, d.o, d.i]);
        let (gnb, gnb_t) = rand_t::<F>(&mut rng, &[d.o, d.i]);
        let g = cpu::ca_merge_backward(&inputs, &opts, &gm_t, None, Some(&gnb_t)).unwrap();
        let rg = orc::ca_merge_backward(&x, &gm, None, Some(&gnb));
        check(
            &format!("grad_base {what}"),
            &g.grad_base,
            &[d.o, d.i],
            &rg.grad_base,
        );
        check(
            &format!("grad_experts {what}"),
            &g.grad_experts,
            &[d.n, d.o, d.i],
            &rg.grad_experts,
        );
        check(
            &format!("grad_scores {what}"),
            &g.grad_scores,
            &[d.g, d.n],
            &rg.grad_scores,
        );
        let f = g.factors.as_ref().unwrap();
        let rf = rg.factors.as_ref().unwrap();
        check(
            &format!("grad_factor_a {what}"),
            &f.grad_factor_a,
            &[rk, d.n, sp.o1, sp.o1],
            &rf[0],
        );
        check(
            &format!("grad_factor_b {what}"),
            &f.grad_factor_b,
            &[rk, d.n, sp.o2, sp.o2],
            &rf[1],
        );
        check(
            &format!("grad_factor_c {what}"),
            &f.grad_factor_c,
            &[rk, d.n, sp.i1, sp.i1],
            &rf[2],
        );
        check(
            &format!("grad_factor_d {what}"),
            &f.grad_factor_d,
            &[rk, d.n, sp.i2, sp.i2],
            &rf[3],
        );
    }
}

#[test]
fn ca_merge_medium_f64() {
    ca_merge_medium::<f64>();
}

#[test]
fn ca_merge_medium_f32() {
    ca_merge_medium::<f32>();
}

#[test]
fn ca_merge_blocks_f64() {
    ca_merge_blocks::<f64>();
}

#[test]
fn ca_merge_blocks_f32() {
    ca_merge_blocks::<f32>();
}

/// Without beta there is no next_base and no grad_beta; without want_curved no curved.
#[test]
fn optional_outputs_absent() {
    let s = shapes()[1];
    let c = Case::random(s, 88);
    let t = c.tensors::<f64>();
    let d = s.d;
    let inputs = kronecker_inputs(&t);
    let opts = MergeOptions::default();
    let out = cpu::ca_merge(&inputs, &opts).unwrap();
    assert!(out.next_base.is_none() && out.curved.is_none() && out.merged_bias.is_none());
    let gm = tensor::<f64>(&[d.g, d.o, d.i], &Rng::new(89).vec(d.g * d.oi()));
    let g = cpu::ca_merge_backward(&inputs, &opts, &gm, None, None).unwrap();
    assert!(g.grad_beta.is_none() && g.grad_base_bias.is_none() && g.grad_expert_bias.is_none());
}

/// An absent grad_merged_bias (with biases) or grad_next_base (with beta) means zero: the same
/// gradients as the oracle with zero upstream gradients there.
#[test]
fn absent_upstream_grads_mean_zero() {
    let s = shapes()[4];
    let c = Case::random(s, 99);
    let t = c.tensors::<f64>();
    let d = s.d;
    let opts = MergeOptions {
        alpha: 0.8,
        mask: Mask::TiesSign,
        dare: Dare::None,
        beta: Some(0.4),
        want_curved: false,
    };
    let inputs = CaMergeInputs {
        base: &t.base,
        experts: &t.experts,
        scores: &t.scores,
        curvature: t.curvature(true),
        base_bias: Some(&t.base_bias),
        expert_bias: Some(&t.expert_bias),
    };
    let x = CaRefIn {
        d,
        base: &c.base,
        experts: &c.experts,
        scores: &c.scores,
        kron: Some(&c.kron),
        biases: Some((c.base_bias.as_slice(), c.expert_bias.as_slice())),
        alpha: 0.8,
        mask: MaskRef::Sign,
        dare: DareRef::None,
        beta: Some(0.4),
    };
    let gm = Rng::new(100).vec(d.g * d.oi());
    let g =
        cpu::ca_merge_backward(&inputs, &opts, &tensor(&[d.g, d.o, d.i], &gm), None, None).unwrap();
    let zb = vec![0.0; d.g * d.o];
    let zn = vec![0.0; d.oi()];
    let rg = orc::ca_merge_backward(&x, &gm, Some(&zb), Some(&zn));
    check("grad_base", &g.grad_base, &[d.o, d.i], &rg.grad_base);
    check(
        "grad_experts",
        &g.grad_experts,
        &[d.n, d.o, d.i],
        &rg.grad_experts,
    );
    check("grad_scores", &g.grad_scores, &[d.g, d.n], &rg.grad_scores);
    check(
        "grad_base_bias",
        g.grad_base_bias.as_ref().unwrap(),
        &[d.o],
        &vec![0.0; d.o],
    );
    check(
        "grad_expert_bias",
        g.grad_expert_bias.as_ref().unwrap(),
        &[d.n, d.o],
        &vec![0.0; d.n * d.o],
    );
    check_scalar("grad_beta", g.grad_beta.unwrap(), 0.0, 1.0);
    check_scalar(
        "grad_alpha",
        g.grad_alpha,
        rg.grad_alpha,
        rg.grad_alpha.abs(),
    );
}
