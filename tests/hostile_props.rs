//! Property tests of hostile input (issue 16), CPU path: over random shapes (consistent, or with
//! one dimension changed, dropped or added), random subsets of inputs, random options (alpha and
//! beta out of the storage dtype's range, NaN, bad mask and DARE parameters, every dtype) and
//! random or corrupted safetensors bytes, every operator returns `Ok` with the outputs it
//! declares, or a well-formed `Err` naming something it was given or reads, and never panics.
//!
//! Every case runs under a 32 MiB memory limit, so the occasional huge G or T ends in
//! `Error::Memory` rather than in an allocation. Case counts are fixed (a few seconds in all).

use camex::named::{self, read_safetensors, run_op, OpInfo, RunOptions};
use camex::{AnyTensor, DType, Dare, Error, HostTensor, Mask, MemoryLimit};
use proptest::prelude::*;
use proptest::test_runner::Config;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

const LIMIT: u64 = 32 << 20;

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Values of the SPEC section 2 symbols for one case.
#[derive(Debug, Clone)]
struct Dims {
    g: usize,
    n: usize,
    o1: usize,
    o2: usize,
    i1: usize,
    i2: usize,
    r: usize,
    t: usize,
    b: usize,
    j: usize,
}

fn dims() -> impl Strategy<Value = Dims> {
    // G and T are now and then large: the outputs' size grows with them, the inputs' barely.
    let big = || prop_oneof![8 => 1usize..4, 1 => Just(4096usize), 1 => Just(1usize << 20)];
    (
        big(),
        1usize..4,
        (1usize..4, 1usize..4, 1usize..4, 1usize..4),
        1usize..3,
        big(),
        (1usize..3, 1usize..4),
    )
        .prop_map(|(g, n, (o1, o2, i1, i2), r, t, (b, j))| Dims {
            g,
            n,
            o1,
            o2,
            i1,
            i2,
            r,
            t,
            b,
            j,
        })
}

fn symbol(d: &Dims, s: &str) -> usize {
    match s {
        "G" => d.g,
        "N" => d.n,
        "O" => d.o1 * d.o2,
        "I" => d.i1 * d.i2,
        "o1" => d.o1,
        "o2" => d.o2,
        "i1" => d.i1,
        "i2" => d.i2,
        "R" => d.r,
        "T" => d.t,
        "B" => d.b,
        "J" => d.j,
        other => panic!("unknown symbol {other}"),
    }
}

/// "[R, N, o1, o1]" -> the shape for `d`.
fn shape_of(spec: &str, d: &Dims) -> Vec<usize> {
    let inner = spec.trim_start_matches('[').trim_end_matches(']');
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| symbol(d, s))
        .collect()
}

/// How one input is broken (or not).
#[derive(Debug, Clone)]
enum Mutation {
    Keep,
    SetDim(usize, usize),
    DropDim(usize),
    AddDim(usize),
    Omit,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        24 => Just(Mutation::Keep),
        1 => (0usize..4, 0usize..6).prop_map(|(k, v)| Mutation::SetDim(k, v)),
        1 => (0usize..4).prop_map(Mutation::DropDim),
        1 => (0usize..3).prop_map(Mutation::AddDim),
        1 => Just(Mutation::Omit),
    ]
}

/// Element values: ordinary, or with NaN/inf/huge values, or a 0/1 mask with strays.
#[derive(Debug, Clone, Copy)]
enum Fill {
    Uniform,
    Special,
    Binary,
}

#[derive(Debug, Clone)]
struct Case {
    op: usize,
    dims: Dims,
    /// Per read slot: include it (optional ones), how it is broken, how it is filled.
    slots: Vec<(bool, Mutation, Fill)>,
    extra: bool,
    seed: u64,
    alpha: f64,
    beta: Option<f64>,
    mask: Mask,
    dare: Dare,
    storage: DType,
    dtype: Option<DType>,
}

fn scalar() -> impl Strategy<Value = f64> {
    prop_oneof![
        6 => -2.0f64..2.0,
        1 => Just(1e300),
        1 => Just(-7e4),
        1 => Just(65504.0),
        1 => Just(4e38),
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
    ]
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::F32),
        Just(DType::F64),
        Just(DType::F16),
        Just(DType::BF16)
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let nops = named::ops().len();
    let slot = (
        any::<bool>(),
        mutation(),
        prop_oneof![6 => Just(Fill::Uniform), 1 => Just(Fill::Special), 1 => Just(Fill::Binary)],
    );
    (
        0..nops,
        dims(),
        proptest::collection::vec(slot, 12),
        prop::bool::weighted(0.05),
        any::<u64>(),
        (scalar(), proptest::option::of(scalar())),
        prop_oneof![
            3 => Just(Mask::None),
            2 => Just(Mask::TiesSign),
            2 => prop_oneof![Just(0.0), Just(0.3), Just(1.0), Just(1.5), Just(f64::NAN)]
                .prop_map(Mask::TiesTrim),
        ],
        prop_oneof![
            3 => Just(Dare::None),
            1 => (prop_oneof![Just(0.0), Just(0.4), Just(1.0), Just(-0.1)], any::<u64>())
                .prop_map(|(p, seed)| Dare::Expert { p, seed }),
            1 => (prop_oneof![Just(0.0), Just(0.4), Just(1.0)], any::<u64>())
                .prop_map(|(p, seed)| Dare::Element { p, seed }),
        ],
        (dtype(), proptest::option::weighted(0.3, dtype())),
    )
        .prop_map(
            |(op, dims, slots, extra, seed, (alpha, beta), mask, dare, (storage, dtype))| Case {
                op,
                dims,
                slots,
                extra,
                seed,
                alpha,
                beta,
                mask,
                dare,
                storage,
                dtype,
            },
        )
}

#[path = "rng/mod.rs"]
mod rng;

/// Inputs of one case; `None` when a broken shape would need more than a few million elements.
fn build(c: &Case, info: &OpInfo) -> Option<BTreeMap<String, AnyTensor>> {
    let mut rng = rng::Rng::new(c.seed);
    let mut out = BTreeMap::new();
    // Factors come all together or not at all, mostly.
    let with_factors = c.slots[0].0;
    for (k, slot) in info.reads.iter().enumerate() {
        let (include, ref m, fill) = c.slots[k % c.slots.len()];
        let wanted = match slot.when {
            None => true,
            Some(_) if slot.name.starts_with("factor_") => with_factors,
            Some(_) => include,
        };
        if !wanted {
            continue;
        }
        let mut shape = shape_of(slot.shape, &c.dims);
        match *m {
            Mutation::Keep => {}
            Mutation::SetDim(d, v) => {
                if let Some(x) = shape.get_mut(d) {
                    *x = v;
                }
            }
            Mutation::DropDim(d) => {
                if d < shape.len() {
                    shape.remove(d);
                }
            }
            Mutation::AddDim(v) => shape.push(v),
            Mutation::Omit => continue,
        }
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= 1 << 22)?;
        let fill = if slot.name == "mask" {
            Fill::Binary
        } else {
            fill
        };
        let data: Vec<f64> = (0..n)
            .map(|_| {
                let u = rng.next_u64();
                let x = (u >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                match fill {
                    Fill::Uniform => x,
                    Fill::Special => match u % 8 {
                        0 => f64::NAN,
                        1 => f64::INFINITY,
                        2 => -1e30,
                        3 => 0.0,
                        _ => x,
                    },
                    Fill::Binary => match u % 64 {
                        0 => 0.5,
                        1 => f64::NAN,
                        k if k % 2 == 0 => 1.0,
                        _ => 0.0,
                    },
                }
            })
            .collect();
        let t = HostTensor::new(&shape, data).unwrap();
        out.insert(slot.name.to_string(), AnyTensor::from_f64(&t, c.storage));
    }
    if c.extra {
        out.insert(
            "factor_A".to_string(),
            AnyTensor::from_f64(&HostTensor::full(&[1], 1.0), c.storage),
        );
    }
    Some(out)
}

fn opts(c: &Case) -> RunOptions {
    RunOptions {
        alpha: c.alpha,
        beta: c.beta,
        mask: c.mask,
        dare: c.dare,
        dtype: c.dtype,
        memory_limit: Some(MemoryLimit::Bytes(LIMIT)),
        ..Default::default()
    }
}

/// The result of one call is well formed: outputs the operator declares, with consistent
/// tensors; or an error whose message names something the caller gave or the operator reads.
fn check_result(
    info: &OpInfo,
    inputs: &BTreeMap<String, AnyTensor>,
    r: &camex::Result<BTreeMap<String, AnyTensor>>,
) -> std::result::Result<(), TestCaseError> {
    match r {
        Ok(out) => {
            for (k, v) in out {
                prop_assert!(
                    info.writes.iter().any(|s| s.name == k),
                    "{}: undeclared output {k}",
                    info.name
                );
                let n: usize = v.shape().iter().product();
                prop_assert_eq!(n, v.to_f64().len());
            }
            for s in info.writes.iter().filter(|s| s.when.is_none()) {
                prop_assert!(out.contains_key(s.name), "{}: no {}", info.name, s.name);
            }
        }
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(!msg.is_empty());
            let known = |t: &str| {
                inputs.contains_key(t)
                    || info.reads.iter().any(|s| s.name == t)
                    || info.writes.iter().any(|s| s.name == t)
            };
            match e {
                Error::Shape { tensor, .. }
                | Error::DType { tensor, .. }
                | Error::Value { tensor, .. }
                | Error::Unexpected { tensor, .. } => {
                    prop_assert!(known(tensor), "{}: {msg}", info.name)
                }
                Error::Missing { tensor, op, .. } => {
                    prop_assert!(known(tensor), "{}: {msg}", info.name);
                    prop_assert_eq!(op.as_str(), info.name);
                }
                Error::Memory {
                    tensor,
                    bytes,
                    total,
                    ..
                } => {
                    prop_assert!(!tensor.is_empty());
                    prop_assert!(
                        total.or(*bytes).is_none_or(|b| b > LIMIT),
                        "{}: {msg}",
                        info.name
                    );
                }
                Error::Option { name, .. } => prop_assert!(!name.is_empty()),
                // The enum is non_exhaustive: a kind added later is unexpected here too.
                _ => {
                    prop_assert!(false, "{}: unexpected error kind: {msg}", info.name)
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(1200))]

    /// Every operator, forward and backward, on random (often broken) inputs and options.
    #[test]
    fn every_operator_ok_or_well_formed_err(c in case()) {
        let info = &named::ops()[c.op];
        let Some(inputs) = build(&c, info) else { return Ok(()) };
        let o = opts(&c);
        let r = catch_unwind(AssertUnwindSafe(|| run_op(info.name, &inputs, &o)));
        prop_assert!(r.is_ok(), "{} panicked on {:?}", info.name, c);
        check_result(info, &inputs, &r.unwrap())?;
    }
}

// ---------------------------------------------------------------------------------------------
// Raw safetensors bytes
// ---------------------------------------------------------------------------------------------

fn temp_file(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static K: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "camex-props-{tag}-{}-{}.safetensors",
        std::process::id(),
        K.fetch_add(1, Ordering::SeqCst)
    ))
}

/// Reads `bytes` as a safetensors file; on success runs operator `op` on what it holds. Neither
/// may panic, and every error is well formed.
fn read_and_run(bytes: &[u8], op: usize) -> std::result::Result<(), TestCaseError> {
    let path = temp_file("raw");
    std::fs::write(&path, bytes).unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| {
        camex::memory::with_limit(MemoryLimit::Bytes(LIMIT), || read_safetensors(&path))
    }));
    let _ = std::fs::remove_file(&path);
    prop_assert!(r.is_ok(), "read_safetensors panicked on {:?}", bytes);
    match r.unwrap() {
        Err(e) => prop_assert!(
            matches!(
                e,
                Error::Io { .. } | Error::DType { .. } | Error::Memory { .. }
            ),
            "{e}"
        ),
        Ok(inputs) => {
            let info = &named::ops()[op % named::ops().len()];
            let o = RunOptions {
                beta: Some(0.5),
                memory_limit: Some(MemoryLimit::Bytes(LIMIT)),
                ..Default::default()
            };
            let r = catch_unwind(AssertUnwindSafe(|| run_op(info.name, &inputs, &o)));
            prop_assert!(r.is_ok(), "{} panicked", info.name);
            check_result(info, &inputs, &r.unwrap())?;
        }
    }
    Ok(())
}

/// A header entry: name, dtype, shape, and offsets (consistent, or arbitrary).
fn entry() -> impl Strategy<Value = (String, String, Vec<u64>, Option<(u64, u64)>)> {
    (
        prop_oneof![
            Just("base"),
            Just("experts"),
            Just("curved"),
            Just("scores"),
            Just("x"),
            Just("merged"),
            Just("router_scores"),
            Just("mask"),
            Just("__metadata__"),
            Just("b\\u0061se"),
        ]
        .prop_map(String::from),
        prop_oneof![
            6 => Just("F32"),
            1 => Just("F64"),
            1 => Just("F16"),
            1 => Just("BF16"),
            1 => Just("I32"),
            1 => Just("BOOL"),
            1 => Just("XX"),
        ]
        .prop_map(String::from),
        proptest::collection::vec(
            prop_oneof![8 => 0u64..5, 1 => Just(1u64 << 40), 1 => Just(u64::MAX)],
            0..4,
        ),
        proptest::option::weighted(0.1, (0u64..64, 0u64..64)),
    )
}

proptest! {
    #![proptest_config(config(300))]

    /// Arbitrary bytes, often with a plausible length prefix.
    #[test]
    fn raw_bytes_never_panic(
        prefix in proptest::option::of(0u64..300),
        body in proptest::collection::vec(any::<u8>(), 0..300),
        op in 0usize..64,
    ) {
        let mut bytes = Vec::new();
        if let Some(n) = prefix {
            bytes.extend_from_slice(&n.to_le_bytes());
        }
        bytes.extend_from_slice(&body);
        read_and_run(&bytes, op)?;
    }

    /// Structured headers: duplicate and escaped names, odd dtypes, huge or empty shapes,
    /// inconsistent offsets, and a data section that is exact, short or long.
    #[test]
    fn headers_never_panic(
        entries in proptest::collection::vec(entry(), 0..6),
        slack in prop_oneof![6 => Just(0i64), 1 => -8i64..8],
        seed in any::<u64>(),
        op in 0usize..64,
    ) {
        let mut offset = 0u64;
        let mut parts = Vec::new();
        for (name, dtype, shape, offs) in &entries {
            let size: u64 = match dtype.as_str() {
                "F64" => 8,
                "F32" | "I32" => 4,
                "F16" | "BF16" => 2,
                _ => 1,
            };
            let n = shape.iter().try_fold(size, |a, &d| a.checked_mul(d)).unwrap_or(u64::MAX);
            let (a, b) = offs.unwrap_or((offset, offset.saturating_add(n)));
            if offs.is_none() && n < (1 << 20) {
                offset = b;
            }
            let shape: Vec<String> = shape.iter().map(u64::to_string).collect();
            parts.push(format!(
                r#""{name}":{{"dtype":"{dtype}","shape":[{}],"data_offsets":[{a},{b}]}}"#,
                shape.join(",")
            ));
        }
        let header = format!("{{{}}}", parts.join(","));
        let len = (offset.min(1 << 16) as i64 + slack).max(0) as usize;
        let mut rng = rng::Rng::new(seed);
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&data);
        read_and_run(&bytes, op)?;
    }

    /// A valid file of every operator's inputs with a few bytes overwritten or cut off.
    #[test]
    fn corrupted_files_never_panic(
        op in 0usize..64,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in proptest::option::weighted(0.2, any::<prop::sample::Index>()),
    ) {
        let info = &named::ops()[op % named::ops().len()];
        let d = Dims { g: 2, n: 2, o1: 2, o2: 1, i1: 1, i2: 3, r: 1, t: 2, b: 1, j: 2 };
        let inputs: BTreeMap<String, AnyTensor> = info
            .reads
            .iter()
            .map(|s| {
                let shape = shape_of(s.shape, &d);
                let t = HostTensor::<f32>::full(&shape, 1.0);
                (s.name.to_string(), AnyTensor::F32(t))
            })
            .collect();
        let path = temp_file("valid");
        named::write_safetensors(&path, &inputs).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        for (at, v) in flips {
            let k = at.index(bytes.len());
            bytes[k] = v;
        }
        if let Some(at) = cut {
            bytes.truncate(at.index(bytes.len()));
        }
        read_and_run(&bytes, op)?;
    }
}
