//! The named-tensor interface (`camex::named`, SPEC section 7): every operator and every backward
//! operator through `run_op` equals the direct `camex::cpu` call on the same inputs (bit for bit:
//! the same code runs), for every variant of inputs and options; dtype handling (override,
//! f16/bf16 widened to f32 and rounded back); the errors; safetensors round trips.

use camex::cpu::{self, CaMergeInputs, Curvature, Factors, MergeInputs};
use camex::named::{self, read_safetensors, run_op, write_safetensors, Device, RunOptions};
use camex::{AnyTensor, DType, Error, Float, HostTensor, MergeOptions};
use std::collections::BTreeMap;

mod cases;
use cases::*;

// ---------------------------------------------------------------------------------------------
// The direct camex::cpu calls
// ---------------------------------------------------------------------------------------------

type Map<F> = BTreeMap<String, HostTensor<F>>;

fn factors<F>(m: &Map<F>) -> Curvature<'_, F> {
    match (
        m.get("factor_a"),
        m.get("factor_b"),
        m.get("factor_c"),
        m.get("factor_d"),
    ) {
        (Some(a), Some(b), Some(c), Some(d)) => Curvature::Kronecker(Factors { a, b, c, d }),
        _ => Curvature::Identity,
    }
}

fn put<F>(out: &mut Map<F>, name: &str, t: HostTensor<F>) {
    out.insert(name.to_string(), t);
}

fn put_factor_grads<F>(out: &mut Map<F>, f: Option<cpu::FactorGrads<F>>) {
    if let Some(f) = f {
        put(out, "grad_factor_a", f.grad_factor_a);
        put(out, "grad_factor_b", f.grad_factor_b);
        put(out, "grad_factor_c", f.grad_factor_c);
        put(out, "grad_factor_d", f.grad_factor_d);
    }
}

/// What `op` should return, by calling camex::cpu directly.
fn direct<F: Float>(op: &str, m: &Map<F>, o: &RunOptions) -> Map<F> {
    let t = |n: &str| &m[n];
    let mut out = Map::new();
    let merge_inputs = || MergeInputs {
        base: t("base"),
        curved: t("curved"),
        scores: t("scores"),
        mask: m.get("mask"),
        base_bias: m.get("base_bias"),
        expert_bias: m.get("expert_bias"),
    };
    let ca_inputs = || CaMergeInputs {
        base: t("base"),
        experts: t("experts"),
        scores: t("scores"),
        curvature: factors(m),
        base_bias: m.get("base_bias"),
        expert_bias: m.get("expert_bias"),
    };
    let mo = MergeOptions {
        alpha: o.alpha,
        mask: o.mask,
        dare: o.dare,
        beta: o.beta,
        want_curved: false,
    };
    match op {
        "curvature" => put(
            &mut out,
            "curved",
            cpu::curvature(t("base"), t("experts"), &factors(m)).unwrap(),
        ),
        "curvature_backward" => {
            let g = cpu::curvature_backward(t("base"), t("experts"), &factors(m), t("grad_curved"))
                .unwrap();
            put(&mut out, "grad_base", g.grad_base);
            put(&mut out, "grad_experts", g.grad_experts);
            put_factor_grads(&mut out, g.factors);
        }
        "ties_mask" => put(
            &mut out,
            "mask",
            cpu::ties_mask(t("base"), t("experts"), o.mask).unwrap(),
        ),
        "merge" => {
            let r = cpu::merge(&merge_inputs(), o.alpha, &o.dare).unwrap();
            put(&mut out, "merged", r.merged);
            if let Some(b) = r.merged_bias {
                put(&mut out, "merged_bias", b);
            }
        }
        "merge_backward" => {
            let g = cpu::merge_backward(
                &merge_inputs(),
                o.alpha,
                &o.dare,
                t("grad_merged"),
                m.get("grad_merged_bias"),
            )
            .unwrap();
            put(&mut out, "grad_base", g.grad_base);
            put(&mut out, "grad_curved", g.grad_curved);
            put(&mut out, "grad_scores", g.grad_scores);
            put(&mut out, "grad_alpha", HostTensor::scalar(g.grad_alpha));
            if let (Some(a), Some(b)) = (g.grad_base_bias, g.grad_expert_bias) {
                put(&mut out, "grad_base_bias", a);
                put(&mut out, "grad_expert_bias", b);
            }
        }
        "ca_merge" => {
            let r = cpu::ca_merge(&ca_inputs(), &mo).unwrap();
            put(&mut out, "merged", r.merged);
            if let Some(b) = r.merged_bias {
                put(&mut out, "merged_bias", b);
            }
            if let Some(nb) = r.next_base {
                put(&mut out, "next_base", nb);
            }
        }
        "ca_merge_backward" => {
            let g = cpu::ca_merge_backward(
                &ca_inputs(),
                &mo,
                t("grad_merged"),
                m.get("grad_merged_bias"),
                m.get("grad_next_base"),
            )
            .unwrap();
            put(&mut out, "grad_base", g.grad_base);
            put(&mut out, "grad_experts", g.grad_experts);
            put(&mut out, "grad_scores", g.grad_scores);
            put_factor_grads(&mut out, g.factors);
            put(&mut out, "grad_alpha", HostTensor::scalar(g.grad_alpha));
            if let Some(b) = g.grad_beta {
                put(&mut out, "grad_beta", HostTensor::scalar(b));
            }
            if let (Some(a), Some(b)) = (g.grad_base_bias, g.grad_expert_bias) {
                put(&mut out, "grad_base_bias", a);
                put(&mut out, "grad_expert_bias", b);
            }
        }
        "merged_linear" => put(
            &mut out,
            "y",
            cpu::merged_linear(t("x"), t("merged"), m.get("merged_bias")).unwrap(),
        ),
        "merged_linear_backward" => {
            let g =
                cpu::merged_linear_backward(t("x"), t("merged"), m.get("merged_bias"), t("grad_y"))
                    .unwrap();
            put(&mut out, "grad_x", g.grad_x);
            put(&mut out, "grad_merged", g.grad_merged);
            if let Some(b) = g.grad_merged_bias {
                put(&mut out, "grad_merged_bias", b);
            }
        }
        "dynamic_merge" => put(
            &mut out,
            "next_base",
            cpu::dynamic_merge(t("base"), t("curved"), o.beta.unwrap()).unwrap(),
        ),
        "dynamic_merge_backward" => {
            let g = cpu::dynamic_merge_backward(
                t("base"),
                t("curved"),
                o.beta.unwrap(),
                t("grad_next_base"),
            )
            .unwrap();
            put(&mut out, "grad_base", g.grad_base);
            put(&mut out, "grad_curved", g.grad_curved);
            put(&mut out, "grad_beta", HostTensor::scalar(g.grad_beta));
        }
        "segment_scores" => put(
            &mut out,
            "scores",
            cpu::segment_scores(t("router_scores")).unwrap(),
        ),
        "segment_scores_backward" => put(
            &mut out,
            "grad_router_scores",
            cpu::segment_scores_backward(t("grad_scores")).unwrap(),
        ),
        other => panic!("no direct call for `{other}`: add it here"),
    }
    out
}

fn widen_f32(m: &BTreeMap<String, AnyTensor>) -> Map<f32> {
    m.iter().map(|(k, v)| (k.clone(), v.to_f32())).collect()
}
fn widen_f64(m: &BTreeMap<String, AnyTensor>) -> Map<f64> {
    m.iter().map(|(k, v)| (k.clone(), v.to_f64())).collect()
}

/// The expected `run_op` result for inputs stored in `storage`: f64 natively, the rest in f32
/// rounded back to `storage`.
fn expected(
    op: &str,
    inputs: &BTreeMap<String, AnyTensor>,
    o: &RunOptions,
    storage: DType,
) -> BTreeMap<String, AnyTensor> {
    if storage == DType::F64 {
        direct(op, &widen_f64(inputs), o)
            .into_iter()
            .map(|(k, v)| (k, AnyTensor::F64(v)))
            .collect()
    } else {
        direct(op, &widen_f32(inputs), o)
            .into_iter()
            .map(|(k, v)| (k, AnyTensor::from_f32(&v, storage)))
            .collect()
    }
}

fn assert_same(
    op: &str,
    label: &str,
    got: &BTreeMap<String, AnyTensor>,
    want: &BTreeMap<String, AnyTensor>,
) {
    let gk: Vec<&String> = got.keys().collect();
    let wk: Vec<&String> = want.keys().collect();
    assert_eq!(gk, wk, "{op} [{label}]: output names");
    for (k, w) in want {
        let g = &got[k];
        assert_eq!(g.dtype(), w.dtype(), "{op} [{label}] `{k}`: dtype");
        assert_eq!(g.shape(), w.shape(), "{op} [{label}] `{k}`: shape");
        assert!(
            g == w,
            "{op} [{label}] `{k}`: values differ from the direct cpu call"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Every operator equals the direct call
// ---------------------------------------------------------------------------------------------

/// Every operator of the table, every input variant, f32 and f64: `run_op` == camex::cpu.
#[test]
fn every_op_equals_direct_cpu_call() {
    let mut ran = 0;
    for (k, info) in named::ops().iter().enumerate() {
        for dtype in [DType::F32, DType::F64] {
            for case in cases(info.name, 100 + k as u64) {
                let inputs = case.any(dtype);
                let got = run_op(info.name, &inputs, &case.opts)
                    .unwrap_or_else(|e| panic!("{} [{}]: {e}", info.name, case.label));
                let want = expected(info.name, &inputs, &case.opts, dtype);
                assert_same(info.name, &case.label, &got, &want);
                ran += 1;
            }
        }
    }
    assert!(ran >= 2 * named::ops().len());
}

/// The table lists SPEC section 7's operators, each differentiable one with its backward, and
/// every output `run_op` writes is one the table declares (required outputs always written).
#[test]
fn op_table_matches_spec_and_outputs() {
    let names: Vec<&str> = named::ops().iter().map(|o| o.name).collect();
    for fwd in [
        "curvature",
        "ties_mask",
        "merge",
        "ca_merge",
        "merged_linear",
        "dynamic_merge",
        "segment_scores",
    ] {
        assert!(names.contains(&fwd), "missing {fwd}");
        let bwd = format!("{fwd}_backward");
        assert_eq!(
            names.contains(&bwd.as_str()),
            fwd != "ties_mask",
            "{bwd}: the mask is a constant, everything else has a backward"
        );
    }
    assert_eq!(names.len(), 13);
    for (k, info) in named::ops().iter().enumerate() {
        // A backward reads everything its forward reads, plus grad_ tensors.
        if let Some(fwd) = info.name.strip_suffix("_backward") {
            let f = named::op_info(fwd).unwrap();
            for s in f.reads {
                assert!(
                    info.reads.contains(s),
                    "{}: does not read {}",
                    info.name,
                    s.name
                );
            }
            for s in info.reads.iter().filter(|s| !f.reads.contains(s)) {
                assert!(
                    s.name.starts_with("grad_"),
                    "{}: extra input {}",
                    info.name,
                    s.name
                );
            }
            for s in info.writes {
                assert!(
                    s.name.starts_with("grad_"),
                    "{}: writes {}",
                    info.name,
                    s.name
                );
            }
        }
        for case in cases(info.name, 300 + k as u64) {
            let got = run_op(info.name, &case.any(DType::F32), &case.opts).unwrap();
            for name in got.keys() {
                assert!(
                    info.writes.iter().any(|s| s.name == name),
                    "{} [{}]: writes undeclared `{name}`",
                    info.name,
                    case.label
                );
            }
            for s in info.writes.iter().filter(|s| s.when.is_none()) {
                assert!(got.contains_key(s.name), "{}: no `{}`", info.name, s.name);
            }
            // 0-d scalars for the gradients of alpha and beta.
            for s in ["grad_alpha", "grad_beta"] {
                if let Some(t) = got.get(s) {
                    assert_eq!(t.shape(), &[] as &[usize]);
                }
            }
        }
    }
}

/// Optional outputs appear exactly in their situation: merged_bias with biases, next_base and
/// grad_beta with beta, factor gradients with the factors.
#[test]
fn optional_outputs_follow_inputs() {
    for case in cases("ca_merge_backward", 5) {
        let got = run_op("ca_merge_backward", &case.any(DType::F32), &case.opts).unwrap();
        assert_eq!(
            got.contains_key("grad_beta"),
            case.opts.beta.is_some(),
            "{}",
            case.label
        );
        assert_eq!(
            got.contains_key("grad_factor_c"),
            case.has("factor_c"),
            "{}",
            case.label
        );
        assert_eq!(
            got.contains_key("grad_base_bias"),
            case.has("base_bias"),
            "{}",
            case.label
        );
    }
    for case in cases("ca_merge", 6) {
        let got = run_op("ca_merge", &case.any(DType::F32), &case.opts).unwrap();
        assert_eq!(
            got.contains_key("next_base"),
            case.opts.beta.is_some(),
            "{}",
            case.label
        );
        assert_eq!(
            got.contains_key("merged_bias"),
            case.has("base_bias"),
            "{}",
            case.label
        );
    }
}

// ---------------------------------------------------------------------------------------------
// dtypes
// ---------------------------------------------------------------------------------------------

/// f16 and bf16 inputs: computed in f32 on the widened values, outputs rounded back (bit-exact),
/// for every operator.
#[test]
fn half_dtypes_widen_compute_round() {
    for dtype in [DType::F16, DType::BF16] {
        for (k, info) in named::ops().iter().enumerate() {
            for case in cases(info.name, 500 + k as u64) {
                let inputs = case.any(dtype);
                let got = run_op(info.name, &inputs, &case.opts).unwrap();
                let want = expected(info.name, &inputs, &case.opts, dtype);
                assert_same(info.name, &case.label, &got, &want);
                assert!(got.values().all(|t| t.dtype() == dtype));
            }
        }
    }
}

/// `dtype` overrides the storage dtype: inputs are first rounded to it, outputs come in it.
#[test]
fn dtype_override() {
    let case = &cases("ca_merge_backward", 7)[1];
    let f32_in = case.any(DType::F32);
    for target in [DType::F64, DType::F16, DType::BF16, DType::F32] {
        let o = RunOptions {
            dtype: Some(target),
            ..case.opts
        };
        let got = run_op("ca_merge_backward", &f32_in, &o).unwrap();
        // The same values stored in `target` from the start (f32 -> target is one rounding).
        let as_target: BTreeMap<String, AnyTensor> = f32_in
            .iter()
            .map(|(k, v)| (k.clone(), AnyTensor::from_f64(&v.to_f64(), target)))
            .collect();
        let want = expected("ca_merge_backward", &as_target, &case.opts, target);
        assert_same("ca_merge_backward", target.name(), &got, &want);
        assert!(got.values().all(|t| t.dtype() == target));
    }
    // f64 inputs narrowed to f32.
    let f64_in = case.any(DType::F64);
    let o = RunOptions {
        dtype: Some(DType::F32),
        ..case.opts
    };
    let got = run_op("ca_merge_backward", &f64_in, &o).unwrap();
    let want = expected(
        "ca_merge_backward",
        &case.any(DType::F32),
        &case.opts,
        DType::F32,
    );
    assert_same("ca_merge_backward", "f64->f32", &got, &want);
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Every required tensor of every operator, when absent, is Error::Missing naming it and the op.
#[test]
fn missing_required_tensor() {
    for info in named::ops() {
        let case = &cases(info.name, 9)[0];
        for name in info.required() {
            let mut inputs = case.any(DType::F32);
            inputs.remove(name);
            let e = run_op(info.name, &inputs, &case.opts).unwrap_err();
            assert!(
                matches!(&e, Error::Missing { tensor, op, note }
                    if tensor == name && op == info.name && note.is_empty()),
                "{e}"
            );
        }
    }
}

/// Some but not all factors: Missing naming the first absent factor.
#[test]
fn partial_factors() {
    for op in [
        "curvature",
        "curvature_backward",
        "ca_merge",
        "ca_merge_backward",
    ] {
        let case = cases(op, 10)
            .into_iter()
            .find(|c| c.has("factor_a"))
            .unwrap();
        let mut inputs = case.any(DType::F32);
        inputs.remove("factor_c");
        match run_op(op, &inputs, &case.opts).unwrap_err() {
            Error::Missing {
                tensor,
                op: o,
                note,
            } => {
                assert_eq!(tensor, "factor_c");
                assert_eq!(o, op);
                assert!(note.contains("all four"), "{note}");
            }
            e => panic!("{op}: {e}"),
        }
    }
}

#[test]
fn lone_bias_is_missing_its_pair() {
    let case = cases("merge", 12)
        .into_iter()
        .find(|c| c.has("base_bias"))
        .unwrap();
    let mut inputs = case.any(DType::F32);
    inputs.remove("expert_bias");
    match run_op("merge", &inputs, &case.opts).unwrap_err() {
        Error::Missing { tensor, .. } => assert_eq!(tensor, "expert_bias"),
        e => panic!("{e}"),
    }
}

#[test]
fn mixed_dtypes_name_the_tensor() {
    let case = &cases("merge", 13)[0];
    let mut inputs = case.any(DType::F32);
    let s = inputs["scores"].to_f64();
    inputs.insert("scores".into(), AnyTensor::F16(s.map(half::f16::from_f64)));
    match run_op("merge", &inputs, &case.opts).unwrap_err() {
        Error::DType {
            tensor,
            expected,
            actual,
        } => {
            assert_eq!(tensor, "scores");
            assert!(expected.starts_with("f32"), "{expected}");
            assert_eq!(actual, "f16");
        }
        e => panic!("{e}"),
    }
}

#[test]
fn unknown_op_and_unknown_tensor() {
    let case = &cases("merge", 14)[0];
    let inputs = case.any(DType::F32);
    let e = run_op("merge_forward", &inputs, &case.opts).unwrap_err();
    assert!(
        matches!(&e, Error::UnknownOp(op) if op == "merge_forward"),
        "{e}"
    );
    let mut extra = inputs.clone();
    extra.insert("factor_A".into(), inputs["base"].clone());
    match run_op("merge", &extra, &case.opts).unwrap_err() {
        Error::Unexpected { tensor, op, .. } => {
            assert_eq!(tensor, "factor_A");
            assert_eq!(op, "merge");
        }
        e => panic!("{e}"),
    }
}

#[test]
fn wrong_shape_is_a_shape_error() {
    let case = &cases("ca_merge", 15)[1];
    let mut inputs = case.any(DType::F32);
    inputs.insert(
        "scores".into(),
        AnyTensor::F32(HostTensor::zeros(&[G, N + 1])),
    );
    match run_op("ca_merge", &inputs, &case.opts).unwrap_err() {
        Error::Shape { tensor, actual, .. } => {
            assert_eq!(tensor, "scores");
            assert_eq!(actual, vec![G, N + 1]);
        }
        e => panic!("{e}"),
    }
    let case = &cases("segment_scores_backward", 16)[0];
    let mut inputs = case.any(DType::F32);
    inputs.insert(
        "grad_scores".into(),
        AnyTensor::F32(HostTensor::zeros(&[B, J + 1, N])),
    );
    assert!(matches!(
        run_op("segment_scores_backward", &inputs, &case.opts).unwrap_err(),
        Error::Shape { tensor, .. } if tensor == "grad_scores"
    ));
}

#[test]
fn dynamic_merge_needs_beta() {
    for op in ["dynamic_merge", "dynamic_merge_backward"] {
        let case = &cases(op, 17)[0];
        let o = RunOptions {
            beta: None,
            ..case.opts
        };
        match run_op(op, &case.any(DType::F32), &o).unwrap_err() {
            Error::Option { name, .. } => assert_eq!(name, "beta"),
            e => panic!("{e}"),
        }
    }
}

/// Without the `cuda` feature, Device::Cuda is refused with Error::Cuda saying so, never run on
/// the CPU instead.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_without_feature_is_refused() {
    let case = &cases("merge", 18)[0];
    let o = RunOptions {
        device: Device::Cuda,
        ..case.opts
    };
    match run_op("merge", &case.any(DType::F32), &o).unwrap_err() {
        Error::Cuda { message: m, .. } => assert!(m.contains("without the `cuda` feature"), "{m}"),
        e => panic!("{e}"),
    }
}

/// With the `cuda` feature: every operator and variant on Device::Cuda, in f32, f16 and bf16,
/// against the float64 CPU result on the same stored inputs, within SPEC section 5's tolerances
/// (relative Frobenius error). Skips, saying so, where no CUDA driver is present; f64 is refused.
#[cfg(feature = "cuda")]
#[test]
fn cuda_device_matches_cpu() {
    let case = &cases("merge", 18)[0];
    let o = RunOptions {
        device: Device::Cuda,
        ..case.opts
    };
    if !camex::cuda::driver_present() {
        match run_op("merge", &case.any(DType::F32), &o).unwrap_err() {
            Error::Cuda { message: m, .. } => eprintln!("cuda_device_matches_cpu: skipped ({m})"),
            e => panic!("{e}"),
        }
        return;
    }
    assert!(matches!(
        run_op("merge", &case.any(DType::F64), &o).unwrap_err(),
        Error::DType { .. }
    ));
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
        for (k, info) in named::ops().iter().enumerate() {
            for case in cases(info.name, 900 + k as u64) {
                let inputs = case.any(dtype);
                let o = RunOptions {
                    device: Device::Cuda,
                    ..case.opts
                };
                let got = run_op(info.name, &inputs, &o)
                    .unwrap_or_else(|e| panic!("{} [{}] {dtype:?}: {e}", info.name, case.label));
                let want = expected(info.name, &inputs, &case.opts, DType::F64);
                let gk: Vec<&String> = got.keys().collect();
                let wk: Vec<&String> = want.keys().collect();
                assert_eq!(gk, wk, "{} [{}]", info.name, case.label);
                for (name, w) in &want {
                    let g = &got[name];
                    assert_eq!(g.dtype(), dtype);
                    assert_eq!(g.shape(), w.shape());
                    let (g, w) = (g.to_f64(), w.to_f64());
                    let num: f64 = g
                        .data()
                        .iter()
                        .zip(w.data())
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum();
                    let den: f64 = w.data().iter().map(|b| b * b).sum();
                    let rel = if den == 0.0 {
                        num.sqrt()
                    } else {
                        (num / den).sqrt()
                    };
                    assert!(
                        rel < tol,
                        "{} [{}] {dtype:?} `{name}`: relative error {rel:e} >= {tol:e}",
                        info.name,
                        case.label
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// safetensors
// ---------------------------------------------------------------------------------------------

fn temp_path(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!(
        "camex-named-{tag}-{}-{nanos}.safetensors",
        std::process::id()
    ))
}

/// Every dtype and 0-d scalars survive a write and a read bit for bit; no temp file is left.
#[test]
fn safetensors_round_trip() {
    let case = &cases("ca_merge_backward", 19)[1];
    let mut all = BTreeMap::new();
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        for (k, v) in case.any(dtype) {
            all.insert(format!("{}_{k}", dtype.name()), v);
        }
        let scalar = AnyTensor::from_f64(&HostTensor::scalar(-1.25f64), dtype);
        all.insert(format!("{}_scalar", dtype.name()), scalar);
    }
    let path = temp_path("roundtrip");
    write_safetensors(&path, &all).unwrap();
    let back = read_safetensors(&path).unwrap();
    assert_eq!(back, all);
    assert_eq!(back["bf16_scalar"].shape(), &[] as &[usize]);
    let dir = path.parent().unwrap();
    let stem = path.file_name().unwrap().to_string_lossy().to_string();
    let leftovers = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with(&format!(".{stem}.tmp"))
        })
        .count();
    assert_eq!(leftovers, 0);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn safetensors_errors() {
    // Absent file.
    let path = temp_path("absent");
    assert!(matches!(read_safetensors(&path), Err(Error::Io { .. })));
    // Not a safetensors file.
    std::fs::write(&path, b"not a safetensors file").unwrap();
    assert!(matches!(read_safetensors(&path), Err(Error::Io { .. })));
    std::fs::remove_file(&path).unwrap();
    // An integer tensor: DType error naming it.
    let bytes: Vec<u8> = [1i32, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![3], &bytes).unwrap();
    let raw = safetensors::serialize([("counts", view)], None).unwrap();
    std::fs::write(&path, raw).unwrap();
    match read_safetensors(&path).unwrap_err() {
        Error::DType { tensor, .. } => assert_eq!(tensor, "counts"),
        e => panic!("{e}"),
    }
    std::fs::remove_file(&path).unwrap();
    // A directory that does not exist: an error and no file.
    let bad = temp_path("nodir").join("out.safetensors");
    let mut m = BTreeMap::new();
    m.insert("x".to_string(), AnyTensor::F32(HostTensor::scalar(1.0)));
    assert!(matches!(write_safetensors(&bad, &m), Err(Error::Io { .. })));
    assert!(!bad.exists());
}
