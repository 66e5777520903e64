//! TIES masks m_i on the raw domain vectors (SPEC section 3). Constants: they carry no gradient.
//!
//! One streaming pass: per chunk of positions, tau = experts - base is formed on the fly, the sign
//! elected (voters summed in expert order, the order of SPEC's sum) and the N mask rows written;
//! no [N, O, I] domain vectors are stored. Trimming first finds each expert's threshold.

use super::curvature::check_weights;
use super::SyncPtr;
use crate::error::Result;
use crate::options::Mask;
use crate::shape::expect_shape;
use crate::tensor::{Float, HostTensor};
use rayon::prelude::*;

/// `mask` [N, O, I] of 0/1 for `base` and `experts` (all ones for [`Mask::None`]).
pub fn ties_mask<F: Float>(
    base: &HostTensor<F>,
    experts: &HostTensor<F>,
    mask: Mask,
) -> Result<HostTensor<F>> {
    let (n, o, i) = check_weights(base, experts)?;
    mask.validate()?;
    let mut bufs = vec![("mask", vec![n, o, i])];
    bufs.extend(mask_workspace(n, o, i, mask));
    super::budget::<F>(&bufs)?;
    let mut out = HostTensor::zeros(&[n, o, i]);
    fill_mask(base.data(), experts.data(), mask, n, out.data_mut());
    Ok(out)
}

/// [`ties_mask`] into a caller's `out` [N, O, I] (every element overwritten): a reused output is
/// not page-faulted in again on every call. A wrong-sized `out` is an error naming `mask`.
pub fn ties_mask_into<F: Float>(
    base: &HostTensor<F>,
    experts: &HostTensor<F>,
    mask: Mask,
    out: &mut HostTensor<F>,
) -> Result<()> {
    let (n, o, i) = check_weights(base, experts)?;
    mask.validate()?;
    expect_shape("mask", out.shape(), &[n, o, i])?;
    super::budget::<F>(&mask_workspace(n, o, i, mask))?;
    fill_mask(base.data(), experts.data(), mask, n, out.data_mut());
    Ok(())
}

/// The scratch of [`fill_mask`] (an upper bound), for the memory check.
pub(crate) fn mask_workspace(
    n: usize,
    o: usize,
    i: usize,
    mask: Mask,
) -> Vec<(&'static str, Vec<usize>)> {
    match mask {
        Mask::None => vec![],
        Mask::TiesSign => vec![("workspace (TIES)", vec![super::threads(), 2 * CH])],
        // One |tau| buffer per thread for the thresholds, then the sign pass's.
        Mask::TiesTrim(_) => vec![(
            "workspace (TIES trim)",
            vec![super::threads(), o * i + 2 * CH + n],
        )],
    }
}

/// The mask for validated inputs, `None` for [`Mask::None`] (the CA-merge then skips it).
pub(crate) fn mask_unchecked<F: Float>(
    base: &HostTensor<F>,
    experts: &HostTensor<F>,
    mask: Mask,
) -> Option<HostTensor<F>> {
    if mask == Mask::None {
        return None;
    }
    let mut out = HostTensor::zeros(experts.shape());
    fill_mask(
        base.data(),
        experts.data(),
        mask,
        experts.shape()[0],
        out.data_mut(),
    );
    Some(out)
}

/// Positions per task of the sign pass: the chunk of N expert rows (and the mask rows written)
/// stays in L2 between the election and the writes.
const CH: usize = 4096;

/// Writes the mask of validated inputs into `out` [N, O*I].
fn fill_mask<F: Float>(base: &[F], experts: &[F], mask: Mask, n: usize, out: &mut [F]) {
    let oi = base.len();
    let thresholds = match mask {
        Mask::None => {
            out.par_iter_mut().for_each(|v| *v = F::ONE);
            return;
        }
        Mask::TiesSign => None,
        Mask::TiesTrim(k) => Some(trim_thresholds(base, experts, n, k)),
    };
    let thr = thresholds.as_deref();
    let total = out.len();
    let op = SyncPtr(out.as_mut_ptr());
    (0..oi.div_ceil(CH)).into_par_iter().for_each_init(
        || (vec![F::ZERO; CH], vec![0i8; CH]),
        |(sum, elect), c| {
            let q0 = c * CH;
            let w = CH.min(oi - q0);
            let bq = &base[q0..q0 + w];
            let (sum, elect) = (&mut sum[..w], &mut elect[..w]);
            // Voters summed in expert order, one row at a time (the same additions, in the same
            // order, as per position; rows stream and vectorise).
            sum.fill(F::ZERO);
            for e in 0..n {
                let xe = &experts[e * oi + q0..e * oi + q0 + w];
                match thr {
                    None => sum
                        .iter_mut()
                        .zip(xe.iter().zip(bq))
                        .for_each(|(s, (&x, &b))| *s += x - b),
                    Some(th) => sum
                        .iter_mut()
                        .zip(xe.iter().zip(bq))
                        .for_each(|(s, (&x, &b))| *s += trimmed(x - b, th[e])),
                }
            }
            elect
                .iter_mut()
                .zip(sum.iter())
                .for_each(|(ev, &s)| *ev = sign_code(s, 4));
            for e in 0..n {
                let xe = &experts[e * oi + q0..e * oi + q0 + w];
                // SAFETY: task c alone writes positions q0..q0+w of every expert row.
                let me = unsafe { op.slice(e * oi + q0, w, total) };
                let rows = me.iter_mut().zip(xe.iter().zip(bq)).zip(elect.iter());
                match thr {
                    None => rows.for_each(|((m, (&x, &b)), &ev)| {
                        *m = one_if(sign_code(x - b, 2) == ev);
                    }),
                    Some(th) => rows.for_each(|((m, (&x, &b)), &ev)| {
                        let t = x - b;
                        *m = one_if((trimmed(t, th[e]) != F::ZERO) & (sign_code(t, 2) == ev));
                    }),
                }
            }
        },
    );
}

/// The sign of `v` as -1, 0 or 1, and `nan` for NaN, without branches (signs of real data are
/// random, and a branch per element mispredicts half the time). The elected sign's NaN code
/// differs from the voters', so a NaN sign equals nothing: NaN positions get m = 0 (the NaN still
/// reaches the output through U, since the mask is applied by multiplication).
#[inline(always)]
fn sign_code<F: Float>(v: F, nan: i8) -> i8 {
    (v > F::ZERO) as i8 - (v < F::ZERO) as i8 + nan * v.is_nan() as i8
}

#[inline(always)]
fn one_if<F: Float>(keep: bool) -> F {
    if keep {
        F::ONE
    } else {
        F::ZERO
    }
}

/// The trimmed voter: tau where |tau| reaches the expert's threshold (or is NaN), else 0.
#[inline(always)]
fn trimmed<F: Float>(t: F, h: F) -> F {
    let a = t.abs();
    if a.is_nan() | (!h.is_nan() & (a >= h)) {
        t
    } else {
        F::ZERO
    }
}

/// TIES trimming: per expert, the threshold that keeps the ceil(k * O * I) largest |tau| (ties at
/// the threshold kept, NaN counted as largest).
fn trim_thresholds<F: Float>(base: &[F], experts: &[F], n: usize, k: f64) -> Vec<F> {
    let oi = base.len();
    let keep_n = ((k * oi as f64).ceil() as usize).clamp(1, oi);
    (0..n)
        .into_par_iter()
        .map_init(
            || vec![F::ZERO; oi],
            |mags, e| {
                let xe = &experts[e * oi..(e + 1) * oi];
                for ((m, &w), &b) in mags.iter_mut().zip(xe).zip(base) {
                    *m = (w - b).abs();
                }
                let cmp = |a: &F, b: &F| match (a.is_nan(), b.is_nan()) {
                    (true, true) => std::cmp::Ordering::Equal,
                    (true, false) => std::cmp::Ordering::Greater,
                    (false, true) => std::cmp::Ordering::Less,
                    _ => a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal),
                };
                *mags.select_nth_unstable_by(oi - keep_n, cmp).1
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask as it was computed before the streaming pass: tau stored, trimmed copy stored,
    /// elected signs stored, then the masks.
    fn two_pass<F: Float>(base: &[F], experts: &[F], n: usize, mask: Mask) -> Vec<F> {
        let oi = base.len();
        let tau: Vec<F> = (0..n * oi).map(|k| experts[k] - base[k % oi]).collect();
        let voters = match mask {
            Mask::TiesTrim(k) => {
                let th = trim_thresholds(base, experts, n, k);
                (0..n * oi)
                    .map(|k| {
                        let (t, h) = (tau[k], th[k / oi]);
                        let a = t.abs();
                        if a.is_nan() || (!h.is_nan() && a >= h) {
                            t
                        } else {
                            F::ZERO
                        }
                    })
                    .collect()
            }
            _ => tau.clone(),
        };
        let elects: Vec<F> = (0..oi)
            .map(|q| {
                let mut s = F::ZERO;
                for v in 0..n {
                    s += voters[v * oi + q];
                }
                s.sgn()
            })
            .collect();
        (0..n * oi)
            .map(|k| {
                let agrees = tau[k].sgn() == elects[k % oi];
                let keep = match mask {
                    Mask::TiesTrim(_) => voters[k] != F::ZERO && agrees,
                    _ => agrees,
                };
                if keep {
                    F::ONE
                } else {
                    F::ZERO
                }
            })
            .collect()
    }

    /// The streaming pass gives the two-pass mask exactly, across chunk edges, with zeros, ties
    /// of |tau| at the threshold and NaNs among the voters.
    #[test]
    fn streaming_matches_two_pass() {
        let (n, o, i) = (5, 37, 300); // O*I = 11100: two full chunks and a partial one
        let oi = o * i;
        let mut s = 7u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) % 7) as f32 - 3.0 // small integers: exact zeros and ties
        };
        let base: Vec<f32> = (0..oi).map(|_| next()).collect();
        let mut experts: Vec<f32> = (0..n * oi).map(|_| next()).collect();
        experts[17] = f32::NAN;
        experts[oi + 4096] = f32::NAN;
        let bt = HostTensor::new(&[o, i], base.clone()).unwrap();
        let et = HostTensor::new(&[n, o, i], experts.clone()).unwrap();
        for mask in [Mask::TiesSign, Mask::TiesTrim(0.2), Mask::TiesTrim(0.9)] {
            let want = two_pass(&base, &experts, n, mask);
            let got = ties_mask(&bt, &et, mask).unwrap();
            assert_eq!(got.data(), &want[..], "{mask:?}");
        }
    }
}
