//! Helpers shared by the GPU tests (tests/gpu.rs) and the emulation tests (tests/emu.rs): the
//! deterministic data, the dtypes' bounds (SPEC section 5), the oracle glue, the shapes.

// Each of the two test targets uses a part.
#![allow(dead_code)]

#[path = "../oracle/mod.rs"]
pub mod oracle;

pub use camex::cpu;
pub use camex::cuda::{self, CudaTensor, Element};
pub use camex::{Dare, HostTensor, Mask, MergeOptions, Split};
pub use half::{bf16, f16};
pub use oracle::official as off;
pub use oracle::{CaRefIn, DareRef, Dims, KronRef, MaskRef, Split4};
pub use std::sync::Arc;

pub type Stream = Arc<cuda::Stream>;

pub fn gpu(test: &str) -> Option<Gpu> {
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
pub struct Gpu {
    pub stream: Stream,
    pub test: String,
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

pub fn mismatch(msg: String) {
    println!("FAIL {msg}");
    MISMATCHES.with(|m| m.set(m.get() + 1));
}

/// Deterministic data: multiples of 2^-10 in [-lim, lim], so that tau = W - E and the sums of the
/// TIES votes are exact in f32 and the masks of the f32 kernels equal the f64 oracle's.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn dyadic(&mut self, lim: f64) -> f64 {
        let k = (lim * 1024.0) as i64;
        let r = (self.next() % (2 * k as u64 + 1)) as i64 - k;
        r as f64 / 1024.0
    }
    pub fn tensor(&mut self, shape: &[usize], lim: f64) -> HostTensor<f64> {
        HostTensor::from_fn(shape, |_| self.dyadic(lim))
    }
}

pub trait Dt: Element + std::fmt::Debug {
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
pub fn official<T: Dt>(work: f64) -> bool {
    T::LOW && work <= 2e9
}

/// Multiply-adds of the official curvature (forward) at a shape.
pub fn curv_work(sh: Sh, kron: bool) -> f64 {
    let s = Split::default_for(sh.o, sh.i);
    let k = if kron {
        (s.o1 + s.o2 + s.i1 + s.i2) as f64
    } else {
        1.0
    };
    (sh.n * sh.r.max(1) * sh.o * sh.i) as f64 * k
}

pub fn dims(sh: Sh) -> Dims {
    Dims {
        g: sh.g,
        n: sh.n,
        o: sh.o,
        i: sh.i,
    }
}

pub fn kron_ref(sh: Sh, f: [&HostTensor<f64>; 4]) -> KronRef {
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

pub fn mask_ref(m: Mask) -> MaskRef {
    match m {
        Mask::None => MaskRef::None,
        Mask::TiesSign => MaskRef::Sign,
        Mask::TiesTrim(k) => MaskRef::Trim(k),
    }
}

pub fn dare_ref(d: &Dare) -> DareRef {
    match *d {
        Dare::None => DareRef::None,
        Dare::Expert { p, seed } => DareRef::Expert { p, seed },
        Dare::Element { p, seed } => DareRef::Element { p, seed },
    }
}

/// SPEC section 5 on one tensor output: bound 1, rel_err <= tol, and, given the official
/// formulation's result in the dtype (E_off its error), bound 2, rel_err <= 2 E_off + 1e-6. Prints
/// the RESULT line; returns the failure, if any. NaN fails.
pub fn judge<T: Dt>(
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
pub fn judge_sums<T: Dt>(op: &str, got: &[f64], want: &[f64], scales: &[f64]) -> Option<String> {
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
pub fn put<T: Dt>(s: &Stream, t: &HostTensor<f64>) -> (HostTensor<f64>, CudaTensor<T>) {
    let ts: HostTensor<T> = t.map(|v| T::from_f32(v as f32));
    let back = ts.map(|v| v.to_f32() as f64);
    (back, CudaTensor::upload(s, &ts).expect("upload"))
}

pub fn get<T: Dt>(s: &Stream, t: &CudaTensor<T>) -> HostTensor<f64> {
    t.download(s).expect("download").map(|v| v.to_f32() as f64)
}

pub fn bits<T: Dt>(s: &Stream, t: &CudaTensor<T>) -> Vec<u32> {
    t.download(s)
        .expect("download")
        .data()
        .iter()
        .map(|v| v.to_f32().to_bits())
        .collect()
}

/// Relative Frobenius error (absolute when the reference is zero); NaN anywhere fails.
pub fn rel_err(got: &HostTensor<f64>, want: &HostTensor<f64>) -> f64 {
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
pub fn close<T: Dt>(
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
pub fn close_sums<T: Dt>(
    s: &Stream,
    what: &str,
    got: &CudaTensor<T>,
    want: &[f64],
    scales: &[f64],
) {
    if let Some(m) = judge_sums::<T>(what, get(s, got).data(), want, scales) {
        mismatch(m);
    }
}

pub fn same_bits<T: Dt>(s: &Stream, what: &str, a: &CudaTensor<T>, b: &CudaTensor<T>) {
    if bits(s, a) != bits(s, b) {
        mismatch(format!("{what} [{}]: two runs differ", T::NAME));
    }
}

// ---- shapes ----

#[derive(Clone, Copy, Debug)]
pub struct Sh {
    pub n: usize,
    pub o: usize,
    pub i: usize,
    pub r: usize,
    pub g: usize,
}

pub fn shapes() -> Vec<Sh> {
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

pub fn t5() -> bool {
    !std::env::var("CAMEX_SKIP_T5").is_ok_and(|v| v == "1")
}

pub struct Weights<T> {
    pub base: (HostTensor<f64>, CudaTensor<T>),
    pub experts: (HostTensor<f64>, CudaTensor<T>),
    pub scores: (HostTensor<f64>, CudaTensor<T>),
    pub factors: [(HostTensor<f64>, CudaTensor<T>); 4],
    pub base_bias: (HostTensor<f64>, CudaTensor<T>),
    pub expert_bias: (HostTensor<f64>, CudaTensor<T>),
}

pub fn weights<T: Dt>(s: &Stream, sh: Sh, seed: u64) -> Weights<T> {
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

/// The f64 halves of the four (host, storage) factor pairs as the CPU curvature, or the identity;
/// shared by the GPU tests' weights and the emulation tests' host-only ones.
pub fn host_curv<X>(factors: &[(HostTensor<f64>, X)], kron: bool) -> cpu::Curvature<'_, f64> {
    if kron {
        cpu::Curvature::Kronecker(cpu::Factors {
            a: &factors[0].0,
            b: &factors[1].0,
            c: &factors[2].0,
            d: &factors[3].0,
        })
    } else {
        cpu::Curvature::Identity
    }
}

impl<T: Dt> Weights<T> {
    pub fn cpu_curv(&self, kron: bool) -> cpu::Curvature<'_, f64> {
        host_curv(&self.factors, kron)
    }
    pub fn gpu_curv(&self, kron: bool) -> cuda::CudaCurvature<'_, T> {
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

// ---- cases shared by the GPU and emulation tests ----

pub fn dares() -> [Dare; 3] {
    [
        Dare::None,
        Dare::Expert { p: 0.3, seed: 7 },
        Dare::Element {
            p: 0.1,
            seed: 0xDEAD_BEEF_0123,
        },
    ]
}

/// What a CA-merge case needs beyond the f64 reference: the oracle's TIES mask and Kronecker
/// factors, for the official formulation in T (bound 2, when `low`) and the S of the cancelling sums.
pub struct CaOff {
    pub kr: Option<KronRef>,
    pub mask: Vec<f64>,
    pub low: bool,
}

pub fn ca_off<T: Dt>(
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
    pub fn input<'a>(
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
    pub fn scales(
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

pub fn ca_options() -> Vec<(MergeOptions, bool)> {
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

/// The merged linear layer's official results in T (forward y; backward grad_x, grad_merged,
/// grad_merged_bias), when bound 2 applies.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn linear_official<T: Dt>(
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

/// The curvature op's FFI parameters over host buffers (the emulation's "device" memory, where
/// tests call the kernels' C entry points directly): `factors` = Some([A, B, C, D]) for the
/// Kronecker curvature, None for the identity. Outputs and workspace are the caller's to set.
pub fn curvature_params<T: Dt>(
    sh: Sh,
    split: Split,
    base: &[T],
    experts: &[T],
    factors: Option<[&[T]; 4]>,
) -> camex::ffi::camex_curvature_params {
    let ptr = |v: &[T]| v.as_ptr() as u64;
    let mut prm = camex::ffi::camex_curvature_params {
        dtype: T::CODE,
        n: sh.n as i64,
        o: sh.o as i64,
        i: sh.i as i64,
        r: if factors.is_some() { sh.r as i64 } else { 0 },
        o1: split.o1 as i64,
        o2: split.o2 as i64,
        i1: split.i1 as i64,
        i2: split.i2 as i64,
        base: ptr(base),
        experts: ptr(experts),
        ..Default::default()
    };
    if let Some([a, b, c, d]) = factors {
        prm.factor_a = ptr(a);
        prm.factor_b = ptr(b);
        prm.factor_c = ptr(c);
        prm.factor_d = ptr(d);
    }
    prm
}
