//! Domain vectors `tau_i = experts[i] - base` and the curvature `U_i = M_i(tau_i)` (SPEC section 3).
//!
//! `kronecker`: U_i = sum_r (A_ri (x) B_ri) tau_i (C_ri (x) D_ri)^T, computed as four mode products on
//! the 4-D view [o1, o2, i1, i2] of each weight, never as an O x O or I x I Kronecker matrix. The x1
//! product mixes rows o2*I apart; the crate's own buffers for its inputs and outputs (tau, t1,
//! dt1) store those rows `SLAB_PAD` elements further apart, so that it and the dA contraction run
//! in place without cache-set conflicts (`mode1`). The x2, x3, x4 products stay inside one slab
//! [o2, I] of the 4-D view, so they run slab by slab on cache-resident buffers. Experts and ranks run in order, blocks and slabs in parallel with fixed partitions, so
//! the result is the same for any thread count.

use super::gemm::{gemm_small, gemm_small_raw, left_small, xyt, View};
use super::{Scratch, SyncPtr};
use crate::error::Result;
use crate::shape::{expect_nonempty, expect_rank, expect_shape, Split};
use crate::tensor::{Float, HostTensor};
use rayon::prelude::*;

pub(crate) use crate::backend::{check_curvature, Dims};

/// The four Kronecker factors on the host ([`crate::backend::Factors`]).
pub type Factors<'a, F> = crate::backend::Factors<'a, HostTensor<F>>;
/// Which M_i to apply, on the host ([`crate::backend::Curvature`]).
pub type Curvature<'a, F> = crate::backend::Curvature<'a, HostTensor<F>>;
/// Gradients of the four factors ([`crate::backend::FactorGrads`]).
pub type FactorGrads<F> = crate::backend::FactorGrads<HostTensor<F>>;
/// Gradients of [`curvature`] ([`crate::backend::CurvatureGrads`]).
pub type CurvatureGrads<F> = crate::backend::CurvatureGrads<HostTensor<F>>;

/// Checks `base` [O, I] and `experts` [N, O, I]; returns (N, O, I).
pub(crate) fn check_weights<F>(
    base: &HostTensor<F>,
    experts: &HostTensor<F>,
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

/// Factors initialised as the official code does: every factor the identity, so M_i = R * I.
/// With `normalised`, `factor_a` is I / R instead, so that M_i = I.
pub fn identity_factors<F: Float>(
    r: usize,
    n: usize,
    split: Split,
    normalised: bool,
) -> [HostTensor<F>; 4] {
    let eye = |k: usize, v: F| {
        HostTensor::from_fn(&[r, n, k, k], |idx| {
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

/// `curved` [N, O, I]: `U_i = M_i(experts[i] - base)`.
pub fn curvature<F: Float>(
    base: &HostTensor<F>,
    experts: &HostTensor<F>,
    curv: &Curvature<F>,
) -> Result<HostTensor<F>> {
    let (n, o, i) = check_weights(base, experts)?;
    let dims = check_curvature(n, o, i, curv)?;
    let mut bufs = vec![("curved", vec![n, o, i])];
    bufs.extend(curved_workspace(&dims, curv));
    super::budget::<F>(&bufs)?;
    Ok(curved_unchecked(base, experts, curv, &dims))
}

/// tau_i = experts[i] - base, written into `out` (length O*I).
pub(crate) fn domain_vector<F: Float>(base: &[F], expert: &[F], out: &mut [F]) {
    for ((t, &w), &e) in out.iter_mut().zip(expert).zip(base) {
        *t = w - e;
    }
}

/// tau_i = experts[i] - base into a padded [o1, slab] buffer (row stride `slab + SLAB_PAD`).
fn domain_vector_padded<F: Float>(base: &[F], expert: &[F], tau: &mut [F], slab: usize) {
    tau.par_chunks_mut(slab + SLAB_PAD)
        .enumerate()
        .for_each(|(a, ta)| {
            let r = a * slab..(a + 1) * slab;
            domain_vector(&base[r.clone()], &expert[r], &mut ta[..slab]);
        });
}

/// The scratch of [`curved_unchecked`] (an upper bound), for the memory check.
pub(crate) fn curved_workspace<F>(
    dims: &Dims,
    curv: &Curvature<F>,
) -> Option<(&'static str, Vec<usize>)> {
    match curv {
        Curvature::Identity => None,
        Curvature::Kronecker(_) => Some((
            "workspace (curvature)",
            vec![
                2 + 2 * super::threads(),
                dims.oi() + dims.split.o1 * SLAB_PAD + Scratch::<F>::PAD,
            ],
        )),
    }
}

/// The buffers of [`fused_backward`] besides its input H (an upper bound), for the memory check.
pub(crate) fn fused_backward_workspace<F>(
    dims: &Dims,
    curv: &Curvature<F>,
    want_curved: bool,
) -> Vec<(&'static str, Vec<usize>)> {
    let (n, o, i) = (dims.n, dims.o, dims.i);
    let mut v = Vec::new();
    if want_curved {
        v.push(("curved (recomputed)", vec![n, o, i]));
    }
    if let Curvature::Kronecker(_) = curv {
        let Split { o1, o2, i1, i2 } = dims.split;
        v.push(("grad_experts", vec![n, o, i]));
        v.push(("grad_factor_a", vec![dims.r, n, o1, o1]));
        v.push(("grad_factor_b", vec![dims.r, n, o2, o2]));
        v.push(("grad_factor_c", vec![dims.r, n, i1, i1]));
        v.push(("grad_factor_d", vec![dims.r, n, i2, i2]));
        v.push((
            "workspace (curvature backward)",
            vec![
                3 + 3 * super::threads(),
                dims.oi() + o1 * SLAB_PAD + Scratch::<F>::PAD,
            ],
        ));
        v.push((
            "workspace (factor partials)",
            vec![o1, o2 * o2 + i1 * i1 + i2 * i2],
        ));
        v.push((
            "workspace (dA split-k partials)",
            vec![(dims.oi() / o1).div_ceil(BLOCK_W), o1 * o1],
        ));
    }
    v
}

/// U for validated inputs.
pub(crate) fn curved_unchecked<F: Float>(
    base: &HostTensor<F>,
    experts: &HostTensor<F>,
    curv: &Curvature<F>,
    dims: &Dims,
) -> HostTensor<F> {
    let oi = dims.oi();
    let mut u = HostTensor::zeros(&[dims.n, dims.o, dims.i]);
    match curv {
        Curvature::Identity => u
            .data_mut()
            .par_chunks_mut(oi)
            .enumerate()
            .for_each(|(e, ue)| {
                domain_vector(base.data(), &experts.data()[e * oi..(e + 1) * oi], ue)
            }),
        // Experts in order, each parallel inside (column blocks, then slabs): N = 7 experts do
        // not split evenly over a few threads, the 32+ blocks of one expert do.
        Curvature::Kronecker(f) => {
            let slab = oi / dims.split.o1;
            let padded = dims.split.o1 * (slab + SLAB_PAD);
            let mut tau = Scratch::zeros(padded);
            let mut t1 = Scratch::zeros(padded);
            for (e, ue) in u.data_mut().chunks_mut(oi).enumerate() {
                let expert = &experts.data()[e * oi..(e + 1) * oi];
                domain_vector_padded(base.data(), expert, &mut tau, slab);
                for r in 0..dims.r {
                    kron_rank_forward(&tau, &mut t1, ue, f, e, r, dims, r > 0);
                }
            }
        }
    }
    u
}

/// Extra elements between the o1 rows (slabs) of the crate's own [o1, o2*I] buffers. Rows o2*I
/// apart are a multiple of 4 KiB at every SPEC shape, so the o1 rows that the x1 product and the
/// dA contraction read side by side would all fall into one cache set; one more cache line per row
/// spreads them over o1 sets. Before, each block was copied into a packed buffer and back: 11 % of
/// a T5-small forward in memmove.
const SLAB_PAD: usize = 16;

/// Columns per parallel block of the mode-1 product, which are also the split-k chunks of the dA
/// contraction: the o1 rows of a block (128 KiB at o1 = 32 in f32) stay in L2 for both.
const BLOCK_W: usize = 1024;

/// y (+)= M x (M^T x when `transpose`) for x, y [o1, rest] with row strides `xs`, `ys` and M the
/// o1 x o1 factor at `m[m_off..]`: the mode-1 product, in parallel column blocks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mode1<F: Float>(
    y: &mut [F],
    ys: usize,
    x: &[F],
    xs: usize,
    (o1, rest): (usize, usize),
    m: &[F],
    m_off: usize,
    transpose: bool,
    accumulate: bool,
) {
    let mode = (m, m_off, transpose, accumulate);
    mode1_blocks(y, ys, x, xs, (o1, rest), mode, None);
}

/// [`mode1`] with `mode` = (m, m_off, transpose, accumulate); with `contract` = (z, zs, dst), also
/// dst [o1, o1] = x z^T (the dA contraction) as split-k over the same column blocks, partials
/// summed in block order, so each block of x is read once for both. Blocks are fixed, and within a
/// block k = o1 is not split, so the bits do not depend on the thread count.
#[allow(clippy::type_complexity)]
fn mode1_blocks<F: Float>(
    y: &mut [F],
    ys: usize,
    x: &[F],
    xs: usize,
    (o1, rest): (usize, usize),
    (m, m_off, transpose, accumulate): (&[F], usize, bool, bool),
    contract: Option<(&[F], usize, &mut [F])>,
) {
    let mv = View::rm(m_off, o1, o1);
    let mv = if transpose { mv.t() } else { mv };
    let (yp, ylen) = (SyncPtr(y.as_mut_ptr()), y.len());
    let z = contract.as_ref().map(|(z, zs, _)| (*z, *zs));
    let partials: Vec<Vec<F>> = (0..rest.div_ceil(BLOCK_W))
        .into_par_iter()
        .map(|b| {
            let c0 = b * BLOCK_W;
            let w = BLOCK_W.min(rest - c0);
            let view = |rs| View {
                off: c0,
                rows: o1,
                cols: w,
                rs,
                cs: 1,
            };
            // SAFETY: y is an exclusive borrow of ylen elements; block b alone touches its
            // columns c0..c0+w (blocks are disjoint), and x and m are other buffers.
            unsafe { gemm_small_raw(yp.get(), ylen, view(ys), accumulate, m, mv, x, view(xs)) };
            match z {
                Some((z, zs)) => {
                    let mut part = vec![F::ZERO; o1 * o1];
                    xyt(
                        &mut part,
                        o1,
                        false,
                        &x[c0..],
                        xs,
                        &z[c0..],
                        zs,
                        (o1, o1, w),
                        (1, 0),
                    );
                    part
                }
                None => Vec::new(),
            }
        })
        .collect();
    if let Some((_, _, dst)) = contract {
        dst.copy_from_slice(&partials[0]);
        for p in &partials[1..] {
            dst.iter_mut().zip(p).for_each(|(d, &v)| *d += v);
        }
    }
}

/// Per-row mode-3 product on a slab [o2, i1, i2]: y_b = M x_b (M^T x_b when `transpose`) for
/// every row b, M the i1 x i1 factor.
#[allow(clippy::too_many_arguments)]
fn mode3_rows<F: Float>(
    y: &mut [F],
    x: &[F],
    rows: usize,
    i1: usize,
    i2: usize,
    m: &[F],
    m_off: usize,
    transpose: bool,
) {
    left_small(y, x, rows, (i1, i2), m, m_off, transpose);
}

/// One rank of U for expert `e`: t1 = tau x1 A, then per slab a (o2 x I, cache-resident):
/// x2 B, x3 C, x4 D into u (accumulated when `accumulate`).
#[allow(clippy::too_many_arguments)]
fn kron_rank_forward<F: Float>(
    tau: &[F],
    t1: &mut [F],
    u: &mut [F],
    f: &Factors<F>,
    e: usize,
    r: usize,
    dims: &Dims,
    accumulate: bool,
) {
    let Split { o1, o2, i1, i2 } = dims.split;
    let (n, ii) = (dims.n, dims.i);
    let slab = o2 * ii;
    let ps = slab + SLAB_PAD;
    mode1(
        t1,
        ps,
        tau,
        ps,
        (o1, slab),
        f.a.data(),
        foff(r, e, n, o1),
        false,
        false,
    );
    let t1: &[F] = t1;
    u.par_chunks_mut(slab).enumerate().for_each_init(
        || (Scratch::zeros(slab), Scratch::zeros(slab)),
        |(t2, t3), (a, ua)| {
            let xs = &t1[a * ps..a * ps + slab];
            let v = View::rm(0, o2, ii);
            gemm_small(
                t2,
                v,
                false,
                f.b.data(),
                View::rm(foff(r, e, n, o2), o2, o2),
                xs,
                v,
            );
            mode3_rows(t3, t2, o2, i1, i2, f.c.data(), foff(r, e, n, i1), false);
            let v = View::rm(0, o2 * i1, i2);
            gemm_small(
                ua,
                v,
                accumulate,
                t3,
                v,
                f.d.data(),
                View::rm(foff(r, e, n, i2), i2, i2).t(),
            );
        },
    );
}

/// Offset of factor (r, expert) of size k x k in a [R, N, k, k] tensor.
#[inline]
fn foff(r: usize, e: usize, n: usize, k: usize) -> usize {
    (r * n + e) * k * k
}

/// `curvature` backward: from `grad_curved` [N, O, I] to the base, the experts and the factors.
pub fn curvature_backward<F: Float>(
    base: &HostTensor<F>,
    experts: &HostTensor<F>,
    curv: &Curvature<F>,
    grad_curved: &HostTensor<F>,
) -> Result<CurvatureGrads<F>> {
    let (n, o, i) = check_weights(base, experts)?;
    let dims = check_curvature(n, o, i, curv)?;
    expect_shape("grad_curved", grad_curved.shape(), &[n, o, i])?;
    let mut bufs = vec![
        ("grad_curved (copy)", vec![n, o, i]),
        ("grad_base", vec![2, o, i]),
    ];
    bufs.extend(fused_backward_workspace(&dims, curv, false));
    super::budget::<F>(&bufs)?;
    let back = fused_backward(base, experts, curv, &dims, grad_curved.clone(), false);
    let grad_base = neg_sum_experts(&back.grad_tau, &dims);
    Ok(CurvatureGrads {
        grad_base,
        grad_experts: back.grad_tau,
        factors: back.factors,
    })
}

/// -sum_i grad_tau_i, in expert order (deterministic).
pub(crate) fn neg_sum_experts<F: Float>(grad_tau: &HostTensor<F>, dims: &Dims) -> HostTensor<F> {
    let s = super::sum_stack(grad_tau.data(), dims.oi());
    HostTensor::from_fn(&[dims.o, dims.i], |q| -s[q])
}

/// What the fused reverse pass returns.
pub(crate) struct FusedBack<F> {
    /// U = M(tau) [N, O, I], when asked for (the forward, recomputed on the way).
    pub curved: Option<HostTensor<F>>,
    /// dL/dtau [N, O, I].
    pub grad_tau: HostTensor<F>,
    pub factors: Option<FactorGrads<F>>,
}

/// From H = dL/dU [N, O, I] (consumed) to dL/dtau and the factor gradients, recomputing U on the way
/// when `want_curved` (the CA-merge backward needs it for grad_scores and grad_beta).
///
/// Per expert and rank: the forward chain t1 = tau x1 A, t2 = t1 x2 B, t3 = t2 x3 C (and U += t3 x4 D),
/// then the reverse chain dt3 = H x4 D^T, dt2 = dt3 x3 C^T, dt1 = dt2 x2 B^T, dtau += dt1 x1 A^T with
/// one contraction per factor (dD from H and t3, dC from dt3 and t2, dB from dt2 and t1, dA from dt1
/// and tau): 8 mode products and 4 contractions, all but the two x1 products on cache-resident slabs.
pub(crate) fn fused_backward<F: Float>(
    base: &HostTensor<F>,
    experts: &HostTensor<F>,
    curv: &Curvature<F>,
    dims: &Dims,
    h: HostTensor<F>,
    want_curved: bool,
) -> FusedBack<F> {
    let want_u = want_curved;
    let f = match curv {
        Curvature::Identity => {
            let curved = want_u.then(|| curved_unchecked(base, experts, curv, dims));
            return FusedBack {
                curved,
                grad_tau: h,
                factors: None,
            };
        }
        Curvature::Kronecker(f) => f,
    };
    let oi = dims.oi();
    let Split { o1, o2, i1, i2 } = dims.split;
    let (n, rk) = (dims.n, dims.r);
    let mut grad_tau = HostTensor::zeros(&[n, dims.o, dims.i]);
    let mut u = want_u.then(|| HostTensor::zeros(&[n, dims.o, dims.i]));
    let mut ga = HostTensor::zeros(&[rk, n, o1, o1]);
    let mut gb = HostTensor::zeros(&[rk, n, o2, o2]);
    let mut gc = HostTensor::zeros(&[rk, n, i1, i1]);
    let mut gd = HostTensor::zeros(&[rk, n, i2, i2]);
    let slab = oi / o1;
    let ps = slab + SLAB_PAD;
    let mut tau = Scratch::zeros(o1 * ps);
    let mut t1 = Scratch::zeros(o1 * ps);
    let mut dt1 = Scratch::zeros(o1 * ps);
    for e in 0..n {
        domain_vector_padded(
            base.data(),
            &experts.data()[e * oi..(e + 1) * oi],
            &mut tau,
            slab,
        );
        let he = &h.data()[e * oi..(e + 1) * oi];
        for r in 0..rk {
            let ue = u.as_mut().map(|t| &mut t.data_mut()[e * oi..(e + 1) * oi]);
            let [db, dc, dd] = kron_rank_backward(&tau, he, &mut t1, &mut dt1, ue, f, e, r, dims);
            gb.data_mut()[foff(r, e, n, o2)..][..o2 * o2].copy_from_slice(&db);
            gc.data_mut()[foff(r, e, n, i1)..][..i1 * i1].copy_from_slice(&dc);
            gd.data_mut()[foff(r, e, n, i2)..][..i2 * i2].copy_from_slice(&dd);
            // dtau (+)= A^T dt1, and dA = dt1 [o1, slab] @ tau^T [slab, o1] on the same blocks.
            let da = &mut ga.data_mut()[foff(r, e, n, o1)..][..o1 * o1];
            let gte = &mut grad_tau.data_mut()[e * oi..(e + 1) * oi];
            let mode = (f.a.data(), foff(r, e, n, o1), true, r > 0);
            mode1_blocks(gte, slab, &dt1, ps, (o1, slab), mode, Some((&tau, ps, da)));
        }
    }
    let grads = FactorGrads {
        grad_factor_a: ga,
        grad_factor_b: gb,
        grad_factor_c: gc,
        grad_factor_d: gd,
    };
    FusedBack {
        curved: u,
        grad_tau,
        factors: Some(grads),
    }
}

/// One rank of the reverse chain for expert `e`, slab by slab (o2 x I, cache-resident):
/// recomputes t1 = tau x1 A (into `t1`), and per slab t2 = t1 x2 B, t3 = t2 x3 C (and U += t3 x4 D
/// when `u` is given); then dt3 = H x4 D^T, dD = H^T t3; dt2 = dt3 x3 C^T, dC = sum_b dt3_b t2_b^T;
/// dt1 = dt2 x2 B^T (into `dt1`), dB = dt2 t1^T. Returns [dB, dC, dD] with the per-slab
/// partial sums added in slab order (deterministic for any thread count).
#[allow(clippy::too_many_arguments)]
fn kron_rank_backward<F: Float>(
    tau: &[F],
    h: &[F],
    t1: &mut [F],
    dt1: &mut [F],
    u: Option<&mut [F]>,
    f: &Factors<F>,
    e: usize,
    r: usize,
    dims: &Dims,
) -> [Vec<F>; 3] {
    let Split { o1, o2, i1, i2 } = dims.split;
    let (n, ii) = (dims.n, dims.i);
    let slab = o2 * ii;
    let ps = slab + SLAB_PAD;
    mode1(
        t1,
        ps,
        tau,
        ps,
        (o1, slab),
        f.a.data(),
        foff(r, e, n, o1),
        false,
        false,
    );
    let t1: &[F] = t1;
    let (ob, oc, od) = (foff(r, e, n, o2), foff(r, e, n, i1), foff(r, e, n, i2));
    let up = u.map(|u| (SyncPtr(u.as_mut_ptr()), u.len()));
    let partials: Vec<[Vec<F>; 3]> = dt1
        .par_chunks_mut(ps)
        .enumerate()
        .map_init(
            || {
                (
                    Scratch::zeros(slab),
                    Scratch::zeros(slab),
                    Scratch::zeros(slab),
                )
            },
            |(t2, t3, w), (a, dt1a)| {
                let dt1a = &mut dt1a[..slab];
                let t1a = &t1[a * ps..a * ps + slab];
                let ha = &h[a * slab..(a + 1) * slab];
                let vs = View::rm(0, o2, ii);
                let vd = View::rm(0, o2 * i1, i2);
                gemm_small(t2, vs, false, f.b.data(), View::rm(ob, o2, o2), t1a, vs);
                mode3_rows(t3, t2, o2, i1, i2, f.c.data(), oc, false);
                if let Some((p, len)) = up {
                    assert!((a + 1) * slab <= len);
                    // SAFETY: slab a of U is written by this task alone, and is inside U.
                    let ua = unsafe { std::slice::from_raw_parts_mut(p.get().add(a * slab), slab) };
                    gemm_small(ua, vd, r > 0, t3, vd, f.d.data(), View::rm(od, i2, i2).t());
                }
                let mut dd = vec![F::ZERO; i2 * i2];
                gemm_small(&mut dd, View::rm(0, i2, i2), false, ha, vd.t(), t3, vd);
                // dt3 = H D (into w)
                gemm_small(w, vd, false, ha, vd, f.d.data(), View::rm(od, i2, i2));
                // dC = sum_b dt3_b t2_b^T: the o2 rows b are the summed segments.
                let mut dc = vec![F::ZERO; i1 * i1];
                xyt(
                    &mut dc,
                    i1,
                    false,
                    w,
                    i2,
                    t2,
                    i2,
                    (i1, i1, i2),
                    (o2, i1 * i2),
                );
                // dt2 = C^T dt3 per row (into t3, no longer needed)
                mode3_rows(t3, w, o2, i1, i2, f.c.data(), oc, true);
                let mut db = vec![F::ZERO; o2 * o2];
                xyt(&mut db, o2, false, t3, ii, t1a, ii, (o2, o2, ii), (1, 0));
                gemm_small(
                    dt1a,
                    vs,
                    false,
                    f.b.data(),
                    View::rm(ob, o2, o2).t(),
                    t3,
                    vs,
                );
                [db, dc, dd]
            },
        )
        .collect();
    let mut out = [
        vec![F::ZERO; o2 * o2],
        vec![F::ZERO; i1 * i1],
        vec![F::ZERO; i2 * i2],
    ];
    for p in &partials {
        for k in 0..3 {
            out[k].iter_mut().zip(&p[k]).for_each(|(o, &v)| *o += v);
        }
    }
    out
}
