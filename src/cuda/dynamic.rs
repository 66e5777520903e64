//! `dynamic_merge` and its backward on the GPU (kernels/dynamic.cu).

use super::{check, check_finite, check_weights, workspace, CudaTensor, Element, Launch};
use crate::error::Result;
use crate::ffi;
use crate::shape::expect_shape;
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// Gradients of [`dynamic_merge_backward`], `grad_beta` 0-d ([`crate::backend::DynamicGrads`]).
pub type CudaDynamicGrads<T> = crate::backend::DynamicGrads<CudaTensor<T>>;

fn params<T: Element>(n: usize, o: usize, i: usize, beta: f64) -> ffi::camex_dynamic_params {
    ffi::camex_dynamic_params {
        dtype: T::CODE,
        n: n as i64,
        o: o as i64,
        i: i as i64,
        beta,
        ..Default::default()
    }
}

/// `next_base` [O, I] = base + (beta/N) sum_i curved_i.
pub fn dynamic_merge<T: Element>(
    stream: &Arc<CudaStream>,
    base: &CudaTensor<T>,
    curved: &CudaTensor<T>,
    beta: f64,
) -> Result<CudaTensor<T>> {
    let _r = super::op_range(c"camex::dynamic_merge");
    let (n, o, i) = check_weights(base.shape(), curved.shape(), "curved")?;
    check_finite::<T>("beta", beta)?;
    let mut p = params::<T>(n, o, i, beta);
    let mut out = CudaTensor::<T>::output(stream, "next_base", &[o, i])?;
    {
        let mut l = Launch::new(stream)?;
        p.base = l.read(base);
        p.curved = l.read(curved);
        p.next_base = l.write(&mut out);
        // SAFETY: live device buffers of the validated shapes.
        check(
            unsafe { ffi::camex_dynamic_forward(&p, l.raw_stream()) },
            "dynamic_merge",
        )?;
    }
    Ok(out)
}

/// Gradients of [`dynamic_merge`].
pub fn dynamic_merge_backward<T: Element>(
    stream: &Arc<CudaStream>,
    base: &CudaTensor<T>,
    curved: &CudaTensor<T>,
    beta: f64,
    grad_next_base: &CudaTensor<T>,
) -> Result<CudaDynamicGrads<T>> {
    let _r = super::op_range(c"camex::dynamic_merge_backward");
    let (n, o, i) = check_weights(base.shape(), curved.shape(), "curved")?;
    check_finite::<T>("beta", beta)?;
    expect_shape("grad_next_base", grad_next_base.shape(), &[o, i])?;
    let mut p = params::<T>(n, o, i, beta);
    // SAFETY: host-side size computation.
    let ws_bytes = unsafe { ffi::camex_dynamic_workspace(&p) };
    let mut ws = workspace(stream, ws_bytes)?;
    let mut grad_base = CudaTensor::<T>::output(stream, "grad_base", &[o, i])?;
    let mut grad_curved = CudaTensor::<T>::output(stream, "grad_curved", &[n, o, i])?;
    let mut grad_beta = CudaTensor::<T>::output(stream, "grad_beta", &[])?;
    {
        let mut l = Launch::new(stream)?;
        p.base = l.read(base);
        p.curved = l.read(curved);
        p.grad_next_base = l.read(grad_next_base);
        p.grad_base = l.write(&mut grad_base);
        p.grad_curved = l.write(&mut grad_curved);
        p.grad_beta = l.write(&mut grad_beta);
        p.workspace = l.write_slice(&mut ws);
        p.workspace_bytes = ws_bytes;
        // SAFETY: live device buffers of the validated shapes.
        check(
            unsafe { ffi::camex_dynamic_backward(&p, l.raw_stream()) },
            "dynamic_merge_backward",
        )?;
    }
    Ok(CudaDynamicGrads {
        grad_base,
        grad_curved,
        grad_beta,
    })
}
