//! The same kernels and launchers run through the CPU emulation of kernels/emu.h (build with
//! `CAMEX_KERNEL_EMU=1`; "device" pointers are then host pointers, so these tests call the FFI
//! directly). They check the kernels' indexing, tiling, reductions and orchestration against the
//! CPU path where no GPU exists; with GPU-built kernels they skip.
//!
//! `CAMEX_KERNEL_EMU=1 cargo test --release --features cuda --test emu` (a few minutes).
#![cfg(feature = "cuda")]

mod emu_alloc;
mod gpu_common;

use camex::ffi;
use gpu_common::*;

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
    let back = HostTensor::new(t.shape(), v.iter().map(|x| x.to_f32() as f64).collect()).unwrap();
    (back, v)
}

fn p<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

fn opt<T>(v: &Option<Vec<T>>) -> u64 {
    v.as_ref().map_or(0, |v| p(v))
}

/// A workspace of `bytes` (one more, for the launchers' alignment), every byte 0xFF (NaN in every
/// dtype): on a GPU a workspace is uninitialised (often recycled) memory, so a kernel reading scratch
/// it did not write gets NaN here instead of a lucky zero.
fn scratch(bytes: i64) -> Vec<u8> {
    vec![0xFF; bytes as usize + 1]
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
        host_curv(&self.factors, kron)
    }
}

/// A CA-merge call's parameters for the weights `w` at shape `sh` (the factors where `kron`; no
/// biases, outputs or workspace yet).
fn ca_params<T: Dt>(
    sh: Sh,
    w: &HostW<T>,
    kron: bool,
    opts: &MergeOptions,
) -> ffi::camex_ca_merge_params {
    let s = w.split;
    let (mask_kind, trim_k) = mask_code(opts.mask);
    let mut prm = ffi::camex_ca_merge_params {
        dtype: T::CODE,
        g: sh.g as i64,
        n: sh.n as i64,
        o: sh.o as i64,
        i: sh.i as i64,
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
    prm
}

/// The backward's gradients as bits: those that do not read U, then those that do (its first pass,
/// U recomputed).
type GradBits = (Vec<Vec<u32>>, Vec<Vec<u32>>);
/// One CA-merge case, forward and backward, at a shape.
type Case = fn(Sh) -> GradBits;

fn ca_case<T: Dt>(sh: Sh, kron: bool, opts: MergeOptions, bias: bool) -> GradBits {
    let w = host_weights::<T>(sh, 4);
    let (n, o, i, g) = (sh.n, sh.o, sh.i, sh.g);
    let mut prm = ca_params(sh, &w, kron, &opts);
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
    let ws = scratch(unsafe { ffi::camex_ca_merge_workspace(&prm, 0) });
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
    // Twice where the forward gave U: recomputing it, then given it (the tape's case).
    type Bits = Vec<Vec<u32>>;
    let mut first: Option<(Bits, Bits)> = None;
    for given in [None]
        .into_iter()
        .chain(curved.as_ref().filter(|_| kron).map(Some))
    {
        let kept = if given.is_some() { " (U given)" } else { "" };
        let grad_base = nan::<T>(o * i);
        let grad_experts = nan::<T>(n * o * i);
        let grad_scores = nan::<T>(g * n);
        let grad_alpha = nan::<T>(1);
        let grad_beta = opts.beta.map(|_| nan::<T>(1));
        let gfs: Vec<Vec<T>> = w.factors.iter().map(|f| nan::<T>(f.0.len())).collect();
        let gbb = bias.then(|| nan::<T>(o));
        let geb = bias.then(|| nan::<T>(n * o));
        let mut b = prm;
        // The backward given the forward's U reads it; the workspace is sized for that (camex.h).
        b.curved = given.map_or(0, |u| p(u));
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
        // SAFETY: host-side size computation.
        let ws = scratch(unsafe { ffi::camex_ca_merge_workspace(&b, 1) });
        b.workspace = p(&ws);
        b.workspace_bytes = ws.len() as i64;
        // SAFETY: as above.
        ok(unsafe { ffi::camex_ca_merge_backward(&b, stream()) }, &tag);
        cmp(
            &format!("{tag}{kept} grad_base"),
            &grad_base,
            &want.grad_base,
            ob.map(|b| &b.grad_base),
        );
        cmp(
            &format!("{tag}{kept} grad_experts"),
            &grad_experts,
            &want.grad_experts,
            ob.map(|b| &b.grad_experts),
        );
        cmp_sums(
            &format!("{tag}{kept} grad_scores"),
            &grad_scores,
            want.grad_scores.data(),
            &s_scores,
        );
        cmp_sums(
            &format!("{tag}{kept} grad_alpha"),
            &grad_alpha,
            &[want.grad_alpha],
            &[s_alpha],
        );
        if let (Some(gb), Some(wb)) = (&grad_beta, want.grad_beta) {
            cmp_sums(&format!("{tag}{kept} grad_beta"), gb, &[wb], &[s_beta]);
        }
        if let Some(wf) = &want.factors {
            let o = |k: usize| ob.and_then(|b| b.factors.as_ref()).map(|f| &f[k]);
            cmp(
                &format!("{tag}{kept} grad_factor_a"),
                &gfs[0],
                &wf.grad_factor_a,
                o(0),
            );
            cmp(
                &format!("{tag}{kept} grad_factor_b"),
                &gfs[1],
                &wf.grad_factor_b,
                o(1),
            );
            cmp(
                &format!("{tag}{kept} grad_factor_c"),
                &gfs[2],
                &wf.grad_factor_c,
                o(2),
            );
            cmp(
                &format!("{tag}{kept} grad_factor_d"),
                &gfs[3],
                &wf.grad_factor_d,
                o(3),
            );
        }
        if let (Some(g1), Some(w1)) = (&gbb, &want.grad_base_bias) {
            let o = ob.and_then(|b| b.grad_base_bias.as_ref());
            cmp(&format!("{tag}{kept} grad_base_bias"), g1, w1, o);
        }
        if let (Some(g1), Some(w1)) = (&geb, &want.grad_expert_bias) {
            let o = ob.and_then(|b| b.grad_expert_bias.as_ref());
            cmp(&format!("{tag}{kept} grad_expert_bias"), g1, w1, o);
        }
        // The gradients that do not read U are the same bits either way; those that do (scores,
        // alpha, beta) are held to the bounds above, and in f32 (U stored exactly) are the same
        // bits too.
        let bits = |v: &[T]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<u32>>();
        let u_free: Vec<Vec<u32>> = [&grad_base, &grad_experts]
            .into_iter()
            .chain(&gfs)
            .chain(gbb.iter().chain(&geb))
            .map(|v| bits(v))
            .collect();
        let u_read: Vec<Vec<u32>> = [&grad_scores, &grad_alpha]
            .into_iter()
            .chain(&grad_beta)
            .map(|v| bits(v))
            .collect();
        match &first {
            Some((f, r)) => {
                assert_eq!(
                    f, &u_free,
                    "emu {tag}: U given changed a gradient that does not read U"
                );
                if !T::LOW {
                    assert_eq!(r, &u_read, "emu {tag}: U given changed f32 gradients' bits");
                }
            }
            None => first = Some((u_free, u_read)),
        }
    }
    first.expect("the backward ran")
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

/// NaN and Inf inputs (a NaN in the base, in an expert or in a score; +Inf and -Inf in two experts)
/// give non-finite outputs exactly where the CPU path's are, forward and backward, in every dtype
/// (f16 and bf16 on the tensor cores), every mask, with and without curvature: SPEC section 5, a NaN
/// or Inf propagates to the outputs it touches and never hides. NaN and Inf are not told apart
/// (Inf - Inf is NaN on either side, in whatever order its terms are summed).
#[test]
fn emu_non_finite_inputs_propagate_like_the_cpu_path() {
    if !on("emu_non_finite_inputs_propagate_like_the_cpu_path") {
        return;
    }
    let sh = Sh {
        n: 3,
        o: 12,
        i: 20,
        r: 2,
        g: 3,
    };
    for kron in [false, true] {
        for mask in [Mask::None, Mask::TiesSign, Mask::TiesTrim(0.5)] {
            for which in 0..4 {
                non_finite_case::<f32>(sh, kron, mask, which);
                non_finite_case::<f16>(sh, kron, mask, which);
                non_finite_case::<bf16>(sh, kron, mask, which);
            }
        }
    }
}

/// Whether `got` (the kernels') and `want` (the CPU path's) are non-finite at the same elements.
fn same_non_finite<T: Dt>(what: &str, got: &[T], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&k| got[k].to_f32().is_finite() != want[k].is_finite())
        .collect();
    let nf = want.iter().filter(|x| !x.is_finite()).count();
    assert!(
        bad.is_empty(),
        "emu {what}: finite on one side only at {} of {} elements (first {:?}; the CPU path has {nf} non-finite)",
        bad.len(),
        got.len(),
        &bad[..bad.len().min(8)]
    );
}

fn non_finite_case<T: Dt>(sh: Sh, kron: bool, mask: Mask, which: usize) {
    let mut w = host_weights::<T>(sh, 11);
    let (n, o, i, g) = (sh.n, sh.o, sh.i, sh.g);
    let at = 2 * i + 3; // element (2, 3) of a weight
    let poke = |t: &HostTensor<f64>, ks: &[(usize, f64)]| {
        host::<T>(&HostTensor::from_fn(t.shape(), |k| {
            ks.iter().find(|x| x.0 == k).map_or(t.data()[k], |x| x.1)
        }))
    };
    let what = match which {
        0 => {
            w.base = poke(&w.base.0, &[(at, f64::NAN)]);
            "NaN in base"
        }
        1 => {
            w.experts = poke(&w.experts.0, &[(o * i + at, f64::NAN)]);
            "NaN in expert 1"
        }
        2 => {
            w.scores = poke(&w.scores.0, &[(n + 1, f64::NAN)]);
            "NaN in scores[1, 1]"
        }
        _ => {
            let ks = [(at, f64::INFINITY), (2 * o * i + at, f64::NEG_INFINITY)];
            w.experts = poke(&w.experts.0, &ks);
            "+Inf and -Inf in experts 0 and 2"
        }
    };
    let tag = format!("{} {what}, kron={kron} mask={mask:?}", T::NAME);
    let opts = MergeOptions {
        mask,
        ..MergeOptions::default()
    };
    let prm = ca_params(sh, &w, kron, &opts);
    let ci = cpu::CaMergeInputs {
        base: &w.base.0,
        experts: &w.experts.0,
        scores: &w.scores.0,
        curvature: w.curv(kron),
        base_bias: None,
        expert_bias: None,
    };
    // SAFETY: host-side size computation.
    let ws = scratch(unsafe { ffi::camex_ca_merge_workspace(&prm, 0) });
    let merged = nan::<T>(g * o * i);
    let mut f = prm;
    f.merged = p(&merged);
    f.workspace = p(&ws);
    f.workspace_bytes = ws.len() as i64;
    // SAFETY: emulation build: every pointer is a live host buffer of the size the shapes imply.
    ok(unsafe { ffi::camex_ca_merge_forward(&f, stream()) }, &tag);
    let want = cpu::ca_merge(&ci, &opts).unwrap();
    same_non_finite(&format!("{tag} merged"), &merged, want.merged.data());
    assert!(
        want.merged.data().iter().any(|x| !x.is_finite()),
        "{tag}: the CPU path hides it"
    );
    let gm = host::<T>(&Rng(77).tensor(&[g, o, i], 1.0));
    let want = cpu::ca_merge_backward(&ci, &opts, &gm.0, None, None).unwrap();
    let grad_base = nan::<T>(o * i);
    let grad_experts = nan::<T>(n * o * i);
    let grad_scores = nan::<T>(g * n);
    let grad_alpha = nan::<T>(1);
    let gfs: Vec<Vec<T>> = w.factors.iter().map(|f| nan::<T>(f.0.len())).collect();
    let mut b = prm;
    b.grad_merged = p(&gm.1);
    b.grad_base = p(&grad_base);
    b.grad_experts = p(&grad_experts);
    b.grad_scores = p(&grad_scores);
    b.grad_alpha = p(&grad_alpha);
    if kron {
        b.grad_factor_a = p(&gfs[0]);
        b.grad_factor_b = p(&gfs[1]);
        b.grad_factor_c = p(&gfs[2]);
        b.grad_factor_d = p(&gfs[3]);
    }
    // SAFETY: host-side size computation.
    let ws = scratch(unsafe { ffi::camex_ca_merge_workspace(&b, 1) });
    b.workspace = p(&ws);
    b.workspace_bytes = ws.len() as i64;
    // SAFETY: as above.
    ok(unsafe { ffi::camex_ca_merge_backward(&b, stream()) }, &tag);
    same_non_finite(
        &format!("{tag} grad_base"),
        &grad_base,
        want.grad_base.data(),
    );
    same_non_finite(
        &format!("{tag} grad_experts"),
        &grad_experts,
        want.grad_experts.data(),
    );
    same_non_finite(
        &format!("{tag} grad_scores"),
        &grad_scores,
        want.grad_scores.data(),
    );
    same_non_finite(
        &format!("{tag} grad_alpha"),
        &grad_alpha,
        &[want.grad_alpha],
    );
    if let Some(wf) = &want.factors {
        let wants = [
            &wf.grad_factor_a,
            &wf.grad_factor_b,
            &wf.grad_factor_c,
            &wf.grad_factor_d,
        ];
        for (k, (got, want)) in gfs.iter().zip(wants).enumerate() {
            same_non_finite(&format!("{tag} grad_factor {k}"), got, want.data());
        }
    }
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
        // Without `curved`: the tensor-core forward then keeps U in storage T inside U's f32
        // workspace where one round takes every rank, and the backward recomputes U.
        ca_case::<bf16>(sh, true, ca_options()[5].0, false);
        ca_case::<f16>(sh, true, ca_options()[1].0, false);
    }
}

/// The backward's dots (grad_scores, grad_alpha, grad_beta) from H's one pass over the upstream
/// gradient (`h_dots_kernel`: bf16, no DARE or DARE per expert, N <= 8, G <= 32; `emu_counters`
/// checks which kernels run): groups filling part of one m tile of 16, one, one and part of the
/// second, and two; several chunks of 4096 elements, with an odd element count (single loads);
/// masks, the beta row, U given and recomputed (`ca_case` runs both). N = 9 and DARE per element
/// take `dots_kernel` beside it. Then the merge op's backward, with and without a mask tensor
/// (m_i U_i split into hi + lo).
#[test]
fn emu_dots_in_the_h_pass() {
    if !on("emu_dots_in_the_h_pass") {
        return;
    }
    let sh = |n, o, i, r, g| Sh { n, o, i, r, g };
    let shapes = [
        sh(3, 6, 10, 2, 2),
        sh(8, 12, 20, 2, 16),
        sh(4, 64, 130, 2, 17),
        sh(7, 65, 131, 1, 32),
        sh(9, 6, 10, 1, 3),
    ];
    let plain = MergeOptions {
        alpha: 0.9,
        mask: Mask::None,
        dare: Dare::None,
        beta: None,
        want_curved: false,
    };
    let ties = MergeOptions {
        alpha: -0.5,
        mask: Mask::TiesTrim(0.4),
        beta: Some(0.5),
        want_curved: true,
        ..plain
    };
    let expert = MergeOptions {
        dare: Dare::Expert { p: 0.3, seed: 9 },
        ..ties
    };
    for (k, s) in shapes.into_iter().enumerate() {
        ca_case::<bf16>(s, true, plain, false);
        ca_case::<bf16>(s, true, ties, true);
        if k % 2 == 0 {
            // (time: the emulation's slowest cases are the larger shapes)
            ca_case::<bf16>(s, true, expert, false);
        }
        for (with_mask, bias) in [(false, false), (true, true)] {
            merge_case::<bf16>(s, Dare::None, with_mask, bias);
        }
        merge_case::<bf16>(s, Dare::Expert { p: 0.3, seed: 9 }, true, false);
    }
    merge_case::<bf16>(shapes[0], Dare::Element { p: 0.25, seed: 5 }, true, false);
}

/// The rows-side backward in rank groups (`rows_bwd_groups`: one round of every rank, 2 to 4
/// groups per slab here), whose last group to arrive sums the slab's dtau over the groups in group
/// order: the gradients match the CPU within the bounds, and are the same bits when the blocks run
/// in reverse order (another group then arrives last).
#[test]
fn emu_rank_groups_sum_in_a_fixed_order() {
    if !on("emu_rank_groups_sum_in_a_fixed_order") {
        return;
    }
    let shapes = [
        Sh {
            n: 3,
            o: 6,
            i: 10,
            r: 8,
            g: 2,
        },
        Sh {
            n: 2,
            o: 12,
            i: 20,
            r: 4,
            g: 3,
        },
    ];
    for sh in shapes {
        let cases: [(&str, Case); 2] = [
            ("bf16", |sh| {
                ca_case::<bf16>(sh, true, ca_options()[10].0, false)
            }),
            ("f16", |sh| {
                ca_case::<f16>(sh, true, ca_options()[1].0, false)
            }),
        ];
        for (name, case) in cases {
            let ahead = case(sh);
            // SAFETY: a setting of this thread's emulated launches.
            let prev = unsafe { ffi::camex_emu_reverse_blocks(1) };
            let reversed = case(sh);
            unsafe { ffi::camex_emu_reverse_blocks(prev) };
            assert_eq!(
                ahead, reversed,
                "emu {name} {sh:?}: the gradients depend on the blocks' order"
            );
        }
    }
}

fn curvature_case<T: Dt>(sh: Sh, kron: bool) {
    let w = host_weights::<T>(sh, 1);
    let (n, o, i) = (sh.n, sh.o, sh.i);
    let fv: Vec<&[T]> = w.factors.iter().map(|f| f.1.as_slice()).collect();
    let factors = kron.then(|| [fv[0], fv[1], fv[2], fv[3]]);
    let prm = curvature_params(sh, w.split, &w.base.1, &w.experts.1, factors);
    // SAFETY: host-side size computation, then host buffers of the implied sizes (emulation).
    let ws = scratch(unsafe { ffi::camex_curvature_workspace(&prm, 0) });
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
    let ws = scratch(unsafe { ffi::camex_curvature_workspace(&prm, 1) });
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

/// The forward's two stages pipelined in bf16, where the next rank's operands come in by cp.async
/// while this rank's are multiplied: stage 2 (`kron_cols_kernel` under `cols_pipe`: Z's rows and
/// the factors C, D; i1 and i2 multiples of 8, I = 64 = 8 x 8, with a last block of rows partly past
/// O = 20) and stage 1 (`kron_rows_body` under `rows_pipe`: A and B; O = 64 = 8 x 8); and the
/// backward's columns side (`kron_cols_bwd_reg_kernel` under `cols_bwd_reg_pipe`: P's rows, at
/// I = 64). Rounds of two ranks and of one (R = 3; the CA-merge lends Z its output, the curvature
/// op has rounds of one). The emulation executes a cp.async only at the wait that covers it, so a
/// missing or early wait, or a buffer overwritten while it is read, changes the result.
#[test]
fn emu_pipelined_stages() {
    if !on("emu_pipelined_stages") {
        return;
    }
    for (o, i) in [(20, 64), (64, 16)] {
        let sh = Sh {
            n: 2,
            o,
            i,
            r: 3,
            g: 3,
        };
        ca_case::<bf16>(sh, true, ca_options()[10].0, false);
        ca_case::<bf16>(sh, true, ca_options()[5].0, false);
        curvature_case::<bf16>(sh, true);
    }
}

/// T5-base `wi`'s factor sizes (48 x 64 | 24 x 32), one expert and one rank, through the
/// tensor-core forward and the fused backward: their shared-memory layouts at the largest
/// footprint that matters (the rows-side backward, 193 KiB in bf16 and 209 KiB in f16, of
/// sm_90's 227 KiB); and `wo`'s (24 x 32 | 48 x 64), where the columns side takes 6 rows a block
/// under sm_90's limit and 4 under sm_80's (emu_counters.rs checks which path each limit takes).
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
    // SAFETY: a per-thread setting of the emulation, restored below.
    let prev = unsafe { ffi::camex_emu_smem_limit(163 * 1024) };
    curvature_case::<bf16>(wo, true);
    // SAFETY: as above.
    unsafe { ffi::camex_emu_smem_limit(prev) };
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
            let ws = scratch(unsafe { ffi::camex_mask_workspace(&prm) });
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
                merge_case::<f32>(sh, dare, with_mask, bias);
            }
        }
    }
}

/// The merge op forward and backward in T against the CPU (mask tensor and biases optional).
fn merge_case<T: Dt>(sh: Sh, dare: Dare, with_mask: bool, bias: bool) {
    let w = host_weights::<T>(sh, 3);
    let (n, o, i, g) = (sh.n, sh.o, sh.i, sh.g);
    let mut rng = Rng(99);
    let curved = host::<T>(&rng.tensor(&[n, o, i], 2.0));
    let mask = host::<T>(&HostTensor::from_fn(&[n, o, i], |_| {
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
        dtype: T::CODE,
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
    let merged = nan::<T>(g * o * i);
    let mb = nan::<T>(g * o);
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
    let gm = host::<T>(&rng.tensor(&[g, o, i], 1.0));
    let gmb = host::<T>(&rng.tensor(&[g, o], 1.0));
    let ws = scratch(unsafe { ffi::camex_merge_workspace(&prm, 1) });
    let (gb, gc, gs, ga) = (
        nan::<T>(o * i),
        nan::<T>(n * o * i),
        nan::<T>(g * n),
        nan::<T>(1),
    );
    let (gbb, geb) = (nan::<T>(o), nan::<T>(n * o));
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
    let want = cpu::merge_backward(&ci, alpha, &dare, &gm.0, bias.then_some(&gmb.0)).unwrap();
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
        let ws = scratch(unsafe { ffi::camex_dynamic_workspace(&prm) });
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
