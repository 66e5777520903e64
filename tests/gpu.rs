//! GPU vs CPU: every CUDA op and gradient against the CPU path in f64 (the oracle of SPEC section 5)
//! for f32, f16 and bf16 storage, at small, odd (not multiples of any tile) and T5-base shapes.
//!
//! SPEC section 5's bounds: every tensor output within tol (1e-5 f32, 2e-3 f16, 1e-2 bf16) in
//! relative Frobenius error; in f16/bf16 also within 2 E_off + 1e-6, E_off the error of the official
//! einsum formulation evaluated in that dtype (`tests/oracle/official.rs`); grad_alpha, grad_beta and
//! each grad_scores entry within tol * S (S: the sum of the absolute values of its terms). RESULT
//! lines carry rel_err (|out - ref| / S for those sums, `metric=abs/S`), e_off and the bound applied.
//!
//! Each run poisons its outputs with NaN first (`cuda::set_poison_outputs`), so an element a kernel
//! does not write fails the comparison, and each op runs twice and must give the same bits.
//!
//! Without a GPU (no libcuda, or no device) each test prints why it skips and returns; with
//! `CAMEX_REQUIRE_GPU=1` a missing GPU is a failure. `CAMEX_SKIP_T5=1` skips the T5-base shapes.
#![cfg(feature = "cuda")]

mod oracle;

use camex::cpu;
use camex::cuda::{self, CudaTensor, Element};
use camex::{Dare, HostTensor, Mask, MergeOptions, Split};
use half::{bf16, f16};
use oracle::official as off;
use oracle::{CaRefIn, DareRef, Dims, KronRef, MaskRef, Split4};
use std::sync::Arc;

type Stream = Arc<cuda::Stream>;

fn gpu(test: &str) -> Option<Gpu> {
    let require = std::env::var("CAMEX_REQUIRE_GPU").is_ok_and(|v| v == "1");
    match cuda::new_stream(0) {
        Ok(s) => {
            cuda::set_poison_outputs(true);
            MISMATCHES.with(|m| m.set(0));
            Some(Gpu {
                stream: s,
                test: test.to_string(),
            })
        }
        Err(e) => {
            if require {
                panic!("{test}: CAMEX_REQUIRE_GPU=1 but no GPU: {e}");
            }
            eprintln!("{test}: skipped, no GPU: {e}");
            None
        }
    }
}

thread_local! {
    /// Comparisons that failed in this test (each test runs on its own thread).
    static MISMATCHES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A test's stream. A failed comparison is reported and counted rather than panicking at once, so
/// one run on a lent GPU shows every case that is off; the test then fails when this is dropped.
struct Gpu {
    stream: Stream,
    test: String,
}

impl std::ops::Deref for Gpu {
    type Target = Stream;
    fn deref(&self) -> &Stream {
        &self.stream
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let n = MISMATCHES.with(|m| m.get());
        if n > 0 && !std::thread::panicking() {
            panic!(
                "{}: {n} comparison(s) failed (lines with FAIL above)",
                self.test
            );
        }
    }
}

fn mismatch(msg: String) {
    println!("FAIL {msg}");
    MISMATCHES.with(|m| m.set(m.get() + 1));
}

/// Deterministic data: multiples of 2^-10 in [-lim, lim], so that tau = W - E and the sums of the
/// TIES votes are exact in f32 and the masks of the f32 kernels equal the f64 oracle's.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn dyadic(&mut self, lim: f64) -> f64 {
        let k = (lim * 1024.0) as i64;
        let r = (self.next() % (2 * k as u64 + 1)) as i64 - k;
        r as f64 / 1024.0
    }
    fn tensor(&mut self, shape: &[usize], lim: f64) -> HostTensor<f64> {
        HostTensor::from_fn(shape, |_| self.dyadic(lim))
    }
}

trait Dt: Element + std::fmt::Debug {
    /// SPEC section 5's bound 1.
    const TOL: f64;
    const NAME: &'static str;
    /// f16/bf16: tensor outputs are also held to bound 2, against the official formulation
    /// evaluated in this dtype (tests/oracle/official.rs).
    const LOW: bool;
    /// Rounds an f64 to this dtype and back.
    fn q(v: f64) -> f64;
}
impl Dt for f32 {
    const TOL: f64 = 1e-5;
    const NAME: &'static str = "f32";
    const LOW: bool = false;
    fn q(v: f64) -> f64 {
        v as f32 as f64
    }
}
impl Dt for f16 {
    const TOL: f64 = 2e-3;
    const NAME: &'static str = "f16";
    const LOW: bool = true;
    fn q(v: f64) -> f64 {
        f16::from_f64(v).to_f64()
    }
}
impl Dt for bf16 {
    const TOL: f64 = 1e-2;
    const NAME: &'static str = "bf16";
    const LOW: bool = true;
    fn q(v: f64) -> f64 {
        bf16::from_f64(v).to_f64()
    }
}

/// Whether to evaluate the official formulation in T's dtype for bound 2: f16/bf16, and only while
/// its plain loops stay cheap (`work` multiply-adds; at T5-base with N = 7, R = 8, or the T5 merged
/// linear, they would take minutes of a lent GPU's time, and those cases are held to bound 1).
fn official<T: Dt>(work: f64) -> bool {
    T::LOW && work <= 2e9
}

/// Multiply-adds of the official curvature (forward) at a shape.
fn curv_work(sh: Sh, kron: bool) -> f64 {
    let s = Split::default_for(sh.o, sh.i);
    let k = if kron {
        (s.o1 + s.o2 + s.i1 + s.i2) as f64
    } else {
        1.0
    };
    (sh.n * sh.r.max(1) * sh.o * sh.i) as f64 * k
}

fn dims(sh: Sh) -> Dims {
    Dims {
        g: sh.g,
        n: sh.n,
        o: sh.o,
        i: sh.i,
    }
}

fn kron_ref(sh: Sh, f: [&HostTensor<f64>; 4]) -> KronRef {
    let s = Split::default_for(sh.o, sh.i);
    KronRef {
        r: sh.r,
        split: Split4 {
            o1: s.o1,
            o2: s.o2,
            i1: s.i1,
            i2: s.i2,
        },
        a: f[0].data().to_vec(),
        b: f[1].data().to_vec(),
        c: f[2].data().to_vec(),
        d: f[3].data().to_vec(),
    }
}

fn mask_ref(m: Mask) -> MaskRef {
    match m {
        Mask::None => MaskRef::None,
        Mask::TiesSign => MaskRef::Sign,
        Mask::TiesTrim(k) => MaskRef::Trim(k),
    }
}

fn dare_ref(d: &Dare) -> DareRef {
    match *d {
        Dare::None => DareRef::None,
        Dare::Expert { p, seed } => DareRef::Expert { p, seed },
        Dare::Element { p, seed } => DareRef::Element { p, seed },
    }
}

/// SPEC section 5 on one tensor output: bound 1, rel_err <= tol, and, given the official
/// formulation's result in the dtype (E_off its error), bound 2, rel_err <= 2 E_off + 1e-6. Prints
/// the RESULT line; returns the failure, if any. NaN fails.
fn judge<T: Dt>(
    op: &str,
    got: &HostTensor<f64>,
    want: &HostTensor<f64>,
    off: Option<&[f64]>,
) -> Option<String> {
    let e = rel_err(got, want);
    let e_off = off.map(|o| rel_err(&HostTensor::new(want.shape(), o.to_vec()).unwrap(), want));
    let b2 = e_off.map(|x| 2.0 * x + 1e-6);
    let bound = b2.map_or(T::TOL, |b| b.min(T::TOL));
    let e_off_s = e_off.map_or("-".to_string(), |x| format!("{x:.3e}"));
    println!(
        "RESULT op={op} dtype={} shape={:?} rel_err={e:.3e} e_off={e_off_s} bound={bound:.3e}",
        T::NAME,
        want.shape()
    );
    (e.is_nan() || e > bound).then(|| {
        format!(
            "{op} [{}] {:?}: relative error {e:.3e} > {bound:.3e} (tol {:.0e}, E_off {e_off_s})",
            T::NAME,
            want.shape(),
            T::TOL
        )
    })
}

/// SPEC section 5's bound 1 for cancelling sums (grad_alpha, grad_beta, each grad_scores entry):
/// |out - ref| <= tol * S, S the sum of the absolute values of its terms. The RESULT line's rel_err
/// is the worst |out - ref| / S.
fn judge_sums<T: Dt>(op: &str, got: &[f64], want: &[f64], scales: &[f64]) -> Option<String> {
    assert_eq!(want.len(), scales.len(), "{op}: scales");
    let mut worst = 0.0f64;
    for ((g, w), sc) in got.iter().zip(want).zip(scales) {
        let d = (g - w).abs();
        let r = if d == 0.0 {
            0.0
        } else if *sc > 0.0 {
            d / sc
        } else {
            f64::INFINITY
        };
        worst = if r.is_nan() { f64::NAN } else { worst.max(r) };
    }
    println!(
        "RESULT op={op} dtype={} shape=[{}] rel_err={worst:.3e} e_off=- bound={:.3e} metric=abs/S",
        T::NAME,
        want.len(),
        T::TOL
    );
    (worst.is_nan() || worst > T::TOL).then(|| {
        format!(
            "{op} [{}]: |error| / S = {worst:.3e} > {:.0e}",
            T::NAME,
            T::TOL
        )
    })
}

/// Rounds to T storage; returns (the f64 oracle input, the device tensor).
fn put<T: Dt>(s: &Stream, t: &HostTensor<f64>) -> (HostTensor<f64>, CudaTensor<T>) {
    let ts: HostTensor<T> = t.map(|v| T::from_f32(v as f32));
    let back = ts.map(|v| v.to_f32() as f64);
    (back, CudaTensor::upload(s, &ts).expect("upload"))
}

fn get<T: Dt>(s: &Stream, t: &CudaTensor<T>) -> HostTensor<f64> {
    t.download(s).expect("download").map(|v| v.to_f32() as f64)
}

fn bits<T: Dt>(s: &Stream, t: &CudaTensor<T>) -> Vec<u32> {
    t.download(s)
        .expect("download")
        .data()
        .iter()
        .map(|v| v.to_f32().to_bits())
        .collect()
}

/// Relative Frobenius error (absolute when the reference is zero); NaN anywhere fails.
fn rel_err(got: &HostTensor<f64>, want: &HostTensor<f64>) -> f64 {
    assert_eq!(got.shape(), want.shape(), "shape");
    let (mut num, mut den) = (0.0, 0.0);
    for (&g, &w) in got.data().iter().zip(want.data()) {
        if g.is_nan() != w.is_nan() {
            return f64::INFINITY;
        }
        if !w.is_nan() {
            num += (g - w) * (g - w);
            den += w * w;
        }
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// A tensor output against the f64 reference and, for bound 2, the official result in T (`off`).
fn close<T: Dt>(
    s: &Stream,
    what: &str,
    got: &CudaTensor<T>,
    want: &HostTensor<f64>,
    off: Option<&Vec<f64>>,
) {
    if let Some(m) = judge::<T>(what, &get(s, got), want, off.map(|v| v.as_slice())) {
        mismatch(m);
    }
}

/// Cancelling sums (a 0-d gradient, or grad_scores) with S of each entry.
fn close_sums<T: Dt>(s: &Stream, what: &str, got: &CudaTensor<T>, want: &[f64], scales: &[f64]) {
    if let Some(m) = judge_sums::<T>(what, get(s, got).data(), want, scales) {
        mismatch(m);
    }
}

fn same_bits<T: Dt>(s: &Stream, what: &str, a: &CudaTensor<T>, b: &CudaTensor<T>) {
    if bits(s, a) != bits(s, b) {
        mismatch(format!("{what} [{}]: two runs differ", T::NAME));
    }
}

// ---- shapes ----

#[derive(Clone, Copy, Debug)]
struct Sh {
    n: usize,
    o: usize,
    i: usize,
    r: usize,
    g: usize,
}

fn shapes() -> Vec<Sh> {
    vec![
        Sh {
            n: 3,
            o: 6,
            i: 10,
            r: 2,
            g: 2,
        },
        Sh {
            n: 5,
            o: 35,
            i: 77,
            r: 3,
            g: 3,
        }, // 5x7, 7x11: nothing a multiple of a tile
        Sh {
            n: 2,
            o: 7,
            i: 13,
            r: 1,
            g: 1,
        }, // primes: o1 = i1 = 1
        Sh {
            n: 9,
            o: 96,
            i: 130,
            r: 2,
            g: 5,
        }, // N > 8: the experts beyond the register cache
        Sh {
            n: 7,
            o: 130,
            i: 200,
            r: 8,
            g: 4,
        }, // official N, R; dot chunks > 1
    ]
}

fn t5() -> bool {
    !std::env::var("CAMEX_SKIP_T5").is_ok_and(|v| v == "1")
}

struct Weights<T> {
    base: (HostTensor<f64>, CudaTensor<T>),
    experts: (HostTensor<f64>, CudaTensor<T>),
    scores: (HostTensor<f64>, CudaTensor<T>),
    factors: [(HostTensor<f64>, CudaTensor<T>); 4],
    base_bias: (HostTensor<f64>, CudaTensor<T>),
    expert_bias: (HostTensor<f64>, CudaTensor<T>),
}

fn weights<T: Dt>(s: &Stream, sh: Sh, seed: u64) -> Weights<T> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let split = Split::default_for(sh.o, sh.i);
    // Factors near the normalised identity, so U stays O(1) in every dtype.
    let eye: [HostTensor<f64>; 4] = cpu::identity_factors(sh.r.max(1), sh.n, split, true);
    let factors = eye.map(|t| {
        let noise = rng.tensor(t.shape(), 0.25);
        let sum = HostTensor::from_fn(t.shape(), |k| {
            t.data()[k] + noise.data()[k] / sh.r.max(1) as f64
        });
        put::<T>(s, &sum)
    });
    Weights {
        base: put(s, &rng.tensor(&[sh.o, sh.i], 2.0)),
        experts: put(s, &rng.tensor(&[sh.n, sh.o, sh.i], 2.0)),
        scores: put(s, &rng.tensor(&[sh.g, sh.n], 1.0)),
        factors,
        base_bias: put(s, &rng.tensor(&[sh.o], 1.0)),
        expert_bias: put(s, &rng.tensor(&[sh.n, sh.o], 1.0)),
    }
}

impl<T: Dt> Weights<T> {
    fn cpu_curv(&self, kron: bool) -> cpu::Curvature<'_, f64> {
        if kron {
            cpu::Curvature::Kronecker(cpu::Factors {
                a: &self.factors[0].0,
                b: &self.factors[1].0,
                c: &self.factors[2].0,
                d: &self.factors[3].0,
            })
        } else {
            cpu::Curvature::Identity
        }
    }
    fn gpu_curv(&self, kron: bool) -> cuda::CudaCurvature<'_, T> {
        if kron {
            cuda::CudaCurvature::Kronecker(cuda::CudaFactors {
                a: &self.factors[0].1,
                b: &self.factors[1].1,
                c: &self.factors[2].1,
                d: &self.factors[3].1,
            })
        } else {
            cuda::CudaCurvature::Identity
        }
    }
}

// ---- tests ----

#[test]
fn philox_known_answers() {
    let Some(s) = gpu("philox_known_answers") else {
        return;
    };
    let mut ctr = vec![
        [0u32; 4],
        [u32::MAX; 4],
        [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
    ];
    let mut key = vec![[0u32; 2], [u32::MAX; 2], [0xa4093822, 0x299f31d0]];
    let mut rng = Rng(12345);
    for _ in 0..1000 {
        let w = rng.next();
        let v = rng.next();
        ctr.push([w as u32, (w >> 32) as u32, v as u32, (v >> 32) as u32]);
        let k = rng.next();
        key.push([k as u32, (k >> 32) as u32]);
    }
    let got = cuda::philox_device(&s, &ctr, &key).expect("philox");
    assert_eq!(got[0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
    assert_eq!(got[1], [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
    assert_eq!(got[2], [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]);
    for (k, (c, kk)) in ctr.iter().zip(&key).enumerate() {
        assert_eq!(got[k], camex::philox::philox4x32_10(*c, *kk), "counter {k}");
    }
}

fn curvature_case<T: Dt>(s: &Stream, sh: Sh, kron: bool) {
    let w = weights::<T>(s, sh, 1);
    let (cc, gc) = (w.cpu_curv(kron), w.gpu_curv(kron));
    let kr = kron.then(|| kron_ref(sh, w.factors.each_ref().map(|f| &f.0)));
    let low = official::<T>(3.0 * curv_work(sh, kron));
    let want = cpu::curvature(&w.base.0, &w.experts.0, &cc).unwrap();
    let got = cuda::curvature(s, &w.base.1, &w.experts.1, &gc).unwrap();
    let again = cuda::curvature(s, &w.base.1, &w.experts.1, &gc).unwrap();
    let offc = low.then(|| {
        off::curvature(
            &T::q,
            w.base.0.data(),
            w.experts.0.data(),
            kr.as_ref(),
            sh.n,
        )
    });
    close(
        s,
        &format!("curvature kron={kron}"),
        &got,
        &want,
        offc.as_ref(),
    );
    same_bits(s, "curvature", &got, &again);

    let mut rng = Rng(77);
    let (gcv, gcd) = put::<T>(s, &rng.tensor(&[sh.n, sh.o, sh.i], 1.0));
    let want = cpu::curvature_backward(&w.base.0, &w.experts.0, &cc, &gcv).unwrap();
    let got = cuda::curvature_backward(s, &w.base.1, &w.experts.1, &gc, &gcd).unwrap();
    let again = cuda::curvature_backward(s, &w.base.1, &w.experts.1, &gc, &gcd).unwrap();
    let (ob, oe, of) = match low {
        true => {
            let (b, e, f) = off::curvature_backward(
                &T::q,
                w.base.0.data(),
                w.experts.0.data(),
                kr.as_ref(),
                sh.n,
                gcv.data(),
            );
            (Some(b), Some(e), f)
        }
        false => (None, None, None),
    };
    close(
        s,
        "curvature_backward grad_base",
        &got.grad_base,
        &want.grad_base,
        ob.as_ref(),
    );
    close(
        s,
        "curvature_backward grad_experts",
        &got.grad_experts,
        &want.grad_experts,
        oe.as_ref(),
    );
    same_bits(
        s,
        "curvature_backward grad_experts",
        &got.grad_experts,
        &again.grad_experts,
    );
    assert_eq!(got.factors.is_some(), kron);
    if let (Some(g), Some(wf)) = (&got.factors, &want.factors) {
        let o = |k: usize| of.as_ref().map(|f| &f[k]);
        close(
            s,
            "grad_factor_a",
            &g.grad_factor_a,
            &wf.grad_factor_a,
            o(0),
        );
        close(
            s,
            "grad_factor_b",
            &g.grad_factor_b,
            &wf.grad_factor_b,
            o(1),
        );
        close(
            s,
            "grad_factor_c",
            &g.grad_factor_c,
            &wf.grad_factor_c,
            o(2),
        );
        close(
            s,
            "grad_factor_d",
            &g.grad_factor_d,
            &wf.grad_factor_d,
            o(3),
        );
        same_bits(
            s,
            "grad_factor_a",
            &g.grad_factor_a,
            &again.factors.as_ref().unwrap().grad_factor_a,
        );
    }
}

#[test]
fn curvature_matches_cpu() {
    let Some(s) = gpu("curvature_matches_cpu") else {
        return;
    };
    for sh in shapes() {
        for kron in [false, true] {
            curvature_case::<f32>(&s, sh, kron);
            curvature_case::<f16>(&s, sh, kron);
            curvature_case::<bf16>(&s, sh, kron);
        }
    }
}

fn mask_case<T: Dt>(s: &Stream, sh: Sh, mask: Mask) {
    let w = weights::<T>(s, sh, 2);
    let want = cpu::ties_mask(&w.base.0, &w.experts.0, mask).unwrap();
    let got = cuda::ties_mask(s, &w.base.1, &w.experts.1, mask).unwrap();
    let again = cuda::ties_mask(s, &w.base.1, &w.experts.1, mask).unwrap();
    // 0/1 and computed from exact tau: must be equal, not just close.
    assert_eq!(
        get(s, &got),
        want,
        "ties_mask {mask:?} [{}] {sh:?}",
        T::NAME
    );
    println!(
        "RESULT op=ties_mask({mask:?}) dtype={} shape={:?} rel_err=0",
        T::NAME,
        want.shape()
    );
    same_bits(s, "ties_mask", &got, &again);
}

#[test]
fn ties_mask_matches_cpu() {
    let Some(s) = gpu("ties_mask_matches_cpu") else {
        return;
    };
    for sh in shapes() {
        for mask in [
            Mask::None,
            Mask::TiesSign,
            Mask::TiesTrim(0.3),
            Mask::TiesTrim(1.0),
            Mask::TiesTrim(1e-9),
        ] {
            mask_case::<f32>(&s, sh, mask);
            mask_case::<f16>(&s, sh, mask);
            mask_case::<bf16>(&s, sh, mask);
        }
    }
}

fn dares() -> [Dare; 3] {
    [
        Dare::None,
        Dare::Expert { p: 0.3, seed: 7 },
        Dare::Element {
            p: 0.1,
            seed: 0xDEAD_BEEF_0123,
        },
    ]
}

fn merge_case<T: Dt>(s: &Stream, sh: Sh, with_mask: bool, bias: bool, dare: Dare) {
    let w = weights::<T>(s, sh, 3);
    let mut rng = Rng(99);
    let curved = put::<T>(s, &rng.tensor(&[sh.n, sh.o, sh.i], 2.0));
    let mask = put::<T>(
        s,
        &HostTensor::from_fn(&[sh.n, sh.o, sh.i], |_| (rng.next() % 2) as f64),
    );
    let ci = cpu::MergeInputs {
        base: &w.base.0,
        curved: &curved.0,
        scores: &w.scores.0,
        mask: with_mask.then_some(&mask.0),
        base_bias: bias.then_some(&w.base_bias.0),
        expert_bias: bias.then_some(&w.expert_bias.0),
    };
    let gi = cuda::CudaMergeInputs {
        base: &w.base.1,
        curved: &curved.1,
        scores: &w.scores.1,
        mask: with_mask.then_some(&mask.1),
        base_bias: bias.then_some(&w.base_bias.1),
        expert_bias: bias.then_some(&w.expert_bias.1),
    };
    let alpha = 0.75;
    let d = dims(sh);
    let low = official::<T>((sh.g * sh.n * sh.o * sh.i) as f64);
    let mask_v = with_mask.then_some(mask.0.data());
    let biases = bias.then_some((w.base_bias.0.data(), w.expert_bias.0.data()));
    let want = cpu::merge(&ci, alpha, &dare).unwrap();
    let got = cuda::merge(s, &gi, alpha, &dare).unwrap();
    let again = cuda::merge(s, &gi, alpha, &dare).unwrap();
    let (om, omb) = match low {
        true => {
            let (m, mb) = off::merge(
                &T::q,
                d,
                w.base.0.data(),
                curved.0.data(),
                w.scores.0.data(),
                mask_v,
                biases,
                alpha,
                dare_ref(&dare),
            );
            (Some(m), mb)
        }
        false => (None, None),
    };
    close(s, "merge merged", &got.merged, &want.merged, om.as_ref());
    same_bits(s, "merge merged", &got.merged, &again.merged);
    assert_eq!(got.merged_bias.is_some(), bias);
    if let (Some(g), Some(wb)) = (&got.merged_bias, &want.merged_bias) {
        close(s, "merge merged_bias", g, wb, omb.as_ref());
    }
    let gm = put::<T>(s, &rng.tensor(&[sh.g, sh.o, sh.i], 1.0));
    let gmb = put::<T>(s, &rng.tensor(&[sh.g, sh.o], 1.0));
    let want = cpu::merge_backward(&ci, alpha, &dare, &gm.0, bias.then_some(&gmb.0)).unwrap();
    let got = cuda::merge_backward(s, &gi, alpha, &dare, &gm.1, bias.then_some(&gmb.1)).unwrap();
    let again = cuda::merge_backward(s, &gi, alpha, &dare, &gm.1, bias.then_some(&gmb.1)).unwrap();
    let og = low.then(|| {
        off::merge_backward(
            &T::q,
            d,
            w.scores.0.data(),
            mask_v,
            biases,
            alpha,
            dare_ref(&dare),
            gm.0.data(),
            bias.then_some(gmb.0.data()),
        )
    });
    let (s_alpha, s_scores) = oracle::merge_backward_scales(
        d,
        curved.0.data(),
        w.scores.0.data(),
        mask_v,
        biases,
        alpha,
        dare_ref(&dare),
        gm.0.data(),
        bias.then_some(gmb.0.data()),
    );
    close(
        s,
        "merge_backward grad_base",
        &got.grad_base,
        &want.grad_base,
        og.as_ref().map(|o| &o.grad_base),
    );
    close(
        s,
        "merge_backward grad_curved",
        &got.grad_curved,
        &want.grad_curved,
        og.as_ref().map(|o| &o.grad_curved),
    );
    close_sums(
        s,
        "merge_backward grad_scores",
        &got.grad_scores,
        want.grad_scores.data(),
        &s_scores,
    );
    close_sums(
        s,
        "merge_backward grad_alpha",
        &got.grad_alpha,
        &[want.grad_alpha],
        &[s_alpha],
    );
    same_bits(
        s,
        "merge_backward grad_scores",
        &got.grad_scores,
        &again.grad_scores,
    );
    same_bits(
        s,
        "merge_backward grad_alpha",
        &got.grad_alpha,
        &again.grad_alpha,
    );
    if bias {
        close(
            s,
            "merge_backward grad_base_bias",
            got.grad_base_bias.as_ref().unwrap(),
            want.grad_base_bias.as_ref().unwrap(),
            og.as_ref().and_then(|o| o.grad_base_bias.as_ref()),
        );
        close(
            s,
            "merge_backward grad_expert_bias",
            got.grad_expert_bias.as_ref().unwrap(),
            want.grad_expert_bias.as_ref().unwrap(),
            og.as_ref().and_then(|o| o.grad_expert_bias.as_ref()),
        );
    }
}

#[test]
fn merge_matches_cpu() {
    let Some(s) = gpu("merge_matches_cpu") else {
        return;
    };
    for sh in shapes() {
        for dare in dares() {
            for (with_mask, bias) in [(false, false), (true, true), (true, false)] {
                merge_case::<f32>(&s, sh, with_mask, bias, dare);
                merge_case::<f16>(&s, sh, with_mask, bias, dare);
                merge_case::<bf16>(&s, sh, with_mask, bias, dare);
            }
        }
    }
}

/// What a CA-merge case needs beyond the f64 reference: the oracle's TIES mask and Kronecker
/// factors, for the official formulation in T (bound 2, when `low`) and the S of the cancelling sums.
struct CaOff {
    kr: Option<KronRef>,
    mask: Vec<f64>,
    low: bool,
}

fn ca_off<T: Dt>(
    sh: Sh,
    kron: bool,
    opts: &MergeOptions,
    base: &HostTensor<f64>,
    experts: &HostTensor<f64>,
    factors: [&HostTensor<f64>; 4],
) -> CaOff {
    let oi = sh.o * sh.i;
    let tau = oracle::domain_vectors(base.data(), experts.data(), sh.n, oi);
    CaOff {
        kr: kron.then(|| kron_ref(sh, factors)),
        mask: oracle::ties_mask(&tau, sh.n, oi, mask_ref(opts.mask)),
        low: official::<T>(3.0 * curv_work(sh, kron) + (sh.g * sh.n * oi) as f64),
    }
}

impl CaOff {
    fn input<'a>(
        &'a self,
        sh: Sh,
        opts: &MergeOptions,
        base: &'a HostTensor<f64>,
        experts: &'a HostTensor<f64>,
        scores: &'a HostTensor<f64>,
        biases: Option<(&'a HostTensor<f64>, &'a HostTensor<f64>)>,
    ) -> CaRefIn<'a> {
        CaRefIn {
            d: dims(sh),
            base: base.data(),
            experts: experts.data(),
            scores: scores.data(),
            kron: self.kr.as_ref(),
            biases: biases.map(|(e, b)| (e.data(), b.data())),
            alpha: opts.alpha,
            mask: mask_ref(opts.mask),
            dare: dare_ref(&opts.dare),
            beta: opts.beta,
        }
    }

    /// (S of grad_alpha, S of each grad_scores entry, S of grad_beta) for the f64 curved U.
    fn scales(
        &self,
        x: &CaRefIn,
        u: &HostTensor<f64>,
        gm: &HostTensor<f64>,
        gmb: Option<&HostTensor<f64>>,
        gnb: &HostTensor<f64>,
    ) -> (f64, Vec<f64>, f64) {
        let (a, sc) = oracle::merge_backward_scales(
            x.d,
            u.data(),
            x.scores,
            Some(&self.mask),
            x.biases,
            x.alpha,
            x.dare,
            gm.data(),
            gmb.map(|t| t.data()),
        );
        (a, sc, oracle::beta_scale(u.data(), x.d.n, gnb.data()))
    }
}

fn ca_case<T: Dt>(s: &Stream, sh: Sh, kron: bool, opts: MergeOptions, bias: bool, backward: bool) {
    let w = weights::<T>(s, sh, 4);
    let ci = cpu::CaMergeInputs {
        base: &w.base.0,
        experts: &w.experts.0,
        scores: &w.scores.0,
        curvature: w.cpu_curv(kron),
        base_bias: bias.then_some(&w.base_bias.0),
        expert_bias: bias.then_some(&w.expert_bias.0),
    };
    let gi = cuda::CudaCaMergeInputs {
        base: &w.base.1,
        experts: &w.experts.1,
        scores: &w.scores.1,
        curvature: w.gpu_curv(kron),
        base_bias: bias.then_some(&w.base_bias.1),
        expert_bias: bias.then_some(&w.expert_bias.1),
    };
    let tag = format!(
        "ca_merge kron={kron} {:?} {:?} beta={:?}",
        opts.mask, opts.dare, opts.beta
    );
    let co = ca_off::<T>(
        sh,
        kron,
        &opts,
        &w.base.0,
        &w.experts.0,
        w.factors.each_ref().map(|f| &f.0),
    );
    let x = co.input(
        sh,
        &opts,
        &w.base.0,
        &w.experts.0,
        &w.scores.0,
        bias.then_some((&w.base_bias.0, &w.expert_bias.0)),
    );
    let fo = co.low.then(|| off::ca_merge(&T::q, &x, &co.mask));
    let want = cpu::ca_merge(&ci, &opts).unwrap();
    let got = cuda::ca_merge(s, &gi, &opts).unwrap();
    let again = cuda::ca_merge(s, &gi, &opts).unwrap();
    close(
        s,
        &format!("{tag} merged"),
        &got.merged,
        &want.merged,
        fo.as_ref().map(|f| &f.0),
    );
    same_bits(s, "ca_merge merged", &got.merged, &again.merged);
    assert_eq!(got.next_base.is_some(), opts.beta.is_some());
    assert_eq!(got.curved.is_some(), opts.want_curved);
    if let (Some(g), Some(wn)) = (&got.next_base, &want.next_base) {
        let o = fo.as_ref().and_then(|f| f.2.as_ref());
        close(s, &format!("{tag} next_base"), g, wn, o);
    }
    if let (Some(g), Some(wc)) = (&got.curved, &want.curved) {
        close(
            s,
            &format!("{tag} curved"),
            g,
            wc,
            fo.as_ref().map(|f| &f.3),
        );
    }
    if let (Some(g), Some(wb)) = (&got.merged_bias, &want.merged_bias) {
        let o = fo.as_ref().and_then(|f| f.1.as_ref());
        close(s, &format!("{tag} merged_bias"), g, wb, o);
    }
    if !backward {
        return;
    }
    let mut rng = Rng(1234);
    let gm = put::<T>(s, &rng.tensor(&[sh.g, sh.o, sh.i], 1.0));
    let gmb = put::<T>(s, &rng.tensor(&[sh.g, sh.o], 1.0));
    let gnb = put::<T>(s, &rng.tensor(&[sh.o, sh.i], 1.0));
    let has_beta = opts.beta.is_some();
    let want = cpu::ca_merge_backward(
        &ci,
        &opts,
        &gm.0,
        bias.then_some(&gmb.0),
        has_beta.then_some(&gnb.0),
    )
    .unwrap();
    let got = cuda::ca_merge_backward(
        s,
        &gi,
        &opts,
        &gm.1,
        bias.then_some(&gmb.1),
        has_beta.then_some(&gnb.1),
    )
    .unwrap();
    let again = cuda::ca_merge_backward(
        s,
        &gi,
        &opts,
        &gm.1,
        bias.then_some(&gmb.1),
        has_beta.then_some(&gnb.1),
    )
    .unwrap();
    let bo = co.low.then(|| {
        off::ca_merge_backward(
            &T::q,
            &x,
            &co.mask,
            gm.0.data(),
            bias.then_some(gmb.0.data()),
            has_beta.then_some(gnb.0.data()),
        )
    });
    let u = cpu::curvature(&w.base.0, &w.experts.0, &ci.curvature).unwrap();
    let (s_alpha, s_scores, s_beta) = co.scales(&x, &u, &gm.0, bias.then_some(&gmb.0), &gnb.0);
    close(
        s,
        &format!("{tag} grad_base"),
        &got.grad_base,
        &want.grad_base,
        bo.as_ref().map(|b| &b.grad_base),
    );
    close(
        s,
        &format!("{tag} grad_experts"),
        &got.grad_experts,
        &want.grad_experts,
        bo.as_ref().map(|b| &b.grad_experts),
    );
    close_sums(
        s,
        &format!("{tag} grad_scores"),
        &got.grad_scores,
        want.grad_scores.data(),
        &s_scores,
    );
    close_sums(
        s,
        &format!("{tag} grad_alpha"),
        &got.grad_alpha,
        &[want.grad_alpha],
        &[s_alpha],
    );
    same_bits(
        s,
        "ca_merge_backward grad_experts",
        &got.grad_experts,
        &again.grad_experts,
    );
    same_bits(
        s,
        "ca_merge_backward grad_scores",
        &got.grad_scores,
        &again.grad_scores,
    );
    same_bits(
        s,
        "ca_merge_backward grad_alpha",
        &got.grad_alpha,
        &again.grad_alpha,
    );
    assert_eq!(got.grad_beta.is_some(), has_beta);
    if let (Some(g), Some(wb)) = (&got.grad_beta, want.grad_beta) {
        close_sums(s, &format!("{tag} grad_beta"), g, &[wb], &[s_beta]);
    }
    if let (Some(g), Some(wf)) = (&got.factors, &want.factors) {
        let o = |k: usize| bo.as_ref().and_then(|b| b.factors.as_ref()).map(|f| &f[k]);
        close(
            s,
            &format!("{tag} grad_factor_a"),
            &g.grad_factor_a,
            &wf.grad_factor_a,
            o(0),
        );
        close(
            s,
            &format!("{tag} grad_factor_b"),
            &g.grad_factor_b,
            &wf.grad_factor_b,
            o(1),
        );
        close(
            s,
            &format!("{tag} grad_factor_c"),
            &g.grad_factor_c,
            &wf.grad_factor_c,
            o(2),
        );
        close(
            s,
            &format!("{tag} grad_factor_d"),
            &g.grad_factor_d,
            &wf.grad_factor_d,
            o(3),
        );
        same_bits(
            s,
            "grad_factor_d",
            &g.grad_factor_d,
            &again.factors.as_ref().unwrap().grad_factor_d,
        );
    }
    if bias {
        close(
            s,
            &format!("{tag} grad_base_bias"),
            got.grad_base_bias.as_ref().unwrap(),
            want.grad_base_bias.as_ref().unwrap(),
            bo.as_ref().and_then(|b| b.grad_base_bias.as_ref()),
        );
        close(
            s,
            &format!("{tag} grad_expert_bias"),
            got.grad_expert_bias.as_ref().unwrap(),
            want.grad_expert_bias.as_ref().unwrap(),
            bo.as_ref().and_then(|b| b.grad_expert_bias.as_ref()),
        );
    }
}

fn ca_options() -> Vec<(MergeOptions, bool)> {
    let mut v = Vec::new();
    for mask in [Mask::None, Mask::TiesSign, Mask::TiesTrim(0.4)] {
        for dare in dares() {
            v.push((
                MergeOptions {
                    alpha: 0.9,
                    mask,
                    dare,
                    beta: None,
                    want_curved: false,
                },
                false,
            ));
        }
    }
    v.push((
        MergeOptions {
            alpha: 1.0,
            mask: Mask::TiesSign,
            dare: Dare::Expert { p: 0.1, seed: 3 },
            beta: Some(0.5),
            want_curved: true,
        },
        true,
    ));
    v.push((
        MergeOptions {
            alpha: -0.5,
            mask: Mask::TiesTrim(0.2),
            dare: Dare::Element { p: 0.25, seed: 11 },
            beta: Some(-1.25),
            want_curved: true,
        },
        false,
    ));
    v
}

#[test]
fn ca_merge_matches_cpu() {
    let Some(s) = gpu("ca_merge_matches_cpu") else {
        return;
    };
    for sh in shapes() {
        for kron in [false, true] {
            for (opts, bias) in ca_options() {
                ca_case::<f32>(&s, sh, kron, opts, bias, true);
                ca_case::<f16>(&s, sh, kron, opts, bias, true);
                ca_case::<bf16>(&s, sh, kron, opts, bias, true);
            }
        }
    }
}

#[test]
fn ca_merge_t5_base() {
    let Some(s) = gpu("ca_merge_t5_base") else {
        return;
    };
    if !t5() {
        eprintln!("ca_merge_t5_base: skipped, CAMEX_SKIP_T5=1");
        return;
    }
    let sh = Sh {
        n: 7,
        o: 3072,
        i: 768,
        r: 8,
        g: 16,
    };
    let opts = MergeOptions {
        alpha: 1.0,
        mask: Mask::TiesSign,
        dare: Dare::Expert { p: 0.1, seed: 5 },
        beta: Some(1.0),
        want_curved: false,
    };
    ca_case::<f32>(&s, sh, true, opts, true, true);
    ca_case::<bf16>(&s, sh, true, opts, false, false);
    ca_case::<f16>(&s, sh, true, opts, false, false);
}

/// The tensor-core kernels (kernels/kron_tc.cuh and gemm_tc_kernel, opt-in until a GPU has run
/// them), switched on for this test's thread: the merged linear, the curvature and every CA-merge
/// case in f16/bf16, forward and backward, at the odd shapes, T5-base `wi` and its transpose `wo`.
#[test]
fn tensor_core_path_matches_cpu() {
    let Some(s) = gpu("tensor_core_path_matches_cpu") else {
        return;
    };
    cuda::set_tensor_cores(Some(true));
    assert!(cuda::tensor_cores(), "the switch must apply on this thread");
    for (g, t, o, i) in linear_cases() {
        for bias in [false, true] {
            linear_case::<f16>(&s, g, t, o, i, bias);
            linear_case::<bf16>(&s, g, t, o, i, bias);
        }
    }
    for sh in shapes() {
        curvature_case::<f16>(&s, sh, true);
        curvature_case::<bf16>(&s, sh, true);
        for (opts, bias) in ca_options() {
            ca_case::<f16>(&s, sh, true, opts, bias, true);
            ca_case::<bf16>(&s, sh, true, opts, bias, true);
        }
    }
    if t5() {
        let opts = MergeOptions {
            alpha: 1.0,
            mask: Mask::TiesSign,
            dare: Dare::Expert { p: 0.1, seed: 5 },
            beta: Some(1.0),
            want_curved: true,
        };
        for (o, i) in [(3072, 768), (768, 3072)] {
            let sh = Sh {
                n: 7,
                o,
                i,
                r: 8,
                g: 16,
            };
            ca_case::<bf16>(&s, sh, true, opts, false, true);
            ca_case::<f16>(&s, sh, true, opts, false, false);
        }
    }
    cuda::set_tensor_cores(None);
}

fn linear_case<T: Dt>(s: &Stream, g: usize, t: usize, o: usize, i: usize, bias: bool) {
    let mut rng = Rng(g as u64 * 1000 + t as u64 + 1);
    let x = put::<T>(s, &rng.tensor(&[g, t, i], 1.0));
    let m = put::<T>(s, &rng.tensor(&[g, o, i], 1.0));
    let b = put::<T>(s, &rng.tensor(&[g, o], 1.0));
    let dy = put::<T>(s, &rng.tensor(&[g, t, o], 1.0));
    let (fo, bo) = linear_official::<T>(g, t, o, i, &x.0, &m.0, bias.then_some(&b.0), &dy.0);
    let want = cpu::merged_linear(&x.0, &m.0, bias.then_some(&b.0)).unwrap();
    let got = cuda::merged_linear(s, &x.1, &m.1, bias.then_some(&b.1)).unwrap();
    let again = cuda::merged_linear(s, &x.1, &m.1, bias.then_some(&b.1)).unwrap();
    close(s, "merged_linear y", &got, &want, fo.as_ref());
    same_bits(s, "merged_linear y", &got, &again);
    let want = cpu::merged_linear_backward(&x.0, &m.0, bias.then_some(&b.0), &dy.0).unwrap();
    let got = cuda::merged_linear_backward(s, &x.1, &m.1, bias.then_some(&b.1), &dy.1).unwrap();
    close(
        s,
        "merged_linear_backward grad_x",
        &got.grad_x,
        &want.grad_x,
        bo.as_ref().map(|b| &b.0),
    );
    close(
        s,
        "merged_linear_backward grad_merged",
        &got.grad_merged,
        &want.grad_merged,
        bo.as_ref().map(|b| &b.1),
    );
    assert_eq!(got.grad_merged_bias.is_some(), bias);
    if let (Some(g), Some(w)) = (&got.grad_merged_bias, &want.grad_merged_bias) {
        let ob = bo.as_ref().map(|b| &b.2);
        close(s, "merged_linear_backward grad_merged_bias", g, w, ob);
    }
}

/// The merged linear layer's official results in T (forward y; backward grad_x, grad_merged,
/// grad_merged_bias), when bound 2 applies.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn linear_official<T: Dt>(
    g: usize,
    t: usize,
    o: usize,
    i: usize,
    x: &HostTensor<f64>,
    m: &HostTensor<f64>,
    b: Option<&HostTensor<f64>>,
    dy: &HostTensor<f64>,
) -> (Option<Vec<f64>>, Option<(Vec<f64>, Vec<f64>, Vec<f64>)>) {
    if !official::<T>((g * t * o * i) as f64 * 3.0) {
        return (None, None);
    }
    let d = Dims { g, n: 1, o, i };
    let y = off::merged_linear(&T::q, d, t, x.data(), m.data(), b.map(|b| b.data()));
    let back = off::merged_linear_backward(&T::q, d, t, x.data(), m.data(), dy.data());
    (Some(y), Some(back))
}

/// (G, T, O, I) of the merged-linear cases: degenerate, odd, tile-sized and T5-base.
fn linear_cases() -> Vec<(usize, usize, usize, usize)> {
    let mut cases = vec![
        (1, 1, 1, 1),
        (3, 5, 7, 9),
        (2, 67, 130, 70),
        (4, 64, 64, 64),
    ];
    if t5() {
        cases.push((16, 128, 3072, 768));
    }
    cases
}

#[test]
fn merged_linear_matches_cpu() {
    let Some(s) = gpu("merged_linear_matches_cpu") else {
        return;
    };
    for (g, t, o, i) in linear_cases() {
        for bias in [false, true] {
            linear_case::<f32>(&s, g, t, o, i, bias);
            linear_case::<f16>(&s, g, t, o, i, bias);
            linear_case::<bf16>(&s, g, t, o, i, bias);
        }
    }
}

fn dynamic_case<T: Dt>(s: &Stream, sh: Sh) {
    let mut rng = Rng(555);
    let base = put::<T>(s, &rng.tensor(&[sh.o, sh.i], 2.0));
    let curved = put::<T>(s, &rng.tensor(&[sh.n, sh.o, sh.i], 2.0));
    let gnb = put::<T>(s, &rng.tensor(&[sh.o, sh.i], 1.0));
    let beta = 0.7;
    let (fo, bo) = dynamic_official::<T>(sh.n, &base.0, &curved.0, beta, &gnb.0);
    let want = cpu::dynamic_merge(&base.0, &curved.0, beta).unwrap();
    let got = cuda::dynamic_merge(s, &base.1, &curved.1, beta).unwrap();
    close(s, "dynamic_merge", &got, &want, fo.as_ref());
    let want = cpu::dynamic_merge_backward(&base.0, &curved.0, beta, &gnb.0).unwrap();
    let got = cuda::dynamic_merge_backward(s, &base.1, &curved.1, beta, &gnb.1).unwrap();
    let again = cuda::dynamic_merge_backward(s, &base.1, &curved.1, beta, &gnb.1).unwrap();
    close(
        s,
        "dynamic_merge_backward grad_base",
        &got.grad_base,
        &want.grad_base,
        bo.as_ref().map(|_| gnb.0.data().to_vec()).as_ref(),
    );
    close(
        s,
        "dynamic_merge_backward grad_curved",
        &got.grad_curved,
        &want.grad_curved,
        bo.as_ref(),
    );
    close_sums(
        s,
        "dynamic_merge_backward grad_beta",
        &got.grad_beta,
        &[want.grad_beta],
        &[oracle::beta_scale(curved.0.data(), sh.n, gnb.0.data())],
    );
    same_bits(s, "grad_beta", &got.grad_beta, &again.grad_beta);
}

/// The dynamic merge's official results in T: next_base, and grad_curved (every expert's: the mean's
/// backward); grad_base is grad_next_base itself.
fn dynamic_official<T: Dt>(
    n: usize,
    base: &HostTensor<f64>,
    curved: &HostTensor<f64>,
    beta: f64,
    gnb: &HostTensor<f64>,
) -> (Option<Vec<f64>>, Option<Vec<f64>>) {
    if !T::LOW {
        return (None, None);
    }
    let nb = off::dynamic_merge(&T::q, base.data(), curved.data(), n, beta);
    let gc1 = off::dynamic_merge_grad_curved(&T::q, n, beta, gnb.data());
    let gc = (0..n).flat_map(|_| gc1.iter().copied()).collect();
    (Some(nb), Some(gc))
}

#[test]
fn dynamic_matches_cpu() {
    let Some(s) = gpu("dynamic_matches_cpu") else {
        return;
    };
    for sh in shapes() {
        dynamic_case::<f32>(&s, sh);
        dynamic_case::<f16>(&s, sh);
        dynamic_case::<bf16>(&s, sh);
    }
}

fn segment_case<T: Dt>(s: &Stream, b: usize, j: usize, n: usize) {
    let mut rng = Rng(31);
    let r = put::<T>(s, &rng.tensor(&[b, j, n], 1.0));
    let want = cpu::segment_scores(&r.0).unwrap();
    assert_eq!(
        get(s, &cuda::segment_scores(s, &r.1).unwrap()),
        want,
        "segment_scores [{}]",
        T::NAME
    );
    let want = cpu::segment_scores_backward(&r.0).unwrap();
    assert_eq!(
        get(s, &cuda::segment_scores_backward(s, &r.1).unwrap()),
        want,
        "segment_scores_backward [{}]",
        T::NAME
    );
    println!(
        "RESULT op=segment_scores dtype={} shape={:?} rel_err=0",
        T::NAME,
        [b, j, n]
    );
}

#[test]
fn segment_matches_cpu() {
    let Some(s) = gpu("segment_matches_cpu") else {
        return;
    };
    for (b, j, n) in [(1, 1, 1), (8, 4, 7), (3, 5, 9)] {
        segment_case::<f32>(&s, b, j, n);
        segment_case::<f16>(&s, b, j, n);
        segment_case::<bf16>(&s, b, j, n);
    }
}

#[test]
fn bad_shapes_are_errors_before_launch() {
    let Some(s) = gpu("bad_shapes_are_errors_before_launch") else {
        return;
    };
    let w = weights::<f32>(
        &s,
        Sh {
            n: 3,
            o: 6,
            i: 10,
            r: 2,
            g: 2,
        },
        9,
    );
    let wrong = CudaTensor::<f32>::zeros(&s, &[3, 6, 11]).unwrap();
    let e = cuda::curvature(&s, &w.base.1, &wrong, &cuda::CudaCurvature::Identity).unwrap_err();
    let cpu_e = cpu::curvature(
        &w.base.0,
        &HostTensor::<f64>::zeros(&[3, 6, 11]),
        &cpu::Curvature::Identity,
    )
    .unwrap_err();
    // The same variant and the same fields, so the same message.
    assert!(matches!(e, camex::Error::Shape { .. }), "{e}");
    assert_eq!(e.to_string(), cpu_e.to_string());
    let scores = CudaTensor::<f32>::zeros(&s, &[2, 4]).unwrap();
    let e = cuda::ca_merge(
        &s,
        &cuda::CudaCaMergeInputs {
            base: &w.base.1,
            experts: &w.experts.1,
            scores: &scores,
            curvature: cuda::CudaCurvature::Identity,
            base_bias: None,
            expert_bias: None,
        },
        &MergeOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e, camex::Error::Shape { ref tensor, .. } if tensor == "scores"),
        "{e}"
    );
}

/// The same kernels and launchers run through the CPU emulation of kernels/emu.h (build with
/// `CAMEX_KERNEL_EMU=1`; "device" pointers are then host pointers, so these tests call the FFI
/// directly). They check the kernels' indexing, tiling, reductions and orchestration against the
/// CPU path where no GPU exists; with GPU-built kernels they skip.
mod emu {
    use super::*;
    use camex::ffi;

    fn on(test: &str) -> bool {
        // SAFETY: a constant query, no CUDA call.
        let e = unsafe { ffi::camex_emulated() } == 1;
        if !e {
            eprintln!("{test}: skipped, kernels built for the GPU (CAMEX_KERNEL_EMU=1 builds the CPU emulation)");
        }
        e
    }

    fn host<T: Dt>(t: &HostTensor<f64>) -> (HostTensor<f64>, Vec<T>) {
        let v: Vec<T> = t.data().iter().map(|&x| T::from_f32(x as f32)).collect();
        let back =
            HostTensor::new(t.shape(), v.iter().map(|x| x.to_f32() as f64).collect()).unwrap();
        (back, v)
    }

    fn p<T>(v: &[T]) -> u64 {
        v.as_ptr() as u64
    }

    fn opt<T>(v: &Option<Vec<T>>) -> u64 {
        v.as_ref().map_or(0, |v| p(v))
    }

    fn nan<T: Dt>(n: usize) -> Vec<T> {
        vec![T::from_f32(f32::NAN); n.max(1)]
    }

    fn f64s<T: Dt>(v: &[T]) -> Vec<f64> {
        v.iter().map(|x| x.to_f32() as f64).collect()
    }

    /// A tensor output: SPEC section 5's bound 1 and, given `off` (the official result in T), bound 2.
    fn cmp<T: Dt>(what: &str, got: &[T], want: &HostTensor<f64>, off: Option<&Vec<f64>>) {
        let g = HostTensor::new(want.shape(), f64s(&got[..want.len()])).unwrap();
        if let Some(m) = judge::<T>(&format!("emu:{what}"), &g, want, off.map(|v| v.as_slice())) {
            panic!("emu {m}");
        }
    }

    /// Cancelling sums (grad_alpha, grad_beta, grad_scores): |out - ref| <= tol * S per entry.
    fn cmp_sums<T: Dt>(what: &str, got: &[T], want: &[f64], scales: &[f64]) {
        let g = f64s(&got[..want.len()]);
        if let Some(m) = judge_sums::<T>(&format!("emu:{what}"), &g, want, scales) {
            panic!("emu {m}");
        }
    }

    fn ok(code: i32, what: &str) {
        assert_eq!(code, 0, "emu {what}: launcher returned {code}");
    }

    fn stream() -> ffi::camex_stream_t {
        std::ptr::null_mut()
    }

    fn mask_code(m: Mask) -> (i32, f64) {
        match m {
            Mask::None => (ffi::camex_mask_kind_CAMEX_MASK_NONE as i32, 0.0),
            Mask::TiesSign => (ffi::camex_mask_kind_CAMEX_MASK_TIES_SIGN as i32, 0.0),
            Mask::TiesTrim(k) => (ffi::camex_mask_kind_CAMEX_MASK_TIES_TRIM as i32, k),
        }
    }

    fn dare_code(d: &Dare) -> ffi::camex_dare {
        match camex::philox::DareDraw::from_options(d) {
            None => ffi::camex_dare {
                kind: 0,
                threshold: 0,
                seed: 0,
                scale: 1.0,
            },
            Some(x) => ffi::camex_dare {
                kind: match x.granularity {
                    camex::philox::Granularity::Expert => 1,
                    camex::philox::Granularity::Element => 2,
                },
                threshold: x.threshold,
                seed: x.seed,
                scale: x.scale,
            },
        }
    }

    struct HostW<T> {
        base: (HostTensor<f64>, Vec<T>),
        experts: (HostTensor<f64>, Vec<T>),
        scores: (HostTensor<f64>, Vec<T>),
        factors: Vec<(HostTensor<f64>, Vec<T>)>,
        base_bias: (HostTensor<f64>, Vec<T>),
        expert_bias: (HostTensor<f64>, Vec<T>),
        split: Split,
    }

    fn host_weights<T: Dt>(sh: Sh, seed: u64) -> HostW<T> {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
        let split = Split::default_for(sh.o, sh.i);
        let eye: [HostTensor<f64>; 4] = cpu::identity_factors(sh.r, sh.n, split, true);
        let factors = eye
            .iter()
            .map(|t| {
                let noise = rng.tensor(t.shape(), 0.25);
                host::<T>(&HostTensor::from_fn(t.shape(), |k| {
                    t.data()[k] + noise.data()[k] / sh.r as f64
                }))
            })
            .collect();
        HostW {
            base: host(&rng.tensor(&[sh.o, sh.i], 2.0)),
            experts: host(&rng.tensor(&[sh.n, sh.o, sh.i], 2.0)),
            scores: host(&rng.tensor(&[sh.g, sh.n], 1.0)),
            factors,
            base_bias: host(&rng.tensor(&[sh.o], 1.0)),
            expert_bias: host(&rng.tensor(&[sh.n, sh.o], 1.0)),
            split,
        }
    }

    impl<T> HostW<T> {
        fn curv(&self, kron: bool) -> cpu::Curvature<'_, f64> {
            if kron {
                cpu::Curvature::Kronecker(cpu::Factors {
                    a: &self.factors[0].0,
                    b: &self.factors[1].0,
                    c: &self.factors[2].0,
                    d: &self.factors[3].0,
                })
            } else {
                cpu::Curvature::Identity
            }
        }
    }

    fn ca_case<T: Dt>(sh: Sh, kron: bool, opts: MergeOptions, bias: bool) {
        let w = host_weights::<T>(sh, 4);
        let (n, o, i, g) = (sh.n, sh.o, sh.i, sh.g);
        let s = w.split;
        let (mask_kind, trim_k) = mask_code(opts.mask);
        let mut prm = ffi::camex_ca_merge_params {
            dtype: T::CODE,
            g: g as i64,
            n: n as i64,
            o: o as i64,
            i: i as i64,
            r: if kron { sh.r as i64 } else { 0 },
            o1: s.o1 as i64,
            o2: s.o2 as i64,
            i1: s.i1 as i64,
            i2: s.i2 as i64,
            base: p(&w.base.1),
            experts: p(&w.experts.1),
            scores: p(&w.scores.1),
            alpha: opts.alpha,
            has_beta: opts.beta.is_some() as i32,
            beta: opts.beta.unwrap_or(0.0),
            mask_kind,
            trim_k,
            dare: dare_code(&opts.dare),
            ..Default::default()
        };
        if kron {
            prm.factor_a = p(&w.factors[0].1);
            prm.factor_b = p(&w.factors[1].1);
            prm.factor_c = p(&w.factors[2].1);
            prm.factor_d = p(&w.factors[3].1);
        }
        if bias {
            prm.base_bias = p(&w.base_bias.1);
            prm.expert_bias = p(&w.expert_bias.1);
        }
        let ci = cpu::CaMergeInputs {
            base: &w.base.0,
            experts: &w.experts.0,
            scores: &w.scores.0,
            curvature: w.curv(kron),
            base_bias: bias.then_some(&w.base_bias.0),
            expert_bias: bias.then_some(&w.expert_bias.0),
        };
        let tag = format!(
            "ca_merge kron={kron} {:?} {:?} beta={:?}",
            opts.mask, opts.dare, opts.beta
        );
        let fr: Vec<&HostTensor<f64>> = w.factors.iter().map(|f| &f.0).collect();
        let co = ca_off::<T>(
            sh,
            kron,
            &opts,
            &w.base.0,
            &w.experts.0,
            [fr[0], fr[1], fr[2], fr[3]],
        );
        let x = co.input(
            sh,
            &opts,
            &w.base.0,
            &w.experts.0,
            &w.scores.0,
            bias.then_some((&w.base_bias.0, &w.expert_bias.0)),
        );
        let fo = co.low.then(|| off::ca_merge(&T::q, &x, &co.mask));
        // forward
        // SAFETY: host-side size computation.
        let ws = vec![0u8; unsafe { ffi::camex_ca_merge_workspace(&prm, 0) } as usize + 1];
        let merged = nan::<T>(g * o * i);
        let merged_bias = bias.then(|| nan::<T>(g * o));
        let next_base = opts.beta.map(|_| nan::<T>(o * i));
        let curved = opts.want_curved.then(|| nan::<T>(n * o * i));
        let mut f = prm;
        f.merged = p(&merged);
        f.merged_bias = opt(&merged_bias);
        f.next_base = opt(&next_base);
        f.curved = opt(&curved);
        f.workspace = p(&ws);
        f.workspace_bytes = ws.len() as i64;
        // SAFETY: emulation build: every pointer is a live host buffer of the size the shapes imply.
        ok(unsafe { ffi::camex_ca_merge_forward(&f, stream()) }, &tag);
        let want = cpu::ca_merge(&ci, &opts).unwrap();
        let fm = fo.as_ref().map(|f| &f.0);
        cmp(&format!("{tag} merged"), &merged, &want.merged, fm);
        if let (Some(gn), Some(wn)) = (&next_base, &want.next_base) {
            let o = fo.as_ref().and_then(|f| f.2.as_ref());
            cmp(&format!("{tag} next_base"), gn, wn, o);
        }
        if let (Some(gc), Some(wc)) = (&curved, &want.curved) {
            cmp(&format!("{tag} curved"), gc, wc, fo.as_ref().map(|f| &f.3));
        }
        if let (Some(gb), Some(wb)) = (&merged_bias, &want.merged_bias) {
            let o = fo.as_ref().and_then(|f| f.1.as_ref());
            cmp(&format!("{tag} merged_bias"), gb, wb, o);
        }
        // backward
        let mut rng = Rng(1234);
        let gm = host::<T>(&rng.tensor(&[g, o, i], 1.0));
        let gmb = host::<T>(&rng.tensor(&[g, o], 1.0));
        let gnb = host::<T>(&rng.tensor(&[o, i], 1.0));
        // SAFETY: host-side size computation.
        let ws = vec![0u8; unsafe { ffi::camex_ca_merge_workspace(&prm, 1) } as usize + 1];
        let grad_base = nan::<T>(o * i);
        let grad_experts = nan::<T>(n * o * i);
        let grad_scores = nan::<T>(g * n);
        let grad_alpha = nan::<T>(1);
        let grad_beta = opts.beta.map(|_| nan::<T>(1));
        let gfs: Vec<Vec<T>> = w.factors.iter().map(|f| nan::<T>(f.0.len())).collect();
        let gbb = bias.then(|| nan::<T>(o));
        let geb = bias.then(|| nan::<T>(n * o));
        let mut b = prm;
        b.grad_merged = p(&gm.1);
        if bias {
            b.grad_merged_bias = p(&gmb.1);
        }
        if opts.beta.is_some() {
            b.grad_next_base = p(&gnb.1);
        }
        b.grad_base = p(&grad_base);
        b.grad_experts = p(&grad_experts);
        b.grad_scores = p(&grad_scores);
        b.grad_alpha = p(&grad_alpha);
        b.grad_beta = opt(&grad_beta);
        if kron {
            b.grad_factor_a = p(&gfs[0]);
            b.grad_factor_b = p(&gfs[1]);
            b.grad_factor_c = p(&gfs[2]);
            b.grad_factor_d = p(&gfs[3]);
        }
        b.grad_base_bias = opt(&gbb);
        b.grad_expert_bias = opt(&geb);
        b.workspace = p(&ws);
        b.workspace_bytes = ws.len() as i64;
        // SAFETY: as above.
        ok(unsafe { ffi::camex_ca_merge_backward(&b, stream()) }, &tag);
        let has_beta = opts.beta.is_some();
        let want = cpu::ca_merge_backward(
            &ci,
            &opts,
            &gm.0,
            bias.then_some(&gmb.0),
            has_beta.then_some(&gnb.0),
        )
        .unwrap();
        let bo = co.low.then(|| {
            off::ca_merge_backward(
                &T::q,
                &x,
                &co.mask,
                gm.0.data(),
                bias.then_some(gmb.0.data()),
                has_beta.then_some(gnb.0.data()),
            )
        });
        let u = cpu::curvature(&w.base.0, &w.experts.0, &ci.curvature).unwrap();
        let (s_alpha, s_scores, s_beta) = co.scales(&x, &u, &gm.0, bias.then_some(&gmb.0), &gnb.0);
        let ob = bo.as_ref();
        cmp(
            &format!("{tag} grad_base"),
            &grad_base,
            &want.grad_base,
            ob.map(|b| &b.grad_base),
        );
        cmp(
            &format!("{tag} grad_experts"),
            &grad_experts,
            &want.grad_experts,
            ob.map(|b| &b.grad_experts),
        );
        cmp_sums(
            &format!("{tag} grad_scores"),
            &grad_scores,
            want.grad_scores.data(),
            &s_scores,
        );
        cmp_sums(
            &format!("{tag} grad_alpha"),
            &grad_alpha,
            &[want.grad_alpha],
            &[s_alpha],
        );
        if let (Some(gb), Some(wb)) = (&grad_beta, want.grad_beta) {
            cmp_sums(&format!("{tag} grad_beta"), gb, &[wb], &[s_beta]);
        }
        if let Some(wf) = &want.factors {
            let o = |k: usize| ob.and_then(|b| b.factors.as_ref()).map(|f| &f[k]);
            cmp(
                &format!("{tag} grad_factor_a"),
                &gfs[0],
                &wf.grad_factor_a,
                o(0),
            );
            cmp(
                &format!("{tag} grad_factor_b"),
                &gfs[1],
                &wf.grad_factor_b,
                o(1),
            );
            cmp(
                &format!("{tag} grad_factor_c"),
                &gfs[2],
                &wf.grad_factor_c,
                o(2),
            );
            cmp(
                &format!("{tag} grad_factor_d"),
                &gfs[3],
                &wf.grad_factor_d,
                o(3),
            );
        }
        if let (Some(g1), Some(w1)) = (&gbb, &want.grad_base_bias) {
            let o = ob.and_then(|b| b.grad_base_bias.as_ref());
            cmp(&format!("{tag} grad_base_bias"), g1, w1, o);
        }
        if let (Some(g1), Some(w1)) = (&geb, &want.grad_expert_bias) {
            let o = ob.and_then(|b| b.grad_expert_bias.as_ref());
            cmp(&format!("{tag} grad_expert_bias"), g1, w1, o);
        }
    }

    fn small_shapes() -> Vec<Sh> {
        vec![
            Sh {
                n: 3,
                o: 6,
                i: 10,
                r: 2,
                g: 2,
            },
            Sh {
                n: 2,
                o: 7,
                i: 13,
                r: 1,
                g: 1,
            },
            Sh {
                n: 9,
                o: 12,
                i: 70,
                r: 2,
                g: 3,
            },
        ]
    }

    #[test]
    fn emu_ca_merge_matches_cpu() {
        if !on("emu_ca_merge_matches_cpu") {
            return;
        }
        for sh in small_shapes() {
            for kron in [false, true] {
                for (opts, bias) in ca_options() {
                    ca_case::<f32>(sh, kron, opts, bias);
                }
            }
        }
        // Dot products over several chunks, odd tile remainders.
        let sh = Sh {
            n: 7,
            o: 65,
            i: 131,
            r: 2,
            g: 2,
        };
        ca_case::<f32>(sh, true, ca_options()[9].0, true);
    }

    /// The CA-merge in f16 and bf16 (the tensor-core paths), forward and backward, at the small shapes.
    #[test]
    fn emu_ca_merge_half_matches_cpu() {
        if !on("emu_ca_merge_half_matches_cpu") {
            return;
        }
        for sh in small_shapes() {
            ca_case::<f16>(sh, true, ca_options()[9].0, true);
            ca_case::<bf16>(sh, true, ca_options()[10].0, false);
        }
    }

    fn curvature_case<T: Dt>(sh: Sh, kron: bool) {
        let w = host_weights::<T>(sh, 1);
        let (n, o, i) = (sh.n, sh.o, sh.i);
        let s = w.split;
        let mut prm = ffi::camex_curvature_params {
            dtype: T::CODE,
            n: n as i64,
            o: o as i64,
            i: i as i64,
            r: if kron { sh.r as i64 } else { 0 },
            o1: s.o1 as i64,
            o2: s.o2 as i64,
            i1: s.i1 as i64,
            i2: s.i2 as i64,
            base: p(&w.base.1),
            experts: p(&w.experts.1),
            ..Default::default()
        };
        if kron {
            prm.factor_a = p(&w.factors[0].1);
            prm.factor_b = p(&w.factors[1].1);
            prm.factor_c = p(&w.factors[2].1);
            prm.factor_d = p(&w.factors[3].1);
        }
        // SAFETY: host-side size computation, then host buffers of the implied sizes (emulation).
        let ws = vec![0u8; unsafe { ffi::camex_curvature_workspace(&prm, 0) } as usize + 1];
        let curved = nan::<T>(n * o * i);
        let mut f = prm;
        f.curved = p(&curved);
        f.workspace = p(&ws);
        f.workspace_bytes = ws.len() as i64;
        ok(
            unsafe { ffi::camex_curvature_forward(&f, stream()) },
            "curvature",
        );
        let fr: Vec<&HostTensor<f64>> = w.factors.iter().map(|f| &f.0).collect();
        let kr = kron.then(|| kron_ref(sh, [fr[0], fr[1], fr[2], fr[3]]));
        let low = official::<T>(3.0 * curv_work(sh, kron));
        let (bd, ed) = (w.base.0.data(), w.experts.0.data());
        let want = cpu::curvature(&w.base.0, &w.experts.0, &w.curv(kron)).unwrap();
        let oc = low.then(|| off::curvature(&T::q, bd, ed, kr.as_ref(), n));
        cmp(
            &format!("curvature kron={kron}"),
            &curved,
            &want,
            oc.as_ref(),
        );

        let mut rng = Rng(77);
        let gc = host::<T>(&rng.tensor(&[n, o, i], 1.0));
        let ws = vec![0u8; unsafe { ffi::camex_curvature_workspace(&prm, 1) } as usize + 1];
        let gb = nan::<T>(o * i);
        let ge = nan::<T>(n * o * i);
        let gfs: Vec<Vec<T>> = w.factors.iter().map(|f| nan::<T>(f.0.len())).collect();
        let mut b = prm;
        b.grad_curved = p(&gc.1);
        b.grad_base = p(&gb);
        b.grad_experts = p(&ge);
        if kron {
            b.grad_factor_a = p(&gfs[0]);
            b.grad_factor_b = p(&gfs[1]);
            b.grad_factor_c = p(&gfs[2]);
            b.grad_factor_d = p(&gfs[3]);
        }
        b.workspace = p(&ws);
        b.workspace_bytes = ws.len() as i64;
        ok(
            unsafe { ffi::camex_curvature_backward(&b, stream()) },
            "curvature_backward",
        );
        let want = cpu::curvature_backward(&w.base.0, &w.experts.0, &w.curv(kron), &gc.0).unwrap();
        let ob = low.then(|| off::curvature_backward(&T::q, bd, ed, kr.as_ref(), n, gc.0.data()));
        let ob = ob.as_ref();
        cmp(
            "curvature_backward grad_base",
            &gb,
            &want.grad_base,
            ob.map(|b| &b.0),
        );
        cmp(
            "curvature_backward grad_experts",
            &ge,
            &want.grad_experts,
            ob.map(|b| &b.1),
        );
        if let Some(wf) = &want.factors {
            let o = |k: usize| ob.and_then(|b| b.2.as_ref()).map(|f| &f[k]);
            cmp(
                "curvature_backward grad_factor_a",
                &gfs[0],
                &wf.grad_factor_a,
                o(0),
            );
            cmp(
                "curvature_backward grad_factor_b",
                &gfs[1],
                &wf.grad_factor_b,
                o(1),
            );
            cmp(
                "curvature_backward grad_factor_c",
                &gfs[2],
                &wf.grad_factor_c,
                o(2),
            );
            cmp(
                "curvature_backward grad_factor_d",
                &gfs[3],
                &wf.grad_factor_d,
                o(3),
            );
        }
    }

    #[test]
    fn emu_curvature_matches_cpu() {
        if !on("emu_curvature_matches_cpu") {
            return;
        }
        for sh in small_shapes() {
            for kron in [false, true] {
                curvature_case::<f32>(sh, kron);
                curvature_case::<f16>(sh, kron);
                curvature_case::<bf16>(sh, kron);
            }
        }
    }

    /// A factor over 64 (O = 67 = 1 x 67; I = 80 = 8 x 10) sends the Kronecker curvature to the
    /// chain of mode products, whose strided GEMMs run on the tensor cores with f32 intermediates
    /// (`kernels/gemm.cuh`, which keeps their hi/lo split): both SPEC bounds, forward and backward.
    #[test]
    fn emu_kron_chain_on_tensor_cores() {
        if !on("emu_kron_chain_on_tensor_cores") {
            return;
        }
        let sh = Sh {
            n: 2,
            o: 67,
            i: 80,
            r: 2,
            g: 2,
        };
        curvature_case::<bf16>(sh, true);
        curvature_case::<f16>(sh, true);
    }

    /// T5-base `wi`'s factor sizes (48 x 64 | 24 x 32), one expert and one rank, through the
    /// tensor-core forward and the fused backward: their shared-memory layouts at the largest
    /// footprint that matters (the rows-side backward, 193 KiB in bf16 and 209 KiB in f16, of
    /// sm_90's 227 KiB); and `wo`'s (24 x 32 | 48 x 64), where the columns side takes 4 rows a block.
    #[test]
    fn emu_tensor_core_t5_base_dims() {
        if !on("emu_tensor_core_t5_base_dims") {
            return;
        }
        let wi = Sh {
            n: 1,
            o: 3072,
            i: 768,
            r: 1,
            g: 1,
        };
        curvature_case::<bf16>(wi, true);
        curvature_case::<f16>(wi, true);
        let wo = Sh {
            o: 768,
            i: 3072,
            ..wi
        };
        curvature_case::<bf16>(wo, true);
    }

    #[test]
    fn emu_ties_mask_matches_cpu() {
        if !on("emu_ties_mask_matches_cpu") {
            return;
        }
        for sh in small_shapes() {
            for mask in [
                Mask::None,
                Mask::TiesSign,
                Mask::TiesTrim(0.3),
                Mask::TiesTrim(1.0),
                Mask::TiesTrim(1e-9),
            ] {
                let w = host_weights::<f32>(sh, 2);
                let (kind, k) = mask_code(mask);
                let mut prm = ffi::camex_mask_params {
                    dtype: f32::CODE,
                    n: sh.n as i64,
                    o: sh.o as i64,
                    i: sh.i as i64,
                    base: p(&w.base.1),
                    experts: p(&w.experts.1),
                    mask_kind: kind,
                    trim_k: k,
                    ..Default::default()
                };
                // SAFETY: size query, then host buffers of the implied sizes (emulation).
                let ws = vec![0u8; unsafe { ffi::camex_mask_workspace(&prm) } as usize + 1];
                let out = nan::<f32>(sh.n * sh.o * sh.i);
                prm.mask = p(&out);
                prm.workspace = p(&ws);
                prm.workspace_bytes = ws.len() as i64;
                ok(unsafe { ffi::camex_ties_mask(&prm, stream()) }, "ties_mask");
                let want = cpu::ties_mask(&w.base.0, &w.experts.0, mask).unwrap();
                let got: Vec<f64> = out.iter().map(|&x| x as f64).collect();
                assert_eq!(got, want.data(), "emu ties_mask {mask:?} {sh:?}");
            }
        }
    }

    #[test]
    fn emu_merge_matches_cpu() {
        if !on("emu_merge_matches_cpu") {
            return;
        }
        for sh in small_shapes() {
            for dare in dares() {
                for (with_mask, bias) in [(false, false), (true, true)] {
                    let w = host_weights::<f32>(sh, 3);
                    let (n, o, i, g) = (sh.n, sh.o, sh.i, sh.g);
                    let mut rng = Rng(99);
                    let curved = host::<f32>(&rng.tensor(&[n, o, i], 2.0));
                    let mask = host::<f32>(&HostTensor::from_fn(&[n, o, i], |_| {
                        (rng.next() % 2) as f64
                    }));
                    let alpha = 0.75;
                    let ci = cpu::MergeInputs {
                        base: &w.base.0,
                        curved: &curved.0,
                        scores: &w.scores.0,
                        mask: with_mask.then_some(&mask.0),
                        base_bias: bias.then_some(&w.base_bias.0),
                        expert_bias: bias.then_some(&w.expert_bias.0),
                    };
                    let mut prm = ffi::camex_merge_params {
                        dtype: f32::CODE,
                        g: g as i64,
                        n: n as i64,
                        o: o as i64,
                        i: i as i64,
                        base: p(&w.base.1),
                        curved: p(&curved.1),
                        scores: p(&w.scores.1),
                        mask: if with_mask { p(&mask.1) } else { 0 },
                        alpha,
                        dare: dare_code(&dare),
                        ..Default::default()
                    };
                    if bias {
                        prm.base_bias = p(&w.base_bias.1);
                        prm.expert_bias = p(&w.expert_bias.1);
                    }
                    let merged = nan::<f32>(g * o * i);
                    let mb = nan::<f32>(g * o);
                    let mut f = prm;
                    f.merged = p(&merged);
                    f.merged_bias = if bias { p(&mb) } else { 0 };
                    // SAFETY: host buffers of the implied sizes (emulation).
                    ok(unsafe { ffi::camex_merge_forward(&f, stream()) }, "merge");
                    let want = cpu::merge(&ci, alpha, &dare).unwrap();
                    cmp("merge merged", &merged, &want.merged, None);
                    if let Some(wb) = &want.merged_bias {
                        cmp("merge merged_bias", &mb, wb, None);
                    }
                    let gm = host::<f32>(&rng.tensor(&[g, o, i], 1.0));
                    let gmb = host::<f32>(&rng.tensor(&[g, o], 1.0));
                    let ws = vec![0u8; unsafe { ffi::camex_merge_workspace(&prm, 1) } as usize + 1];
                    let (gb, gc, gs, ga) = (
                        nan::<f32>(o * i),
                        nan::<f32>(n * o * i),
                        nan::<f32>(g * n),
                        nan::<f32>(1),
                    );
                    let (gbb, geb) = (nan::<f32>(o), nan::<f32>(n * o));
                    let mut b = prm;
                    b.grad_merged = p(&gm.1);
                    b.grad_merged_bias = if bias { p(&gmb.1) } else { 0 };
                    b.grad_base = p(&gb);
                    b.grad_curved = p(&gc);
                    b.grad_scores = p(&gs);
                    b.grad_alpha = p(&ga);
                    if bias {
                        b.grad_base_bias = p(&gbb);
                        b.grad_expert_bias = p(&geb);
                    }
                    b.workspace = p(&ws);
                    b.workspace_bytes = ws.len() as i64;
                    ok(
                        unsafe { ffi::camex_merge_backward(&b, stream()) },
                        "merge_backward",
                    );
                    let want =
                        cpu::merge_backward(&ci, alpha, &dare, &gm.0, bias.then_some(&gmb.0))
                            .unwrap();
                    let (s_alpha, s_scores) = oracle::merge_backward_scales(
                        dims(sh),
                        curved.0.data(),
                        w.scores.0.data(),
                        with_mask.then_some(mask.0.data()),
                        bias.then_some((w.base_bias.0.data(), w.expert_bias.0.data())),
                        alpha,
                        dare_ref(&dare),
                        gm.0.data(),
                        bias.then_some(gmb.0.data()),
                    );
                    cmp("merge_backward grad_base", &gb, &want.grad_base, None);
                    cmp("merge_backward grad_curved", &gc, &want.grad_curved, None);
                    cmp_sums(
                        "merge_backward grad_scores",
                        &gs,
                        want.grad_scores.data(),
                        &s_scores,
                    );
                    cmp_sums(
                        "merge_backward grad_alpha",
                        &ga,
                        &[want.grad_alpha],
                        &[s_alpha],
                    );
                    if bias {
                        cmp(
                            "merge_backward grad_base_bias",
                            &gbb,
                            want.grad_base_bias.as_ref().unwrap(),
                            None,
                        );
                        cmp(
                            "merge_backward grad_expert_bias",
                            &geb,
                            want.grad_expert_bias.as_ref().unwrap(),
                            None,
                        );
                    }
                }
            }
        }
    }

    fn emu_linear_case<T: Dt>(g: usize, t: usize, o: usize, i: usize, bias: bool) {
        let mut rng = Rng(g as u64 * 1000 + t as u64 + 1);
        let x = host::<T>(&rng.tensor(&[g, t, i], 1.0));
        let m = host::<T>(&rng.tensor(&[g, o, i], 1.0));
        let bb = host::<T>(&rng.tensor(&[g, o], 1.0));
        let dy = host::<T>(&rng.tensor(&[g, t, o], 1.0));
        let y = nan::<T>(g * t * o);
        let (gx, gw, gbias) = (nan::<T>(g * t * i), nan::<T>(g * o * i), nan::<T>(g * o));
        let prm = ffi::camex_linear_params {
            dtype: T::CODE,
            g: g as i64,
            t: t as i64,
            o: o as i64,
            i: i as i64,
            x: p(&x.1),
            merged: p(&m.1),
            merged_bias: if bias { p(&bb.1) } else { 0 },
            y: p(&y),
            grad_y: p(&dy.1),
            grad_x: p(&gx),
            grad_merged: p(&gw),
            grad_merged_bias: if bias { p(&gbias) } else { 0 },
        };
        // SAFETY: host buffers of the implied sizes (emulation).
        ok(
            unsafe { ffi::camex_linear_forward(&prm, stream()) },
            "linear",
        );
        ok(
            unsafe { ffi::camex_linear_backward(&prm, stream()) },
            "linear_backward",
        );
        let (fo, bo) = linear_official::<T>(g, t, o, i, &x.0, &m.0, bias.then_some(&bb.0), &dy.0);
        let want = cpu::merged_linear(&x.0, &m.0, bias.then_some(&bb.0)).unwrap();
        cmp("merged_linear y", &y, &want, fo.as_ref());
        let want = cpu::merged_linear_backward(&x.0, &m.0, bias.then_some(&bb.0), &dy.0).unwrap();
        let bo = bo.as_ref();
        cmp("merged_linear grad_x", &gx, &want.grad_x, bo.map(|b| &b.0));
        cmp(
            "merged_linear grad_merged",
            &gw,
            &want.grad_merged,
            bo.map(|b| &b.1),
        );
        if let Some(wb) = &want.grad_merged_bias {
            let ob = bo.map(|b| &b.2);
            cmp("merged_linear grad_merged_bias", &gbias, wb, ob);
        }
    }

    #[test]
    fn emu_linear_dynamic_segment_match_cpu() {
        if !on("emu_linear_dynamic_segment_match_cpu") {
            return;
        }
        for (g, t, o, i) in [(1, 1, 1, 1), (3, 5, 7, 9), (2, 67, 130, 70)] {
            for bias in [false, true] {
                emu_linear_case::<f32>(g, t, o, i, bias);
                // f16/bf16 run the GEMMs on the tensor-core kernel (on in the emulation build).
                emu_linear_case::<f16>(g, t, o, i, bias);
                emu_linear_case::<bf16>(g, t, o, i, bias);
            }
        }
        for sh in small_shapes() {
            let mut rng = Rng(555);
            let (n, o, i) = (sh.n, sh.o, sh.i);
            let base = host::<f32>(&rng.tensor(&[o, i], 2.0));
            let curved = host::<f32>(&rng.tensor(&[n, o, i], 2.0));
            let gnb = host::<f32>(&rng.tensor(&[o, i], 1.0));
            let beta = 0.7;
            let nb = nan::<f32>(o * i);
            let (gb, gc, gbeta) = (nan::<f32>(o * i), nan::<f32>(n * o * i), nan::<f32>(1));
            let mut prm = ffi::camex_dynamic_params {
                dtype: f32::CODE,
                n: n as i64,
                o: o as i64,
                i: i as i64,
                base: p(&base.1),
                curved: p(&curved.1),
                beta,
                next_base: p(&nb),
                grad_next_base: p(&gnb.1),
                grad_base: p(&gb),
                grad_curved: p(&gc),
                grad_beta: p(&gbeta),
                ..Default::default()
            };
            // SAFETY: size query, then host buffers of the implied sizes (emulation).
            let ws = vec![0u8; unsafe { ffi::camex_dynamic_workspace(&prm) } as usize + 1];
            prm.workspace = p(&ws);
            prm.workspace_bytes = ws.len() as i64;
            ok(
                unsafe { ffi::camex_dynamic_forward(&prm, stream()) },
                "dynamic",
            );
            ok(
                unsafe { ffi::camex_dynamic_backward(&prm, stream()) },
                "dynamic_backward",
            );
            cmp(
                "dynamic_merge",
                &nb,
                &cpu::dynamic_merge(&base.0, &curved.0, beta).unwrap(),
                None,
            );
            let want = cpu::dynamic_merge_backward(&base.0, &curved.0, beta, &gnb.0).unwrap();
            cmp("dynamic grad_base", &gb, &want.grad_base, None);
            cmp("dynamic grad_curved", &gc, &want.grad_curved, None);
            cmp_sums(
                "dynamic grad_beta",
                &gbeta,
                &[want.grad_beta],
                &[oracle::beta_scale(curved.0.data(), n, gnb.0.data())],
            );
        }
        for (b, j, n) in [(1, 1, 1), (8, 4, 7), (3, 5, 9)] {
            let mut rng = Rng(31);
            let r = host::<f32>(&rng.tensor(&[b, j, n], 1.0));
            let (s, gr) = (nan::<f32>(b * j * n), nan::<f32>(b * j * n));
            let prm = ffi::camex_segment_params {
                dtype: f32::CODE,
                b: b as i64,
                j: j as i64,
                n: n as i64,
                router_scores: p(&r.1),
                scores: p(&s),
                grad_scores: p(&r.1),
                grad_router_scores: p(&gr),
            };
            // SAFETY: host buffers of the implied sizes (emulation).
            ok(
                unsafe { ffi::camex_segment_forward(&prm, stream()) },
                "segment",
            );
            ok(
                unsafe { ffi::camex_segment_backward(&prm, stream()) },
                "segment_backward",
            );
            let want = cpu::segment_scores(&r.0).unwrap();
            assert_eq!(s.iter().map(|&x| x as f64).collect::<Vec<_>>(), want.data());
            let want = cpu::segment_scores_backward(&r.0).unwrap();
            assert_eq!(
                gr.iter().map(|&x| x as f64).collect::<Vec<_>>(),
                want.data()
            );
        }
    }

    #[test]
    fn emu_philox_known_answers() {
        if !on("emu_philox_known_answers") {
            return;
        }
        let ctr: Vec<u32> = vec![0, 0, 0, 0, u32::MAX, u32::MAX, u32::MAX, u32::MAX];
        let key: Vec<u32> = vec![0, 0, u32::MAX, u32::MAX];
        let out = vec![0u32; 8];
        // SAFETY: host buffers of 2 counters (emulation).
        ok(
            unsafe { ffi::camex_philox_test(p(&ctr), p(&key), p(&out), 2, stream()) },
            "philox",
        );
        assert_eq!(&out[..4], &[0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(&out[4..], &[0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
    }
}
