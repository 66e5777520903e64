//! Benchmark cases shared by `cargo bench` (`benches/cpu.rs`, `benches/cuda.rs`), `camex bench`
//! (`cli`, feature `cli`) and `examples/cost_model.rs`, each of which includes this module by path: the shapes of SPEC
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

// Each including target (benches, cost_model, the camex binary, tests/bench_common.rs) uses a part.
#![allow(dead_code)]

use camex::cpu::{self, CaMergeInputs, Curvature, Factors, MergeInputs};
use camex::Split;
use camex::{DType, Float, HostTensor};
use camex::{Dare, Mask, MergeOptions};
use camex::{Error, Result};
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
/// `#[global_allocator] static ALLOC: CountingAlloc = CountingAlloc;`.
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

/// Who computes: this crate's fused path, or the peer (the unfused formulation in candle).
/// `Camex`'s ca_merge forward+backward keeps the forward's U for the backward, as an autodiff
/// framework keeps a forward's intermediates (the floor's assumption); `CamexRecompute` is the
/// plain `ca_merge_backward`, which recomputes it and keeps nothing between the passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    Camex,
    CamexRecompute,
    Candle,
}

/// `name()`, `Display` and `FromStr` of an option enum, from one table of its spellings.
macro_rules! spelled {
    ($t:ident, $what:literal, { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $t {
            pub fn name(self) -> &'static str {
                match self {
                    $($t::$v => $s,)+
                }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
        impl std::str::FromStr for $t {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($s => Ok($t::$v),)+
                    _ => Err(Error::option(
                        $what,
                        format!("expected {}, got `{s}`", [$($s),+].join("|")),
                    )),
                }
            }
        }
    };
}

spelled!(ShapeName, "shape", {
    T5Small => "t5-small",
    T5Base => "t5-base",
    Gpt2 => "gpt2",
    MiniLm => "minilm",
});
spelled!(Op, "op", {
    CaMerge => "ca_merge",
    Curvature => "curvature",
    Merge => "merge",
    TiesMask => "ties_mask",
    MergedLinear => "merged_linear",
    DynamicMerge => "dynamic_merge",
    SegmentScores => "segment_scores",
});
spelled!(Pass, "pass", { Fwd => "fwd", FwdBwd => "fwd+bwd" });
spelled!(Impl, "impl", {
    Camex => "camex",
    CamexRecompute => "camex-recompute",
    Candle => "candle-unfused",
});

/// Where a case runs: the library's one `Device` (the CLI's `--device` too).
pub use camex::Device;

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

fn fastest(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
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

/// Measures this CPU: a 2048^3 GEMM of `F` through the `gemm` crate on all rayon threads and a
/// 256 MiB parallel copy, each the fastest of 5 after a warm-up. The fastest, not the median: on a
/// shared machine one slow repetition moved the median GEMM rate from 200 to 106 GFLOP/s in one
/// run, halving that run's floors; the machine's best rate gives the stricter floor. Takes about
/// two seconds.
pub fn measure_cpu<F: Float>() -> Machine {
    let threads = rayon::current_num_threads();
    let m = 2048;
    let a: Vec<F> = (0..m * m)
        .map(|k| F::from_f64(((k % 97) as f64 - 48.0) / 97.0))
        .collect();
    let b = a.clone();
    let mut c = vec![F::ZERO; m * m];
    let mut times = Vec::new();
    for rep in 0..6 {
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
    let gemm_flops = 2.0 * (m as f64).powi(3) / fastest(&times);
    drop((a, b, c));
    let len = 64 << 20; // 64 Mi f32 = 256 MiB
    let src: Vec<f32> = vec![1.0; len];
    let mut dst: Vec<f32> = vec![0.0; len];
    let mut times = Vec::new();
    for rep in 0..6 {
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
    let copy_bytes_per_s = 2.0 * (len * 4) as f64 / fastest(&times);
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
pub struct Data<F> {
    pub base: HostTensor<F>,
    pub experts: HostTensor<F>,
    pub scores: HostTensor<F>,
    pub factors: [HostTensor<F>; 4],
}

pub fn data<F: Float>(s: &BenchShape) -> Data<F> {
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
        (Device::Cpu, Impl::Camex | Impl::CamexRecompute, DType::F32) => prepare_camex::<f32>(case),
        (Device::Cpu, Impl::Camex | Impl::CamexRecompute, DType::F64) => prepare_camex::<f64>(case),
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
            let (op, imp) = (case.op, case.imp);
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
                let keep_u = bwd && imp == Impl::Camex;
                let opts = MergeOptions {
                    want_curved: keep_u,
                    ..MergeOptions::default()
                };
                let out = cpu::ca_merge(&inputs, &opts)?;
                if !bwd {
                    return keep(Ok(out.merged));
                }
                drop(out.merged);
                keep(match &out.curved {
                    Some(u) => cpu::ca_merge_backward_with_curved(
                        &inputs,
                        &opts,
                        u,
                        &grad_merged,
                        None,
                        None,
                    ),
                    None => cpu::ca_merge_backward(&inputs, &opts, &grad_merged, None, None),
                })
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

#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "peer")]
pub mod peer;

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
