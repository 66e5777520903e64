//! burn's autodiff gradients of the CAMEx extension equal candle's on the same inputs, and bad
//! shapes are errors.
#![cfg(all(feature = "burn", feature = "candle"))]

use burn::tensor::{DType, Device, Tensor, TensorData};
use camex::burn::{ca_merge, merged_linear, Factors};
use camex::{Dare, Mask, MergeOptions};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn data(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    std: f64,
    shift_eye: bool,
) -> (Vec<f64>, Vec<usize>) {
    let cpu = candle_core::Device::Cpu;
    let mut v: Vec<f64> = camex::candle::randn(rng, shape, std, candle_core::DType::F64, &cpu)
        .and_then(|t| t.flatten_all()?.to_vec1::<f64>())
        .unwrap();
    if shift_eye {
        // Factors near the identity: [R, N, k, k] + I on the last two dims.
        let k = shape[shape.len() - 1];
        for (idx, x) in v.iter_mut().enumerate() {
            if (idx % (k * k)) / k == idx % k {
                *x += 1.0;
            }
        }
    }
    (v, shape.to_vec())
}

fn burn_t<const D: usize>(d: &(Vec<f64>, Vec<usize>), dev: &Device) -> Tensor<D> {
    Tensor::<D>::from_data(TensorData::new(d.0.clone(), d.1.clone()), (dev, DType::F64))
        .require_grad()
}

fn candle_t(d: &(Vec<f64>, Vec<usize>)) -> candle_core::Var {
    candle_core::Var::from_vec(d.0.clone(), d.1.as_slice(), &candle_core::Device::Cpu).unwrap()
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

#[test]
fn burn_autodiff_gradients_equal_candle() {
    let dev = Device::flex().autodiff();
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (n, o, i, g, t, r) = (3, 6, 4, 2, 5, 2);
    let base = data(&mut rng, &[o, i], 1.0, false);
    let experts = data(&mut rng, &[n, o, i], 1.0, false);
    let scores = data(&mut rng, &[g, n], 1.0, false);
    let fa = data(&mut rng, &[r, n, 2, 2], 0.3, true);
    let fb = data(&mut rng, &[r, n, 3, 3], 0.3, true);
    let fc = data(&mut rng, &[r, n, 2, 2], 0.3, true);
    let fd = data(&mut rng, &[r, n, 2, 2], 0.3, true);
    let x = data(&mut rng, &[g, t, i], 1.0, false);
    let w = data(&mut rng, &[g, t, o], 1.0, false);
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
        // burn
        let bt = [burn_t::<2>(&base, &dev), burn_t::<2>(&scores, &dev)];
        let et = burn_t::<3>(&experts, &dev);
        let ft = [
            burn_t::<4>(&fa, &dev),
            burn_t::<4>(&fb, &dev),
            burn_t::<4>(&fc, &dev),
            burn_t::<4>(&fd, &dev),
        ];
        let xt = burn_t::<3>(&x, &dev);
        let wt = Tensor::<3>::from_data(
            TensorData::new(w.0.clone(), w.1.clone()),
            (&dev, DType::F64),
        );
        let factors = kron.then(|| Factors {
            a: ft[0].clone(),
            b: ft[1].clone(),
            c: ft[2].clone(),
            d: ft[3].clone(),
        });
        let merged = ca_merge(bt[0].clone(), et.clone(), bt[1].clone(), factors, &opts).unwrap();
        let y = merged_linear(xt.clone(), merged, None).unwrap();
        let loss = (y * wt).sum();
        let grads = loss.backward();
        // candle
        let cb = candle_t(&base);
        let ce = candle_t(&experts);
        let cs = candle_t(&scores);
        let cf = [candle_t(&fa), candle_t(&fb), candle_t(&fc), candle_t(&fd)];
        let cx = candle_t(&x);
        let cw =
            candle_core::Tensor::from_vec(w.0.clone(), w.1.as_slice(), &candle_core::Device::Cpu)
                .unwrap();
        let cfs = kron.then(|| camex::candle::Factors {
            a: cf[0].as_tensor().clone(),
            b: cf[1].as_tensor().clone(),
            c: cf[2].as_tensor().clone(),
            d: cf[3].as_tensor().clone(),
        });
        let cm = camex::candle::ca_merge(&cb, &ce, &cs, cfs.as_ref(), &opts).unwrap();
        let cy = cx.matmul(&cm.transpose(1, 2).unwrap()).unwrap();
        let closs = (cy * &cw).unwrap().sum_all().unwrap();
        assert!(
            (to_vec(loss.clone().reshape([1]))[0] - closs.to_scalar::<f64>().unwrap()).abs() < 1e-9
        );
        let cg = closs.backward().unwrap();
        let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let mut pairs: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
            (
                "base",
                to_vec(bt[0].grad(&grads).unwrap()),
                flat(cg.get(&cb).unwrap()),
            ),
            (
                "experts",
                to_vec(et.grad(&grads).unwrap()),
                flat(cg.get(&ce).unwrap()),
            ),
            (
                "scores",
                to_vec(bt[1].grad(&grads).unwrap()),
                flat(cg.get(&cs).unwrap()),
            ),
            (
                "x",
                to_vec(xt.grad(&grads).unwrap()),
                flat(cg.get(&cx).unwrap()),
            ),
        ];
        if kron {
            for (k, name) in ["factor_a", "factor_b", "factor_c", "factor_d"]
                .iter()
                .enumerate()
            {
                pairs.push((
                    name,
                    to_vec(ft[k].grad(&grads).unwrap()),
                    flat(cg.get(&cf[k]).unwrap()),
                ));
            }
        }
        for (name, got, want) in pairs {
            let e = rel_err(&got, &want);
            assert!(
                e < 1e-10,
                "{name} (kronecker: {kron}): burn vs candle rel err {e}"
            );
        }
    }
}

#[test]
fn f32_forward_without_autodiff() {
    let dev = Device::flex();
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let base = data(&mut rng, &[4, 6], 1.0, false);
    let experts = data(&mut rng, &[2, 4, 6], 1.0, false);
    let scores = data(&mut rng, &[3, 2], 1.0, false);
    let f32t = |d: &(Vec<f64>, Vec<usize>)| {
        TensorData::new(
            d.0.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
            d.1.clone(),
        )
    };
    let merged = ca_merge(
        Tensor::<2>::from_data(f32t(&base), &dev),
        Tensor::<3>::from_data(f32t(&experts), &dev),
        Tensor::<2>::from_data(f32t(&scores), &dev),
        None,
        &MergeOptions::default(),
    )
    .unwrap();
    let got = to_vec(merged);
    let hb = camex::HostTensor::new(&base.1, base.0.clone()).unwrap();
    let he = camex::HostTensor::new(&experts.1, experts.0.clone()).unwrap();
    let hs = camex::HostTensor::new(&scores.1, scores.0.clone()).unwrap();
    let inputs = camex::cpu::CaMergeInputs {
        base: &hb,
        experts: &he,
        scores: &hs,
        curvature: camex::cpu::Curvature::Identity,
        base_bias: None,
        expert_bias: None,
    };
    let want = camex::cpu::ca_merge(&inputs, &MergeOptions::default())
        .unwrap()
        .merged;
    assert!(rel_err(&got, want.data()) < 1e-5);
}

#[test]
fn bad_shapes_are_errors() {
    let dev = Device::flex();
    let z2 = |a: usize, b: usize| Tensor::<2>::zeros([a, b], &dev);
    let z3 = |a: usize, b: usize, c: usize| Tensor::<3>::zeros([a, b, c], &dev);
    let z4 = |a: usize, b: usize, c: usize, d: usize| Tensor::<4>::zeros([a, b, c, d], &dev);
    let opts = MergeOptions::default();
    let e = ca_merge(z2(4, 6), z3(2, 4, 5), z2(3, 2), None, &opts).unwrap_err();
    assert!(e.to_string().contains("experts"), "{e}");
    let e = ca_merge(z2(4, 6), z3(2, 4, 6), z2(3, 3), None, &opts).unwrap_err();
    assert!(e.to_string().contains("scores"), "{e}");
    let f = Factors {
        a: z4(1, 2, 2, 2),
        b: z4(1, 2, 3, 3),
        c: z4(1, 2, 2, 2),
        d: z4(1, 2, 3, 3),
    };
    let e = ca_merge(z2(4, 6), z3(2, 4, 6), z2(3, 2), Some(f), &opts).unwrap_err();
    assert!(e.to_string().contains("factor_b"), "{e}");
    let e = merged_linear(z3(3, 5, 7), z3(3, 4, 6), None).unwrap_err();
    assert!(e.to_string().contains("x"), "{e}");
}
