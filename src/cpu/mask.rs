//! TIES masks m_i on the raw domain vectors (SPEC section 3). Constants: they carry no gradient.

use super::curvature::{check_weights, domain_vector};
use crate::error::Result;
use crate::options::Mask;
use crate::tensor::{Float, Tensor};
use rayon::prelude::*;

/// `mask` [N, O, I] of 0/1 for `base` and `experts` (all ones for [`Mask::None`]).
pub fn ties_mask<F: Float>(base: &Tensor<F>, experts: &Tensor<F>, mask: Mask) -> Result<Tensor<F>> {
    let (n, o, i) = check_weights(base, experts)?;
    mask.validate()?;
    let mut bufs = vec![("mask", vec![n, o, i])];
    bufs.extend(mask_workspace(n, o, i, mask));
    super::budget::<F>(&bufs)?;
    Ok(mask_unchecked(base, experts, mask).unwrap_or_else(|| Tensor::full(&[n, o, i], F::ONE)))
}

/// The scratch of [`mask_unchecked`] (an upper bound, the mask itself included), for the memory
/// check.
pub(crate) fn mask_workspace(
    n: usize,
    o: usize,
    i: usize,
    mask: Mask,
) -> Vec<(&'static str, Vec<usize>)> {
    match mask {
        Mask::None => vec![],
        Mask::TiesSign => vec![("workspace (TIES)", vec![2 * n + 1, o, i])],
        Mask::TiesTrim(_) => vec![(
            "workspace (TIES trim)",
            vec![3 * n + 1 + super::threads(), o, i],
        )],
    }
}

/// The mask for validated inputs, `None` for [`Mask::None`].
pub(crate) fn mask_unchecked<F: Float>(
    base: &Tensor<F>,
    experts: &Tensor<F>,
    mask: Mask,
) -> Option<Tensor<F>> {
    let shape = experts.shape().to_vec();
    let n = shape[0];
    let oi = base.len();
    let mut tau = vec![F::ZERO; n * oi];
    tau.par_chunks_mut(oi)
        .enumerate()
        .for_each(|(e, t)| domain_vector(base.data(), &experts.data()[e * oi..(e + 1) * oi], t));
    let trimmed;
    let (voters, k): (&[F], _) = match mask {
        Mask::None => return None,
        Mask::TiesSign => (&tau, None),
        Mask::TiesTrim(k) => {
            trimmed = trim(&tau, oi, k);
            (&trimmed, Some(()))
        }
    };
    const CH: usize = 4096;
    // The elected sign once per position (same summation order as per element), then the masks.
    let mut elects = vec![F::ZERO; oi];
    elects.par_chunks_mut(CH).enumerate().for_each(|(c, ec)| {
        let start = c * CH;
        for (j, ev) in ec.iter_mut().enumerate() {
            let q = start + j;
            let mut s = F::ZERO;
            for v in 0..n {
                s += voters[v * oi + q];
            }
            *ev = s.sgn();
        }
    });
    let mut m = vec![F::ZERO; n * oi];
    m.par_chunks_mut(CH).enumerate().for_each(|(c, mc)| {
        let start = c * CH;
        for (j, mv) in mc.iter_mut().enumerate() {
            let idx = start + j;
            let q = idx % oi;
            let elect = elects[q];
            let t = tau[idx];
            // A NaN sign equals nothing, so NaN positions get m = 0 (the NaN still reaches the output
            // through U, since the mask is applied by multiplication).
            let agrees = t.sgn() == elect;
            let keep = match k {
                None => agrees,
                Some(()) => voters[idx] != F::ZERO && agrees,
            };
            *mv = if keep { F::ONE } else { F::ZERO };
        }
    });
    Some(Tensor::new(&shape, m).expect("mask shape"))
}

/// TIES trimming: per expert keep the ceil(k * O * I) largest |tau| (ties at the threshold kept,
/// NaN counted as largest), zero the rest.
fn trim<F: Float>(tau: &[F], oi: usize, k: f64) -> Vec<F> {
    let keep_n = ((k * oi as f64).ceil() as usize).clamp(1, oi);
    let mut out = tau.to_vec();
    out.par_chunks_mut(oi).for_each(|t| {
        let mut mags: Vec<F> = t.iter().map(|v| v.abs()).collect();
        let cmp = |a: &F, b: &F| match (a.is_nan(), b.is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            _ => a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal),
        };
        let (_, thr, _) = mags.select_nth_unstable_by(oi - keep_n, cmp);
        let thr = *thr;
        for v in t.iter_mut() {
            let a = v.abs();
            let kept = a.is_nan() || (!thr.is_nan() && a >= thr);
            if !kept {
                *v = F::ZERO;
            }
        }
    });
    out
}
