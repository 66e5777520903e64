//! candle custom ops, `CamexLinear` and `CamexFfn`: autograd gradients against central finite
//! differences (f64) and against the crate's own CPU backward; dtypes, layouts and bad shapes.
#![cfg(feature = "candle")]

use camex::candle::{
    ca_merge, curvature, merge, segment_scores, Activation, CamexFfn, CamexFfnConfig,
    CamexLayerConfig, CamexLinear, CurvatureKind, DenseFfn, Factors, Routing, SeededInit,
};
use camex::{cpu, Dare, Mask, MergeOptions};
use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::ChaCha8Rng;
use rand::{Rng, RngExt, SeedableRng};
use std::collections::HashMap;

const DEV: Device = Device::Cpu;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], std: f64) -> Tensor {
    camex::candle::randn(rng, shape, std, DType::F64, &DEV).unwrap()
}

/// A `CamexLinear` holding these tensors: built from a `VarBuilder` over them (SPEC section 7's
/// names), as from a checkpoint.
fn linear(
    base: &Tensor,
    experts: &Tensor,
    factors: Option<[&Tensor; 4]>,
    biases: Option<(&Tensor, &Tensor)>,
    config: CamexLayerConfig,
) -> candle_core::Result<CamexLinear> {
    let mut m = HashMap::new();
    m.insert("base".to_string(), base.clone());
    m.insert("experts".to_string(), experts.clone());
    let curvature = match factors {
        Some(f) => {
            for (name, t) in ["factor_a", "factor_b", "factor_c", "factor_d"]
                .iter()
                .zip(f)
            {
                m.insert(name.to_string(), t.clone());
            }
            CurvatureKind::Kronecker {
                rank: f[0].dims()[0],
                normalised: false,
            }
        }
        None => CurvatureKind::Identity,
    };
    if let Some((eb, b)) = biases {
        m.insert("base_bias".to_string(), eb.clone());
        m.insert("expert_bias".to_string(), b.clone());
    }
    let (o, i) = base.dims2()?;
    let n = experts.dims()[0];
    let vb = VarBuilder::from_tensors(m, DType::F64, &DEV);
    CamexLinear::new(i, o, n, curvature, biases.is_some(), config, vb)
}

fn host(t: &Tensor) -> camex::HostTensor<f64> {
    camex::HostTensor::new(t.dims(), t.flatten_all().unwrap().to_vec1::<f64>().unwrap()).unwrap()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Random Kronecker factors near the identity, so the curvature is far from trivial.
fn factors(rng: &mut ChaCha8Rng, r: usize, n: usize, s: [usize; 4]) -> [Var; 4] {
    let mk = |rng: &mut ChaCha8Rng, k: usize| {
        let eye = Tensor::eye(k, DType::F64, &DEV).unwrap();
        let eye = eye
            .unsqueeze(0)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((r, n, 1, 1))
            .unwrap();
        Var::from_tensor(&(eye + randn(rng, &[r, n, k, k], 0.3)).unwrap()).unwrap()
    };
    [mk(rng, s[0]), mk(rng, s[1]), mk(rng, s[2]), mk(rng, s[3])]
}

fn as_factors(f: &[Var; 4]) -> Factors {
    Factors {
        a: f[0].as_tensor().clone(),
        b: f[1].as_tensor().clone(),
        c: f[2].as_tensor().clone(),
        d: f[3].as_tensor().clone(),
    }
}

/// Central finite differences of `loss` with respect to a few entries of `v`, compared to `grad`.
fn check_fd(name: &str, v: &Var, grad: &Tensor, loss: &dyn Fn() -> f64, picks: usize) {
    let base = flat(v.as_tensor());
    let g = flat(grad);
    let n = base.len();
    let h = 1e-5;
    let mut rng = rng(n as u64 * 7 + 1);
    let mut worst: f64 = 0.0;
    for t in 0..picks.min(n) {
        let k = if picks >= n {
            t
        } else {
            rng.random_range(0..n)
        };
        let mut p = base.clone();
        p[k] = base[k] + h;
        v.set(&Tensor::from_vec(p.clone(), v.dims(), &DEV).unwrap())
            .unwrap();
        let lp = loss();
        p[k] = base[k] - h;
        v.set(&Tensor::from_vec(p, v.dims(), &DEV).unwrap())
            .unwrap();
        let lm = loss();
        let fd = (lp - lm) / (2.0 * h);
        let err = (fd - g[k]).abs() / (1e-6 + fd.abs().max(g[k].abs()));
        worst = worst.max(err);
        assert!(
            err < 1e-5,
            "{name}[{k}]: autograd {} vs finite difference {fd} (rel err {err})",
            g[k]
        );
    }
    v.set(&Tensor::from_vec(base, v.dims(), &DEV).unwrap())
        .unwrap();
    assert!(worst.is_finite(), "{name}: no finite comparison");
}

#[test]
fn ca_merge_autograd_equals_cpu_backward() {
    let mut rng = rng(1);
    let (n, o, i, g, r) = (3, 6, 4, 5, 2);
    let base = Var::from_tensor(&randn(&mut rng, &[o, i], 1.0)).unwrap();
    let experts = Var::from_tensor(&randn(&mut rng, &[n, o, i], 1.0)).unwrap();
    let scores = Var::from_tensor(&randn(&mut rng, &[g, n], 1.0)).unwrap();
    let f = factors(&mut rng, r, n, [2, 3, 2, 2]);
    let w = randn(&mut rng, &[g, o, i], 1.0);
    for (mask, dare) in [
        (Mask::None, Dare::None),
        (Mask::TiesSign, Dare::Expert { p: 0.3, seed: 9 }),
        (Mask::TiesTrim(0.5), Dare::Element { p: 0.2, seed: 4 }),
    ] {
        let opts = MergeOptions {
            alpha: 0.7,
            mask,
            dare,
            ..MergeOptions::default()
        };
        let merged = ca_merge(&base, &experts, &scores, Some(&as_factors(&f)), &opts).unwrap();
        // The forward is the CPU operator's.
        let (hb, he, hs) = (host(&base), host(&experts), host(&scores));
        let hf: Vec<_> = f.iter().map(|v| host(v)).collect();
        let inputs = cpu::CaMergeInputs {
            base: &hb,
            experts: &he,
            scores: &hs,
            curvature: cpu::Curvature::Kronecker(cpu::Factors {
                a: &hf[0],
                b: &hf[1],
                c: &hf[2],
                d: &hf[3],
            }),
            base_bias: None,
            expert_bias: None,
        };
        let want = cpu::ca_merge(&inputs, &opts).unwrap();
        assert_eq!(flat(&merged), want.merged.data().to_vec());
        let grads = (merged * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let cg = cpu::ca_merge_backward(&inputs, &opts, &host(&w), None, None).unwrap();
        let fg = cg.factors.unwrap();
        for (name, var, want) in [
            ("base", &base, cg.grad_base.data()),
            ("experts", &experts, cg.grad_experts.data()),
            ("scores", &scores, cg.grad_scores.data()),
            ("factor_a", &f[0], fg.grad_factor_a.data()),
            ("factor_b", &f[1], fg.grad_factor_b.data()),
            ("factor_c", &f[2], fg.grad_factor_c.data()),
            ("factor_d", &f[3], fg.grad_factor_d.data()),
        ] {
            let got = flat(
                grads
                    .get(var)
                    .unwrap_or_else(|| panic!("no gradient for {name}")),
            );
            let e = rel_err(&got, want);
            assert!(e < 1e-12, "{name} ({mask:?}, {dare:?}): rel err {e}");
        }
    }
}

#[test]
fn curvature_and_merge_ops_equal_fused_and_finite_differences() {
    let mut rng = rng(2);
    let (n, o, i, g, r) = (2, 4, 6, 3, 2);
    let base = Var::from_tensor(&randn(&mut rng, &[o, i], 1.0)).unwrap();
    let experts = Var::from_tensor(&randn(&mut rng, &[n, o, i], 1.0)).unwrap();
    let scores = Var::from_tensor(&randn(&mut rng, &[g, n], 1.0)).unwrap();
    let f = factors(&mut rng, r, n, [2, 2, 3, 2]);
    let w = randn(&mut rng, &[g, o, i], 1.0);
    let hb = host(&base);
    let he = host(&experts);
    let mask = cpu::ties_mask(&hb, &he, Mask::TiesSign).unwrap();
    let mask_t = Tensor::from_vec(mask.data().to_vec(), mask.shape(), &DEV).unwrap();
    let dare = Dare::Expert { p: 0.25, seed: 3 };
    let loss = || -> Tensor {
        let curved = curvature(&base, &experts, Some(&as_factors(&f))).unwrap();
        let merged = merge(&base, &curved, &scores, Some(&mask_t), 1.3, &dare).unwrap();
        (merged * &w).unwrap().sum_all().unwrap()
    };
    // Composition equals the fused operator.
    let opts = MergeOptions {
        alpha: 1.3,
        mask: Mask::TiesSign,
        dare,
        ..MergeOptions::default()
    };
    let fused = ca_merge(&base, &experts, &scores, Some(&as_factors(&f)), &opts).unwrap();
    let fused_loss = (fused * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let l = loss();
    assert!((l.to_scalar::<f64>().unwrap() - fused_loss).abs() < 1e-10 * fused_loss.abs().max(1.0));
    let grads = l.backward().unwrap();
    let scalar = || loss().to_scalar::<f64>().unwrap();
    check_fd("base", &base, grads.get(&base).unwrap(), &scalar, 12);
    check_fd(
        "experts",
        &experts,
        grads.get(&experts).unwrap(),
        &scalar,
        12,
    );
    check_fd("scores", &scores, grads.get(&scores).unwrap(), &scalar, 6);
    for (k, v) in f.iter().enumerate() {
        check_fd(&format!("factor {k}"), v, grads.get(v).unwrap(), &scalar, 8);
    }
    // Identity curvature is candle's own `experts - base`.
    let u = curvature(&base, &experts, None).unwrap();
    let want = cpu::curvature(&hb, &he, &cpu::Curvature::Identity).unwrap();
    assert!(rel_err(&flat(&u), want.data()) < 1e-15);
}

#[test]
fn camex_linear_gradients_equal_finite_differences() {
    let mut rng = rng(3);
    let (n, o, i, g, t, r) = (3, 6, 8, 2, 3, 2);
    for curv in [true, false] {
        let base = randn(&mut rng, &[o, i], 0.5);
        let experts = randn(&mut rng, &[n, o, i], 0.5);
        let fs = factors(&mut rng, r, n, [2, 3, 2, 4]);
        let fts: Vec<Tensor> = fs.iter().map(|v| v.as_tensor().clone()).collect();
        let eb = randn(&mut rng, &[o], 0.5);
        let b = randn(&mut rng, &[n, o], 0.5);
        let config = CamexLayerConfig {
            alpha: 0.9,
            ..CamexLayerConfig::default()
        };
        let opts = config.merge_options(None);
        let lin = linear(
            &base,
            &experts,
            curv.then(|| [&fts[0], &fts[1], &fts[2], &fts[3]]),
            Some((&eb, &b)),
            config,
        )
        .unwrap();
        let x = Var::from_tensor(&randn(&mut rng, &[g, t, i], 1.0)).unwrap();
        let scores = Var::from_tensor(&randn(&mut rng, &[g, n], 1.0)).unwrap();
        let w = randn(&mut rng, &[g, t, o], 1.0);
        let loss = || {
            lin.forward(&x, &scores)
                .unwrap()
                .mul(&w)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss().backward().unwrap();
        let scalar = || loss().to_scalar::<f64>().unwrap();
        let mut vars = lin.vars();
        vars.push(x.clone());
        vars.push(scores.clone());
        assert_eq!(vars.len(), if curv { 10 } else { 6 });
        for (k, v) in vars.iter().enumerate() {
            let gr = grads
                .get(v)
                .unwrap_or_else(|| panic!("var {k}: no gradient"));
            check_fd(&format!("var {k} (kronecker: {curv})"), v, gr, &scalar, 10);
        }
        // And the same as the crate's own CPU backward of ca_merge + merged_linear.
        let hx = host(&x);
        let hs = host(&scores);
        let hf: Vec<_> = fts.iter().map(host).collect();
        let (hb, he, heb, hbb) = (host(&base), host(&experts), host(&eb), host(&b));
        let inputs = cpu::CaMergeInputs {
            base: &hb,
            experts: &he,
            scores: &hs,
            curvature: if curv {
                cpu::Curvature::Kronecker(cpu::Factors {
                    a: &hf[0],
                    b: &hf[1],
                    c: &hf[2],
                    d: &hf[3],
                })
            } else {
                cpu::Curvature::Identity
            },
            base_bias: Some(&heb),
            expert_bias: Some(&hbb),
        };
        let m = cpu::ca_merge(&inputs, &opts).unwrap();
        let y = cpu::merged_linear(&hx, &m.merged, m.merged_bias.as_ref()).unwrap();
        assert!(rel_err(&flat(&lin.forward(&x, &scores).unwrap()), y.data()) < 1e-12);
        let lg =
            cpu::merged_linear_backward(&hx, &m.merged, m.merged_bias.as_ref(), &host(&w)).unwrap();
        let cg = cpu::ca_merge_backward(
            &inputs,
            &opts,
            &lg.grad_merged,
            lg.grad_merged_bias.as_ref(),
            None,
        )
        .unwrap();
        let pairs = [
            (&lin.base, cg.grad_base.data()),
            (&lin.experts, cg.grad_experts.data()),
            (
                &lin.biases.as_ref().unwrap().0,
                cg.grad_base_bias.as_ref().unwrap().data(),
            ),
            (
                &lin.biases.as_ref().unwrap().1,
                cg.grad_expert_bias.as_ref().unwrap().data(),
            ),
            (&scores, cg.grad_scores.data()),
            (&x, lg.grad_x.data()),
        ];
        for (k, (v, want)) in pairs.into_iter().enumerate() {
            let e = rel_err(&flat(grads.get(v).unwrap()), want);
            assert!(e < 1e-10, "pair {k} (kronecker: {curv}): rel err {e}");
        }
    }
}

fn small_ffn(
    rng: &mut ChaCha8Rng,
    routing: Routing,
    curvature: CurvatureKind,
    dare: Dare,
) -> (DenseFfn, CamexFfn) {
    let map = VarMap::new();
    let vb = SeededInit::new(rng.next_u64()).var_builder(&map, DType::F64, &DEV);
    // SiLU: candle's backward of gelu_erf rounds 1/sqrt(2 pi) to 6 digits, too coarse for 1e-5 checks.
    let dense = DenseFfn::new(8, 12, 0.4, Activation::Silu, vb.pp("dense")).unwrap();
    let config = CamexFfnConfig {
        n_experts: 3,
        curvature,
        routing,
        top_k: None,
        noisy: true,
        layer: CamexLayerConfig {
            dare,
            ..CamexLayerConfig::default()
        },
        seed: 3,
    };
    let ffn = CamexFfn::upcycle(&dense, config, vb.pp("camex")).unwrap();
    // The map holds both layers' variables, under their prefixes.
    assert_eq!(map.all_vars().len(), 4 + ffn.vars().len());
    (dense, ffn)
}

#[test]
fn upcycled_ffn_starts_equal_to_dense() {
    let mut rng = rng(4);
    for routing in [
        Routing::PerSequence,
        Routing::CausalSegments { segment_len: 2 },
    ] {
        let (dense, ffn) = small_ffn(
            &mut rng,
            routing,
            CurvatureKind::Kronecker {
                rank: 2,
                normalised: false,
            },
            Dare::None,
        );
        let x = randn(&mut rng, &[2, 6, 8], 1.0);
        let y = ffn.forward_t(&x, false).unwrap();
        let yd = dense.forward(&x).unwrap();
        assert!(rel_err(&flat(&y), &flat(&yd)) < 1e-12);
    }
}

#[test]
fn ffn_gradients_equal_finite_differences() {
    let mut rng = rng(5);
    for (routing, curv) in [
        (
            Routing::CausalSegments { segment_len: 2 },
            CurvatureKind::Kronecker {
                rank: 2,
                normalised: true,
            },
        ),
        (Routing::PerSequence, CurvatureKind::Identity),
    ] {
        let (_, ffn) = small_ffn(&mut rng, routing, curv, Dare::Expert { p: 0.3, seed: 1 });
        // Move the experts away from the base (upcycling starts at tau = 0) and give the noise a scale.
        for v in [
            &ffn.wi.experts,
            &ffn.wo.experts,
            ffn.router.noise_weight.as_ref().unwrap(),
        ] {
            v.set(&(v.as_tensor() + randn(&mut rng, v.dims(), 0.3)).unwrap())
                .unwrap();
        }
        let x = Var::from_tensor(&randn(&mut rng, &[2, 6, 8], 1.0)).unwrap();
        let mut w = randn(&mut rng, &[2, 6, 8], 1.0);
        if let Routing::CausalSegments { segment_len } = routing {
            // Segment 0 merges with its own scores under a stop-gradient (SPEC section 3), which
            // finite differences cannot see; the loss ignores segment 0's outputs so that they agree.
            // (The stop-gradient itself is checked in `segment_scores_shift_and_stop_gradient`.)
            let keep = Tensor::cat(
                &[
                    Tensor::zeros((2, segment_len, 8), DType::F64, &DEV).unwrap(),
                    Tensor::ones((2, 6 - segment_len, 8), DType::F64, &DEV).unwrap(),
                ],
                1,
            )
            .unwrap();
            w = (w * keep).unwrap();
        }
        // Training mode with a fixed seed: the router noise and DARE draws are constants.
        let loss = || {
            let out = ffn.forward_full(&x, Some(42)).unwrap();
            (out.y.mul(&w).unwrap().sum_all().unwrap() + out.balance_loss).unwrap()
        };
        let grads = loss().backward().unwrap();
        let scalar = || loss().to_scalar::<f64>().unwrap();
        let mut vars = ffn.vars();
        vars.push(x.clone());
        for (k, v) in vars.iter().enumerate() {
            let gr = grads
                .get(v)
                .unwrap_or_else(|| panic!("{routing:?} var {k}: no gradient"));
            check_fd(&format!("{routing:?} var {k}"), v, gr, &scalar, 6);
        }
    }
}

#[test]
fn segment_scores_shift_and_stop_gradient() {
    let mut rng = rng(6);
    let r = Var::from_tensor(&randn(&mut rng, &[2, 3, 4], 1.0)).unwrap();
    let s = segment_scores(&r).unwrap();
    let rv = r.as_tensor().to_vec3::<f64>().unwrap();
    let sv = s.to_vec3::<f64>().unwrap();
    for b in 0..2 {
        assert_eq!(sv[b][0], rv[b][0]);
        assert_eq!(sv[b][1], rv[b][0]);
        assert_eq!(sv[b][2], rv[b][1]);
    }
    let w = randn(&mut rng, &[2, 3, 4], 1.0);
    let g = (s * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gv = g.get(&r).unwrap().to_vec3::<f64>().unwrap();
    let wv = w.to_vec3::<f64>().unwrap();
    for b in 0..2 {
        assert_eq!(gv[b][0], wv[b][1]);
        assert_eq!(gv[b][1], wv[b][2]);
        assert_eq!(gv[b][2], vec![0.0; 4]);
    }
}

#[test]
fn dtypes_and_strided_inputs() {
    let mut rng = rng(7);
    let (n, o, i, g) = (2, 4, 6, 3);
    let base = randn(&mut rng, &[o, i], 1.0);
    let experts = randn(&mut rng, &[n, o, i], 1.0);
    let scores = randn(&mut rng, &[g, n], 1.0);
    let f = factors(&mut rng, 2, n, [2, 2, 2, 3]);
    let opts = MergeOptions::default();
    let want = flat(&ca_merge(&base, &experts, &scores, Some(&as_factors(&f)), &opts).unwrap());
    for (dt, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
        let c = |t: &Tensor| t.to_dtype(dt).unwrap();
        let fc = Factors {
            a: c(&f[0]),
            b: c(&f[1]),
            c: c(&f[2]),
            d: c(&f[3]),
        };
        let got = ca_merge(&c(&base), &c(&experts), &c(&scores), Some(&fc), &opts).unwrap();
        assert_eq!(got.dtype(), dt);
        let e = rel_err(&flat(&got), &want);
        assert!(e < tol, "{dt:?}: rel err {e}");
    }
    // A transposed (strided) base and an offset view of the experts give the same answer.
    let base_t = base.t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!base_t.is_contiguous());
    let padded = Tensor::cat(&[&randn(&mut rng, &[1, o, i], 1.0), &experts], 0).unwrap();
    let experts_v = padded.narrow(0, 1, n).unwrap();
    let got = ca_merge(&base_t, &experts_v, &scores, Some(&as_factors(&f)), &opts).unwrap();
    assert_eq!(flat(&got), want);
    // Integer tensors are refused with an error naming the dtype.
    let err = ca_merge(
        &base.to_dtype(DType::U32).unwrap(),
        &experts.to_dtype(DType::U32).unwrap(),
        &scores.to_dtype(DType::U32).unwrap(),
        None,
        &opts,
    )
    .unwrap_err();
    assert!(err.to_string().contains("dtype"), "{err}");
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let mut rng = rng(8);
    let (n, o, i, g) = (2, 4, 6, 3);
    let base = randn(&mut rng, &[o, i], 1.0);
    let experts = randn(&mut rng, &[n, o, i], 1.0);
    let scores = randn(&mut rng, &[g, n], 1.0);
    let f = factors(&mut rng, 2, n, [2, 2, 2, 3]);
    let opts = MergeOptions::default();
    let expect = |r: candle_core::Result<Tensor>, what: &str| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains(what), "error `{e}` does not name `{what}`");
    };
    expect(
        ca_merge(
            &base,
            &experts,
            &randn(&mut rng, &[g, n + 1], 1.0),
            None,
            &opts,
        ),
        "scores",
    );
    expect(
        ca_merge(
            &base,
            &randn(&mut rng, &[n, o, i + 1], 1.0),
            &scores,
            None,
            &opts,
        ),
        "experts",
    );
    let mut bad = as_factors(&f);
    bad.b = randn(&mut rng, &[2, n, 3, 3], 1.0);
    expect(
        ca_merge(&base, &experts, &scores, Some(&bad), &opts),
        "factor_b",
    );
    expect(
        ca_merge(
            &base,
            &experts,
            &scores.to_dtype(DType::F32).unwrap(),
            None,
            &opts,
        ),
        "scores",
    );
    let config = CamexLayerConfig::default();
    let lin = linear(&base, &experts, None, None, config).unwrap();
    expect(
        lin.forward(&randn(&mut rng, &[g, 5, i + 2], 1.0), &scores),
        "x",
    );
    expect(
        lin.forward(&randn(&mut rng, &[g + 1, 5, i], 1.0), &scores),
        "scores",
    );
    assert!(linear(&base, &randn(&mut rng, &[n, i, o], 1.0), None, None, config).is_err());
    let (_, ffn) = small_ffn(
        &mut rng,
        Routing::CausalSegments { segment_len: 4 },
        CurvatureKind::Identity,
        Dare::None,
    );
    let e = ffn
        .forward_t(&randn(&mut rng, &[2, 6, 8], 1.0), false)
        .unwrap_err();
    assert!(e.to_string().contains("segment_len"), "{e}");
    expect(
        segment_scores(&randn(&mut rng, &[2, 3], 1.0)),
        "router_scores",
    );
}

#[test]
fn router_top_k_and_balance_loss() {
    use camex::candle::{balance_loss, Router};
    let mut rng = rng(9);
    let (g, n, d) = (5, 4, 3);
    let router = Router {
        weight: Var::from_tensor(&randn(&mut rng, &[n, d], 1.0)).unwrap(),
        noise_weight: None,
        k: 2,
    };
    let h = randn(&mut rng, &[g, d], 1.0);
    let s = router
        .scores(&h, Some(&mut rng))
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    // Without a noise weight, training (a generator given) and evaluation agree.
    assert_eq!(router.forward(&h).unwrap().to_vec2::<f64>().unwrap(), s);
    let logits = h
        .matmul(&router.weight.t().unwrap())
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    for (row, lrow) in s.iter().zip(&logits) {
        assert_eq!(row.iter().filter(|&&v| v > 0.0).count(), 2, "{row:?}");
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // The kept experts are the two largest logits, softmax-normalised among themselves.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| lrow[b].total_cmp(&lrow[a]));
        let (a, b) = (order[0], order[1]);
        let want = 1.0 / (1.0 + (lrow[b] - lrow[a]).exp());
        assert!((row[a] - want).abs() < 1e-12);
    }
    // cv^2(importance) + cv^2(load), population variance, by hand.
    let scores = Tensor::new(&[[0.5f64, 0.5, 0.0], [0.2, 0.3, 0.5]], &DEV).unwrap();
    let cv2 = |v: &[f64]| {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64 / (m * m + 1e-10)
    };
    let want = cv2(&[0.7, 0.8, 0.5]) + cv2(&[2.0, 2.0, 1.0]);
    let got = balance_loss(&scores).unwrap().to_scalar::<f64>().unwrap();
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
}
