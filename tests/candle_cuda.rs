//! The candle ops on a CUDA device (their `cuda_fwd` and CUDA backward, features `candle` and
//! `cuda`) against the same ops on the CPU in f64, which `tests/candle_ops.rs` checks against finite
//! differences and the crate's own backward. Forward outputs and the autograd gradient of every
//! input are compared by ||gpu - cpu|| / ||cpu|| with SPEC section 5's bounds (f32 1e-5, f16 2e-3,
//! bf16 1e-2), at odd shapes (no multiple of any tile), with the kernels' outputs NaN-poisoned.
//! Both sides see the same inputs: the random f64 values are rounded to the storage dtype first.
//!
//! Without a GPU each test prints why it skips and returns; `CAMEX_REQUIRE_GPU=1` makes that a
//! failure. Note that a binary built with candle's CUDA backend needs the CUDA libraries (driver,
//! cuBLAS, cuRAND, NVRTC) to start at all: where they are absent it does not run (see README).
#![cfg(all(feature = "candle", feature = "cuda"))]

use camex::candle::{
    ca_merge, curvature, merge, randn, segment_scores, CamexLayerConfig, CamexLinear,
    CurvatureKind, Factors,
};
use camex::{Dare, Mask, MergeOptions};
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;
use rand::rngs::ChaCha8Rng;
use rand::SeedableRng;

fn gpu(test: &str) -> Option<Device> {
    let require = std::env::var("CAMEX_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let why = if camex::cuda::driver_present() {
        match Device::new_cuda(0) {
            Ok(d) => {
                camex::cuda::set_poison_outputs(true);
                return Some(d);
            }
            Err(e) => format!("no CUDA device: {e}"),
        }
    } else {
        "no CUDA driver (libcuda)".to_string()
    };
    assert!(!require, "{test}: CAMEX_REQUIRE_GPU=1 but {why}");
    eprintln!("{test}: skipped, {why}");
    None
}

fn tol(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1e-2,
    }
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = want.iter().map(|y| y * y).sum();
    if num.is_nan() {
        return f64::INFINITY;
    }
    (num / den.max(1e-300)).sqrt()
}

/// One input: its f64 values, already rounded to the storage dtype, and its shape.
struct Input {
    shape: Vec<usize>,
    values: Tensor,
}

fn input(rng: &mut ChaCha8Rng, shape: &[usize], std: f64, near_eye: bool, dt: DType) -> Input {
    let mut t = randn(rng, shape, std, DType::F64, &Device::Cpu).unwrap();
    if near_eye {
        // Kronecker factors [R, N, k, k] near the identity, so the curvature is far from trivial.
        let k = shape[3];
        let eye = Tensor::eye(k, DType::F64, &Device::Cpu)
            .unwrap()
            .broadcast_as(shape)
            .unwrap();
        t = (t + eye).unwrap();
    }
    let values = t.to_dtype(dt).unwrap().to_dtype(DType::F64).unwrap();
    Input {
        shape: shape.to_vec(),
        values,
    }
}

/// Runs `op` on the CPU in f64 and on `dev` in `dt` with the same inputs, and compares the output
/// and the gradient of every input under the loss sum(out * w).
fn compare(
    what: &str,
    dev: &Device,
    dt: DType,
    inputs: &[Input],
    op: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) {
    let run = |d: &Device, t: DType| -> (Vec<f64>, Vec<Vec<f64>>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|x| {
                Var::from_tensor(&x.values.to_dtype(t).unwrap().to_device(d).unwrap()).unwrap()
            })
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = op(&ts).unwrap_or_else(|e| panic!("{what} on {d:?}: {e}"));
        // A fixed weight, rounded to `dt` on both sides, so that d loss / d out is the same.
        let n = out.elem_count();
        let w: Vec<f64> = (0..n).map(|k| ((k * 7 % 11) as f64 - 5.0) / 4.0).collect();
        let w = Tensor::from_vec(w, out.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(t)
            .unwrap()
            .to_device(d)
            .unwrap();
        let grads = out.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = vars
            .iter()
            .enumerate()
            .map(|(k, v)| {
                flat(
                    grads
                        .get(v)
                        .unwrap_or_else(|| panic!("{what}: no gradient for input {k}")),
                )
            })
            .collect();
        (flat(&out), g)
    };
    let (want, want_g) = run(&Device::Cpu, DType::F64);
    let (got, got_g) = run(dev, dt);
    let mut fails = Vec::new();
    let mut check = |name: String, g: &[f64], w: &[f64]| {
        let e = rel_err(g, w);
        println!("RESULT op=candle:{name} dtype={dt:?} rel_err={e:.3e}");
        if e.is_nan() || e >= tol(dt) {
            fails.push(format!("{name}: relative error {e:.3e} >= {:.0e}", tol(dt)));
        }
    };
    check(format!("{what} forward"), &got, &want);
    for (k, (g, w)) in got_g.iter().zip(&want_g).enumerate() {
        let shape = &inputs[k].shape;
        check(format!("{what} grad of input {k} {shape:?}"), g, w);
    }
    assert!(fails.is_empty(), "{dt:?}: {fails:#?}");
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The four Kronecker factors from `t[k..k + 4]`.
fn factors_at(t: &[Tensor], k: usize) -> Factors {
    Factors {
        a: t[k].clone(),
        b: t[k + 1].clone(),
        c: t[k + 2].clone(),
        d: t[k + 3].clone(),
    }
}

#[test]
fn ca_merge_on_cuda_matches_cpu() {
    let Some(dev) = gpu("ca_merge_on_cuda_matches_cpu") else {
        return;
    };
    // (G, N, o1, o2, i1, i2, R): odd sizes, and T5-small-like factor splits.
    for (g, n, s, r) in [
        (3, 4, [3, 5, 7, 3], 2),
        (2, 5, [8, 9, 6, 11], 1),
        (1, 3, [16, 33, 24, 20], 3),
    ] {
        let (o, i) = (s[0] * s[1], s[2] * s[3]);
        for dt in DTYPES {
            let mut rng = ChaCha8Rng::seed_from_u64(o as u64 * 31 + i as u64);
            let mut ins = vec![
                input(&mut rng, &[o, i], 0.5, false, dt),
                input(&mut rng, &[n, o, i], 0.5, false, dt),
                input(&mut rng, &[g, n], 1.0, false, dt),
            ];
            for k in s {
                ins.push(input(&mut rng, &[r, n, k, k], 0.3, true, dt));
            }
            let opts = MergeOptions {
                alpha: 0.75,
                mask: Mask::None,
                dare: Dare::Expert { p: 0.3, seed: 7 },
                ..MergeOptions::default()
            };
            let kron = |t: &[Tensor]| ca_merge(&t[0], &t[1], &t[2], Some(&factors_at(t, 3)), &opts);
            compare("ca_merge(kronecker)", &dev, dt, &ins, &kron);
            // The identity curvature (domain-specific merging) with element DARE.
            let opts_id = MergeOptions {
                dare: Dare::Element { p: 0.2, seed: 11 },
                ..opts
            };
            let ident = |t: &[Tensor]| ca_merge(&t[0], &t[1], &t[2], None, &opts_id);
            compare("ca_merge(identity)", &dev, dt, &ins[..3], &ident);
        }
    }
}

#[test]
fn curvature_merge_and_segments_on_cuda_match_cpu() {
    let Some(dev) = gpu("curvature_merge_and_segments_on_cuda_match_cpu") else {
        return;
    };
    let (g, n, s, r) = (3, 5, [5, 7, 9, 3], 2);
    let (o, i) = (s[0] * s[1], s[2] * s[3]);
    for dt in DTYPES {
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let mut ins = vec![
            input(&mut rng, &[o, i], 0.5, false, dt),
            input(&mut rng, &[n, o, i], 0.5, false, dt),
        ];
        for k in s {
            ins.push(input(&mut rng, &[r, n, k, k], 0.3, true, dt));
        }
        let curv = |t: &[Tensor]| curvature(&t[0], &t[1], Some(&factors_at(t, 2)));
        compare("curvature", &dev, dt, &ins, &curv);

        // merge with a constant 0/1 mask (the same on both devices, in each one's dtype).
        let merge_ins = vec![
            input(&mut rng, &[o, i], 0.5, false, dt),
            input(&mut rng, &[n, o, i], 0.5, false, dt),
            input(&mut rng, &[g, n], 1.0, false, dt),
        ];
        let mask: Vec<f64> = (0..n * o * i)
            .map(|k| ((k * 5 + 1) % 3 != 0) as u8 as f64)
            .collect();
        let mask = Tensor::from_vec(mask, (n, o, i), &Device::Cpu).unwrap();
        let dare = Dare::Expert { p: 0.25, seed: 3 };
        let merged = |t: &[Tensor]| {
            let m = mask.to_dtype(t[0].dtype())?.to_device(t[0].device())?;
            merge(&t[0], &t[1], &t[2], Some(&m), 0.9, &dare)
        };
        compare("merge", &dev, dt, &merge_ins, &merged);

        let seg_ins = vec![input(&mut rng, &[3, 5, n], 1.0, false, dt)];
        let seg = |t: &[Tensor]| segment_scores(&t[0]);
        compare("segment_scores", &dev, dt, &seg_ins, &seg);
    }
}

#[test]
fn camex_linear_on_cuda_matches_cpu() {
    let Some(dev) = gpu("camex_linear_on_cuda_matches_cpu") else {
        return;
    };
    let (n, s, r, g, t) = (4, [4, 5, 3, 7], 2, 3, 5);
    let (o, i) = (s[0] * s[1], s[2] * s[3]);
    for dt in DTYPES {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        // base, experts, base bias, expert biases, x, scores, then the four factors.
        let mut ins = vec![
            input(&mut rng, &[o, i], 0.5, false, dt),
            input(&mut rng, &[n, o, i], 0.5, false, dt),
            input(&mut rng, &[o], 0.5, false, dt),
            input(&mut rng, &[n, o], 0.5, false, dt),
            input(&mut rng, &[g, t, i], 1.0, false, dt),
            input(&mut rng, &[g, n], 1.0, false, dt),
        ];
        for k in s {
            ins.push(input(&mut rng, &[r, n, k, k], 0.3, true, dt));
        }
        // The layer owns copies of its weights (its `vars()`); x and scores are ours.
        let run = |d: &Device, ty: DType| -> Vec<Vec<f64>> {
            let ts: Vec<Tensor> = ins
                .iter()
                .map(|x| x.values.to_dtype(ty).unwrap().to_device(d).unwrap())
                .collect();
            // Built from a VarBuilder over the tensors (SPEC section 7's names), as from a file.
            let names = [
                "base",
                "experts",
                "base_bias",
                "expert_bias",
                "",
                "",
                "factor_a",
                "factor_b",
                "factor_c",
                "factor_d",
            ];
            let m = names
                .iter()
                .zip(&ts)
                .filter(|(n, _)| !n.is_empty())
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect();
            let kron = CurvatureKind::Kronecker {
                rank: r,
                normalised: false,
            };
            let config = CamexLayerConfig {
                alpha: 0.8,
                ..CamexLayerConfig::default()
            };
            let vb = VarBuilder::from_tensors(m, ty, d);
            let lin = CamexLinear::new(i, o, n, kron, true, config, vb).unwrap();
            let x = Var::from_tensor(&ts[4]).unwrap();
            let scores = Var::from_tensor(&ts[5]).unwrap();
            let y = lin.forward(&x, &scores).unwrap();
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let mut vars = lin.vars();
            vars.push(x);
            vars.push(scores);
            let mut out = vec![flat(&y)];
            out.extend(vars.iter().map(|v| flat(grads.get(v).expect("a gradient"))));
            out
        };
        let want = run(&Device::Cpu, DType::F64);
        let got = run(&dev, dt);
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            let what = if k == 0 {
                "forward".to_string()
            } else {
                format!("grad of var {}", k - 1)
            };
            let e = rel_err(g, w);
            println!("RESULT op=candle:CamexLinear {what} dtype={dt:?} rel_err={e:.3e}");
            // y^2 squares the output's error: twice the bound.
            assert!(e < 2.0 * tol(dt), "CamexLinear {dt:?} {what}: {e:.3e}");
        }
    }
}

#[test]
fn bad_inputs_on_cuda_are_errors() {
    let Some(dev) = gpu("bad_inputs_on_cuda_are_errors") else {
        return;
    };
    let base = Tensor::zeros((6, 4), DType::F64, &dev).unwrap();
    let experts = Tensor::zeros((2, 6, 4), DType::F64, &dev).unwrap();
    let scores = Tensor::zeros((1, 2), DType::F64, &dev).unwrap();
    let e = ca_merge(&base, &experts, &scores, None, &MergeOptions::default()).unwrap_err();
    assert!(e.to_string().contains("f32|f16|bf16"), "{e}");
    // Mixed devices.
    let cpu_scores = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
    let base = base.to_dtype(DType::F32).unwrap();
    let experts = experts.to_dtype(DType::F32).unwrap();
    let e = ca_merge(&base, &experts, &cpu_scores, None, &MergeOptions::default()).unwrap_err();
    assert!(e.to_string().contains("scores"), "{e}");
    // A wrong shape names the tensor and both shapes.
    let bad = Tensor::zeros((2, 5, 4), DType::F32, &dev).unwrap();
    let scores = Tensor::zeros((1, 2), DType::F32, &dev).unwrap();
    let e = ca_merge(&base, &bad, &scores, None, &MergeOptions::default()).unwrap_err();
    assert!(e.to_string().contains("experts"), "{e}");
    // Strided inputs are made contiguous, not refused or misread.
    let experts_t = Tensor::arange(0f32, 48.0, &dev)
        .unwrap()
        .reshape((2, 4, 6))
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let scores = Tensor::new(&[[0.25f32, 0.5]], &dev).unwrap();
    let got = ca_merge(&base, &experts_t, &scores, None, &MergeOptions::default()).unwrap();
    let want = ca_merge(
        &base.to_device(&Device::Cpu).unwrap(),
        &experts_t.to_device(&Device::Cpu).unwrap(),
        &scores.to_device(&Device::Cpu).unwrap(),
        None,
        &MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(flat(&got), flat(&want));
}

#[test]
fn candle_cuda_path_makes_no_device_copies() {
    let Some(dev) = gpu("candle_cuda_path_makes_no_device_copies") else {
        return;
    };
    let (g, n, s, r) = (2, 3, [3, 5, 7, 3], 2);
    let (o, i) = (s[0] * s[1], s[2] * s[3]);
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let cpu = |shape: &[usize], std: f64, rng: &mut ChaCha8Rng| {
        randn(rng, shape, std, DType::F32, &Device::Cpu).unwrap()
    };
    let base = cpu(&[o, i], 0.5, &mut rng);
    // `experts` read in place at a start offset: the middle N of N + 2 experts (contiguous).
    let all_experts = cpu(&[n + 2, o, i], 0.5, &mut rng);
    let scores = cpu(&[g, n], 1.0, &mut rng);
    let factors: Vec<Tensor> = s
        .iter()
        .map(|&k| {
            let eye = Tensor::eye(k, DType::F32, &Device::Cpu)
                .unwrap()
                .broadcast_as((r, n, k, k))
                .unwrap();
            (cpu(&[r, n, k, k], 0.3, &mut rng) + eye).unwrap()
        })
        .collect();
    let on = |t: &Tensor| Var::from_tensor(&t.to_device(&dev).unwrap()).unwrap();
    let (vb, ve, vs) = (on(&base), on(&all_experts), on(&scores));
    let vf: Vec<Var> = factors.iter().map(on).collect();
    let experts = ve.narrow(0, 1, n).unwrap();
    assert!(experts.is_contiguous());
    let opts = MergeOptions::default();
    let f = Factors {
        a: vf[0].as_tensor().clone(),
        b: vf[1].as_tensor().clone(),
        c: vf[2].as_tensor().clone(),
        d: vf[3].as_tensor().clone(),
    };
    let before = camex::cuda::device_copies();
    let merged = ca_merge(&vb, &experts, &vs, Some(&f), &opts).unwrap();
    assert_eq!(
        camex::cuda::device_copies() - before,
        0,
        "the forward copied on the device"
    );
    // The in-place read at the offset computes what the CPU computes.
    let want = ca_merge(
        &base,
        &all_experts.narrow(0, 1, n).unwrap(),
        &scores,
        Some(&Factors {
            a: factors[0].clone(),
            b: factors[1].clone(),
            c: factors[2].clone(),
            d: factors[3].clone(),
        }),
        &opts,
    )
    .unwrap();
    let e = rel_err(&flat(&merged), &flat(&want));
    assert!(e < 1e-5, "ca_merge at an offset: {e:.3e}");
    // The backward: every gradient comes back as the kernels wrote it, the packed one (scores
    // and four factors) too: the kernels write its pieces into one buffer (PackedOutputs).
    let before = camex::cuda::device_copies();
    let grads = merged.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(
        camex::cuda::device_copies() - before,
        0,
        "the backward copied on the device"
    );
    assert!(grads.get(ve.as_tensor()).is_some() && grads.get(&vf[3]).is_some());
    // The identity curvature packs the scores alone: its backward copies nothing.
    let before = camex::cuda::device_copies();
    let merged = ca_merge(&vb, &experts, &vs, None, &opts).unwrap();
    merged.sum_all().unwrap().backward().unwrap();
    assert_eq!(camex::cuda::device_copies() - before, 0);
}
