//! Causal segment routing (Lory style, SPEC section 3): segment j merges with the router scores of
//! segment j-1; segment 0 uses its own scores under a stop-gradient.

use crate::error::Result;
use crate::shape::{expect_nonempty, expect_rank};
use crate::tensor::{Float, HostTensor};

/// `scores` [B, J, N] from `router_scores` [B, J, N]: S[b, 0] = R[b, 0], S[b, j] = R[b, j-1].
pub fn segment_scores<F: Float>(router_scores: &HostTensor<F>) -> Result<HostTensor<F>> {
    expect_rank("router_scores", router_scores.shape(), 3, "[B, J, N]")?;
    expect_nonempty("router_scores", router_scores.shape())?;
    super::budget::<F>(&[("scores", router_scores.shape().to_vec())])?;
    let (j, n) = (router_scores.shape()[1], router_scores.shape()[2]);
    let r = router_scores.data();
    Ok(HostTensor::from_fn(router_scores.shape(), |idx| {
        let (b, jj, e) = (idx / (j * n), (idx / n) % j, idx % n);
        let src = if jj == 0 { 0 } else { jj - 1 };
        r[(b * j + src) * n + e]
    }))
}

/// `grad_router_scores` [B, J, N]: dL/dR[b, j] = dL/dS[b, j+1] for j < J-1; nothing flows
/// through S[b, 0], so the last segment's router scores get zero.
pub fn segment_scores_backward<F: Float>(grad_scores: &HostTensor<F>) -> Result<HostTensor<F>> {
    expect_rank("grad_scores", grad_scores.shape(), 3, "[B, J, N]")?;
    expect_nonempty("grad_scores", grad_scores.shape())?;
    super::budget::<F>(&[("grad_router_scores", grad_scores.shape().to_vec())])?;
    let (j, n) = (grad_scores.shape()[1], grad_scores.shape()[2]);
    let g = grad_scores.data();
    Ok(HostTensor::from_fn(grad_scores.shape(), |idx| {
        let (b, jj, e) = (idx / (j * n), (idx / n) % j, idx % n);
        if jj + 1 < j {
            g[(b * j + jj + 1) * n + e]
        } else {
            F::ZERO
        }
    }))
}
