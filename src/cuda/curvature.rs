//! `curvature` and `curvature_backward` on the GPU (kernels/curvature.cu).

use super::{check, check_weights, workspace, CudaTensor, Element, Launch};
use crate::error::{Error, Result};
use crate::ffi;
use crate::shape::expect_shape;
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// The four Kronecker factors on the device ([`crate::backend::Factors`]).
pub type CudaFactors<'a, T> = crate::backend::Factors<'a, CudaTensor<T>>;
/// Which M_i to apply, on the device ([`crate::backend::Curvature`]).
pub type CudaCurvature<'a, T> = crate::backend::Curvature<'a, CudaTensor<T>>;
/// Gradients of the four factors on the device ([`crate::backend::FactorGrads`]).
pub type CudaFactorGrads<T> = crate::backend::FactorGrads<CudaTensor<T>>;
/// Gradients of [`curvature_backward`] ([`crate::backend::CurvatureGrads`]).
pub type CudaCurvatureGrads<T> = crate::backend::CurvatureGrads<CudaTensor<T>>;

/// The factors' shapes, A to D (none for the identity): the pieces of packed factor gradients.
pub(crate) fn factor_shapes<T>(curv: &CudaCurvature<T>) -> Vec<Vec<usize>> {
    match curv {
        CudaCurvature::Identity => Vec::new(),
        CudaCurvature::Kronecker(f) => [f.a, f.b, f.c, f.d]
            .iter()
            .map(|t| t.shape().to_vec())
            .collect(),
    }
}

/// Pieces of a packed output, and the factor gradients split off their end.
type SplitParts<T> = (Vec<CudaTensor<T>>, Option<CudaFactorGrads<T>>);

/// The factor gradients from the last four of `parts` (none for the identity), and the parts
/// before them.
pub(crate) fn split_factor_parts<T>(
    mut parts: Vec<CudaTensor<T>>,
    kron: bool,
) -> Result<SplitParts<T>> {
    if !kron {
        return Ok((parts, None));
    }
    let four = parts.split_off(parts.len().saturating_sub(4));
    let [a, b, c, d]: [CudaTensor<T>; 4] = four
        .try_into()
        .map_err(|_| Error::cuda("factor gradients: four pieces expected (internal)"))?;
    Ok((
        parts,
        Some(CudaFactorGrads {
            grad_factor_a: a,
            grad_factor_b: b,
            grad_factor_c: c,
            grad_factor_d: d,
        }),
    ))
}

/// (R, o1, o2, i1, i2); R = 0 for the identity.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KronDims {
    pub r: usize,
    pub o1: usize,
    pub o2: usize,
    pub i1: usize,
    pub i2: usize,
}

/// Checks the factors against (N, O, I), as the CPU path does.
pub(crate) fn check_curvature<T>(
    n: usize,
    o: usize,
    i: usize,
    curv: &CudaCurvature<T>,
) -> Result<KronDims> {
    let d = crate::backend::check_curvature(n, o, i, curv)?;
    let s = d.split;
    Ok(KronDims {
        r: d.r,
        o1: s.o1,
        o2: s.o2,
        i1: s.i1,
        i2: s.i2,
    })
}

fn params<T: Element>(n: usize, o: usize, i: usize, k: &KronDims) -> ffi::camex_curvature_params {
    ffi::camex_curvature_params {
        dtype: T::CODE,
        n: n as i64,
        o: o as i64,
        i: i as i64,
        r: k.r as i64,
        o1: k.o1 as i64,
        o2: k.o2 as i64,
        i1: k.i1 as i64,
        i2: k.i2 as i64,
        ..Default::default()
    }
}

/// `curved` [N, O, I]: `U_i = M_i(experts[i] - base)`.
pub fn curvature<T: Element>(
    stream: &Arc<CudaStream>,
    base: &CudaTensor<T>,
    experts: &CudaTensor<T>,
    curv: &CudaCurvature<T>,
) -> Result<CudaTensor<T>> {
    let _r = super::op_range(c"camex::curvature");
    let (n, o, i) = check_weights(base.shape(), experts.shape(), "experts")?;
    let k = check_curvature(n, o, i, curv)?;
    let mut p = params::<T>(n, o, i, &k);
    // SAFETY: pure size computation on the host.
    let ws_bytes = unsafe { ffi::camex_curvature_workspace(&p, 0) };
    let mut ws = workspace(stream, ws_bytes)?;
    let mut curved = CudaTensor::<T>::output(stream, "curved", &[n, o, i])?;
    {
        let mut l = Launch::new(stream)?;
        p.base = l.read(base);
        p.experts = l.read(experts);
        if let CudaCurvature::Kronecker(f) = curv {
            p.factor_a = l.read(f.a);
            p.factor_b = l.read(f.b);
            p.factor_c = l.read(f.c);
            p.factor_d = l.read(f.d);
        }
        p.curved = l.write(&mut curved);
        p.workspace = l.write_slice(&mut ws);
        p.workspace_bytes = ws_bytes;
        // SAFETY: every pointer is a live device buffer of the size the shapes (validated above) imply.
        check(
            unsafe { ffi::camex_curvature_forward(&p, l.raw_stream()) },
            "curvature",
        )?;
    }
    Ok(curved)
}

/// `curvature` backward: from `grad_curved` [N, O, I] to base, experts and factors.
pub fn curvature_backward<T: Element>(
    stream: &Arc<CudaStream>,
    base: &CudaTensor<T>,
    experts: &CudaTensor<T>,
    curv: &CudaCurvature<T>,
    grad_curved: &CudaTensor<T>,
) -> Result<CudaCurvatureGrads<T>> {
    let _r = super::op_range(c"camex::curvature_backward");
    let (n, o, i) = check_weights(base.shape(), experts.shape(), "experts")?;
    let k = check_curvature(n, o, i, curv)?;
    expect_shape("grad_curved", grad_curved.shape(), &[n, o, i])?;
    let mut p = params::<T>(n, o, i, &k);
    // SAFETY: pure size computation on the host.
    let ws_bytes = unsafe { ffi::camex_curvature_workspace(&p, 1) };
    let mut ws = workspace(stream, ws_bytes)?;
    let mut grad_base = CudaTensor::<T>::output(stream, "grad_base", &[o, i])?;
    let mut grad_experts = CudaTensor::<T>::output(stream, "grad_experts", &[n, o, i])?;
    // The factor gradients in one buffer, as the adapters pack them (no copy).
    let mut packed =
        super::PackedOutputs::<T>::new(stream, "the factor gradients", factor_shapes(curv))?;
    {
        let mut l = Launch::new(stream)?;
        p.base = l.read(base);
        p.experts = l.read(experts);
        if let CudaCurvature::Kronecker(f) = curv {
            p.factor_a = l.read(f.a);
            p.factor_b = l.read(f.b);
            p.factor_c = l.read(f.c);
            p.factor_d = l.read(f.d);
        }
        if let [a, b, c, d] = packed.ptrs(&mut l)[..] {
            (p.grad_factor_a, p.grad_factor_b) = (a, b);
            (p.grad_factor_c, p.grad_factor_d) = (c, d);
        }
        p.grad_curved = l.read(grad_curved);
        p.grad_base = l.write(&mut grad_base);
        p.grad_experts = l.write(&mut grad_experts);
        p.workspace = l.write_slice(&mut ws);
        p.workspace_bytes = ws_bytes;
        // SAFETY: as in `curvature`.
        check(
            unsafe { ffi::camex_curvature_backward(&p, l.raw_stream()) },
            "curvature_backward",
        )?;
    }
    let kron = matches!(curv, CudaCurvature::Kronecker(_));
    let (_, factors) = split_factor_parts(packed.into_parts(), kron)?;
    Ok(CudaCurvatureGrads {
        grad_base,
        grad_experts,
        factors,
    })
}
