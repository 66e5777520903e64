//! `ties_mask` on the GPU (kernels/mask.cu).

use super::{check, check_weights, workspace, CudaTensor, Element, Launch};
use crate::error::Result;
use crate::ffi;
use crate::options::Mask;
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// `mask` [N, O, I] of 0/1 for `base` and `experts` (all ones for [`Mask::None`]).
pub fn ties_mask<T: Element>(
    stream: &Arc<CudaStream>,
    base: &CudaTensor<T>,
    experts: &CudaTensor<T>,
    mask: Mask,
) -> Result<CudaTensor<T>> {
    let _r = super::op_range(c"camex::ties_mask");
    let (n, o, i) = check_weights(base.shape(), experts.shape(), "experts")?;
    mask.validate()?;
    let (kind, k) = match mask {
        Mask::None => (ffi::camex_mask_kind_CAMEX_MASK_NONE, 0.0),
        Mask::TiesSign => (ffi::camex_mask_kind_CAMEX_MASK_TIES_SIGN, 0.0),
        Mask::TiesTrim(k) => (ffi::camex_mask_kind_CAMEX_MASK_TIES_TRIM, k),
    };
    let mut p = ffi::camex_mask_params {
        dtype: T::CODE,
        n: n as i64,
        o: o as i64,
        i: i as i64,
        mask_kind: kind as i32,
        trim_k: k,
        ..Default::default()
    };
    // SAFETY: host-side size computation.
    let ws_bytes = unsafe { ffi::camex_mask_workspace(&p) };
    let mut ws = workspace(stream, ws_bytes)?;
    let mut out = CudaTensor::<T>::output(stream, "mask", &[n, o, i])?;
    {
        let mut l = Launch::new(stream)?;
        p.base = l.read(base);
        p.experts = l.read(experts);
        p.mask = l.write(&mut out);
        p.workspace = l.write_slice(&mut ws);
        p.workspace_bytes = ws_bytes;
        // SAFETY: live device buffers of the validated shapes.
        check(
            unsafe { ffi::camex_ties_mask(&p, l.raw_stream()) },
            "ties_mask",
        )?;
    }
    Ok(out)
}
