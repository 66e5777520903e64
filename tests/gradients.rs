//! Finite-difference checks (central differences in f64, eps = 1e-6) of every differentiable input
//! of every CPU operator. The loss is a random linear functional L = <cotangent, outputs>, so the
//! backward pass with the cotangent as upstream gradient must equal dL/dinput, element by element.
//! Masks and DARE draws are constants: inputs are kept away from sign boundaries so that ties_sign
//! does not flip under the perturbation.

mod oracle;

use camex::cpu::{self, CaMergeInputs, Curvature, Factors, MergeInputs};
use camex::{Dare, HostTensor, Mask, MergeOptions};
use oracle::glue::{rel_err, shapes, tensor, vals, Case, Rng, Shape};
use oracle::{self as orc, CaRefIn, DareRef, MaskRef};

const EPS: f64 = 1e-6;
const FD_TOL: f64 = 1e-6;

/// One differentiable input: its name, shape, value and the analytic gradient to check.
struct Param {
    name: &'static str,
    shape: Vec<usize>,
    val: Vec<f64>,
}

fn param(name: &'static str, shape: &[usize], val: &[f64]) -> Param {
    Param {
        name,
        shape: shape.to_vec(),
        val: val.to_vec(),
    }
}

/// Central differences of `loss` in every element of every parameter, against `grads` (same order).
fn fd_check(what: &str, params: &[Param], grads: &[Vec<f64>], loss: impl Fn(&[Vec<f64>]) -> f64) {
    assert_eq!(params.len(), grads.len());
    let mut vals: Vec<Vec<f64>> = params.iter().map(|p| p.val.clone()).collect();
    for (pi, p) in params.iter().enumerate() {
        assert_eq!(
            grads[pi].len(),
            p.val.len(),
            "{what}: grad_{} length",
            p.name
        );
        let mut fd = vec![0.0; p.val.len()];
        for k in 0..p.val.len() {
            let x0 = vals[pi][k];
            vals[pi][k] = x0 + EPS;
            let lp = loss(&vals);
            vals[pi][k] = x0 - EPS;
            let lm = loss(&vals);
            vals[pi][k] = x0;
            fd[k] = (lp - lm) / (2.0 * EPS);
        }
        let e = rel_err(&grads[pi], &fd);
        assert!(
            e < FD_TOL,
            "{what}: grad_{} {:?} differs from finite differences: relative error {e:e}\nanalytic {:?}\nfd       {:?}",
            p.name,
            p.shape,
            grads[pi],
            fd
        );
    }
}

fn t(shape: &[usize], v: &[f64]) -> HostTensor<f64> {
    tensor::<f64>(shape, v)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    orc::inner(a, b)
}

/// A case with continuous inputs whose tau_i and sum_j tau_j stay at least 0.05 from zero
/// elementwise, so that the ties_sign mask is locally constant.
fn smooth_case(s: Shape, seed: u64) -> Case {
    let mut c = Case::random(s, seed);
    let mut rng = Rng::new(seed ^ 0xABCD);
    let d = s.d;
    let oi = d.oi();
    c.base = rng.vec(oi);
    loop {
        for e in 0..d.n {
            for k in 0..oi {
                let mag = 0.1 + 0.9 * rng.unit();
                let sign = if rng.unit() < 0.5 { -1.0 } else { 1.0 };
                c.experts[e * oi + k] = c.base[k] + sign * mag;
            }
        }
        let ok = (0..oi).all(|k| {
            (0..d.n)
                .map(|e| c.experts[e * oi + k] - c.base[k])
                .sum::<f64>()
                .abs()
                > 0.05
        });
        if ok {
            break;
        }
    }
    c
}

fn kron_factors<'a>(
    a: &'a HostTensor<f64>,
    b: &'a HostTensor<f64>,
    c: &'a HostTensor<f64>,
    d: &'a HostTensor<f64>,
) -> Curvature<'a, f64> {
    Curvature::Kronecker(Factors { a, b, c, d })
}

// ---------------------------------------------------------------------------------------------

#[test]
fn curvature_gradients() {
    for (k, s) in shapes().iter().enumerate() {
        let c = smooth_case(*s, 10 + k as u64);
        let d = s.d;
        let sp = s.split;
        let r = s.r;
        let cot = Rng::new(20 + k as u64).vec(d.n * d.oi());
        let shp = [
            vec![d.o, d.i],
            vec![d.n, d.o, d.i],
            vec![r, d.n, sp.o1, sp.o1],
            vec![r, d.n, sp.o2, sp.o2],
            vec![r, d.n, sp.i1, sp.i1],
            vec![r, d.n, sp.i2, sp.i2],
        ];
        for kron in [false, true] {
            let what = format!("curvature {s:?} kronecker={kron}");
            let names = [
                "base", "experts", "factor_a", "factor_b", "factor_c", "factor_d",
            ];
            let vals0 = [
                &c.base, &c.experts, &c.kron.a, &c.kron.b, &c.kron.c, &c.kron.d,
            ];
            let np = if kron { 6 } else { 2 };
            let params: Vec<Param> = (0..np)
                .map(|j| param(names[j], &shp[j], vals0[j]))
                .collect();
            let loss = |v: &[Vec<f64>]| {
                let ts: Vec<HostTensor<f64>> = (0..np).map(|j| t(&shp[j], &v[j])).collect();
                let curv = if kron {
                    kron_factors(&ts[2], &ts[3], &ts[4], &ts[5])
                } else {
                    Curvature::Identity
                };
                dot(&cot, &vals(&cpu::curvature(&ts[0], &ts[1], &curv).unwrap()))
            };
            let ts: Vec<HostTensor<f64>> = (0..6).map(|j| t(&shp[j], vals0[j])).collect();
            let curv = if kron {
                kron_factors(&ts[2], &ts[3], &ts[4], &ts[5])
            } else {
                Curvature::Identity
            };
            let g = cpu::curvature_backward(&ts[0], &ts[1], &curv, &t(&shp[1], &cot)).unwrap();
            let mut grads = vec![vals(&g.grad_base), vals(&g.grad_experts)];
            if kron {
                let f = g.factors.expect("factor grads");
                grads.extend([
                    vals(&f.grad_factor_a),
                    vals(&f.grad_factor_b),
                    vals(&f.grad_factor_c),
                    vals(&f.grad_factor_d),
                ]);
            } else {
                assert!(g.factors.is_none(), "{what}: identity has no factor grads");
            }
            fd_check(&what, &params, &grads, loss);
        }
    }
}

#[test]
fn merge_gradients() {
    for (k, s) in shapes().iter().enumerate() {
        let c = smooth_case(*s, 30 + k as u64);
        let d = s.d;
        let mut rng = Rng::new(40 + k as u64);
        let curved = rng.vec(d.n * d.oi());
        let tau = orc::domain_vectors(&c.base, &c.experts, d.n, d.oi());
        let mask = orc::ties_mask(&tau, d.n, d.oi(), MaskRef::Sign);
        let mask_t = t(&[d.n, d.o, d.i], &mask);
        let cot = rng.vec(d.g * d.oi());
        let cot_b = rng.vec(d.g * d.o);
        for (dare, with_mask) in [
            (Dare::None, false),
            (Dare::Expert { p: 0.3, seed: 5 }, true),
            (Dare::Element { p: 0.4, seed: 6 }, true),
        ] {
            let what = format!("merge {s:?} dare={dare:?} mask={with_mask}");
            let shp = [
                vec![d.o, d.i],
                vec![d.n, d.o, d.i],
                vec![d.g, d.n],
                vec![],
                vec![d.o],
                vec![d.n, d.o],
            ];
            let alpha = 0.8;
            let params = vec![
                param("base", &shp[0], &c.base),
                param("curved", &shp[1], &curved),
                param("scores", &shp[2], &c.scores),
                param("alpha", &shp[3], &[alpha]),
                param("base_bias", &shp[4], &c.base_bias),
                param("expert_bias", &shp[5], &c.expert_bias),
            ];
            let run = |v: &[Vec<f64>]| {
                let ts: Vec<HostTensor<f64>> = (0..6).map(|j| t(&shp[j], &v[j])).collect();
                let inputs = MergeInputs {
                    base: &ts[0],
                    curved: &ts[1],
                    scores: &ts[2],
                    mask: with_mask.then_some(&mask_t),
                    base_bias: Some(&ts[4]),
                    expert_bias: Some(&ts[5]),
                };
                cpu::merge(&inputs, v[3][0], &dare).unwrap()
            };
            let loss = |v: &[Vec<f64>]| {
                let out = run(v);
                dot(&cot, &vals(&out.merged))
                    + dot(&cot_b, &vals(out.merged_bias.as_ref().unwrap()))
            };
            let v0: Vec<Vec<f64>> = params.iter().map(|p| p.val.clone()).collect();
            let ts: Vec<HostTensor<f64>> = (0..6).map(|j| t(&shp[j], &v0[j])).collect();
            let inputs = MergeInputs {
                base: &ts[0],
                curved: &ts[1],
                scores: &ts[2],
                mask: with_mask.then_some(&mask_t),
                base_bias: Some(&ts[4]),
                expert_bias: Some(&ts[5]),
            };
            let g = cpu::merge_backward(
                &inputs,
                alpha,
                &dare,
                &t(&[d.g, d.o, d.i], &cot),
                Some(&t(&[d.g, d.o], &cot_b)),
            )
            .unwrap();
            let grads = vec![
                vals(&g.grad_base),
                vals(&g.grad_curved),
                vals(&g.grad_scores),
                vec![g.grad_alpha],
                vals(g.grad_base_bias.as_ref().expect("grad_base_bias")),
                vals(g.grad_expert_bias.as_ref().expect("grad_expert_bias")),
            ];
            fd_check(&what, &params, &grads, loss);
        }
    }
}

/// Every input of the fused operator, with the Kronecker curvature, biases and next_base.
#[test]
fn ca_merge_gradients() {
    for (k, s) in shapes().iter().enumerate() {
        let c = smooth_case(*s, 50 + k as u64);
        let d = s.d;
        let sp = s.split;
        let r = s.r;
        let mut rng = Rng::new(60 + k as u64);
        let cot = rng.vec(d.g * d.oi());
        let cot_b = rng.vec(d.g * d.o);
        let cot_nb = rng.vec(d.oi());
        let shp = [
            vec![d.o, d.i],
            vec![d.n, d.o, d.i],
            vec![d.g, d.n],
            vec![r, d.n, sp.o1, sp.o1],
            vec![r, d.n, sp.o2, sp.o2],
            vec![r, d.n, sp.i1, sp.i1],
            vec![r, d.n, sp.i2, sp.i2],
            vec![],
            vec![],
            vec![d.o],
            vec![d.n, d.o],
        ];
        let cases = [
            (true, Mask::TiesSign, Dare::Element { p: 0.2, seed: 3 }),
            (true, Mask::None, Dare::Expert { p: 0.5, seed: 4 }),
            (false, Mask::TiesSign, Dare::None),
        ];
        for (kron, mask, dare) in cases {
            let what = format!("ca_merge {s:?} kronecker={kron} mask={mask:?} dare={dare:?}");
            let (alpha, beta) = (1.1, 0.7);
            let mut params = vec![
                param("base", &shp[0], &c.base),
                param("experts", &shp[1], &c.experts),
                param("scores", &shp[2], &c.scores),
                param("factor_a", &shp[3], &c.kron.a),
                param("factor_b", &shp[4], &c.kron.b),
                param("factor_c", &shp[5], &c.kron.c),
                param("factor_d", &shp[6], &c.kron.d),
                param("alpha", &shp[7], &[alpha]),
                param("beta", &shp[8], &[beta]),
                param("base_bias", &shp[9], &c.base_bias),
                param("expert_bias", &shp[10], &c.expert_bias),
            ];
            let opts_of = |v: &[Vec<f64>]| MergeOptions {
                alpha: v[7][0],
                mask,
                dare,
                beta: Some(v[8][0]),
                want_curved: false,
            };
            let loss = |v: &[Vec<f64>]| {
                let ts: Vec<HostTensor<f64>> = (0..11).map(|j| t(&shp[j], &v[j])).collect();
                let inputs = CaMergeInputs {
                    base: &ts[0],
                    experts: &ts[1],
                    scores: &ts[2],
                    curvature: if kron {
                        kron_factors(&ts[3], &ts[4], &ts[5], &ts[6])
                    } else {
                        Curvature::Identity
                    },
                    base_bias: Some(&ts[9]),
                    expert_bias: Some(&ts[10]),
                };
                let out = cpu::ca_merge(&inputs, &opts_of(v)).unwrap();
                dot(&cot, &vals(&out.merged))
                    + dot(&cot_b, &vals(out.merged_bias.as_ref().unwrap()))
                    + dot(&cot_nb, &vals(out.next_base.as_ref().unwrap()))
            };
            let v0: Vec<Vec<f64>> = params.iter().map(|p| p.val.clone()).collect();
            let ts: Vec<HostTensor<f64>> = (0..11).map(|j| t(&shp[j], &v0[j])).collect();
            let inputs = CaMergeInputs {
                base: &ts[0],
                experts: &ts[1],
                scores: &ts[2],
                curvature: if kron {
                    kron_factors(&ts[3], &ts[4], &ts[5], &ts[6])
                } else {
                    Curvature::Identity
                },
                base_bias: Some(&ts[9]),
                expert_bias: Some(&ts[10]),
            };
            let g = cpu::ca_merge_backward(
                &inputs,
                &opts_of(&v0),
                &t(&[d.g, d.o, d.i], &cot),
                Some(&t(&[d.g, d.o], &cot_b)),
                Some(&t(&[d.o, d.i], &cot_nb)),
            )
            .unwrap();
            let mut grads = vec![
                vals(&g.grad_base),
                vals(&g.grad_experts),
                vals(&g.grad_scores),
            ];
            match &g.factors {
                Some(f) => grads.extend([
                    vals(&f.grad_factor_a),
                    vals(&f.grad_factor_b),
                    vals(&f.grad_factor_c),
                    vals(&f.grad_factor_d),
                ]),
                None => {
                    assert!(!kron, "{what}: factor grads missing");
                    // Identity: the factors are not inputs; their FD gradient is zero.
                    for p in &params[3..7] {
                        grads.push(vec![0.0; p.val.len()]);
                    }
                }
            }
            grads.push(vec![g.grad_alpha]);
            grads.push(vec![g.grad_beta.expect("grad_beta with beta set")]);
            grads.push(vals(g.grad_base_bias.as_ref().expect("grad_base_bias")));
            grads.push(vals(g.grad_expert_bias.as_ref().expect("grad_expert_bias")));
            if !kron {
                // Keep the FD loop short: drop the unused factors (their zero gradient is trivial).
                params.drain(3..7);
                grads.drain(3..7);
                let keep = [0usize, 1, 2, 7, 8, 9, 10];
                let loss_id = |v: &[Vec<f64>]| {
                    let mut full: Vec<Vec<f64>> = v0.clone();
                    for (j, &slot) in keep.iter().enumerate() {
                        full[slot] = v[j].clone();
                    }
                    loss(&full)
                };
                fd_check(&what, &params, &grads, loss_id);
            } else {
                fd_check(&what, &params, &grads, loss);
            }
        }
    }
}

#[test]
fn merged_linear_gradients() {
    for (k, s) in shapes().iter().enumerate() {
        let d = s.d;
        let tt = s.t;
        let mut rng = Rng::new(70 + k as u64);
        let x = rng.vec(d.g * tt * d.i);
        let merged = rng.vec(d.g * d.oi());
        let bias = rng.vec(d.g * d.o);
        let cot = rng.vec(d.g * tt * d.o);
        let shp = [vec![d.g, tt, d.i], vec![d.g, d.o, d.i], vec![d.g, d.o]];
        let params = vec![
            param("x", &shp[0], &x),
            param("merged", &shp[1], &merged),
            param("merged_bias", &shp[2], &bias),
        ];
        let loss = |v: &[Vec<f64>]| {
            let y = cpu::merged_linear(
                &t(&shp[0], &v[0]),
                &t(&shp[1], &v[1]),
                Some(&t(&shp[2], &v[2])),
            )
            .unwrap();
            dot(&cot, &vals(&y))
        };
        let g = cpu::merged_linear_backward(
            &t(&shp[0], &x),
            &t(&shp[1], &merged),
            Some(&t(&shp[2], &bias)),
            &t(&[d.g, tt, d.o], &cot),
        )
        .unwrap();
        let grads = vec![
            vals(&g.grad_x),
            vals(&g.grad_merged),
            vals(g.grad_merged_bias.as_ref().expect("grad_merged_bias")),
        ];
        fd_check(&format!("merged_linear {s:?}"), &params, &grads, loss);
    }
}

#[test]
fn dynamic_merge_gradients() {
    for (k, s) in shapes().iter().enumerate() {
        let d = s.d;
        let mut rng = Rng::new(80 + k as u64);
        let base = rng.vec(d.oi());
        let curved = rng.vec(d.n * d.oi());
        let cot = rng.vec(d.oi());
        let beta = -0.9;
        let shp = [vec![d.o, d.i], vec![d.n, d.o, d.i], vec![]];
        let params = vec![
            param("base", &shp[0], &base),
            param("curved", &shp[1], &curved),
            param("beta", &shp[2], &[beta]),
        ];
        let loss = |v: &[Vec<f64>]| {
            let nb = cpu::dynamic_merge(&t(&shp[0], &v[0]), &t(&shp[1], &v[1]), v[2][0]).unwrap();
            dot(&cot, &vals(&nb))
        };
        let g = cpu::dynamic_merge_backward(
            &t(&shp[0], &base),
            &t(&shp[1], &curved),
            beta,
            &t(&shp[0], &cot),
        )
        .unwrap();
        let grads = vec![vals(&g.grad_base), vals(&g.grad_curved), vec![g.grad_beta]];
        fd_check(&format!("dynamic_merge {s:?}"), &params, &grads, loss);
    }
}

/// S[b, 0] copies R[b, 0] in the forward pass but is a stop-gradient: the backward pass must equal
/// the finite differences minus exactly that copy's contribution, and a cotangent on S[b, 0]
/// alone must give no gradient at all.
#[test]
fn segment_scores_gradients_and_stop_gradient() {
    let mut rng = Rng::new(90);
    for (b, j, n) in [(2, 4, 3), (1, 1, 2), (3, 2, 1)] {
        let what = format!("segment_scores B={b} J={j} N={n}");
        let router = rng.vec(b * j * n);
        let cot = rng.vec(b * j * n);
        let shp = [b, j, n];
        let loss = |v: &[f64]| dot(&cot, &vals(&cpu::segment_scores(&t(&shp, v)).unwrap()));
        let g = vals(&cpu::segment_scores_backward(&t(&shp, &cot)).unwrap());
        let mut fd = vec![0.0; router.len()];
        let mut v = router.clone();
        for k in 0..router.len() {
            let x0 = v[k];
            v[k] = x0 + EPS;
            let lp = loss(&v);
            v[k] = x0 - EPS;
            let lm = loss(&v);
            v[k] = x0;
            fd[k] = (lp - lm) / (2.0 * EPS);
        }
        // The forward pass really does depend on R[b, 0] through S[b, 0] ...
        let mut through_copy = vec![0.0; router.len()];
        for bb in 0..b {
            for e in 0..n {
                through_copy[(bb * j) * n + e] = cot[(bb * j) * n + e];
            }
        }
        let fd_without_copy: Vec<f64> = fd.iter().zip(&through_copy).map(|(f, c)| f - c).collect();
        // Scaled by ||cotangent||: with J = 1 the expected gradient is exactly zero.
        let diff: Vec<f64> = g.iter().zip(&fd_without_copy).map(|(a, b)| a - b).collect();
        let e = dot(&diff, &diff).sqrt() / dot(&cot, &cot).sqrt();
        assert!(
            e < FD_TOL,
            "{what}: grad_router_scores vs fd minus the stop-gradient path: {e:e}"
        );
        // ... but a cotangent on S[b, 0] only gives nothing.
        let mut cot0 = vec![0.0; cot.len()];
        for bb in 0..b {
            for e in 0..n {
                cot0[(bb * j) * n + e] = 1.0;
            }
        }
        let g0 = vals(&cpu::segment_scores_backward(&t(&shp, &cot0)).unwrap());
        assert!(
            g0.iter().all(|&x| x == 0.0),
            "{what}: gradient flowed through S[b, 0]: {g0:?}"
        );
    }
}

/// The oracle's own backward (used by cpu_ops.rs) agrees with finite differences of its forward,
/// so a mismatch there points at camex, not at the oracle.
#[test]
fn oracle_ca_merge_backward_matches_fd() {
    for (k, s) in shapes().iter().enumerate().filter(|(k, _)| k % 2 == 1) {
        let c = smooth_case(*s, 95 + k as u64);
        let d = s.d;
        let sp = s.split;
        let r = s.r;
        let mut rng = Rng::new(97 + k as u64);
        let cot = rng.vec(d.g * d.oi());
        let cot_b = rng.vec(d.g * d.o);
        let cot_nb = rng.vec(d.oi());
        let dare = DareRef::Element { p: 0.3, seed: 9 };
        let shp = [
            vec![d.o, d.i],
            vec![d.n, d.o, d.i],
            vec![d.g, d.n],
            vec![r, d.n, sp.o1, sp.o1],
            vec![r, d.n, sp.o2, sp.o2],
            vec![r, d.n, sp.i1, sp.i1],
            vec![r, d.n, sp.i2, sp.i2],
            vec![],
            vec![],
            vec![d.o],
            vec![d.n, d.o],
        ];
        let params = vec![
            param("base", &shp[0], &c.base),
            param("experts", &shp[1], &c.experts),
            param("scores", &shp[2], &c.scores),
            param("factor_a", &shp[3], &c.kron.a),
            param("factor_b", &shp[4], &c.kron.b),
            param("factor_c", &shp[5], &c.kron.c),
            param("factor_d", &shp[6], &c.kron.d),
            param("alpha", &shp[7], &[0.9]),
            param("beta", &shp[8], &[1.4]),
            param("base_bias", &shp[9], &c.base_bias),
            param("expert_bias", &shp[10], &c.expert_bias),
        ];
        let run = |v: &[Vec<f64>], f: &mut dyn FnMut(&CaRefIn) -> Vec<Vec<f64>>| {
            let kr = orc::KronRef {
                r,
                split: sp,
                a: v[3].clone(),
                b: v[4].clone(),
                c: v[5].clone(),
                d: v[6].clone(),
            };
            let x = CaRefIn {
                d,
                base: &v[0],
                experts: &v[1],
                scores: &v[2],
                kron: Some(&kr),
                biases: Some((&v[9], &v[10])),
                alpha: v[7][0],
                mask: MaskRef::Sign,
                dare,
                beta: Some(v[8][0]),
            };
            f(&x)
        };
        let loss = |v: &[Vec<f64>]| {
            let out = run(v, &mut |x| {
                let o = orc::ca_merge(x);
                vec![o.merged, o.merged_bias.unwrap(), o.next_base.unwrap()]
            });
            dot(&cot, &out[0]) + dot(&cot_b, &out[1]) + dot(&cot_nb, &out[2])
        };
        let v0: Vec<Vec<f64>> = params.iter().map(|p| p.val.clone()).collect();
        let grads = run(&v0, &mut |x| {
            let g = orc::ca_merge_backward(x, &cot, Some(&cot_b), Some(&cot_nb));
            let f = g.factors.unwrap();
            vec![
                g.grad_base,
                g.grad_experts,
                g.grad_scores,
                f[0].clone(),
                f[1].clone(),
                f[2].clone(),
                f[3].clone(),
                vec![g.grad_alpha],
                vec![g.grad_beta.unwrap()],
                g.grad_base_bias.unwrap(),
                g.grad_expert_bias.unwrap(),
            ]
        });
        fd_check(&format!("oracle ca_merge {s:?}"), &params, &grads, loss);
    }
}
