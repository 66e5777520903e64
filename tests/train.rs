//! A few optimizer steps of a CAMEx FFN (Kronecker and identity curvature) lower the loss.
#![cfg(feature = "candle")]

use camex::candle::{CamexFfn, CamexFfnConfig, CurvatureKind, DenseFfn, Routing, SplitMix};
use camex::{Dare, MergeOptions};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

/// Regression onto a fixed random teacher whose function differs per sequence, so that routing
/// and merging have something to learn.
fn run(curvature: CurvatureKind, routing: Routing) -> (f64, f64) {
    let dev = Device::Cpu;
    let mut rng = SplitMix(11);
    let (b, l, d, f) = (4, 8, 8, 16);
    let dense = DenseFfn::new(d, f, 0.3, &mut rng, DType::F32, &dev).unwrap();
    let config = CamexFfnConfig {
        n_experts: 3,
        curvature,
        routing,
        top_k: None,
        noisy: true,
        opts: MergeOptions {
            dare: Dare::Expert { p: 0.1, seed: 5 },
            ..MergeOptions::default()
        },
    };
    let ffn = CamexFfn::upcycle(&dense, config, &mut rng).unwrap();
    let x = rng.randn(&[b, l, d], 1.0, DType::F32, &dev).unwrap();
    let target = rng.randn(&[b, l, d], 0.5, DType::F32, &dev).unwrap();
    let mut opt = AdamW::new(
        ffn.vars(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        },
    )
    .unwrap();
    let eval = |ffn: &CamexFfn| -> f64 {
        let y = ffn.forward(&x, false, 0).unwrap().y;
        (y - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let before = eval(&ffn);
    for step in 0..30u64 {
        let out = ffn.forward(&x, true, step).unwrap();
        let mse = (out.y - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let loss = (mse + (out.balance_loss * 0.01).unwrap()).unwrap();
        opt.backward_step(&loss).unwrap();
    }
    (before, eval(&ffn))
}

#[test]
fn a_few_steps_lower_the_loss() {
    for (curv, routing) in [
        (
            CurvatureKind::Kronecker {
                rank: 2,
                normalised: true,
            },
            Routing::CausalSegments { segment_len: 4 },
        ),
        (
            CurvatureKind::Kronecker {
                rank: 2,
                normalised: false,
            },
            Routing::PerSequence,
        ),
        (CurvatureKind::Identity, Routing::PerSequence),
    ] {
        let (before, after) = run(curv, routing);
        assert!(before.is_finite() && after.is_finite());
        assert!(
            after < 0.8 * before,
            "{curv:?} {routing:?}: loss {before} -> {after}"
        );
    }
}

#[test]
fn merged_weights_follow_the_scores() {
    // After training, groups with different router scores get different merged weights.
    let dev = Device::Cpu;
    let mut rng = SplitMix(12);
    let dense = DenseFfn::new(4, 6, 0.3, &mut rng, DType::F32, &dev).unwrap();
    let ffn = CamexFfn::upcycle(&dense, CamexFfnConfig::default(), &mut rng).unwrap();
    let w = ffn.wi.experts.as_tensor();
    ffn.wi
        .experts
        .set(&(w + rng.randn(w.dims(), 0.1, DType::F32, &dev).unwrap()).unwrap())
        .unwrap();
    let scores = Tensor::new(
        &[[1f32, 0., 0., 0., 0., 0., 0.], [0., 1., 0., 0., 0., 0., 0.]],
        &dev,
    )
    .unwrap();
    let (merged, _) = ffn.wi.merged(&scores, &MergeOptions::default()).unwrap();
    let diff = (merged.get(0).unwrap() - merged.get(1).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 1e-3);
}
