//! A few optimizer steps of a CAMEx FFN (Kronecker and identity curvature) lower the loss.
#![cfg(feature = "candle")]

use camex::candle::{
    randn, Activation, CamexFfn, CamexFfnConfig, CamexLayerConfig, CurvatureKind, DenseFfn,
    Routing, SeededInit,
};
use camex::Dare;
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::rngs::ChaCha8Rng;
use rand::SeedableRng;

/// Regression onto a fixed random teacher whose function differs per sequence, so that routing
/// and merging have something to learn.
fn run(curvature: CurvatureKind, routing: Routing) -> (f64, f64) {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let init = SeededInit::new(11);
    let (b, l, d, f) = (4, 8, 8, 16);
    let scratch = VarMap::new();
    let dense_vb = init.var_builder(&scratch, DType::F32, &dev);
    let dense = DenseFfn::new(d, f, 0.3, Activation::Gelu, dense_vb).unwrap();
    let config = CamexFfnConfig {
        n_experts: 3,
        curvature,
        routing,
        top_k: None,
        noisy: true,
        layer: CamexLayerConfig {
            dare: Dare::Expert { p: 0.1, seed: 5 },
            ..CamexLayerConfig::default()
        },
        seed: 5,
    };
    let vars = VarMap::new();
    let ffn = CamexFfn::upcycle(&dense, config, init.var_builder(&vars, DType::F32, &dev)).unwrap();
    // The layer's variables are the map's: the optimizer trains them through it.
    assert_eq!(vars.all_vars().len(), ffn.vars().len());
    let x = randn(&mut rng, (b, l, d), 1.0, DType::F32, &dev).unwrap();
    let target = randn(&mut rng, (b, l, d), 0.5, DType::F32, &dev).unwrap();
    let mut opt = AdamW::new(
        vars.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        },
    )
    .unwrap();
    let eval = |ffn: &CamexFfn| -> f64 {
        let y = ffn.forward_t(&x, false).unwrap();
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
        let out = ffn.forward_full(&x, Some(step)).unwrap();
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
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let map = VarMap::new();
    let vb = SeededInit::new(12).var_builder(&map, DType::F32, &dev);
    let dense = DenseFfn::new(4, 6, 0.3, Activation::Gelu, vb.pp("dense")).unwrap();
    let ffn = CamexFfn::upcycle(&dense, CamexFfnConfig::default(), vb.pp("camex")).unwrap();
    let w = ffn.wi.experts.as_tensor();
    ffn.wi
        .experts
        .set(&(w + randn(&mut rng, w.dims(), 0.1, DType::F32, &dev).unwrap()).unwrap())
        .unwrap();
    let scores = Tensor::new(
        &[[1f32, 0., 0., 0., 0., 0., 0.], [0., 1., 0., 0., 0., 0., 0.]],
        &dev,
    )
    .unwrap();
    // Evaluation: DARE (on in the default config) is off.
    let merged = ffn.wi.merge(&scores, None).unwrap().weight;
    let diff = (merged.get(0).unwrap() - merged.get(1).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 1e-3);
}
