//! `merged_linear` and its backward on the GPU (kernels/linear.cu).

use super::{check, CudaTensor, Element, Launch};
use crate::error::{Error, Result};
use crate::ffi;
use crate::shape::{expect_nonempty, expect_rank, expect_shape};
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// Gradients of [`merged_linear_backward`] ([`crate::backend::LinearGrads`]).
pub type CudaLinearGrads<T> = crate::backend::LinearGrads<CudaTensor<T>>;

/// (G, T, O, I) from x [G, T, I], merged [G, O, I], merged_bias [G, O].
fn check_linear<T>(
    x: &CudaTensor<T>,
    merged: &CudaTensor<T>,
    bias: Option<&CudaTensor<T>>,
) -> Result<(usize, usize, usize, usize)> {
    expect_rank("x", x.shape(), 3, "[G, T, I]")?;
    expect_nonempty("x", x.shape())?;
    expect_rank("merged", merged.shape(), 3, "[G, O, I]")?;
    expect_nonempty("merged", merged.shape())?;
    let (g, t, i) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let o = merged.shape()[1];
    expect_shape("merged", merged.shape(), &[g, o, i])?;
    if let Some(b) = bias {
        expect_shape("merged_bias", b.shape(), &[g, o])?;
    }
    if g > 65535 {
        return Err(Error::option(
            "x",
            format!("G = {g} groups exceed the CUDA path's limit of 65535"),
        ));
    }
    Ok((g, t, o, i))
}

fn params<T: Element>(g: usize, t: usize, o: usize, i: usize) -> ffi::camex_linear_params {
    ffi::camex_linear_params {
        dtype: T::CODE,
        g: g as i64,
        t: t as i64,
        o: o as i64,
        i: i as i64,
        ..Default::default()
    }
}

/// y [G, T, O] = x Wbar_g^T + bbar_g.
pub fn merged_linear<T: Element>(
    stream: &Arc<CudaStream>,
    x: &CudaTensor<T>,
    merged: &CudaTensor<T>,
    merged_bias: Option<&CudaTensor<T>>,
) -> Result<CudaTensor<T>> {
    let _r = super::op_range(c"camex::merged_linear");
    let (g, t, o, i) = check_linear(x, merged, merged_bias)?;
    let mut p = params::<T>(g, t, o, i);
    let mut y = CudaTensor::<T>::output(stream, "y", &[g, t, o])?;
    {
        let mut l = Launch::new(stream)?;
        p.x = l.read(x);
        p.merged = l.read(merged);
        p.merged_bias = l.read_opt(merged_bias);
        p.y = l.write(&mut y);
        // SAFETY: live device buffers of the validated shapes.
        check(
            unsafe { ffi::camex_linear_forward(&p, l.raw_stream()) },
            "merged_linear",
        )?;
    }
    Ok(y)
}

/// dx = dy Wbar, dWbar = dy^T x, dbbar = sum_t dy (when a bias was given).
pub fn merged_linear_backward<T: Element>(
    stream: &Arc<CudaStream>,
    x: &CudaTensor<T>,
    merged: &CudaTensor<T>,
    merged_bias: Option<&CudaTensor<T>>,
    grad_y: &CudaTensor<T>,
) -> Result<CudaLinearGrads<T>> {
    let _r = super::op_range(c"camex::merged_linear_backward");
    let (g, t, o, i) = check_linear(x, merged, merged_bias)?;
    expect_shape("grad_y", grad_y.shape(), &[g, t, o])?;
    let mut p = params::<T>(g, t, o, i);
    let mut grad_x = CudaTensor::<T>::output(stream, "grad_x", &[g, t, i])?;
    let mut grad_merged = CudaTensor::<T>::output(stream, "grad_merged", &[g, o, i])?;
    let mut grad_bias = if merged_bias.is_some() {
        Some(CudaTensor::<T>::output(
            stream,
            "grad_merged_bias",
            &[g, o],
        )?)
    } else {
        None
    };
    {
        let mut l = Launch::new(stream)?;
        p.x = l.read(x);
        p.merged = l.read(merged);
        p.grad_y = l.read(grad_y);
        p.grad_x = l.write(&mut grad_x);
        p.grad_merged = l.write(&mut grad_merged);
        p.grad_merged_bias = l.write_opt(grad_bias.as_mut());
        // SAFETY: live device buffers of the validated shapes.
        check(
            unsafe { ffi::camex_linear_backward(&p, l.raw_stream()) },
            "merged_linear_backward",
        )?;
    }
    Ok(CudaLinearGrads {
        grad_x,
        grad_merged,
        grad_merged_bias: grad_bias,
    })
}
