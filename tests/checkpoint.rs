//! Layers saved to safetensors and loaded back (candle-nn's VarMap), and a CAMEx FFN upcycled from
//! a dense FFN checkpoint file.
#![cfg(feature = "candle")]

use camex::candle::checkpoint::{self, join};
use camex::candle::{
    randn, Activation, CamexFfn, CamexFfnConfig, CamexLayerConfig, CurvatureKind, DenseFfn,
    Routing, SeededInit,
};
use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::ChaCha8Rng;
use rand::SeedableRng;
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "camex-ckpt-{}-{name}.safetensors",
        std::process::id()
    ))
}

fn config() -> CamexFfnConfig {
    CamexFfnConfig {
        n_experts: 3,
        curvature: CurvatureKind::Kronecker {
            rank: 2,
            normalised: true,
        },
        routing: Routing::CausalSegments { segment_len: 2 },
        layer: CamexLayerConfig::default(),
        ..CamexFfnConfig::default()
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A builder over a new map whose new variables draw from `seed`.
fn builder(seed: u64) -> VarBuilder<'static> {
    SeededInit::new(seed).var_builder(&VarMap::new(), DType::F32, &Device::Cpu)
}

/// A dense FFN [4 -> 8 -> 4] with new variables from `seed`.
fn dense(seed: u64) -> DenseFfn {
    DenseFfn::new(4, 8, 0.3, Activation::Gelu, builder(seed)).unwrap()
}

/// A CAMEx FFN whose every variable differs from its upcycled start, so a roundtrip that lost or
/// swapped a tensor shows.
fn trained_like(seed: u64) -> CamexFfn {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ffn = CamexFfn::upcycle(&dense(seed), config(), builder(seed + 100)).unwrap();
    for v in ffn.vars() {
        let noise = randn(&mut rng, v.dims(), 0.1, DType::F32, &dev).unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
    ffn
}

#[test]
fn camex_ffn_roundtrip() {
    let a = trained_like(1);
    let b = trained_like(2);
    let x = randn(
        &mut ChaCha8Rng::seed_from_u64(3),
        (2, 4, 4),
        1.0,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let ya = a.forward_t(&x, false).unwrap();
    assert!(max_diff(&ya, &b.forward_t(&x, false).unwrap()) > 1e-3);
    let path = tmp("roundtrip");
    let (na, nb) = (a.named_vars("layer"), b.named_vars("layer"));
    // Router, its noise, wi and wo with base, experts, four factors and two biases each.
    assert_eq!(na.len(), 2 + 2 * 8);
    checkpoint::save(&na, &path).unwrap();
    checkpoint::load(&nb, &path).unwrap();
    let _ = std::fs::remove_file(&path);
    for ((name, va), (_, vb)) in na.iter().zip(&nb) {
        assert_eq!(
            max_diff(va.as_tensor(), vb.as_tensor()),
            0.0,
            "{name} differs after the roundtrip"
        );
    }
    assert_eq!(max_diff(&ya, &b.forward_t(&x, false).unwrap()), 0.0);

    // The same file through a VarBuilder: a layer built from it computes the same function.
    checkpoint::save(&na, &path).unwrap();
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu).unwrap() };
    let c = CamexFfn::new(4, 8, Activation::Gelu, config(), vb.pp("layer")).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(max_diff(&ya, &c.forward_t(&x, false).unwrap()), 0.0);
}

#[test]
fn load_refuses_what_does_not_fit() {
    let a = trained_like(1);
    let path = tmp("refuse");
    checkpoint::save(&a.named_vars(""), &path).unwrap();

    // Another shape: a model with 4 experts.
    let other = CamexFfn::upcycle(
        &dense(4),
        CamexFfnConfig {
            n_experts: 4,
            ..config()
        },
        builder(5),
    )
    .unwrap();
    let before = other.wi.base.as_tensor().copy().unwrap();
    let e = checkpoint::load(&other.named_vars(""), &path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("router.weight") && e.contains("[4, 4]"), "{e}");
    // Nothing was set: the check runs before any variable changes.
    assert_eq!(max_diff(&before, other.wi.base.as_tensor()), 0.0);

    // A missing tensor (another prefix) names it.
    let e = checkpoint::load(&a.named_vars("model"), &path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no tensor `model.router.weight`"), "{e}");

    // A file with more tensors than the model: refused by `load`, fine for `load_subset`.
    let part: Vec<(String, Var)> = a.named_vars("").into_iter().take(2).collect();
    let e = checkpoint::load(&part, &path).unwrap_err().to_string();
    assert!(e.contains("belongs to no variable"), "{e}");
    checkpoint::load_subset(&part, &path).unwrap();

    // Another dtype.
    let f64_vars: Vec<(String, Var)> = a
        .named_vars("")
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                Var::from_tensor(&v.to_dtype(DType::F64).unwrap()).unwrap(),
            )
        })
        .collect();
    let e = checkpoint::load(&f64_vars, &path).unwrap_err().to_string();
    assert!(e.contains("dtype F32, expected F64"), "{e}");

    // Two variables under one name.
    let dup = vec![part[0].clone(), part[0].clone()];
    let e = checkpoint::save(&dup, tmp("dup")).unwrap_err().to_string();
    assert!(e.contains("two variables are named"), "{e}");

    // Not a safetensors file.
    std::fs::write(&path, b"not safetensors").unwrap();
    let e = checkpoint::load(&a.named_vars(""), &path)
        .unwrap_err()
        .to_string();
    assert!(e.contains(path.to_str().unwrap()), "{e}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn upcycle_from_a_dense_checkpoint_file() {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let dense = dense(7);
    // Non-zero biases, so that the upcycled biases are checked too.
    for b in [&dense.b1, &dense.b2] {
        b.set(&randn(&mut rng, b.dims(), 0.2, DType::F32, &dev).unwrap())
            .unwrap();
    }
    let path = tmp("dense");
    checkpoint::save(&dense.named_vars("blocks.0.ffn"), &path).unwrap();
    let ffn =
        CamexFfn::upcycle_from_safetensors(&path, "blocks.0.ffn", config(), builder(8)).unwrap();
    // Every expert and the base are the dense weights: the layer computes the dense FFN.
    let x = randn(&mut rng, (2, 4, 4), 1.0, DType::F32, &dev).unwrap();
    let want = dense.forward(&x).unwrap();
    let got = ffn.forward_t(&x, false).unwrap();
    assert!(max_diff(&want, &got) < 1e-5, "{}", max_diff(&want, &got));
    assert_eq!(max_diff(ffn.wo.base.as_tensor(), dense.w2.as_tensor()), 0.0);

    // A wrong prefix and a wrong shape name the tensor.
    let e = CamexFfn::upcycle_from_safetensors(&path, "blocks.1.ffn", config(), builder(8))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&join("blocks.1.ffn", "w1")), "{e}");
    let mut bad = dense.named_vars("");
    bad[3].1 = Var::zeros(5, DType::F32, &dev).unwrap();
    checkpoint::save(&bad, &path).unwrap();
    let e = DenseFfn::from_safetensors(&path, "", DType::F32, &dev)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("b2") && e.contains("[4]") && e.contains("[5]"),
        "{e}"
    );
    let _ = std::fs::remove_file(&path);
}
