//! Causal segment scores on the GPU (kernels/segment.cu).

use super::{check, CudaTensor, Element, Launch};
use crate::error::Result;
use crate::ffi;
use crate::shape::{expect_nonempty, expect_rank};
use cudarc::driver::CudaStream;
use std::sync::Arc;

fn dims(name: &str, s: &[usize]) -> Result<(usize, usize, usize)> {
    expect_rank(name, s, 3, "[B, J, N]")?;
    expect_nonempty(name, s)?;
    Ok((s[0], s[1], s[2]))
}

/// `scores` [B, J, N]: S[b, 0] = R[b, 0], S[b, j] = R[b, j-1].
pub fn segment_scores<T: Element>(
    stream: &Arc<CudaStream>,
    router_scores: &CudaTensor<T>,
) -> Result<CudaTensor<T>> {
    let _r = super::op_range(c"camex::segment_scores");
    let (b, j, n) = dims("router_scores", router_scores.shape())?;
    let mut out = CudaTensor::<T>::output(stream, "scores", &[b, j, n])?;
    {
        let mut l = Launch::new(stream)?;
        let p = ffi::camex_segment_params {
            dtype: T::CODE,
            b: b as i64,
            j: j as i64,
            n: n as i64,
            router_scores: l.read(router_scores),
            scores: l.write(&mut out),
            ..Default::default()
        };
        // SAFETY: live device buffers of the validated shapes.
        check(
            unsafe { ffi::camex_segment_forward(&p, l.raw_stream()) },
            "segment_scores",
        )?;
    }
    Ok(out)
}

/// `grad_router_scores`: dR[b, j] = dS[b, j+1] for j < J-1, zero for the last segment.
pub fn segment_scores_backward<T: Element>(
    stream: &Arc<CudaStream>,
    grad_scores: &CudaTensor<T>,
) -> Result<CudaTensor<T>> {
    let _r = super::op_range(c"camex::segment_scores_backward");
    let (b, j, n) = dims("grad_scores", grad_scores.shape())?;
    let mut out = CudaTensor::<T>::output(stream, "grad_router_scores", &[b, j, n])?;
    {
        let mut l = Launch::new(stream)?;
        let p = ffi::camex_segment_params {
            dtype: T::CODE,
            b: b as i64,
            j: j as i64,
            n: n as i64,
            grad_scores: l.read(grad_scores),
            grad_router_scores: l.write(&mut out),
            ..Default::default()
        };
        // SAFETY: live device buffers of the validated shapes.
        check(
            unsafe { ffi::camex_segment_backward(&p, l.raw_stream()) },
            "segment_scores_backward",
        )?;
    }
    Ok(out)
}
