//! The merged linear layer y[g, t, :] = Wbar_g x[g, t, :] + bbar_g (SPEC section 3), one GEMM per group.

use super::gemm::{gemm, View};
use crate::error::Result;
use crate::shape::{expect_nonempty, expect_rank, expect_shape};
use crate::tensor::{Float, HostTensor};

/// Checks x [G, T, I], merged [G, O, I], merged_bias [G, O]; returns (G, T, O, I).
fn check<F>(
    x: &HostTensor<F>,
    merged: &HostTensor<F>,
    bias: Option<&HostTensor<F>>,
) -> Result<(usize, usize, usize, usize)> {
    expect_rank("merged", merged.shape(), 3, "[G, O, I]")?;
    expect_nonempty("merged", merged.shape())?;
    let (g, o, i) = (merged.shape()[0], merged.shape()[1], merged.shape()[2]);
    expect_rank("x", x.shape(), 3, "[G, T, I]")?;
    expect_nonempty("x", x.shape())?;
    let t = x.shape()[1];
    expect_shape("x", x.shape(), &[g, t, i])?;
    if let Some(b) = bias {
        expect_shape("merged_bias", b.shape(), &[g, o])?;
    }
    Ok((g, t, o, i))
}

/// `y` [G, T, O].
pub fn merged_linear<F: Float>(
    x: &HostTensor<F>,
    merged: &HostTensor<F>,
    merged_bias: Option<&HostTensor<F>>,
) -> Result<HostTensor<F>> {
    let (g, t, o, i) = check(x, merged, merged_bias)?;
    super::budget::<F>(&[("y", vec![g, t, o])])?;
    let mut y = HostTensor::zeros(&[g, t, o]);
    for gg in 0..g {
        if let Some(b) = merged_bias {
            for tt in 0..t {
                y.data_mut()[(gg * t + tt) * o..(gg * t + tt + 1) * o]
                    .copy_from_slice(&b.data()[gg * o..(gg + 1) * o]);
            }
        }
        gemm(
            y.data_mut(),
            View::rm(gg * t * o, t, o),
            merged_bias.is_some(),
            x.data(),
            View::rm(gg * t * i, t, i),
            merged.data(),
            View::rm(gg * o * i, o, i).t(),
            F::ONE,
            true,
        );
    }
    Ok(y)
}

/// Gradients of [`merged_linear`] ([`crate::backend::LinearGrads`]).
pub type LinearGrads<F> = crate::backend::LinearGrads<HostTensor<F>>;

/// dx = dy Wbar, dWbar = dy^T x, dbbar = sum_t dy.
pub fn merged_linear_backward<F: Float>(
    x: &HostTensor<F>,
    merged: &HostTensor<F>,
    merged_bias: Option<&HostTensor<F>>,
    grad_y: &HostTensor<F>,
) -> Result<LinearGrads<F>> {
    let (g, t, o, i) = check(x, merged, merged_bias)?;
    expect_shape("grad_y", grad_y.shape(), &[g, t, o])?;
    super::budget::<F>(&[
        ("grad_x", vec![g, t, i]),
        ("grad_merged", vec![g, o, i]),
        ("grad_merged_bias", vec![g, o]),
    ])?;
    let mut grad_x = HostTensor::zeros(&[g, t, i]);
    let mut grad_merged = HostTensor::zeros(&[g, o, i]);
    for gg in 0..g {
        let dy = View::rm(gg * t * o, t, o);
        gemm(
            grad_x.data_mut(),
            View::rm(gg * t * i, t, i),
            false,
            grad_y.data(),
            dy,
            merged.data(),
            View::rm(gg * o * i, o, i),
            F::ONE,
            true,
        );
        gemm(
            grad_merged.data_mut(),
            View::rm(gg * o * i, o, i),
            false,
            grad_y.data(),
            dy.t(),
            x.data(),
            View::rm(gg * t * i, t, i),
            F::ONE,
            true,
        );
    }
    let grad_merged_bias = merged_bias.map(|_| {
        HostTensor::from_fn(&[g, o], |idx| {
            let (gg, oo) = (idx / o, idx % o);
            (0..t).map(|tt| grad_y.data()[(gg * t + tt) * o + oo]).sum()
        })
    });
    Ok(LinearGrads {
        grad_x,
        grad_merged,
        grad_merged_bias,
    })
}
