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

mod gpu_common;
use gpu_common::*;

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
    let curved = got.curved;
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
    // Given the forward's U: the gradients that do not read U are the same bits; those that do
    // (scores, alpha, beta) are held to the bounds, and in f32 are the same bits too.
    let Some(u) = curved.filter(|_| kron) else {
        return;
    };
    let kept = cuda::ca_merge_backward_with_curved(
        s,
        &gi,
        &opts,
        &u,
        &gm.1,
        bias.then_some(&gmb.1),
        has_beta.then_some(&gnb.1),
    )
    .unwrap();
    let tag = format!("{tag} (U given)");
    same_bits(s, &tag, &got.grad_base, &kept.grad_base);
    same_bits(s, &tag, &got.grad_experts, &kept.grad_experts);
    if let (Some(g), Some(k)) = (&got.factors, &kept.factors) {
        same_bits(s, &tag, &g.grad_factor_a, &k.grad_factor_a);
        same_bits(s, &tag, &g.grad_factor_d, &k.grad_factor_d);
    }
    close_sums(
        s,
        &format!("{tag} grad_scores"),
        &kept.grad_scores,
        want.grad_scores.data(),
        &s_scores,
    );
    close_sums(
        s,
        &format!("{tag} grad_alpha"),
        &kept.grad_alpha,
        &[want.grad_alpha],
        &[s_alpha],
    );
    if !T::LOW {
        same_bits(s, &tag, &got.grad_scores, &kept.grad_scores);
    }
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
    let inputs = |scores| cuda::CudaCaMergeInputs {
        base: &w.base.1,
        experts: &w.experts.1,
        scores,
        curvature: cuda::CudaCurvature::Identity,
        base_bias: None,
        expert_bias: None,
    };
    let scores = CudaTensor::<f32>::zeros(&s, &[2, 4]).unwrap();
    let e = cuda::ca_merge(&s, &inputs(&scores), &MergeOptions::default()).unwrap_err();
    assert!(
        matches!(e, camex::Error::Shape { ref tensor, .. } if tensor == "scores"),
        "{e}"
    );
    // The backward given U names `curved` when its shape is not [N, O, I].
    let scores = CudaTensor::<f32>::zeros(&s, &[2, 3]).unwrap();
    let gm = CudaTensor::<f32>::zeros(&s, &[2, 6, 10]).unwrap();
    let e = cuda::ca_merge_backward_with_curved(
        &s,
        &inputs(&scores),
        &MergeOptions::default(),
        &wrong,
        &gm,
        None,
        None,
    )
    .unwrap_err();
    assert!(
        matches!(e, camex::Error::Shape { ref tensor, .. } if tensor == "curved"),
        "{e}"
    );
}
