//! Dynamic merge (EP-CAMEx): E^(l+1) = E^(l) + (beta / N) * sum_i U_i^(l) (SPEC section 3).

use super::curvature::check_weights;
use crate::error::{Error, Result};
use crate::shape::expect_shape;
use crate::tensor::{Float, HostTensor};

fn check_beta<F: Float>(beta: f64) -> Result<()> {
    crate::options::check_scalar("beta", beta, F::DTYPE)
}

/// `next_base` [O, I] from `base` [O, I] and `curved` [N, O, I].
pub fn dynamic_merge<F: Float>(
    base: &HostTensor<F>,
    curved: &HostTensor<F>,
    beta: f64,
) -> Result<HostTensor<F>> {
    let (_, o, i) = check_weights(base, curved).map_err(rename_curved)?;
    check_beta::<F>(beta)?;
    super::budget::<F>(&[("next_base", vec![2, o, i])])?;
    Ok(next_base_unchecked(base, curved, beta))
}

/// `experts` -> `curved` in the messages of the shared weight check.
fn rename_curved(e: Error) -> Error {
    match e {
        Error::Shape {
            tensor,
            expected,
            actual,
        } if tensor == "experts" => Error::Shape {
            tensor: "curved".into(),
            expected,
            actual,
        },
        e => e,
    }
}

pub(crate) fn next_base_unchecked<F: Float>(
    base: &HostTensor<F>,
    curved: &HostTensor<F>,
    beta: f64,
) -> HostTensor<F> {
    let n = curved.shape()[0];
    let c = F::from_f64(beta / n as f64);
    let s = super::sum_stack(curved.data(), base.len());
    HostTensor::from_fn(base.shape(), |q| base.data()[q] + c * s[q])
}

/// Gradients of [`dynamic_merge`], `grad_beta` a value ([`crate::backend::DynamicGrads`]).
pub type DynamicGrads<F> = crate::backend::DynamicGrads<HostTensor<F>, F>;

/// dL/dE = G, dL/dU_i = (beta/N) G, dL/dbeta = (1/N) sum_i <G, U_i>.
pub fn dynamic_merge_backward<F: Float>(
    base: &HostTensor<F>,
    curved: &HostTensor<F>,
    beta: f64,
    grad_next_base: &HostTensor<F>,
) -> Result<DynamicGrads<F>> {
    let (n, o, i) = check_weights(base, curved).map_err(rename_curved)?;
    check_beta::<F>(beta)?;
    expect_shape("grad_next_base", grad_next_base.shape(), &[o, i])?;
    super::budget::<F>(&[("grad_curved", vec![n, o, i]), ("grad_base", vec![o, i])])?;
    let oi = o * i;
    let c = F::from_f64(beta / n as f64);
    let gn = grad_next_base.data();
    let grad_curved = HostTensor::from_fn(curved.shape(), |idx| c * gn[idx % oi]);
    Ok(DynamicGrads {
        grad_base: grad_next_base.clone(),
        grad_curved,
        grad_beta: grad_beta_unchecked(curved, gn, n),
    })
}

/// (1/N) sum_i <G, U_i>.
pub(crate) fn grad_beta_unchecked<F: Float>(curved: &HostTensor<F>, gn: &[F], n: usize) -> F {
    let oi = gn.len();
    let mut s = F::ZERO;
    for e in 0..n {
        let u = &curved.data()[e * oi..(e + 1) * oi];
        s += u.iter().zip(gn).map(|(&a, &b)| a * b).sum::<F>();
    }
    s / F::from_f64(n as f64)
}
