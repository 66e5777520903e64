//! Domain vectors tau_i = experts[i] - base and the curvature U_i = M_i(tau_i) (SPEC section 3).
//!
//! `kronecker`: U_i = sum_r (A_ri (x) B_ri) tau_i (C_ri (x) D_ri)^T, computed as four mode products on
//! the 4-D view [o1, o2, i1, i2] of each weight, never as an O x O or I x I Kronecker matrix. Each mode
//! product is a handful of GEMM calls (see [`mode_product`]); experts run in parallel, ranks in order,
//! so the result is the same for any thread count.

use super::gemm::{gemm, View};
use crate::error::{Error, Result};
use crate::shape::{expect_nonempty, expect_rank, expect_shape, Split};
use crate::tensor::{Float, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// The four Kronecker factors `factor_a` [R, N, o1, o1], `factor_b` [R, N, o2, o2],
/// `factor_c` [R, N, i1, i1], `factor_d` [R, N, i2, i2].
#[derive(Debug, Clone, Copy)]
pub struct Factors<'a, F> {
    pub a: &'a Tensor<F>,
    pub b: &'a Tensor<F>,
    pub c: &'a Tensor<F>,
    pub d: &'a Tensor<F>,
}

/// Which M_i to apply.
#[derive(Debug, Clone, Copy)]
pub enum Curvature<'a, F> {
    /// U_i = tau_i: domain-specific merging, no curvature.
    Identity,
    /// U_i = sum_r (A (x) B) tau_i (C (x) D)^T.
    Kronecker(Factors<'a, F>),
}

/// Gradients of the four factors, shaped like them.
#[derive(Debug, Clone, PartialEq)]
pub struct FactorGrads<F> {
    pub grad_factor_a: Tensor<F>,
    pub grad_factor_b: Tensor<F>,
    pub grad_factor_c: Tensor<F>,
    pub grad_factor_d: Tensor<F>,
}

/// Gradients of `curvature`: `factors` is `None` for the identity curvature.
#[derive(Debug, Clone, PartialEq)]
pub struct CurvatureGrads<F> {
    pub grad_base: Tensor<F>,
    pub grad_experts: Tensor<F>,
    pub factors: Option<FactorGrads<F>>,
}

/// Validated sizes of a (base, experts, curvature) triple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
    pub n: usize,
    pub o: usize,
    pub i: usize,
    /// Rank R (0 for the identity curvature).
    pub r: usize,
    pub split: Split,
}

impl Dims {
    pub fn oi(&self) -> usize {
        self.o * self.i
    }
    fn d4(&self) -> [usize; 4] {
        [self.split.o1, self.split.o2, self.split.i1, self.split.i2]
    }
}

/// Checks `base` [O, I] and `experts` [N, O, I]; returns (N, O, I).
pub(crate) fn check_weights<F>(
    base: &Tensor<F>,
    experts: &Tensor<F>,
) -> Result<(usize, usize, usize)> {
    expect_rank("base", base.shape(), 2, "[O, I]")?;
    expect_nonempty("base", base.shape())?;
    expect_rank("experts", experts.shape(), 3, "[N, O, I]")?;
    expect_nonempty("experts", experts.shape())?;
    let (o, i) = (base.shape()[0], base.shape()[1]);
    let n = experts.shape()[0];
    expect_shape("experts", experts.shape(), &[n, o, i])?;
    Ok((n, o, i))
}

/// Checks a curvature against (N, O, I) and returns the full dimensions.
pub(crate) fn check_curvature<F>(
    n: usize,
    o: usize,
    i: usize,
    curv: &Curvature<F>,
) -> Result<Dims> {
    let f = match curv {
        Curvature::Identity => {
            return Ok(Dims {
                n,
                o,
                i,
                r: 0,
                split: Split {
                    o1: 1,
                    o2: o,
                    i1: 1,
                    i2: i,
                },
            })
        }
        Curvature::Kronecker(f) => f,
    };
    expect_rank("factor_a", f.a.shape(), 4, "[R, N, o1, o1]")?;
    expect_nonempty("factor_a", f.a.shape())?;
    let r = f.a.shape()[0];
    let o1 = f.a.shape()[2];
    expect_shape("factor_a", f.a.shape(), &[r, n, o1, o1])?;
    if o % o1 != 0 {
        return Err(Error::shape(
            "factor_a",
            format!("[R, N, o1, o1] with o1 dividing O = {o}"),
            f.a.shape(),
        ));
    }
    let o2 = o / o1;
    expect_rank("factor_b", f.b.shape(), 4, "[R, N, o2, o2]")?;
    expect_shape("factor_b", f.b.shape(), &[r, n, o2, o2])?;
    expect_rank("factor_c", f.c.shape(), 4, "[R, N, i1, i1]")?;
    expect_nonempty("factor_c", f.c.shape())?;
    let i1 = f.c.shape()[2];
    if i % i1 != 0 {
        return Err(Error::shape(
            "factor_c",
            format!("[R, N, i1, i1] with i1 dividing I = {i}"),
            f.c.shape(),
        ));
    }
    expect_shape("factor_c", f.c.shape(), &[r, n, i1, i1])?;
    let i2 = i / i1;
    expect_rank("factor_d", f.d.shape(), 4, "[R, N, i2, i2]")?;
    expect_shape("factor_d", f.d.shape(), &[r, n, i2, i2])?;
    Ok(Dims {
        n,
        o,
        i,
        r,
        split: Split { o1, o2, i1, i2 },
    })
}

/// Factors initialised as the official code does: every factor the identity, so M_i = R * I.
/// With `normalised`, `factor_a` is I / R instead, so that M_i = I.
pub fn identity_factors<F: Float>(
    r: usize,
    n: usize,
    split: Split,
    normalised: bool,
) -> [Tensor<F>; 4] {
    let eye = |k: usize, v: F| {
        Tensor::from_fn(&[r, n, k, k], |idx| {
            let rc = idx % (k * k);
            if rc / k == rc % k {
                v
            } else {
                F::ZERO
            }
        })
    };
    let a_diag = if normalised {
        F::ONE / F::from_f64(r as f64)
    } else {
        F::ONE
    };
    [
        eye(split.o1, a_diag),
        eye(split.o2, F::ONE),
        eye(split.i1, F::ONE),
        eye(split.i2, F::ONE),
    ]
}

/// `curved` [N, O, I]: U_i = M_i(experts[i] - base).
pub fn curvature<F: Float>(
    base: &Tensor<F>,
    experts: &Tensor<F>,
    curv: &Curvature<F>,
) -> Result<Tensor<F>> {
    let (n, o, i) = check_weights(base, experts)?;
    let dims = check_curvature(n, o, i, curv)?;
    Ok(curved_unchecked(base, experts, curv, &dims))
}

/// tau_i = experts[i] - base, written into `out` (length O*I).
pub(crate) fn domain_vector<F: Float>(base: &[F], expert: &[F], out: &mut [F]) {
    for ((t, &w), &e) in out.iter_mut().zip(expert).zip(base) {
        *t = w - e;
    }
}

/// Ranks split into two fixed halves that run side by side (`rayon::join`) and are summed in a fixed
/// order: both cores stay busy for any N, and the bits do not depend on the thread count.
fn rank_halves(r: usize) -> (Range<usize>, Range<usize>) {
    let h = r.div_ceil(2);
    (0..h, h..r)
}

/// dst += src, elementwise.
fn add_into<F: Float>(dst: &mut [F], src: &[F]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
}

/// U for validated inputs.
pub(crate) fn curved_unchecked<F: Float>(
    base: &Tensor<F>,
    experts: &Tensor<F>,
    curv: &Curvature<F>,
    dims: &Dims,
) -> Tensor<F> {
    let oi = dims.oi();
    let mut u = Tensor::zeros(&[dims.n, dims.o, dims.i]);
    u.data_mut()
        .par_chunks_mut(oi)
        .enumerate()
        .for_each(|(e, ue)| {
            let w = &experts.data()[e * oi..(e + 1) * oi];
            match curv {
                Curvature::Identity => domain_vector(base.data(), w, ue),
                Curvature::Kronecker(f) => {
                    let mut tau = vec![F::ZERO; oi];
                    domain_vector(base.data(), w, &mut tau);
                    let (lo, hi) = rank_halves(dims.r);
                    if hi.is_empty() {
                        kron_forward(&tau, ue, f, e, dims, lo);
                    } else {
                        let mut other = vec![F::ZERO; oi];
                        rayon::join(
                            || kron_forward(&tau, ue, f, e, dims, lo),
                            || kron_forward(&tau, &mut other, f, e, dims, hi),
                        );
                        add_into(ue, &other);
                    }
                }
            }
        });
    u
}

/// Offset of factor (r, expert) of size k x k in a [R, N, k, k] tensor.
#[inline]
fn foff(r: usize, e: usize, n: usize, k: usize) -> usize {
    (r * n + e) * k * k
}

/// u = sum_{r in ranks} tau x1 A x2 B x3 C x4 D for expert `e`.
fn kron_forward<F: Float>(
    tau: &[F],
    u: &mut [F],
    f: &Factors<F>,
    e: usize,
    dims: &Dims,
    ranks: Range<usize>,
) {
    let d4 = dims.d4();
    let Split { o1, o2, i1, i2 } = dims.split;
    let n = dims.n;
    let mut s1 = vec![F::ZERO; dims.oi()];
    let mut s2 = vec![F::ZERO; dims.oi()];
    let first = ranks.start;
    for r in ranks {
        mode_product(&mut s1, tau, d4, 0, f.a.data(), foff(r, e, n, o1), false, false);
        mode_product(&mut s2, &s1, d4, 1, f.b.data(), foff(r, e, n, o2), false, false);
        mode_product(&mut s1, &s2, d4, 2, f.c.data(), foff(r, e, n, i1), false, false);
        mode_product(u, &s1, d4, 3, f.d.data(), foff(r, e, n, i2), false, r > first);
    }
}

/// y (+)= x x_mode M, i.e. y[.., j, ..] = sum_j' M[j, j'] x[.., j', ..] on the 4-D view `d4`
/// (M^T when `transpose`). M is the k x k matrix at `m[m_off..]`, k = d4[mode].
///
/// A mode product is `outer` independent (k x k) @ (k x inner) products; it runs as whichever of
/// `outer` GEMMs of width `inner` or `inner` strided GEMMs of height `outer` takes fewer calls.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mode_product<F: Float>(
    y: &mut [F],
    x: &[F],
    d4: [usize; 4],
    mode: usize,
    m: &[F],
    m_off: usize,
    transpose: bool,
    accumulate: bool,
) {
    let k = d4[mode];
    let outer: usize = d4[..mode].iter().product();
    let inner: usize = d4[mode + 1..].iter().product();
    let mv = View::rm(m_off, k, k);
    let mv = if transpose { mv.t() } else { mv };
    if outer <= inner {
        for o in 0..outer {
            let v = View::rm(o * k * inner, k, inner);
            gemm(y, v, accumulate, m, mv, x, v, F::ONE, false);
        }
    } else {
        for t in 0..inner {
            let v = View {
                off: t,
                rows: outer,
                cols: k,
                rs: k * inner,
                cs: inner,
            };
            gemm(y, v, accumulate, x, v, m, mv.t(), F::ONE, false);
        }
    }
}

/// `curvature` backward: from `grad_curved` [N, O, I] to the base, the experts and the factors.
pub fn curvature_backward<F: Float>(
    base: &Tensor<F>,
    experts: &Tensor<F>,
    curv: &Curvature<F>,
    grad_curved: &Tensor<F>,
) -> Result<CurvatureGrads<F>> {
    let (n, o, i) = check_weights(base, experts)?;
    let dims = check_curvature(n, o, i, curv)?;
    expect_shape("grad_curved", grad_curved.shape(), &[n, o, i])?;
    let back = fused_backward(base, experts, curv, &dims, grad_curved.clone(), false);
    let grad_base = neg_sum_experts(&back.grad_tau, &dims);
    Ok(CurvatureGrads {
        grad_base,
        grad_experts: back.grad_tau,
        factors: back.factors,
    })
}

/// -sum_i grad_tau_i, in expert order (deterministic).
pub(crate) fn neg_sum_experts<F: Float>(grad_tau: &Tensor<F>, dims: &Dims) -> Tensor<F> {
    let oi = dims.oi();
    let mut out = Tensor::zeros(&[dims.o, dims.i]);
    out.data_mut()
        .par_chunks_mut(4096)
        .enumerate()
        .for_each(|(c, chunk)| {
            let start = c * 4096;
            for (j, v) in chunk.iter_mut().enumerate() {
                let mut s = F::ZERO;
                for e in 0..dims.n {
                    s += grad_tau.data()[e * oi + start + j];
                }
                *v = -s;
            }
        });
    out
}

/// What the fused reverse pass returns.
pub(crate) struct FusedBack<F> {
    /// U = M(tau) [N, O, I], when asked for (the forward, recomputed on the way).
    pub curved: Option<Tensor<F>>,
    /// dL/dtau [N, O, I].
    pub grad_tau: Tensor<F>,
    pub factors: Option<FactorGrads<F>>,
}

/// From H = dL/dU [N, O, I] (consumed) to dL/dtau and the factor gradients, recomputing U on the way
/// when `want_curved` (the CA-merge backward needs it for grad_scores and grad_beta).
///
/// Per expert and rank it costs 10 mode products and 4 contractions: the forward chain
/// tau x1 A x2 B x3 C gives the partial product for dD directly and, one product later, the one for dC;
/// the transposed chain H x4 D^T x3 C^T gives dA, dB and dL/dtau.
pub(crate) fn fused_backward<F: Float>(
    base: &Tensor<F>,
    experts: &Tensor<F>,
    curv: &Curvature<F>,
    dims: &Dims,
    h: Tensor<F>,
    want_curved: bool,
) -> FusedBack<F> {
    let oi = dims.oi();
    let f = match curv {
        Curvature::Identity => {
            let curved = want_curved.then(|| {
                let mut u = Tensor::zeros(&[dims.n, dims.o, dims.i]);
                u.data_mut().par_chunks_mut(oi).enumerate().for_each(|(e, ue)| {
                    domain_vector(base.data(), &experts.data()[e * oi..(e + 1) * oi], ue)
                });
                u
            });
            return FusedBack {
                curved,
                grad_tau: h,
                factors: None,
            };
        }
        Curvature::Kronecker(f) => f,
    };
    let Split { o1, o2, i1, i2 } = dims.split;
    let (n, rk) = (dims.n, dims.r);
    let mut grad_tau = Tensor::zeros(&[n, dims.o, dims.i]);
    let u_shape = [if want_curved { n } else { 0 }, dims.o, dims.i];
    let mut curved = Tensor::zeros(&u_shape);
    let u_chunks: Vec<&mut [F]> = if want_curved {
        curved.data_mut().chunks_mut(oi).collect()
    } else {
        Vec::new()
    };
    let mut u_slots: Vec<Option<&mut [F]>> = u_chunks.into_iter().map(Some).collect();
    u_slots.resize_with(n, || None);
    // Per expert: [dA, dB, dC, dD] as [R][k*k], scattered into [R, N, k, k] afterwards.
    let per_expert: Vec<[Vec<F>; 4]> = grad_tau
        .data_mut()
        .par_chunks_mut(oi)
        .zip(u_slots.into_par_iter())
        .enumerate()
        .map(|(e, (gt, ue))| {
            let mut tau = vec![F::ZERO; oi];
            domain_vector(base.data(), &experts.data()[e * oi..(e + 1) * oi], &mut tau);
            let he = &h.data()[e * oi..(e + 1) * oi];
            let (lo, hi) = rank_halves(rk);
            if hi.is_empty() {
                return kron_backward(&tau, he, gt, ue, f, e, dims, lo);
            }
            let mut ue = ue;
            let mut gt2 = vec![F::ZERO; oi];
            let mut u2 = ue.as_ref().map(|_| vec![F::ZERO; oi]);
            let (mut g_lo, g_hi) = rayon::join(
                || kron_backward(&tau, he, gt, ue.as_deref_mut(), f, e, dims, lo),
                || kron_backward(&tau, he, &mut gt2, u2.as_deref_mut(), f, e, dims, hi),
            );
            // The halves are summed in a fixed order; their factor grads are disjoint ranks.
            add_into(gt, &gt2);
            if let (Some(u), Some(u2)) = (ue, u2) {
                add_into(u, &u2);
            }
            for (a, b) in g_lo.iter_mut().zip(g_hi) {
                a.extend(b);
            }
            g_lo
        })
        .collect();
    let scatter = |k: usize, which: usize| {
        let mut t = Tensor::zeros(&[rk, n, k, k]);
        for (e, g) in per_expert.iter().enumerate() {
            for r in 0..rk {
                let dst = foff(r, e, n, k);
                t.data_mut()[dst..dst + k * k].copy_from_slice(&g[which][r * k * k..(r + 1) * k * k]);
            }
        }
        t
    };
    let factors = FactorGrads {
        grad_factor_a: scatter(o1, 0),
        grad_factor_b: scatter(o2, 1),
        grad_factor_c: scatter(i1, 2),
        grad_factor_d: scatter(i2, 3),
    };
    FusedBack {
        curved: want_curved.then_some(curved),
        grad_tau,
        factors: Some(factors),
    }
}

/// One expert's fused reverse chain over `ranks`: writes dL/dtau into `gt` and, when given, U into
/// `u`; returns [dA, dB, dC, dD] for those ranks as [ranks][k*k].
///
/// dD and dC contract H with the forward partials tau x1 A x2 B x3 C and tau x1 A x2 B x4 D; dA and
/// dB move C and D (transposed) onto H instead: dA = (H x4 D^T x3 C^T x2 B^T)_(1) tau_(1)^T and
/// dB from H x4 D^T x3 C^T x1 A^T, whose x2 B^T is also dL/dtau.
#[allow(clippy::too_many_arguments)]
fn kron_backward<F: Float>(
    tau: &[F],
    h: &[F],
    gt: &mut [F],
    mut u: Option<&mut [F]>,
    f: &Factors<F>,
    e: usize,
    dims: &Dims,
    ranks: Range<usize>,
) -> [Vec<F>; 4] {
    let d4 = dims.d4();
    let Split { o1, o2, i1, i2 } = dims.split;
    let (n, oi, o, ii) = (dims.n, dims.oi(), dims.o, dims.i);
    let nr = ranks.len();
    let mut ga = vec![F::ZERO; nr * o1 * o1];
    let mut gb = vec![F::ZERO; nr * o2 * o2];
    let mut gc = vec![F::ZERO; nr * i1 * i1];
    let mut gd = vec![F::ZERO; nr * i2 * i2];
    let mut s1 = vec![F::ZERO; oi];
    let mut s2 = vec![F::ZERO; oi];
    let mut kk = vec![F::ZERO; oi];
    let first = ranks.start;
    for r in ranks {
        let j = r - first;
        let (oa, ob) = (foff(r, e, n, o1), foff(r, e, n, o2));
        let (oc, od) = (foff(r, e, n, i1), foff(r, e, n, i2));
        // Forward partials: T_AB = tau x1 A x2 B; Y_D = T_AB x3 C; U += Y_D x4 D.
        mode_product(&mut s1, tau, d4, 0, f.a.data(), oa, false, false);
        mode_product(&mut s2, &s1, d4, 1, f.b.data(), ob, false, false);
        mode_product(&mut s1, &s2, d4, 2, f.c.data(), oc, false, false);
        if let Some(u) = u.as_deref_mut() {
            mode_product(u, &s1, d4, 3, f.d.data(), od, false, r > first);
        }
        // dD[d, d'] = sum_{p, c} H[p, c, d] Y_D[p, c, d']
        let v = View::rm(0, o * i1, i2);
        gemm(&mut gd, View::rm(j * i2 * i2, i2, i2), false, h, v.t(), &s1, v, F::ONE, false);
        // Y_C = T_AB x4 D; dC[c, c'] = sum_{p, d} H[p, c, d] Y_C[p, c', d]
        mode_product(&mut s1, &s2, d4, 3, f.d.data(), od, false, false);
        for d in 0..i2 {
            let v = View {
                off: d,
                rows: o,
                cols: i1,
                rs: ii,
                cs: i2,
            };
            gemm(&mut gc, View::rm(j * i1 * i1, i1, i1), d > 0, h, v.t(), &s1, v, F::ONE, false);
        }
        // K_CD = H x4 D^T x3 C^T
        mode_product(&mut s1, h, d4, 3, f.d.data(), od, true, false);
        mode_product(&mut kk, &s1, d4, 2, f.c.data(), oc, true, false);
        // Z = K_CD x2 B^T; dA[a, a'] = sum Z[a, :] tau[a', :]
        mode_product(&mut s2, &kk, d4, 1, f.b.data(), ob, true, false);
        let rest = oi / o1;
        let v = View::rm(0, o1, rest);
        gemm(&mut ga, View::rm(j * o1 * o1, o1, o1), false, &s2, v, tau, v.t(), F::ONE, false);
        // W = K_CD x1 A^T; dB[b, b'] = sum_a W[a, b, :] tau[a, b', :]; dtau += W x2 B^T
        mode_product(&mut s2, &kk, d4, 0, f.a.data(), oa, true, false);
        for a in 0..o1 {
            let v = View::rm(a * o2 * ii, o2, ii);
            gemm(&mut gb, View::rm(j * o2 * o2, o2, o2), a > 0, &s2, v, tau, v.t(), F::ONE, false);
        }
        mode_product(gt, &s2, d4, 1, f.b.data(), ob, true, r > first);
    }
    [ga, gb, gc, gd]
}
