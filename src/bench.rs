//! Benchmark cases shared by `cargo bench` (`benches/cpu.rs`) and `camex bench`: the shapes of SPEC
//! section 8, the cost floor counted as SPEC section 8 counts it, this machine's measured GEMM rate
//! and copy bandwidth, a peak-memory counter, and the peer: the official unfused formulation
//! (materialised [R, N, O, I] tensor, four mode products, [G, N, O, I] gating, sum) composed from
//! candle ops (feature `peer`).
//!
//! Peak memory is the high-water mark of live heap bytes during a case, above what was live when the
//! case started (inputs are allocated before and not counted). It needs [`CountingAlloc`] installed
//! as the binary's global allocator; without it the peak reads as unknown (`peak_mem_mb=na`).
//!
//! The CUDA half (module `gpu`, feature `cuda`: `camex bench --device cuda`, `benches/cuda.rs`)
//! times the fused CUDA ops with CUDA events; `scripts/gpu-check.sh` runs it on a GPU machine (one
//! H200 run so far, scalar kernels, BENCHMARKS.md).

use crate::cpu::{self, CaMergeInputs, Curvature, Factors, MergeInputs};
use crate::error::{Error, Result};
use crate::options::{Dare, Mask, MergeOptions};
use crate::shape::Split;
use crate::tensor::{DType, Float, HostTensor};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

// ---------------------------------------------------------------------------------------------
// Peak memory

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// A global allocator that counts live heap bytes and their high-water mark, on top of the system
/// allocator. Install it in a binary with
/// `#[global_allocator] static ALLOC: camex::bench::CountingAlloc = camex::bench::CountingAlloc;`.
pub struct CountingAlloc;

#[inline]
fn grew(n: usize) {
    if !INSTALLED.load(Relaxed) {
        INSTALLED.store(true, Relaxed);
    }
    let now = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call forwards to `System` with the caller's arguments unchanged; the counters are
// plain atomics and never touch the memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

/// Starts a peak-memory scope: returns the live bytes now, the baseline for [`peak_since`].
pub fn peak_start() -> usize {
    let live = LIVE.load(Relaxed);
    PEAK.store(live, Relaxed);
    live
}

/// Peak live bytes above `baseline` since [`peak_start`]; `None` when [`CountingAlloc`] is not
/// the global allocator.
pub fn peak_since(baseline: usize) -> Option<usize> {
    if !INSTALLED.load(Relaxed) {
        return None;
    }
    Some(PEAK.load(Relaxed).saturating_sub(baseline))
}

// ---------------------------------------------------------------------------------------------
// Cases

/// The settings of SPEC section 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeName {
    T5Small,
    T5Base,
    Gpt2,
    MiniLm,
}

/// Sizes of one setting: `wi` is O x I; G groups of T tokens; GPT-2 groups are B x J segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchShape {
    pub o: usize,
    pub i: usize,
    pub n: usize,
    pub r: usize,
    pub g: usize,
    pub t: usize,
    /// (B, J) for causal segment routing: G = B * J.
    pub segments: (usize, usize),
}

impl ShapeName {
    pub const ALL: [ShapeName; 4] = [
        ShapeName::T5Small,
        ShapeName::T5Base,
        ShapeName::Gpt2,
        ShapeName::MiniLm,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ShapeName::T5Small => "t5-small",
            ShapeName::T5Base => "t5-base",
            ShapeName::Gpt2 => "gpt2",
            ShapeName::MiniLm => "minilm",
        }
    }
    pub fn parse(s: &str) -> Result<ShapeName> {
        ShapeName::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                Error::option(
                    "shape",
                    format!("expected t5-small|t5-base|gpt2|minilm, got `{s}`"),
                )
            })
    }
    /// SPEC section 8, the `wi` layer (O x I), N = 7, R = 8.
    pub fn dims(self) -> BenchShape {
        let (o, i, g, t, segments) = match self {
            ShapeName::T5Small => (2048, 512, 16, 128, (16, 1)),
            ShapeName::T5Base => (3072, 768, 16, 128, (16, 1)),
            ShapeName::Gpt2 => (3072, 768, 32, 256, (8, 4)),
            ShapeName::MiniLm => (1536, 384, 32, 128, (32, 1)),
        };
        BenchShape {
            o,
            i,
            n: 7,
            r: 8,
            g,
            t,
            segments,
        }
    }
}

impl BenchShape {
    pub fn split(&self) -> Split {
        Split::default_for(self.o, self.i)
    }
}

/// Operator families (SPEC section 7 names). `ties_mask` has no backward (the mask is a constant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Curvature,
    TiesMask,
    Merge,
    CaMerge,
    MergedLinear,
    DynamicMerge,
    SegmentScores,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::CaMerge,
        Op::Curvature,
        Op::Merge,
        Op::TiesMask,
        Op::MergedLinear,
        Op::DynamicMerge,
        Op::SegmentScores,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Op::Curvature => "curvature",
            Op::TiesMask => "ties_mask",
            Op::Merge => "merge",
            Op::CaMerge => "ca_merge",
            Op::MergedLinear => "merged_linear",
            Op::DynamicMerge => "dynamic_merge",
            Op::SegmentScores => "segment_scores",
        }
    }
    pub fn parse(s: &str) -> Result<Op> {
        Op::ALL.into_iter().find(|x| x.name() == s).ok_or_else(|| {
            Error::option(
                "op",
                format!("expected one of ca_merge|curvature|merge|ties_mask|merged_linear|dynamic_merge|segment_scores, got `{s}`"),
            )
        })
    }
    pub fn has_backward(self) -> bool {
        self != Op::TiesMask
    }
}

/// Forward, or forward then backward (one training step of the op).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Fwd,
    FwdBwd,
}

impl Pass {
    pub fn name(self) -> &'static str {
        match self {
            Pass::Fwd => "fwd",
            Pass::FwdBwd => "fwd+bwd",
        }
    }
}

/// Who computes: this crate's fused path, or the peer (the unfused formulation in candle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    Camex,
    Candle,
}

impl Impl {
    pub fn name(self) -> &'static str {
        match self {
            Impl::Camex => "camex",
            Impl::Candle => "candle-unfused",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            _ => Err(Error::option(
                "device",
                format!("expected cpu|cuda, got `{s}`"),
            )),
        }
    }
}

/// One benchmark case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    pub op: Op,
    pub shape: ShapeName,
    pub imp: Impl,
    pub device: Device,
    pub dtype: DType,
    pub pass: Pass,
}

impl Case {
    /// A short id for criterion: `shape/pass/impl`.
    pub fn id(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.shape.name(),
            self.dtype.name(),
            self.pass.name(),
            self.imp.name()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Floors

/// Useful work of a case: FLOP and the bytes that must cross memory at least once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub flop: f64,
    pub bytes: f64,
}

/// The cost floor of SPEC section 8: Kronecker transform 2*N*R*O*I*(o1+o2+i1+i2), merge 2*G*N*O*I,
/// linear 2*G*T*O*I; element-wise ops count one FLOP per element they produce. The backward of a
/// product costs twice its forward (input gradient and weight gradient, with the forward's
/// intermediates available), so a forward+backward floor is 3x the forward FLOP for every
/// product; bytes count each input and output once (weights, gradients in and out).
pub fn cost(op: Op, s: &BenchShape, pass: Pass, elem: usize) -> Cost {
    let (n, r, g, t) = (s.n as f64, s.r as f64, s.g as f64, s.t as f64);
    let sp = s.split();
    let oi = (s.o * s.i) as f64;
    let kron = 2.0 * n * r * oi * (sp.o1 + sp.o2 + sp.i1 + sp.i2) as f64;
    let mergef = 2.0 * g * n * oi;
    let e = elem as f64;
    let bwd = pass == Pass::FwdBwd;
    let (flop, elems) = match op {
        // reads base, experts; writes curved. Backward: reads grad_curved, writes grad_experts, grad_base.
        Op::Curvature => (
            if bwd { 3.0 * kron } else { kron },
            if bwd {
                (2.0 * n + 1.0) * oi + (2.0 * n + 1.0) * oi
            } else {
                (2.0 * n + 1.0) * oi
            },
        ),
        Op::TiesMask => (2.0 * n * oi, (2.0 * n + 1.0) * oi),
        // reads base, curved; writes merged. Backward: reads grad_merged, writes grad_curved, grad_base.
        Op::Merge => (
            if bwd { 3.0 * mergef } else { mergef },
            if bwd {
                (n + 1.0 + g) * oi + (g + n + 1.0) * oi
            } else {
                (n + 1.0 + g) * oi
            },
        ),
        // reads base, experts; writes merged. Backward: reads grad_merged, writes grad_experts, grad_base.
        Op::CaMerge => (
            if bwd {
                3.0 * (kron + mergef)
            } else {
                kron + mergef
            },
            if bwd {
                (n + 1.0 + g) * oi + (g + n + 1.0) * oi
            } else {
                (n + 1.0 + g) * oi
            },
        ),
        Op::MergedLinear => {
            let lin = 2.0 * g * t * oi;
            let x = g * t * s.i as f64;
            let y = g * t * s.o as f64;
            let w = g * oi;
            if bwd {
                (3.0 * lin, (x + w + y) + (y + x + w))
            } else {
                (lin, x + w + y)
            }
        }
        Op::DynamicMerge => (
            if bwd { 3.0 * n * oi } else { n * oi },
            if bwd {
                (n + 2.0) * oi + (n + 2.0) * oi
            } else {
                (n + 2.0) * oi
            },
        ),
        Op::SegmentScores => {
            let k = g * n;
            (0.0, if bwd { 4.0 * k } else { 2.0 * k })
        }
    };
    Cost {
        flop,
        bytes: elems * e,
    }
}

/// What this machine can do: the rates the floor divides by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Machine {
    /// FLOP/s of a large square GEMM in the case's precision.
    pub gemm_flops: f64,
    /// Bytes/s of a large parallel copy (read + write counted).
    pub copy_bytes_per_s: f64,
    pub threads: usize,
}

impl Machine {
    /// The floor in seconds: the slower of compute at the GEMM rate and traffic at copy bandwidth.
    pub fn floor_s(&self, c: &Cost) -> f64 {
        (c.flop / self.gemm_flops).max(c.bytes / self.copy_bytes_per_s)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let k = v.len();
    if k % 2 == 1 {
        v[k / 2]
    } else {
        0.5 * (v[k / 2 - 1] + v[k / 2])
    }
}

/// Measures this CPU: a 2048^3 GEMM of `F` through the `gemm` crate on all rayon threads (the median
/// of 3 after a warm-up), and a 256 MiB parallel copy. Takes about a second.
pub fn measure_cpu<F: Float>() -> Machine {
    let threads = rayon::current_num_threads();
    let m = 2048;
    let a: Vec<F> = (0..m * m)
        .map(|k| F::from_f64(((k % 97) as f64 - 48.0) / 97.0))
        .collect();
    let b = a.clone();
    let mut c = vec![F::ZERO; m * m];
    let mut times = Vec::new();
    for rep in 0..4 {
        let t0 = Instant::now();
        // SAFETY: a, b, c hold m*m elements each, row-major with row stride m; c aliases neither.
        unsafe {
            gemm::gemm(
                m,
                m,
                m,
                c.as_mut_ptr(),
                1,
                m as isize,
                false,
                a.as_ptr(),
                1,
                m as isize,
                b.as_ptr(),
                1,
                m as isize,
                F::ZERO,
                F::ONE,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
        if rep > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(&c);
    let gemm_flops = 2.0 * (m as f64).powi(3) / median(times);
    drop((a, b, c));
    let len = 64 << 20; // 64 Mi f32 = 256 MiB
    let src: Vec<f32> = vec![1.0; len];
    let mut dst: Vec<f32> = vec![0.0; len];
    let mut times = Vec::new();
    for rep in 0..4 {
        let t0 = Instant::now();
        use rayon::prelude::*;
        dst.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s));
        if rep > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(&dst);
    let copy_bytes_per_s = 2.0 * (len * 4) as f64 / median(times);
    Machine {
        gemm_flops,
        copy_bytes_per_s,
        threads,
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs

/// SplitMix64: deterministic inputs without depending on a generator's API.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn tensor<F: Float>(&mut self, shape: &[usize], scale: f64) -> HostTensor<F> {
        HostTensor::from_fn(shape, |_| F::from_f64(scale * self.next()))
    }
}

/// Inputs of one case, like a trained layer: experts near the base, softmax-like scores, factors
/// near the identity (so M_i stays near R * I and values stay bounded).
struct Data<F> {
    base: HostTensor<F>,
    experts: HostTensor<F>,
    scores: HostTensor<F>,
    factors: [HostTensor<F>; 4],
}

fn data<F: Float>(s: &BenchShape) -> Data<F> {
    let mut rng = Rng(0x00CA_3E00);
    let (n, o, i) = (s.n, s.o, s.i);
    let base: HostTensor<F> = rng.tensor(&[o, i], 0.05);
    let noise: HostTensor<F> = rng.tensor(&[n, o, i], 0.01);
    let experts = HostTensor::from_fn(&[n, o, i], |k| base.data()[k % (o * i)] + noise.data()[k]);
    drop(noise);
    let raw: Vec<f64> = (0..s.g * n).map(|_| 1.0 + 0.5 * rng.next()).collect();
    let scores = HostTensor::from_fn(&[s.g, n], |k| {
        let row = &raw[(k / n) * n..(k / n + 1) * n];
        F::from_f64(raw[k] / row.iter().sum::<f64>())
    });
    let split = s.split();
    let eye = cpu::identity_factors::<F>(s.r, n, split, false);
    let factors = eye.map(|t| {
        let sh = t.shape().to_vec();
        let d = t
            .data()
            .iter()
            .map(|&v| v + F::from_f64(0.01 * rng.next()))
            .collect();
        HostTensor::new(&sh, d).expect("factor shape")
    });
    Data {
        base,
        experts,
        scores,
        factors,
    }
}

/// A prepared case: call it to run one iteration.
pub type Runner = Box<dyn FnMut() -> Result<()>>;

fn keep<T>(r: Result<T>) -> Result<()> {
    std::hint::black_box(r?);
    Ok(())
}

/// Builds the inputs of `case` and returns a closure that runs one iteration of it.
pub fn prepare(case: &Case) -> Result<Runner> {
    if case.pass == Pass::FwdBwd && !case.op.has_backward() {
        return Err(Error::option(
            "pass",
            format!(
                "`{}` has no backward (its output is a constant)",
                case.op.name()
            ),
        ));
    }
    match (case.device, case.imp, case.dtype) {
        (Device::Cuda, _, _) => Err(Error::cuda(
            "camex bench: the CUDA benchmark path is not wired yet (unmeasured)",
        )),
        (Device::Cpu, Impl::Camex, DType::F32) => prepare_camex::<f32>(case),
        (Device::Cpu, Impl::Camex, DType::F64) => prepare_camex::<f64>(case),
        (Device::Cpu, Impl::Candle, DType::F32 | DType::F64) => prepare_peer(case),
        (Device::Cpu, _, d) => Err(Error::DType {
            tensor: "bench inputs".into(),
            expected: "f32 or f64 on the CPU (f16/bf16 are storage types of the CUDA path)".into(),
            actual: d.name().into(),
        }),
    }
}

fn prepare_camex<F: Float>(case: &Case) -> Result<Runner> {
    let s = case.shape.dims();
    let bwd = case.pass == Pass::FwdBwd;
    let mut rng = Rng(0xBE4C_0001);
    let (n, o, i, g, t) = (s.n, s.o, s.i, s.g, s.t);
    match case.op {
        Op::CaMerge | Op::Curvature => {
            let d = data::<F>(&s);
            let grad_merged: HostTensor<F> = rng.tensor(&[g, o, i], 1.0);
            let grad_curved: HostTensor<F> = rng.tensor(&[n, o, i], 1.0);
            let op = case.op;
            Ok(Box::new(move || {
                let [a, b, c, dd] = &d.factors;
                let curv = Curvature::Kronecker(Factors { a, b, c, d: dd });
                if op == Op::Curvature {
                    let u = cpu::curvature(&d.base, &d.experts, &curv)?;
                    if bwd {
                        drop(u);
                        keep(cpu::curvature_backward(
                            &d.base,
                            &d.experts,
                            &curv,
                            &grad_curved,
                        ))?;
                    } else {
                        std::hint::black_box(u);
                    }
                    return Ok(());
                }
                let inputs = CaMergeInputs {
                    base: &d.base,
                    experts: &d.experts,
                    scores: &d.scores,
                    curvature: curv,
                    base_bias: None,
                    expert_bias: None,
                };
                let opts = MergeOptions::default();
                let out = cpu::ca_merge(&inputs, &opts)?;
                if bwd {
                    drop(out);
                    keep(cpu::ca_merge_backward(
                        &inputs,
                        &opts,
                        &grad_merged,
                        None,
                        None,
                    ))
                } else {
                    keep(Ok(out))
                }
            }))
        }
        Op::TiesMask => {
            let d = data::<F>(&s);
            // The output is reused across iterations (`ties_mask_into`), as a training loop would.
            let mut m = HostTensor::zeros(&[n, o, i]);
            Ok(Box::new(move || {
                keep(cpu::ties_mask_into(
                    &d.base,
                    &d.experts,
                    Mask::TiesSign,
                    &mut m,
                ))
            }))
        }
        Op::Merge => {
            let d = data::<F>(&s);
            let curved: HostTensor<F> = rng.tensor(&[n, o, i], 0.01);
            let grad_merged: HostTensor<F> = rng.tensor(&[g, o, i], 1.0);
            drop(d.experts);
            let (base, scores) = (d.base, d.scores);
            // The output is reused across iterations (`merge_into`): a fresh [G, O, I] would be
            // page-faulted in on every call.
            let mut merged = HostTensor::zeros(&[g, o, i]);
            Ok(Box::new(move || {
                let inputs = MergeInputs {
                    base: &base,
                    curved: &curved,
                    scores: &scores,
                    mask: None,
                    base_bias: None,
                    expert_bias: None,
                };
                cpu::merge_into(&inputs, 1.0, &Dare::None, &mut merged, None)?;
                std::hint::black_box(&merged);
                if bwd {
                    keep(cpu::merge_backward(
                        &inputs,
                        1.0,
                        &Dare::None,
                        &grad_merged,
                        None,
                    ))
                } else {
                    Ok(())
                }
            }))
        }
        Op::MergedLinear => {
            let x: HostTensor<F> = rng.tensor(&[g, t, i], 1.0);
            let merged: HostTensor<F> = rng.tensor(&[g, o, i], 0.05);
            let grad_y: HostTensor<F> = rng.tensor(&[g, t, o], 1.0);
            Ok(Box::new(move || {
                let y = cpu::merged_linear(&x, &merged, None)?;
                if bwd {
                    drop(y);
                    keep(cpu::merged_linear_backward(&x, &merged, None, &grad_y))
                } else {
                    keep(Ok(y))
                }
            }))
        }
        Op::DynamicMerge => {
            let base: HostTensor<F> = rng.tensor(&[o, i], 0.05);
            let curved: HostTensor<F> = rng.tensor(&[n, o, i], 0.01);
            let grad_next: HostTensor<F> = rng.tensor(&[o, i], 1.0);
            Ok(Box::new(move || {
                let nb = cpu::dynamic_merge(&base, &curved, 0.5)?;
                if bwd {
                    drop(nb);
                    keep(cpu::dynamic_merge_backward(&base, &curved, 0.5, &grad_next))
                } else {
                    keep(Ok(nb))
                }
            }))
        }
        Op::SegmentScores => {
            let (b, j) = s.segments;
            let router: HostTensor<F> = rng.tensor(&[b, j, n], 1.0);
            let grad: HostTensor<F> = rng.tensor(&[b, j, n], 1.0);
            Ok(Box::new(move || {
                let sc = cpu::segment_scores(&router)?;
                if bwd {
                    drop(sc);
                    keep(cpu::segment_scores_backward(&grad))
                } else {
                    keep(Ok(sc))
                }
            }))
        }
    }
}

#[cfg(not(feature = "peer"))]
fn prepare_peer(_case: &Case) -> Result<Runner> {
    Err(Error::option(
        "peer",
        "the candle peer needs the `peer` feature (cargo ... --features peer)",
    ))
}

#[cfg(feature = "peer")]
fn prepare_peer(case: &Case) -> Result<Runner> {
    peer::prepare(case)
}

/// The peer: the official formulation, unfused, from candle ops, on the CPU and (with `cuda`,
/// which turns on candle's CUDA backend) on the GPU (`gpu::measure_peer`).
#[cfg(feature = "peer")]
pub mod peer {
    use super::*;
    use candle_core::{DType as CDType, Device as CDevice, Tensor as CT, Var};

    fn err(e: candle_core::Error) -> Error {
        Error::option("peer (candle)", e.to_string())
    }

    /// A camex tensor as a candle tensor of `dtype` on the CPU.
    pub fn to_candle(t: &HostTensor<f32>, dtype: CDType) -> candle_core::Result<CT> {
        CT::from_slice(t.data(), t.shape(), &CDevice::Cpu)?.to_dtype(dtype)
    }

    /// y = x x_axis F on the 6-D view [R, N, o1, o2, i1, i2] with per-(r, i) factors F [R, N, k, k]:
    /// the mode moved last (a materialised copy, as einsum does), one batched matmul, moved back.
    fn mode(x: &CT, f: &CT, axis: usize) -> candle_core::Result<CT> {
        let dims = x.dims().to_vec();
        let (r, n, k) = (dims[0], dims[1], dims[axis]);
        let rest = dims[2..].iter().product::<usize>() / k;
        if axis == 2 {
            return f.matmul(&x.reshape((r, n, k, rest))?)?.reshape(dims);
        }
        let xt = x.transpose(axis, 5)?;
        let tdims = xt.dims().to_vec();
        let y = xt.contiguous()?.reshape((r, n, rest, k))?.matmul(&f.t()?)?;
        y.reshape(tdims)?.transpose(axis, 5)
    }

    /// U [N, O, I] = sum_r tau x1 A x2 B x3 C x4 D, through a materialised [R, N, O, I].
    pub fn curvature(
        base: &CT,
        experts: &CT,
        f: [&CT; 4],
        s: &BenchShape,
    ) -> candle_core::Result<CT> {
        let sp = s.split();
        let (r, n, o, i) = (s.r, s.n, s.o, s.i);
        let tau = experts.broadcast_sub(&base.unsqueeze(0)?)?;
        let mut x = tau
            .unsqueeze(0)?
            .broadcast_as((r, n, o, i))?
            .contiguous()?
            .reshape(vec![r, n, sp.o1, sp.o2, sp.i1, sp.i2])?;
        for (axis, fac) in f.iter().enumerate() {
            x = mode(&x, fac, axis + 2)?;
        }
        x.sum(0)?.reshape((n, o, i))
    }

    /// merged [G, O, I] = base + alpha * sum_i (scores [G, N, 1, 1] * P [1, N, O, I]), through a
    /// materialised [G, N, O, I].
    pub fn merge(base: &CT, p: &CT, scores: &CT, alpha: f64) -> candle_core::Result<CT> {
        let (g, n) = scores.dims2()?;
        let gated = scores
            .reshape((g, n, 1, 1))?
            .broadcast_mul(&p.unsqueeze(0)?)?;
        gated.sum(1)?.affine(alpha, 0.0)?.broadcast_add(base)
    }

    struct Inputs {
        tensors: Vec<CT>,
        vars: Vec<Var>,
    }

    impl Inputs {
        fn new(list: Vec<CT>, bwd: bool) -> candle_core::Result<Self> {
            let vars = if bwd {
                list.iter()
                    .map(Var::from_tensor)
                    .collect::<candle_core::Result<_>>()?
            } else {
                Vec::new()
            };
            Ok(Inputs {
                tensors: list,
                vars,
            })
        }
        /// The inputs as seen by the graph: variables (tracked) for fwd+bwd, plain tensors for fwd.
        fn get(&self) -> Vec<CT> {
            if self.vars.is_empty() {
                self.tensors.clone()
            } else {
                self.vars.iter().map(|v| v.as_tensor().clone()).collect()
            }
        }
    }

    pub(super) fn prepare(case: &Case) -> Result<Runner> {
        prepare_on(case, &CDevice::Cpu)
    }

    /// The peer's iteration for `case` on `dev`: f32 or f64 on the CPU (f16/bf16 storage is
    /// computed in f32 there, as the crate's CPU path does), the case's dtype on CUDA.
    pub fn prepare_on(case: &Case, dev: &CDevice) -> Result<Runner> {
        prepare_inner(case, dev).map_err(err)
    }

    fn prepare_inner(case: &Case, dev: &CDevice) -> candle_core::Result<Runner> {
        let s = case.shape.dims();
        let dt = match (dev.is_cpu(), case.dtype) {
            (_, DType::F64) => CDType::F64,
            (false, DType::BF16) => CDType::BF16,
            (false, DType::F16) => CDType::F16,
            _ => CDType::F32,
        };
        let bwd = case.pass == Pass::FwdBwd;
        let mut rng = Rng(0xBE4C_0001);
        let (n, o, i, g, t) = (s.n, s.o, s.i, s.g, s.t);
        let cv = |x: &HostTensor<f32>| to_candle(x, dt)?.to_device(dev);
        // Each arm: the graph's inputs, the upstream gradient, and the forward as a function.
        type Fwd = Box<dyn Fn(&[CT]) -> candle_core::Result<CT>>;
        let (inputs, grad, fwd): (Vec<CT>, CT, Fwd) = match case.op {
            Op::CaMerge | Op::Curvature => {
                let d = data::<f32>(&s);
                let mut list = vec![cv(&d.base)?, cv(&d.experts)?, cv(&d.scores)?];
                for f in &d.factors {
                    list.push(cv(f)?);
                }
                let grad_shape: &[usize] = if case.op == Op::CaMerge {
                    &[g, o, i]
                } else {
                    &[n, o, i]
                };
                let grad = cv(&rng.tensor(grad_shape, 1.0))?;
                let ca = case.op == Op::CaMerge;
                let f: Fwd = Box::new(move |x: &[CT]| {
                    let u = curvature(&x[0], &x[1], [&x[3], &x[4], &x[5], &x[6]], &s)?;
                    if ca {
                        merge(&x[0], &u, &x[2], 1.0)
                    } else {
                        Ok(u)
                    }
                });
                (list, grad, f)
            }
            Op::TiesMask => {
                let d = data::<f32>(&s);
                let list = vec![cv(&d.base)?, cv(&d.experts)?];
                let f: Fwd = Box::new(|x: &[CT]| {
                    let tau = x[1].broadcast_sub(&x[0].unsqueeze(0)?)?;
                    let elect = tau.sum_keepdim(0)?.sign()?;
                    tau.sign()?.broadcast_eq(&elect)?.to_dtype(x[0].dtype())
                });
                (list, cv(&HostTensor::zeros(&[1]))?, f)
            }
            Op::Merge => {
                let d = data::<f32>(&s);
                let curved = rng.tensor(&[n, o, i], 0.01);
                let list = vec![cv(&d.base)?, cv(&curved)?, cv(&d.scores)?];
                let grad = cv(&rng.tensor(&[g, o, i], 1.0))?;
                let f: Fwd = Box::new(|x: &[CT]| merge(&x[0], &x[1], &x[2], 1.0));
                (list, grad, f)
            }
            Op::MergedLinear => {
                let x = rng.tensor(&[g, t, i], 1.0);
                let merged = rng.tensor(&[g, o, i], 0.05);
                let grad = cv(&rng.tensor(&[g, t, o], 1.0))?;
                let f: Fwd = Box::new(|x: &[CT]| x[0].matmul(&x[1].t()?));
                (vec![cv(&x)?, cv(&merged)?], grad, f)
            }
            Op::DynamicMerge => {
                let base = rng.tensor(&[o, i], 0.05);
                let curved = rng.tensor(&[n, o, i], 0.01);
                let grad = cv(&rng.tensor(&[o, i], 1.0))?;
                let c = 0.5 / n as f64;
                let f: Fwd = Box::new(move |x: &[CT]| x[0].add(&x[1].sum(0)?.affine(c, 0.0)?));
                (vec![cv(&base)?, cv(&curved)?], grad, f)
            }
            Op::SegmentScores => {
                let (b, j) = s.segments;
                let router = rng.tensor(&[b, j, n], 1.0);
                let grad = cv(&rng.tensor(&[b, j, n], 1.0))?;
                let f: Fwd = Box::new(move |x: &[CT]| {
                    let first = x[0].narrow(1, 0, 1)?.detach();
                    if j == 1 {
                        return Ok(first);
                    }
                    CT::cat(&[&first, &x[0].narrow(1, 0, j - 1)?], 1)
                });
                (vec![cv(&router)?], grad, f)
            }
        };
        let inputs = Inputs::new(inputs, bwd)?;
        Ok(Box::new(move || {
            let run = || -> candle_core::Result<()> {
                let x = inputs.get();
                let out = fwd(&x)?;
                if bwd {
                    let loss = out.mul(&grad)?.sum_all()?;
                    let grads = loss.backward()?;
                    std::hint::black_box(&grads);
                } else {
                    std::hint::black_box(&out);
                }
                Ok(())
            };
            run().map_err(err)
        }))
    }
}

/// The CUDA half (feature `cuda`): the fused ops of [`crate::cuda`] timed with CUDA events, peak
/// device memory from the default memory pool's high-water mark. Ran on an H200 (2026-11-28,
/// `scripts/gpu-check.sh`; numbers in BENCHMARKS.md) for the scalar kernels.
#[cfg(feature = "cuda")]
pub mod gpu {
    use super::*;
    use crate::cuda::{self as cu, CudaTensor, Element};
    use cudarc::driver::{sys, CudaStream};
    use std::sync::Arc;

    fn err(e: impl std::fmt::Debug) -> Error {
        Error::cuda(format!("{e:?}"))
    }

    /// Whether the opt-in tensor-core kernels (`crate::cuda::set_tensor_cores`) serve `op` in
    /// `dtype`: the Kronecker chain and the strided GEMM, for f16/bf16 storage.
    pub fn tensor_cores_serve(op: Op, dtype: DType) -> bool {
        matches!(op, Op::CaMerge | Op::Curvature | Op::MergedLinear)
            && matches!(dtype, DType::F16 | DType::BF16)
    }

    /// A roofline line of a case the tensor cores ran, labelled `impl=camex-tc`.
    pub fn tensor_core_line(line: &str) -> String {
        line.replace("impl=camex", "impl=camex-tc")
    }

    /// The GPU floor's rates, not measured here (the crate has no cuBLAS to time a GEMM with):
    /// the H200 datasheet (dense bf16/f16 989 TFLOP/s, tf32 494, f32 67; HBM3e 4.8 TB/s).
    /// `scripts/torch_baseline.py` prints the measured matmul rate and copy bandwidth next to it.
    pub fn h200_datasheet(dtype: DType) -> Machine {
        let gemm_flops = match dtype {
            DType::BF16 | DType::F16 => 989e12,
            _ => 67e12,
        };
        Machine {
            gemm_flops,
            copy_bytes_per_s: 4.8e12,
            threads: 0,
        }
    }

    fn pool(stream: &Arc<CudaStream>) -> Option<sys::CUmemoryPool> {
        let ctx = stream.context();
        ctx.bind_to_thread().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: plain driver query into a local out-parameter.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(pool)
    }

    fn pool_attr(
        pool: sys::CUmemoryPool,
        attr: sys::CUmemPool_attribute,
        set: Option<u64>,
    ) -> Option<u64> {
        let mut v: u64 = set.unwrap_or(0);
        let ptr = &mut v as *mut u64 as *mut std::ffi::c_void;
        // SAFETY: the attribute is a u64 (cuuint64_t) for USED_MEM_HIGH / USED_MEM_CURRENT.
        let r = unsafe {
            if set.is_some() {
                sys::cuMemPoolSetAttribute(pool, attr, ptr)
            } else {
                sys::cuMemPoolGetAttribute(pool, attr, ptr)
            }
        };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    /// One prepared GPU case: enqueue one iteration on the stream.
    pub type GpuRun = Box<dyn FnMut(&Arc<CudaStream>) -> Result<()>>;

    fn up<T: Element>(s: &Arc<CudaStream>, t: &HostTensor<f32>) -> Result<CudaTensor<T>> {
        CudaTensor::upload(s, &t.map(T::from_f32))
    }

    fn prepare_t<T: Element>(case: &Case, s: &Arc<CudaStream>) -> Result<GpuRun> {
        let sh = case.shape.dims();
        let bwd = case.pass == Pass::FwdBwd;
        let mut rng = Rng(0xBE4C_0001);
        let (n, o, i, g, t) = (sh.n, sh.o, sh.i, sh.g, sh.t);
        match case.op {
            Op::CaMerge | Op::Curvature => {
                let d = data::<f32>(&sh);
                let base = up::<T>(s, &d.base)?;
                let experts = up::<T>(s, &d.experts)?;
                let scores = up::<T>(s, &d.scores)?;
                let [fa, fb, fc, fd] = &d.factors;
                let (fa, fb, fc, fd) = (
                    up::<T>(s, fa)?,
                    up::<T>(s, fb)?,
                    up::<T>(s, fc)?,
                    up::<T>(s, fd)?,
                );
                let ca = case.op == Op::CaMerge;
                let gshape: &[usize] = if ca { &[g, o, i] } else { &[n, o, i] };
                let grad = up::<T>(s, &rng.tensor(gshape, 1.0))?;
                Ok(Box::new(move |s| {
                    let curv = cu::CudaCurvature::Kronecker(cu::CudaFactors {
                        a: &fa,
                        b: &fb,
                        c: &fc,
                        d: &fd,
                    });
                    if !ca {
                        let u = cu::curvature(s, &base, &experts, &curv)?;
                        if bwd {
                            drop(u);
                            keep(cu::curvature_backward(s, &base, &experts, &curv, &grad))?;
                        }
                        return Ok(());
                    }
                    let x = cu::CudaCaMergeInputs {
                        base: &base,
                        experts: &experts,
                        scores: &scores,
                        curvature: curv,
                        base_bias: None,
                        expert_bias: None,
                    };
                    let opts = MergeOptions::default();
                    let out = cu::ca_merge(s, &x, &opts)?;
                    if bwd {
                        drop(out);
                        keep(cu::ca_merge_backward(s, &x, &opts, &grad, None, None))
                    } else {
                        keep(Ok(out))
                    }
                }))
            }
            Op::Merge => {
                let d = data::<f32>(&sh);
                let base = up::<T>(s, &d.base)?;
                let scores = up::<T>(s, &d.scores)?;
                let curved = up::<T>(s, &rng.tensor(&[n, o, i], 0.01))?;
                let grad = up::<T>(s, &rng.tensor(&[g, o, i], 1.0))?;
                Ok(Box::new(move |s| {
                    let x = cu::CudaMergeInputs {
                        base: &base,
                        curved: &curved,
                        scores: &scores,
                        mask: None,
                        base_bias: None,
                        expert_bias: None,
                    };
                    let out = cu::merge(s, &x, 1.0, &Dare::None)?;
                    if bwd {
                        drop(out);
                        keep(cu::merge_backward(s, &x, 1.0, &Dare::None, &grad, None))
                    } else {
                        keep(Ok(out))
                    }
                }))
            }
            Op::MergedLinear => {
                let x = up::<T>(s, &rng.tensor(&[g, t, i], 1.0))?;
                let merged = up::<T>(s, &rng.tensor(&[g, o, i], 0.05))?;
                let grad = up::<T>(s, &rng.tensor(&[g, t, o], 1.0))?;
                Ok(Box::new(move |s| {
                    let y = cu::merged_linear(s, &x, &merged, None)?;
                    if bwd {
                        drop(y);
                        keep(cu::merged_linear_backward(s, &x, &merged, None, &grad))
                    } else {
                        keep(Ok(y))
                    }
                }))
            }
            op => Err(Error::option(
                "op",
                format!(
                    "the GPU benchmark covers ca_merge, curvature, merge, merged_linear; not `{}`",
                    op.name()
                ),
            )),
        }
    }

    /// Times `case` on GPU `ordinal`: `warmup` untimed iterations (module loading, pool growth),
    /// then `iters` iterations each between two CUDA events; peak = the default pool's
    /// USED_MEM_HIGH above what was in use before (None where the pool query fails).
    pub fn measure_case(
        case: &Case,
        ordinal: usize,
        warmup: usize,
        iters: usize,
    ) -> Result<Measured> {
        if case.imp != Impl::Camex {
            return Err(Error::option(
                "peer",
                "the GPU peer is scripts/torch_baseline.py",
            ));
        }
        let s = cu::new_stream(ordinal)?;
        let mut run = prepare(case, &s)?;
        let s2 = s.clone();
        measure_on(&s, warmup, iters, &mut move || run(&s2))
    }

    /// The peer (the official unfused formulation from candle ops, [`super::peer`]) on GPU
    /// `ordinal` through candle's CUDA backend, timed like [`measure_case`] with CUDA events on
    /// candle's stream; the peak is the same memory pool's high-water mark (candle allocates from
    /// it, stream-ordered). Not yet run on a GPU.
    #[cfg(feature = "peer")]
    pub fn measure_peer(
        case: &Case,
        ordinal: usize,
        warmup: usize,
        iters: usize,
    ) -> Result<Measured> {
        cu::context(ordinal)?; // errors, without panicking, where there is no driver or device
        let dev = candle_core::Device::new_cuda(ordinal).map_err(err)?;
        let candle_core::Device::Cuda(cd) = &dev else {
            return Err(Error::cuda("candle did not open a CUDA device"));
        };
        let s = cd.cuda_stream();
        let peer_case = Case {
            imp: Impl::Candle,
            ..*case
        };
        let mut run = super::peer::prepare_on(&peer_case, &dev)?;
        measure_on(&s, warmup, iters, &mut run)
    }

    /// The candle peer of `case` on GPU 0 and its roofline line (`impl=candle-unfused`), or a
    /// `#` line saying why it did not run (built without `peer`, or an error).
    pub fn peer_on_gpu(
        case: &Case,
        machine: &Machine,
        warmup: usize,
        iters: usize,
    ) -> (Option<Measured>, String) {
        #[cfg(feature = "peer")]
        {
            let peer_case = Case {
                imp: Impl::Candle,
                ..*case
            };
            match measure_peer(case, 0, warmup, iters) {
                Ok(m) => (Some(m), line(&peer_case, &m, machine, None)),
                Err(e) => (None, format!("# peer {}: {e}", peer_case.id())),
            }
        }
        #[cfg(not(feature = "peer"))]
        {
            let _ = (machine, warmup, iters);
            (
                None,
                format!(
                    "# peer {}: not built (--features cuda,peer; or scripts/torch_baseline.py)",
                    case.id()
                ),
            )
        }
    }

    /// `warmup` untimed iterations of `run`, then `iters` timed ones between CUDA events on `s`,
    /// with the peak of the device's default memory pool above what was in use before.
    fn measure_on(
        s: &Arc<CudaStream>,
        warmup: usize,
        iters: usize,
        run: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Measured> {
        for _ in 0..warmup {
            run()?;
        }
        s.synchronize().map_err(err)?;
        let pool = pool(s);
        let used = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;
        let high = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        let base = pool.and_then(|p| {
            let now = pool_attr(p, used, None)?;
            pool_attr(p, high, Some(0))?; // resets the high-water mark to the current use
            Some(now)
        });
        let times = event_times_of(run, s, iters)?;
        let peak = match (pool, base) {
            (Some(p), Some(b)) => pool_attr(p, high, None).map(|h| h.saturating_sub(b) as usize),
            _ => None,
        };
        let min_s = times.iter().cloned().fold(f64::INFINITY, f64::min);
        Ok(Measured {
            median_s: median(times),
            min_s,
            iters: iters.max(1),
            peak_bytes: peak,
        })
    }

    /// Seconds of each of `iters` iterations, each between two CUDA events on `s`.
    pub fn event_times(run: &mut GpuRun, s: &Arc<CudaStream>, iters: usize) -> Result<Vec<f64>> {
        event_times_of(&mut || run(s), s, iters)
    }

    fn event_times_of(
        run: &mut dyn FnMut() -> Result<()>,
        s: &Arc<CudaStream>,
        iters: usize,
    ) -> Result<Vec<f64>> {
        let mut times = Vec::with_capacity(iters.max(1));
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        for _ in 0..iters.max(1) {
            let e0 = s.record_event(timing).map_err(err)?;
            run()?;
            let e1 = s.record_event(timing).map_err(err)?;
            times.push(e0.elapsed_ms(&e1).map_err(err)? as f64 / 1e3);
        }
        s.synchronize().map_err(err)?;
        Ok(times)
    }

    /// Uploads the inputs of `case` (a `camex` case on CUDA) and returns its iteration.
    pub fn prepare(case: &Case, s: &Arc<CudaStream>) -> Result<GpuRun> {
        match case.dtype {
            DType::F32 => prepare_t::<f32>(case, s),
            DType::F16 => prepare_t::<half::f16>(case, s),
            DType::BF16 => prepare_t::<half::bf16>(case, s),
            DType::F64 => Err(Error::DType {
                tensor: "bench inputs".into(),
                expected: "f32, f16 or bf16 on CUDA".into(),
                actual: "f64".into(),
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurement and report lines

/// Timing and memory of one case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub median_s: f64,
    pub min_s: f64,
    pub iters: usize,
    /// Peak live heap bytes above the inputs, over warm-up and timed runs.
    pub peak_bytes: Option<usize>,
}

/// Runs `warmup` untimed iterations, then `iters` timed ones; median wall time.
pub fn measure(run: &mut Runner, warmup: usize, iters: usize) -> Result<Measured> {
    let base = peak_start();
    for _ in 0..warmup {
        run()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        run()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let min_s = times.iter().cloned().fold(f64::INFINITY, f64::min);
    Ok(Measured {
        median_s: median(times),
        min_s,
        iters: iters.max(1),
        peak_bytes: peak_since(base),
    })
}

/// One roofline line: `op=... shape=... device=... dtype=... pass=... median_ms=... gflops=...
/// floor_ms=... peak_mem_mb=...`, then `impl=`, achieved `gbps=`, `x_floor=` (median / floor) and,
/// when the peer ran, `speedup_vs_peer=` (peer median / this median) and `mem_vs_peer=`.
pub fn line(case: &Case, m: &Measured, machine: &Machine, peer: Option<&Measured>) -> String {
    let s = case.shape.dims();
    let c = cost(case.op, &s, case.pass, case.dtype.size_in_bytes());
    let floor = machine.floor_s(&c);
    let peak = match m.peak_bytes {
        Some(b) => format!("{:.1}", b as f64 / (1u64 << 20) as f64),
        None => "na".into(),
    };
    let mut out = format!(
        "op={} shape={} device={} dtype={} pass={} median_ms={:.4} gflops={:.2} floor_ms={:.4} peak_mem_mb={} impl={} gbps={:.2} x_floor={:.2}",
        case.op.name(),
        case.shape.name(),
        case.device.name(),
        case.dtype.name(),
        case.pass.name(),
        m.median_s * 1e3,
        c.flop / m.median_s / 1e9,
        floor * 1e3,
        peak,
        case.imp.name(),
        c.bytes / m.median_s / 1e9,
        m.median_s / floor,
    );
    if let Some(p) = peer {
        out += &format!(" speedup_vs_peer={:.2}", p.median_s / m.median_s);
        if let (Some(a), Some(b)) = (m.peak_bytes, p.peak_bytes) {
            out += &format!(" mem_vs_peer={:.3}", a as f64 / b.max(1) as f64);
        }
    }
    out
}

/// The machine line printed before the cases.
pub fn machine_line(m: &Machine, dtype: DType) -> String {
    format!(
        "machine device=cpu threads={} gemm_{}_gflops={:.1} copy_gbps={:.1}",
        m.threads,
        dtype.name(),
        m.gemm_flops / 1e9,
        m.copy_bytes_per_s / 1e9
    )
}

// ---------------------------------------------------------------------------------------------
// `camex bench`

/// Usage of `camex bench`.
pub const USAGE: &str = concat!(
    "camex bench [--op OP] [--shape t5-small|t5-base|gpt2|minilm] [--device cpu|cuda]\n",
    "            [--dtype f32|f64|f16|bf16] [--pass fwd|fwd+bwd|all] [--iters N] [--warmup N] [--no-peer]\n",
    "            [--xla]\n",
    "  OP: ca_merge|curvature|merge|ties_mask|merged_linear|dynamic_merge|segment_scores (default: all)\n",
    "  Defaults: --shape t5-small --device cpu --dtype f32 (bf16 on cuda) --pass all --iters 5 --warmup 1.\n",
    "  Prints a machine line (measured GEMM rate and copy bandwidth), then one line per case:\n",
    "  op= shape= device= dtype= pass= median_ms= gflops= floor_ms= peak_mem_mb=, then\n",
    "  impl=camex|candle-unfused|xla-official gbps= x_floor= [speedup_vs_peer= mem_vs_peer=]\n",
    "  [speedup_vs_xla=]. The peer (the official unfused formulation in candle) runs when built with\n",
    "  --features peer. --xla also runs the official formulation under JAX/XLA on the CPU\n",
    "  (scripts/jax_baseline.py, f32, ca_merge|curvature|merge; its first run installs jax into\n",
    "  .venv-jax), one process per case, with this run's floor."
);

/// Options of `camex bench`.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchArgs {
    pub ops: Vec<Op>,
    pub shape: ShapeName,
    pub device: Device,
    pub dtype: DType,
    pub passes: Vec<Pass>,
    pub iters: usize,
    pub warmup: usize,
    pub peer: bool,
    /// Also time the XLA peer (`scripts/jax_baseline.py`).
    pub xla: bool,
}

impl BenchArgs {
    /// Parses the arguments after `bench`.
    pub fn parse(args: &[String]) -> Result<BenchArgs> {
        let mut a = BenchArgs {
            ops: Op::ALL.to_vec(),
            shape: ShapeName::T5Small,
            device: Device::Cpu,
            dtype: DType::F32,
            passes: vec![Pass::Fwd, Pass::FwdBwd],
            iters: 5,
            warmup: 1,
            peer: cfg!(feature = "peer"),
            xla: false,
        };
        let mut dtype_given = false;
        let mut k = 0;
        while k < args.len() {
            let flag = args[k].as_str();
            if flag == "--no-peer" || flag == "--xla" {
                if flag == "--xla" {
                    a.xla = true;
                } else {
                    a.peer = false;
                }
                k += 1;
                continue;
            }
            let val = args
                .get(k + 1)
                .ok_or_else(|| Error::option(flag.trim_start_matches('-'), "needs a value"))?;
            match flag {
                "--op" => a.ops = vec![Op::parse(val)?],
                "--shape" => a.shape = ShapeName::parse(val)?,
                "--device" => a.device = Device::parse(val)?,
                "--dtype" => {
                    a.dtype = DType::parse(val)?;
                    dtype_given = true;
                }
                "--pass" => {
                    a.passes = match val.as_str() {
                        "fwd" => vec![Pass::Fwd],
                        "fwd+bwd" => vec![Pass::FwdBwd],
                        "all" => vec![Pass::Fwd, Pass::FwdBwd],
                        _ => {
                            return Err(Error::option(
                                "pass",
                                format!("expected fwd|fwd+bwd|all, got `{val}`"),
                            ))
                        }
                    }
                }
                "--iters" | "--warmup" => {
                    let v: usize = val.parse().map_err(|_| {
                        Error::option(&flag[2..], format!("expected a count, got `{val}`"))
                    })?;
                    if flag == "--iters" {
                        a.iters = v.max(1);
                    } else {
                        a.warmup = v;
                    }
                }
                _ => {
                    return Err(Error::option(
                        "bench",
                        format!("unknown flag `{flag}`\n{USAGE}"),
                    ))
                }
            }
            k += 2;
        }
        if a.device == Device::Cuda && !dtype_given {
            a.dtype = DType::BF16;
        }
        if a.peer && !cfg!(feature = "peer") {
            a.peer = false;
        }
        Ok(a)
    }
}

/// Runs `camex bench`: prints the machine line, then one line per case to `out`.
pub fn run_cli(args: &[String], out: &mut dyn std::io::Write) -> Result<()> {
    let a = BenchArgs::parse(args)?;
    let io = |e: std::io::Error| Error::io_source(e.to_string(), e);
    if a.device == Device::Cuda {
        #[cfg(feature = "cuda")]
        return run_cli_cuda(&a, out);
        #[cfg(not(feature = "cuda"))]
        return Err(Error::cuda(
            "camex bench --device cuda needs a build with --features cuda",
        ));
    }
    if !matches!(a.dtype, DType::F32 | DType::F64) {
        return Err(Error::DType {
            tensor: "bench inputs".into(),
            expected: "f32 or f64 on the CPU (f16/bf16 are storage types of the CUDA path)".into(),
            actual: a.dtype.name().into(),
        });
    }
    let machine = match a.dtype {
        DType::F64 => measure_cpu::<f64>(),
        _ => measure_cpu::<f32>(),
    };
    writeln!(out, "{}", machine_line(&machine, a.dtype)).map_err(io)?;
    if !a.peer {
        writeln!(
            out,
            "# peer (candle, unfused) not run: {}",
            if cfg!(feature = "peer") {
                "--no-peer"
            } else {
                "built without --features peer"
            }
        )
        .map_err(io)?;
    }
    for &op in &a.ops {
        for &pass in &a.passes {
            if pass == Pass::FwdBwd && !op.has_backward() {
                continue;
            }
            let case = Case {
                op,
                shape: a.shape,
                imp: Impl::Camex,
                device: a.device,
                dtype: a.dtype,
                pass,
            };
            let peer_m = if a.peer {
                let pc = Case {
                    imp: Impl::Candle,
                    ..case
                };
                let mut run = prepare(&pc)?;
                let m = measure(&mut run, a.warmup, a.iters)?;
                drop(run);
                writeln!(out, "{}", line(&pc, &m, &machine, None)).map_err(io)?;
                Some(m)
            } else {
                None
            };
            let xla_ms = if a.xla {
                let (l, ms) = xla_peer(&case, &machine, a.iters);
                writeln!(out, "{l}").map_err(io)?;
                ms
            } else {
                None
            };
            let mut run = prepare(&case)?;
            let m = measure(&mut run, a.warmup, a.iters)?;
            drop(run);
            let mut l = line(&case, &m, &machine, peer_m.as_ref());
            if let Some(x) = xla_ms {
                l += &format!(" speedup_vs_xla={:.2}", x / (m.median_s * 1e3));
            }
            writeln!(out, "{l}").map_err(io)?;
        }
    }
    Ok(())
}

/// The XLA peer of one case: `scripts/jax_baseline.py` in its own process (so that XLA's memory and
/// threads stay out of this one's counters), given this run's GEMM rate and bandwidth so that its
/// line has the same floor. Returns its line (or a `#` comment saying why there is none) and its
/// median in ms. `CAMEX_JAX_SCRIPT` and `CAMEX_PYTHON` override the script and the interpreter.
fn xla_peer(case: &Case, machine: &Machine, iters: usize) -> (String, Option<f64>) {
    if !matches!(case.op, Op::CaMerge | Op::Curvature | Op::Merge) || case.dtype != DType::F32 {
        return (
            format!(
                "# xla peer: not run for {} {} (the script times ca_merge, curvature and merge in f32)",
                case.op.name(),
                case.dtype.name()
            ),
            None,
        );
    }
    let script = std::env::var("CAMEX_JAX_SCRIPT").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/jax_baseline.py").to_string()
    });
    let python = std::env::var("CAMEX_PYTHON").unwrap_or_else(|_| "python3".into());
    let run = std::process::Command::new(&python)
        .arg(&script)
        .args(["--shape", case.shape.name(), "--op", case.op.name()])
        .args(["--pass", case.pass.name(), "--iters", &iters.to_string()])
        .arg(format!("--gemm-gflops={}", machine.gemm_flops / 1e9))
        .arg(format!("--copy-gbps={}", machine.copy_bytes_per_s / 1e9))
        .stderr(std::process::Stdio::inherit())
        .output();
    let stdout = match run {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            return (
                format!("# xla peer: {script} exited with {}", o.status),
                None,
            )
        }
        Err(e) => {
            return (
                format!("# xla peer: could not run {python} {script}: {e}"),
                None,
            )
        }
    };
    let Some(l) = stdout.lines().find(|l| l.starts_with("op=")) else {
        return (format!("# xla peer: no case line from {script}"), None);
    };
    let ms = l
        .split_whitespace()
        .find_map(|f| f.strip_prefix("median_ms="))
        .and_then(|v| v.parse::<f64>().ok());
    (l.to_string(), ms)
}

/// `camex bench --device cuda`: the fused ops and, when built with `peer`, the candle peer on the
/// GPU next to each (`--no-peer` skips it; the PyTorch peer is `scripts/torch_baseline.py`).
#[cfg(feature = "cuda")]
fn run_cli_cuda(a: &BenchArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let io = |e: std::io::Error| Error::io_source(e.to_string(), e);
    let machine = gpu::h200_datasheet(a.dtype);
    writeln!(
        out,
        "machine device=cuda floor=h200-datasheet gemm_{}_gflops={:.0} copy_gbps={:.0}",
        a.dtype.name(),
        machine.gemm_flops / 1e9,
        machine.copy_bytes_per_s / 1e9
    )
    .map_err(io)?;
    for &op in &a.ops {
        if !matches!(
            op,
            Op::CaMerge | Op::Curvature | Op::Merge | Op::MergedLinear
        ) {
            continue;
        }
        for &pass in &a.passes {
            let case = Case {
                op,
                shape: a.shape,
                imp: Impl::Camex,
                device: Device::Cuda,
                dtype: a.dtype,
                pass,
            };
            let peer = if a.peer {
                let (pm, pl) = gpu::peer_on_gpu(&case, &machine, a.warmup.max(1), a.iters);
                writeln!(out, "{pl}").map_err(io)?;
                pm
            } else {
                None
            };
            let m = gpu::measure_case(&case, 0, a.warmup.max(1), a.iters)?;
            let mut l = line(&case, &m, &machine, peer.as_ref());
            if gpu::tensor_cores_serve(op, a.dtype) && crate::cuda::tensor_cores() {
                l = gpu::tensor_core_line(&l);
            }
            writeln!(out, "{l}").map_err(io)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_match_spec_section_8() {
        // SPEC: the Kronecker transform at T5-base `wi` is 44.4 GFLOP.
        let s = ShapeName::T5Base.dims();
        let c = cost(Op::Curvature, &s, Pass::Fwd, 4);
        assert!((c.flop / 1e9 - 44.4).abs() < 0.1, "{}", c.flop);
        let m = cost(Op::Merge, &s, Pass::Fwd, 4);
        assert_eq!(m.flop, 2.0 * 16.0 * 7.0 * 3072.0 * 768.0);
        let l = cost(Op::MergedLinear, &s, Pass::FwdBwd, 4);
        assert_eq!(l.flop, 3.0 * 2.0 * 16.0 * 128.0 * 3072.0 * 768.0);
    }

    #[test]
    fn args_parse_and_reject() {
        let v = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let a = BenchArgs::parse(&v("--op ca_merge --shape t5-base --pass fwd")).unwrap();
        assert_eq!(a.ops, vec![Op::CaMerge]);
        assert_eq!(a.shape, ShapeName::T5Base);
        assert_eq!(a.passes, vec![Pass::Fwd]);
        assert!(BenchArgs::parse(&v("--shape t5-huge")).is_err());
        assert!(BenchArgs::parse(&v("--op")).is_err());
        assert!(!a.xla);
        assert!(BenchArgs::parse(&v("--xla --pass fwd")).unwrap().xla);
        let c = BenchArgs::parse(&v("--device cuda")).unwrap();
        assert_eq!(c.dtype, DType::BF16);
    }

    #[test]
    fn bf16_on_cpu_is_an_error_not_a_panic() {
        let case = Case {
            op: Op::Merge,
            shape: ShapeName::MiniLm,
            imp: Impl::Camex,
            device: Device::Cpu,
            dtype: DType::BF16,
            pass: Pass::Fwd,
        };
        assert!(matches!(prepare(&case), Err(Error::DType { .. })));
    }

    /// The peer computes what the fused path computes (small shape, f64).
    #[cfg(feature = "peer")]
    #[test]
    fn peer_matches_fused_ca_merge() {
        use candle_core::DType as CDType;
        let s = BenchShape {
            o: 12,
            i: 10,
            n: 3,
            r: 2,
            g: 4,
            t: 2,
            segments: (4, 1),
        };
        let d = data::<f32>(&s);
        let [a, b, c, dd] = &d.factors;
        let inputs = CaMergeInputs {
            base: &d.base,
            experts: &d.experts,
            scores: &d.scores,
            curvature: Curvature::Kronecker(Factors { a, b, c, d: dd }),
            base_bias: None,
            expert_bias: None,
        };
        let want = cpu::ca_merge(&inputs, &MergeOptions::default())
            .unwrap()
            .merged;
        let cv = |t: &HostTensor<f32>| peer::to_candle(t, CDType::F32).unwrap();
        let u = peer::curvature(
            &cv(&d.base),
            &cv(&d.experts),
            [&cv(a), &cv(b), &cv(c), &cv(dd)],
            &s,
        )
        .unwrap();
        let got = peer::merge(&cv(&d.base), &u, &cv(&d.scores), 1.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let num: f64 = got
            .iter()
            .zip(want.data())
            .map(|(&x, &y)| ((x - y) as f64).powi(2))
            .sum();
        let den: f64 = want.data().iter().map(|&y| (y as f64).powi(2)).sum();
        assert!((num / den).sqrt() < 1e-5, "rel err {}", (num / den).sqrt());
    }
}
