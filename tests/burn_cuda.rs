//! burn's CUDA backend (`Cube` on a CUDA device) against the Flex CPU path: the CAMEx `ca_merge`
//! forward and its autodiff gradients, at two small shapes (one with odd sizes). Skips, and
//! passes, where there is no CUDA driver or device (checked with the crate's own check before
//! burn's CUDA device is touched: cubecl would panic there); `CAMEX_REQUIRE_GPU=1` makes that a
//! failure. f32, SPEC section 5's bound (1e-5 relative), with the kernels' outputs NaN-poisoned.
#![cfg(all(feature = "burn", feature = "cuda"))]

use burn::tensor::{DType, Device, Tensor, TensorData};
use camex::burn::{ca_merge, Factors};
use camex::{Dare, Mask, MergeOptions};

#[path = "rng/mod.rs"]
mod rng;
use rng::Rng;

/// Why there is no GPU to run on, or `None` when there is one.
fn no_gpu() -> Option<String> {
    if !camex::cuda::driver_present() {
        return Some("no CUDA driver (libcuda) on this machine".into());
    }
    camex::cuda::context(0).err().map(|e| e.to_string())
}

type Data = (Vec<f32>, Vec<usize>);

fn data(rng: &mut Rng, shape: &[usize], std: f64, shift_eye: bool) -> Data {
    let n: usize = shape.iter().product();
    let mut v: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
    if shift_eye {
        let k = shape[shape.len() - 1];
        for (idx, x) in v.iter_mut().enumerate() {
            if (idx % (k * k)) / k == idx % k {
                *x += 1.0;
            }
        }
    }
    (v, shape.to_vec())
}

fn tensor<const D: usize>(d: &Data, dev: &Device) -> Tensor<D> {
    Tensor::<D>::from_data(TensorData::new(d.0.clone(), d.1.clone()), (dev, DType::F32))
        .require_grad()
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .unwrap()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

struct Case {
    base: Data,
    experts: Data,
    scores: Data,
    factors: Option<[Data; 4]>,
    /// The weights of the loss `sum(merged * w)`.
    w: Data,
}

/// `merged` and the gradients of base, experts, scores and the factors, on `dev`.
fn run(c: &Case, dev: &Device, opts: &MergeOptions) -> Vec<(&'static str, Vec<f64>)> {
    let base = tensor::<2>(&c.base, dev);
    let experts = tensor::<3>(&c.experts, dev);
    let scores = tensor::<2>(&c.scores, dev);
    let ft = c
        .factors
        .as_ref()
        .map(|f| f.each_ref().map(|d| tensor::<4>(d, dev)));
    let factors = ft.as_ref().map(|f| Factors {
        a: f[0].clone(),
        b: f[1].clone(),
        c: f[2].clone(),
        d: f[3].clone(),
    });
    let merged = ca_merge(base.clone(), experts.clone(), scores.clone(), factors, opts).unwrap();
    let w = Tensor::<3>::from_data(
        TensorData::new(c.w.0.clone(), c.w.1.clone()),
        (dev, DType::F32),
    );
    let loss = (merged.clone() * w).sum();
    let grads = loss.backward();
    let mut out = vec![
        ("merged", to_vec(merged)),
        ("base", to_vec(base.grad(&grads).unwrap())),
        ("experts", to_vec(experts.grad(&grads).unwrap())),
        ("scores", to_vec(scores.grad(&grads).unwrap())),
    ];
    if let Some(f) = ft {
        for (name, t) in ["factor_a", "factor_b", "factor_c", "factor_d"]
            .into_iter()
            .zip(f)
        {
            out.push((name, to_vec(t.grad(&grads).unwrap())));
        }
    }
    out
}

#[test]
fn burn_cuda_ca_merge_equals_flex() {
    if let Some(why) = no_gpu() {
        let require = std::env::var("CAMEX_REQUIRE_GPU").is_ok_and(|v| v == "1");
        assert!(!require, "CAMEX_REQUIRE_GPU=1 but {why}");
        println!("skipped: {why}");
        return;
    }
    // An element a kernel forgets to write shows up as a NaN.
    camex::cuda::set_poison_outputs(true);
    let cuda = Device::cuda(0).autodiff();
    let flex = Device::flex().autodiff();
    let mut rng = Rng::new(15);
    // (n, o1, o2, i1, i2, g, r): o = o1 * o2, i = i1 * i2. The second shape is odd throughout.
    for (n, o1, o2, i1, i2, g, r) in [(4, 4, 4, 4, 4, 2, 2), (3, 3, 5, 5, 3, 3, 1)] {
        let (o, i) = (o1 * o2, i1 * i2);
        let case = Case {
            base: data(&mut rng, &[o, i], 1.0, false),
            experts: data(&mut rng, &[n, o, i], 1.0, false),
            scores: data(&mut rng, &[g, n], 1.0, false),
            factors: Some([
                data(&mut rng, &[r, n, o1, o1], 0.3, true),
                data(&mut rng, &[r, n, o2, o2], 0.3, true),
                data(&mut rng, &[r, n, i1, i1], 0.3, true),
                data(&mut rng, &[r, n, i2, i2], 0.3, true),
            ]),
            w: data(&mut rng, &[g, o, i], 1.0, false),
        };
        for (kron, opts) in [
            (
                true,
                MergeOptions {
                    alpha: 0.8,
                    mask: Mask::TiesSign,
                    dare: Dare::Expert { p: 0.3, seed: 2 },
                    ..MergeOptions::default()
                },
            ),
            (false, MergeOptions::default()),
        ] {
            let case = Case {
                factors: if kron { case.factors.clone() } else { None },
                base: case.base.clone(),
                experts: case.experts.clone(),
                scores: case.scores.clone(),
                w: case.w.clone(),
            };
            let got = run(&case, &cuda, &opts);
            let want = run(&case, &flex, &opts);
            assert_eq!(got.len(), want.len());
            for ((name, a), (_, b)) in got.iter().zip(&want) {
                let e = rel_err(a, b);
                println!(
                    "burn_cuda {name} n={n} o={o} i={i} g={g} kron={kron}: relative error {e:.2e}"
                );
                assert!(
                    e < 1e-5,
                    "{name} (n={n} o={o} i={i} g={g} kron={kron}): relative error {e:e}"
                );
            }
        }
    }
}
