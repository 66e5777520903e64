//! `merge` (curved given) and the fused `ca_merge` on the GPU (kernels/merge.cu,
//! kernels/curvature.cu).

use super::curvature::{check_curvature, CudaCurvature};
use super::{
    check, check_biases, check_finite, check_scores, check_weights, dare_params, workspace,
    CudaTensor, Element, Launch,
};
use crate::error::{Error, Result};
use crate::ffi;
use crate::options::{Dare, Mask, MergeOptions};
use crate::shape::{check_ca_backward, check_grad_merged_bias, expect_shape, CaBackwardShapes};
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// Inputs of [`merge`] on the device ([`crate::backend::MergeInputs`]).
pub type CudaMergeInputs<'a, T> = crate::backend::MergeInputs<'a, CudaTensor<T>>;
/// Outputs of [`merge`] ([`crate::backend::MergeOutputs`]).
pub type CudaMergeOutputs<T> = crate::backend::MergeOutputs<CudaTensor<T>>;
/// Gradients of [`merge_backward`], `grad_alpha` 0-d ([`crate::backend::MergeGrads`]).
pub type CudaMergeGrads<T> = crate::backend::MergeGrads<CudaTensor<T>>;

struct MergeDims {
    g: usize,
    n: usize,
    o: usize,
    i: usize,
    bias: bool,
}

fn check_merge<T: Element>(x: &CudaMergeInputs<T>, alpha: f64, dare: &Dare) -> Result<MergeDims> {
    let (n, o, i) = check_weights(x.base.shape(), x.curved.shape(), "curved")?;
    if let Some(m) = x.mask {
        expect_shape("mask", m.shape(), &[n, o, i])?;
    }
    let g = check_scores(x.scores.shape(), n)?;
    let bias = check_biases(
        x.base_bias.map(|t| t.shape()),
        x.expert_bias.map(|t| t.shape()),
        n,
        o,
        "merge",
    )?;
    check_finite::<T>("alpha", alpha)?;
    dare.validate()?;
    Ok(MergeDims { g, n, o, i, bias })
}

fn merge_params<T: Element>(d: &MergeDims, alpha: f64, dare: &Dare) -> ffi::camex_merge_params {
    ffi::camex_merge_params {
        dtype: T::CODE,
        g: d.g as i64,
        n: d.n as i64,
        o: d.o as i64,
        i: d.i as i64,
        alpha,
        dare: dare_params(dare),
        ..Default::default()
    }
}

/// `merge`: `Wbar_g = E + alpha * sum_i s[g,i] zeta[g,i] (m_i (.) curved_i)`, and the bias merge.
pub fn merge<T: Element>(
    stream: &Arc<CudaStream>,
    inputs: &CudaMergeInputs<T>,
    alpha: f64,
    dare: &Dare,
) -> Result<CudaMergeOutputs<T>> {
    let _r = super::op_range(c"camex::merge");
    let d = check_merge(inputs, alpha, dare)?;
    let mut p = merge_params::<T>(&d, alpha, dare);
    let mut merged = CudaTensor::<T>::output(stream, "merged", &[d.g, d.o, d.i])?;
    let mut merged_bias = if d.bias {
        Some(CudaTensor::<T>::output(stream, "merged_bias", &[d.g, d.o])?)
    } else {
        None
    };
    {
        let mut l = Launch::new(stream)?;
        p.base = l.read(inputs.base);
        p.curved = l.read(inputs.curved);
        p.scores = l.read(inputs.scores);
        p.mask = l.read_opt(inputs.mask);
        p.base_bias = l.read_opt(inputs.base_bias);
        p.expert_bias = l.read_opt(inputs.expert_bias);
        p.merged = l.write(&mut merged);
        p.merged_bias = l.write_opt(merged_bias.as_mut());
        // SAFETY: live device buffers of the validated shapes.
        check(
            unsafe { ffi::camex_merge_forward(&p, l.raw_stream()) },
            "merge",
        )?;
    }
    Ok(CudaMergeOutputs {
        merged,
        merged_bias,
    })
}

/// `merge_backward`: gradients for base, curved, scores, alpha and the biases.
pub fn merge_backward<T: Element>(
    stream: &Arc<CudaStream>,
    inputs: &CudaMergeInputs<T>,
    alpha: f64,
    dare: &Dare,
    grad_merged: &CudaTensor<T>,
    grad_merged_bias: Option<&CudaTensor<T>>,
) -> Result<CudaMergeGrads<T>> {
    let _r = super::op_range(c"camex::merge_backward");
    let d = check_merge(inputs, alpha, dare)?;
    expect_shape("grad_merged", grad_merged.shape(), &[d.g, d.o, d.i])?;
    check_grad_merged_bias(grad_merged_bias.map(|t| t.shape()), d.bias, d.g, d.o)?;
    let mut p = merge_params::<T>(&d, alpha, dare);
    // SAFETY: host-side size computation.
    let ws_bytes = unsafe { ffi::camex_merge_workspace(&p, 1) };
    let mut ws = workspace(stream, ws_bytes)?;
    let mut grad_base = CudaTensor::<T>::output(stream, "grad_base", &[d.o, d.i])?;
    let mut grad_curved = CudaTensor::<T>::output(stream, "grad_curved", &[d.n, d.o, d.i])?;
    let mut grad_scores = CudaTensor::<T>::output(stream, "grad_scores", &[d.g, d.n])?;
    let mut grad_alpha = CudaTensor::<T>::output(stream, "grad_alpha", &[])?;
    let (mut gbb, mut geb) = if d.bias {
        (
            Some(CudaTensor::<T>::output(stream, "grad_base_bias", &[d.o])?),
            Some(CudaTensor::<T>::output(
                stream,
                "grad_expert_bias",
                &[d.n, d.o],
            )?),
        )
    } else {
        (None, None)
    };
    {
        let mut l = Launch::new(stream)?;
        p.base = l.read(inputs.base);
        p.curved = l.read(inputs.curved);
        p.scores = l.read(inputs.scores);
        p.mask = l.read_opt(inputs.mask);
        p.base_bias = l.read_opt(inputs.base_bias);
        p.expert_bias = l.read_opt(inputs.expert_bias);
        p.grad_merged = l.read(grad_merged);
        p.grad_merged_bias = l.read_opt(grad_merged_bias);
        p.grad_base = l.write(&mut grad_base);
        p.grad_curved = l.write(&mut grad_curved);
        p.grad_scores = l.write(&mut grad_scores);
        p.grad_alpha = l.write(&mut grad_alpha);
        p.grad_base_bias = l.write_opt(gbb.as_mut());
        p.grad_expert_bias = l.write_opt(geb.as_mut());
        p.workspace = l.write_slice(&mut ws);
        p.workspace_bytes = ws_bytes;
        // SAFETY: live device buffers of the validated shapes.
        check(
            unsafe { ffi::camex_merge_backward(&p, l.raw_stream()) },
            "merge_backward",
        )?;
    }
    Ok(CudaMergeGrads {
        grad_base,
        grad_curved,
        grad_scores,
        grad_alpha,
        grad_base_bias: gbb,
        grad_expert_bias: geb,
    })
}

/// Inputs of [`ca_merge`] on the device ([`crate::backend::CaMergeInputs`]).
pub type CudaCaMergeInputs<'a, T> = crate::backend::CaMergeInputs<'a, CudaTensor<T>>;
/// Outputs of [`ca_merge`] ([`crate::backend::CaMergeOutputs`]).
pub type CudaCaMergeOutputs<T> = crate::backend::CaMergeOutputs<CudaTensor<T>>;
/// Gradients of [`ca_merge_backward`], scalars 0-d ([`crate::backend::CaMergeGrads`]).
pub type CudaCaMergeGrads<T> = crate::backend::CaMergeGrads<CudaTensor<T>>;

struct CaDims {
    m: MergeDims,
    k: super::curvature::KronDims,
}

fn check_ca<T: Element>(x: &CudaCaMergeInputs<T>, opts: &MergeOptions) -> Result<CaDims> {
    let (n, o, i) = check_weights(x.base.shape(), x.experts.shape(), "experts")?;
    let k = check_curvature(n, o, i, &x.curvature)?;
    let g = check_scores(x.scores.shape(), n)?;
    let bias = check_biases(
        x.base_bias.map(|t| t.shape()),
        x.expert_bias.map(|t| t.shape()),
        n,
        o,
        "merge",
    )?;
    opts.validate_for(T::DTYPE)?;
    Ok(CaDims {
        m: MergeDims { g, n, o, i, bias },
        k,
    })
}

fn ca_params<T: Element>(d: &CaDims, opts: &MergeOptions) -> ffi::camex_ca_merge_params {
    let (mask_kind, trim_k) = match opts.mask {
        Mask::None => (ffi::camex_mask_kind_CAMEX_MASK_NONE, 0.0),
        Mask::TiesSign => (ffi::camex_mask_kind_CAMEX_MASK_TIES_SIGN, 0.0),
        Mask::TiesTrim(k) => (ffi::camex_mask_kind_CAMEX_MASK_TIES_TRIM, k),
    };
    ffi::camex_ca_merge_params {
        dtype: T::CODE,
        g: d.m.g as i64,
        n: d.m.n as i64,
        o: d.m.o as i64,
        i: d.m.i as i64,
        r: d.k.r as i64,
        o1: d.k.o1 as i64,
        o2: d.k.o2 as i64,
        i1: d.k.i1 as i64,
        i2: d.k.i2 as i64,
        alpha: opts.alpha,
        has_beta: opts.beta.is_some() as i32,
        beta: opts.beta.unwrap_or(0.0),
        mask_kind: mask_kind as i32,
        trim_k,
        dare: dare_params(&opts.dare),
        ..Default::default()
    }
}

fn read_curvature<'a, T>(
    l: &mut Launch<'a>,
    p: &mut ffi::camex_ca_merge_params,
    c: &CudaCurvature<'a, T>,
) {
    if let CudaCurvature::Kronecker(f) = c {
        p.factor_a = l.read(f.a);
        p.factor_b = l.read(f.b);
        p.factor_c = l.read(f.c);
        p.factor_d = l.read(f.d);
    }
}

/// The fused CA-merge forward: curvature, mask, DARE, weighted sum over experts for every group,
/// plus base; `next_base` when `opts.beta` is set and `curved` when `opts.want_curved`.
pub fn ca_merge<T: Element>(
    stream: &Arc<CudaStream>,
    inputs: &CudaCaMergeInputs<T>,
    opts: &MergeOptions,
) -> Result<CudaCaMergeOutputs<T>> {
    let _r = super::op_range(c"camex::ca_merge");
    let d = check_ca(inputs, opts)?;
    let mut p = ca_params::<T>(&d, opts);
    let (g, n, o, i) = (d.m.g, d.m.n, d.m.o, d.m.i);
    // SAFETY: host-side size computation.
    let ws_bytes = unsafe { ffi::camex_ca_merge_workspace(&p, 0) };
    let mut ws = workspace(stream, ws_bytes)?;
    let mut merged = CudaTensor::<T>::output(stream, "merged", &[g, o, i])?;
    let mut merged_bias = if d.m.bias {
        Some(CudaTensor::<T>::output(stream, "merged_bias", &[g, o])?)
    } else {
        None
    };
    let mut next_base = if opts.beta.is_some() {
        Some(CudaTensor::<T>::output(stream, "next_base", &[o, i])?)
    } else {
        None
    };
    let mut curved = if opts.want_curved {
        Some(CudaTensor::<T>::output(stream, "curved", &[n, o, i])?)
    } else {
        None
    };
    {
        let mut l = Launch::new(stream)?;
        p.base = l.read(inputs.base);
        p.experts = l.read(inputs.experts);
        p.scores = l.read(inputs.scores);
        read_curvature(&mut l, &mut p, &inputs.curvature);
        p.base_bias = l.read_opt(inputs.base_bias);
        p.expert_bias = l.read_opt(inputs.expert_bias);
        p.merged = l.write(&mut merged);
        p.merged_bias = l.write_opt(merged_bias.as_mut());
        p.next_base = l.write_opt(next_base.as_mut());
        p.curved = l.write_opt(curved.as_mut());
        p.workspace = l.write_slice(&mut ws);
        p.workspace_bytes = ws_bytes;
        // SAFETY: live device buffers of the validated shapes; workspace of the size asked for.
        check(
            unsafe { ffi::camex_ca_merge_forward(&p, l.raw_stream()) },
            "ca_merge",
        )?;
    }
    Ok(CudaCaMergeOutputs {
        merged,
        merged_bias,
        next_base,
        curved,
    })
}

/// The packed gradients' shapes: `scores`' [G, N], then the four factors' for the Kronecker curvature.
fn packed_grad_shapes<T>(g: usize, n: usize, curv: &CudaCurvature<T>) -> Vec<Vec<usize>> {
    let mut shapes = vec![vec![g, n]];
    shapes.extend(super::curvature::factor_shapes(curv));
    shapes
}

/// The fused CA-merge backward. `grad_next_base` is allowed only when `opts.beta` is set (absent
/// means zero); `grad_merged_bias` is optional with biases (absent means zero). U is recomputed
/// on the way; a caller that kept the forward's `curved` skips that with
/// [`ca_merge_backward_with_curved`].
pub fn ca_merge_backward<T: Element>(
    stream: &Arc<CudaStream>,
    inputs: &CudaCaMergeInputs<T>,
    opts: &MergeOptions,
    grad_merged: &CudaTensor<T>,
    grad_merged_bias: Option<&CudaTensor<T>>,
    grad_next_base: Option<&CudaTensor<T>>,
) -> Result<CudaCaMergeGrads<T>> {
    let _r = super::op_range(c"camex::ca_merge_backward");
    backward_ca(
        stream,
        inputs,
        opts,
        None,
        grad_merged,
        grad_merged_bias,
        grad_next_base,
    )
}

/// [`ca_merge_backward`] given the forward's U (`curved` [N, O, I], from [`ca_merge`] with
/// `opts.want_curved`), as an autodiff tape keeps it between the passes: the backward reads it
/// instead of running the curvature's forward chain again (same workspace). `curved` must be that
/// forward's output for these inputs (only its shape can be checked). In f32 the gradients are the
/// same bits as [`ca_merge_backward`]'s; in f16/bf16, `grad_scores`, `grad_alpha` and `grad_beta`
/// then read U as stored (rounded once to the dtype, as the official code keeps it) instead of in
/// f32.
pub fn ca_merge_backward_with_curved<T: Element>(
    stream: &Arc<CudaStream>,
    inputs: &CudaCaMergeInputs<T>,
    opts: &MergeOptions,
    curved: &CudaTensor<T>,
    grad_merged: &CudaTensor<T>,
    grad_merged_bias: Option<&CudaTensor<T>>,
    grad_next_base: Option<&CudaTensor<T>>,
) -> Result<CudaCaMergeGrads<T>> {
    let _r = super::op_range(c"camex::ca_merge_backward_with_curved");
    backward_ca(
        stream,
        inputs,
        opts,
        Some(curved),
        grad_merged,
        grad_merged_bias,
        grad_next_base,
    )
}

fn backward_ca<T: Element>(
    stream: &Arc<CudaStream>,
    inputs: &CudaCaMergeInputs<T>,
    opts: &MergeOptions,
    curved: Option<&CudaTensor<T>>,
    grad_merged: &CudaTensor<T>,
    grad_merged_bias: Option<&CudaTensor<T>>,
    grad_next_base: Option<&CudaTensor<T>>,
) -> Result<CudaCaMergeGrads<T>> {
    let d = check_ca(inputs, opts)?;
    let (g, n, o, i) = (d.m.g, d.m.n, d.m.o, d.m.i);
    let shapes = CaBackwardShapes {
        curved: curved.map(|u| u.shape()),
        grad_merged: grad_merged.shape(),
        grad_merged_bias: grad_merged_bias.map(|t| t.shape()),
        grad_next_base: grad_next_base.map(|t| t.shape()),
    };
    check_ca_backward([g, n, o, i], d.m.bias, opts.beta.is_some(), &shapes)?;
    let mut p = ca_params::<T>(&d, opts);
    // The workspace's size depends only on whether `curved` is given (camex.h); the pointer follows.
    p.curved = u64::from(curved.is_some());
    // SAFETY: host-side size computation.
    let ws_bytes = unsafe { ffi::camex_ca_merge_workspace(&p, 1) };
    let mut ws = workspace(stream, ws_bytes)?;
    let mut grad_base = CudaTensor::<T>::output(stream, "grad_base", &[o, i])?;
    let mut grad_experts = CudaTensor::<T>::output(stream, "grad_experts", &[n, o, i])?;
    // grad_scores and the factor gradients in one buffer, as the adapters pack them (no copy).
    let mut packed = super::PackedOutputs::<T>::new(
        stream,
        "grad_scores and the factor gradients",
        packed_grad_shapes(g, n, &inputs.curvature),
    )?;
    let mut grad_alpha = CudaTensor::<T>::output(stream, "grad_alpha", &[])?;
    let mut grad_beta = if opts.beta.is_some() {
        Some(CudaTensor::<T>::output(stream, "grad_beta", &[])?)
    } else {
        None
    };
    let (mut gbb, mut geb) = if d.m.bias {
        (
            Some(CudaTensor::<T>::output(stream, "grad_base_bias", &[o])?),
            Some(CudaTensor::<T>::output(
                stream,
                "grad_expert_bias",
                &[n, o],
            )?),
        )
    } else {
        (None, None)
    };
    {
        let mut l = Launch::new(stream)?;
        p.base = l.read(inputs.base);
        p.experts = l.read(inputs.experts);
        p.scores = l.read(inputs.scores);
        read_curvature(&mut l, &mut p, &inputs.curvature);
        p.base_bias = l.read_opt(inputs.base_bias);
        p.expert_bias = l.read_opt(inputs.expert_bias);
        p.curved = l.read_opt(curved);
        p.grad_merged = l.read(grad_merged);
        p.grad_merged_bias = l.read_opt(grad_merged_bias);
        p.grad_next_base = l.read_opt(grad_next_base);
        p.grad_base = l.write(&mut grad_base);
        p.grad_experts = l.write(&mut grad_experts);
        let ptrs = packed.ptrs(&mut l);
        p.grad_scores = ptrs[0];
        if let [_, a, b, c, d] = ptrs[..] {
            (p.grad_factor_a, p.grad_factor_b) = (a, b);
            (p.grad_factor_c, p.grad_factor_d) = (c, d);
        }
        p.grad_alpha = l.write(&mut grad_alpha);
        p.grad_beta = l.write_opt(grad_beta.as_mut());
        p.grad_base_bias = l.write_opt(gbb.as_mut());
        p.grad_expert_bias = l.write_opt(geb.as_mut());
        p.workspace = l.write_slice(&mut ws);
        p.workspace_bytes = ws_bytes;
        // SAFETY: live device buffers of the validated shapes; workspace of the size asked for.
        check(
            unsafe { ffi::camex_ca_merge_backward(&p, l.raw_stream()) },
            "ca_merge_backward",
        )?;
    }
    let kron = matches!(inputs.curvature, CudaCurvature::Kronecker(_));
    let (mut rest, factors) = super::curvature::split_factor_parts(packed.into_parts(), kron)?;
    let grad_scores = rest
        .pop()
        .ok_or_else(|| Error::cuda("ca_merge_backward: grad_scores missing (internal)"))?;
    Ok(CudaCaMergeGrads {
        grad_base,
        grad_experts,
        grad_scores,
        factors,
        grad_alpha,
        grad_beta,
        grad_base_bias: gbb,
        grad_expert_bias: geb,
    })
}
