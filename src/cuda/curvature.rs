//! `curvature` and `curvature_backward` on the GPU (kernels/curvature.cu).

use super::{check, check_weights, workspace, CudaTensor, Element, Launch};
use crate::error::{Error, Result};
use crate::ffi;
use crate::shape::{expect_nonempty, expect_rank, expect_shape};
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// The four Kronecker factors on the device (shapes as [`crate::cpu::Factors`]).
#[derive(Debug, Clone, Copy)]
pub struct CudaFactors<'a, T> {
    pub a: &'a CudaTensor<T>,
    pub b: &'a CudaTensor<T>,
    pub c: &'a CudaTensor<T>,
    pub d: &'a CudaTensor<T>,
}

/// Which M_i to apply (as [`crate::cpu::Curvature`]).
#[derive(Debug, Clone, Copy)]
pub enum CudaCurvature<'a, T> {
    Identity,
    Kronecker(CudaFactors<'a, T>),
}

#[derive(Debug)]
pub struct CudaFactorGrads<T> {
    pub grad_factor_a: CudaTensor<T>,
    pub grad_factor_b: CudaTensor<T>,
    pub grad_factor_c: CudaTensor<T>,
    pub grad_factor_d: CudaTensor<T>,
}

#[derive(Debug)]
pub struct CudaCurvatureGrads<T> {
    pub grad_base: CudaTensor<T>,
    pub grad_experts: CudaTensor<T>,
    pub factors: Option<CudaFactorGrads<T>>,
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

/// Checks the factors against (N, O, I), with the CPU path's messages.
pub(crate) fn check_curvature<T>(
    n: usize,
    o: usize,
    i: usize,
    curv: &CudaCurvature<T>,
) -> Result<KronDims> {
    let f = match curv {
        CudaCurvature::Identity => {
            return Ok(KronDims {
                r: 0,
                o1: 1,
                o2: o,
                i1: 1,
                i2: i,
            })
        }
        CudaCurvature::Kronecker(f) => f,
    };
    let sa = f.a.shape();
    expect_rank("factor_a", sa, 4, "[R, N, o1, o1]")?;
    expect_nonempty("factor_a", sa)?;
    let (r, o1) = (sa[0], sa[2]);
    expect_shape("factor_a", sa, &[r, n, o1, o1])?;
    if o % o1 != 0 {
        return Err(Error::shape(
            "factor_a",
            format!("[R, N, o1, o1] with o1 dividing O = {o}"),
            sa,
        ));
    }
    let o2 = o / o1;
    expect_rank("factor_b", f.b.shape(), 4, "[R, N, o2, o2]")?;
    expect_shape("factor_b", f.b.shape(), &[r, n, o2, o2])?;
    let sc = f.c.shape();
    expect_rank("factor_c", sc, 4, "[R, N, i1, i1]")?;
    expect_nonempty("factor_c", sc)?;
    let i1 = sc[2];
    if i % i1 != 0 {
        return Err(Error::shape(
            "factor_c",
            format!("[R, N, i1, i1] with i1 dividing I = {i}"),
            sc,
        ));
    }
    expect_shape("factor_c", sc, &[r, n, i1, i1])?;
    let i2 = i / i1;
    expect_rank("factor_d", f.d.shape(), 4, "[R, N, i2, i2]")?;
    expect_shape("factor_d", f.d.shape(), &[r, n, i2, i2])?;
    Ok(KronDims { r, o1, o2, i1, i2 })
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
    let mut fg = match curv {
        CudaCurvature::Identity => None,
        CudaCurvature::Kronecker(f) => Some(CudaFactorGrads {
            grad_factor_a: CudaTensor::output(stream, "grad_factor_a", f.a.shape())?,
            grad_factor_b: CudaTensor::output(stream, "grad_factor_b", f.b.shape())?,
            grad_factor_c: CudaTensor::output(stream, "grad_factor_c", f.c.shape())?,
            grad_factor_d: CudaTensor::output(stream, "grad_factor_d", f.d.shape())?,
        }),
    };
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
        if let Some(g) = fg.as_mut() {
            p.grad_factor_a = l.write(&mut g.grad_factor_a);
            p.grad_factor_b = l.write(&mut g.grad_factor_b);
            p.grad_factor_c = l.write(&mut g.grad_factor_c);
            p.grad_factor_d = l.write(&mut g.grad_factor_d);
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
    Ok(CudaCurvatureGrads {
        grad_base,
        grad_experts,
        factors: fg,
    })
}
