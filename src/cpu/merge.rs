//! The merge `Wbar_g = E + alpha * sum_i s[g,i] zeta[g,i] (m_i (.) U_i)` and the fused CA-merge
//! (curvature, mask, DARE, weighted sum, optional dynamic merge), forward and backward (SPEC 3, 4).
//!
//! Without element-level DARE the weighted sum over experts is one GEMM [G, N] @ [N, O*I], and in the
//! backward both `sum_g s[g,i] Gbar_g` and the inner products `<Gbar_g, P_i>` are GEMMs: no [G, N, O, I]
//! tensor is ever formed. Element-level DARE draws zeta per element from Philox on the fly instead.

use super::curvature::{
    check_curvature, check_weights, curved_unchecked, curved_workspace, fused_backward,
    fused_backward_workspace, neg_sum_experts, Dims,
};
use super::dynamic::{grad_beta_unchecked, next_base_unchecked};
use super::gemm::{copy_streaming, gemm, xyt, View};
use super::mask::{mask_unchecked, mask_workspace};
use super::SyncPtr;
use crate::error::{Error, Result};
use crate::options::{Dare, Mask, MergeOptions};
use crate::philox::{DareDraw, Granularity};
use crate::shape::{
    check_ca_backward, check_grad_merged_bias, expect_nonempty, expect_rank, expect_shape,
    CaBackwardShapes,
};
use crate::tensor::{Float, HostTensor};
use rayon::prelude::*;

/// Inputs of [`merge`] on the host ([`crate::backend::MergeInputs`]).
pub type MergeInputs<'a, F> = crate::backend::MergeInputs<'a, HostTensor<F>>;
/// Outputs of [`merge`] ([`crate::backend::MergeOutputs`]).
pub type MergeOutputs<F> = crate::backend::MergeOutputs<HostTensor<F>>;
/// Gradients of [`merge`], `grad_alpha` a value ([`crate::backend::MergeGrads`]).
pub type MergeGrads<F> = crate::backend::MergeGrads<HostTensor<F>, F>;
/// Inputs of the fused [`ca_merge`] ([`crate::backend::CaMergeInputs`]).
pub type CaMergeInputs<'a, F> = crate::backend::CaMergeInputs<'a, HostTensor<F>>;
/// Outputs of [`ca_merge`] ([`crate::backend::CaMergeOutputs`]).
pub type CaMergeOutputs<F> = crate::backend::CaMergeOutputs<HostTensor<F>>;
/// Gradients of [`ca_merge`], scalars as values ([`crate::backend::CaMergeGrads`]).
pub type CaMergeGrads<F> = crate::backend::CaMergeGrads<HostTensor<F>, F>;

fn check_alpha<F: Float>(alpha: f64) -> Result<()> {
    crate::options::check_scalar("alpha", alpha, F::DTYPE)
}

/// A mask holds exactly 0 or 1 (SPEC section 3): anything else, NaN included, is an
/// [`Error::Value`] naming the first offending element.
pub(crate) fn check_binary_mask<F: Float>(m: &HostTensor<F>) -> Result<()> {
    let bad = m
        .data()
        .iter()
        .position(|&v| !(v == F::ZERO || v == F::ONE));
    match bad {
        None => Ok(()),
        Some(k) => Err(Error::Value {
            tensor: "mask".into(),
            message: format!(
                "element {:?} is {}; a mask holds only 0 and 1",
                unravel(k, m.shape()),
                m.data()[k]
            ),
        }),
    }
}

/// The multi-index of flat index `k` in a row-major `shape`.
pub(crate) fn unravel(mut k: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (d, &s) in shape.iter().enumerate().rev() {
        if s > 0 {
            idx[d] = k % s;
            k /= s;
        }
    }
    idx
}

/// The buffers of a merge (forward or backward, `plan` validated), for the memory check.
fn merge_bufs<F>(
    plan: &Plan<'_, F>,
    mask: bool,
    biases: bool,
    backward: bool,
) -> Vec<(&'static str, Vec<usize>)> {
    let (g, n, o, i) = (plan.g, plan.n, plan.o, plan.i);
    let mut v = Vec::new();
    if backward {
        v.push(("grad_curved", vec![n, o, i]));
        v.push(("grad_base", vec![o, i]));
        v.push(("grad_scores", vec![3, g, n]));
        v.push(("grad_merged_bias (zeros)", vec![g, o]));
    } else {
        v.push(("merged", vec![g, o, i]));
        v.push(("workspace (coefficients)", vec![g, n]));
    }
    if mask {
        v.push(("workspace (masked curved)", vec![n, o, i]));
    }
    if biases {
        v.push(("merged_bias", vec![g, o]));
        v.push(("grad_expert_bias", vec![n + 1, o]));
    }
    v
}

/// Checks `scores` [G, N]; returns G.
fn check_scores<F>(scores: &HostTensor<F>, n: usize) -> Result<usize> {
    expect_rank("scores", scores.shape(), 2, "[G, N]")?;
    expect_nonempty("scores", scores.shape())?;
    let g = scores.shape()[0];
    expect_shape("scores", scores.shape(), &[g, n])?;
    Ok(g)
}

/// Biases come together or not at all: `base_bias` [O], `expert_bias` [N, O].
fn check_biases<'a, F>(
    base_bias: Option<&'a HostTensor<F>>,
    expert_bias: Option<&'a HostTensor<F>>,
    n: usize,
    o: usize,
    op: &str,
) -> Result<Option<(&'a HostTensor<F>, &'a HostTensor<F>)>> {
    match (base_bias, expert_bias) {
        (None, None) => Ok(None),
        (Some(eb), Some(b)) => {
            expect_shape("base_bias", eb.shape(), &[o])?;
            expect_shape("expert_bias", b.shape(), &[n, o])?;
            Ok(Some((eb, b)))
        }
        (Some(_), None) => Err(Error::Missing {
            tensor: "expert_bias".into(),
            op: op.into(),
            note: format!("shape [{n}, {o}]: biases come in pairs, and base_bias was given"),
        }),
        (None, Some(_)) => Err(Error::Missing {
            tensor: "base_bias".into(),
            op: op.into(),
            note: format!("shape [{o}]: biases come in pairs, and expert_bias was given"),
        }),
    }
}

/// Everything the weighted sum needs, validated.
struct Plan<'a, F> {
    g: usize,
    n: usize,
    oi: usize,
    o: usize,
    i: usize,
    alpha: F,
    scores: &'a [F],
    dare: Option<DareDraw>,
}

impl<F: Float> Plan<'_, F> {
    /// s[g,i] * zeta[g,i] for expert-level (or no) DARE.
    fn coef(&self) -> Vec<F> {
        let mut c = self.scores.to_vec();
        if let Some(d) = self.dare {
            debug_assert_eq!(d.granularity, Granularity::Expert);
            let scale = F::from_f64(d.scale);
            for g in 0..self.g {
                for e in 0..self.n {
                    let z = if d.keep_expert(g, e, self.n) {
                        scale
                    } else {
                        F::ZERO
                    };
                    c[g * self.n + e] *= z;
                }
            }
        }
        c
    }
    fn element_dare(&self) -> Option<DareDraw> {
        self.dare.filter(|d| d.granularity == Granularity::Element)
    }
    /// zeta[g, e, q] for element-level DARE.
    #[inline]
    fn zeta(&self, d: &DareDraw, g: usize, e: usize, q: usize) -> F {
        if d.keep_element(g, e, q, self.n, self.oi) {
            F::from_f64(d.scale)
        } else {
            F::ZERO
        }
    }
}

/// Elements of one column block of the weighted sum (G rows of w columns, w a multiple of 64): the
/// block is filled with base, gets the [G, N] @ [N, w] product added and is copied out while it
/// sits in L2, so each output element is written to memory once. `merge` takes large blocks (fewer
/// GEMM calls, whose fixed cost shows at this size); the CA-merge small ones, so that the
/// per-thread blocks add nothing visible to its peak memory (U is live beside the output there).
const MERGE_BLOCK: usize = 32768;
const CA_MERGE_BLOCK: usize = 4096;

fn merge_width(g: usize, block: usize) -> usize {
    (block / g.max(1) / 64 * 64).max(64)
}

/// merged[g] = base + alpha * sum_i s[g,i] zeta[g,i] P_i, P = m (.) U, into `out` [G, O*I].
///
/// Without element-level DARE: per column block, the `gemm` crate's product on the block, which
/// sums each element over the N experts in order exactly as one [G, N] @ [N, O*I] GEMM does (no
/// k-blocking at k = N), so the bits do not depend on the block width or the thread count.
fn weighted_sum_into<F: Float>(
    plan: &Plan<F>,
    base: &[F],
    u: &[F],
    mask: Option<&[F]>,
    out: &mut [F],
    block: usize,
) {
    let (g, n, oi) = (plan.g, plan.n, plan.oi);
    debug_assert_eq!(out.len(), g * oi);
    if let Some(d) = plan.element_dare() {
        out.par_chunks_mut(oi).enumerate().for_each(|(gg, mg)| {
            for (q, m) in mg.iter_mut().enumerate() {
                let mut s = F::ZERO;
                for e in 0..n {
                    let p = match mask {
                        Some(mk) => u[e * oi + q] * mk[e * oi + q],
                        None => u[e * oi + q],
                    };
                    s += plan.scores[gg * n + e] * plan.zeta(&d, gg, e, q) * p;
                }
                *m = base[q] + plan.alpha * s;
            }
        });
        return;
    }
    let coef = plan.coef();
    let total = out.len();
    let op = SyncPtr(out.as_mut_ptr());
    let bw = merge_width(g, block);
    (0..oi.div_ceil(bw)).into_par_iter().for_each_init(
        || {
            let pb = if mask.is_some() { n * bw } else { 0 };
            (vec![F::ZERO; g * bw], vec![F::ZERO; pb])
        },
        |(blk, pb), b| {
            let c0 = b * bw;
            let w = bw.min(oi - c0);
            for gg in 0..g {
                blk[gg * w..(gg + 1) * w].copy_from_slice(&base[c0..c0 + w]);
            }
            let (rhs, rv): (&[F], View) = match mask {
                // P = m (.) U for this block only (the products of the unfused form, same bits).
                Some(mk) => {
                    for e in 0..n {
                        let src = e * oi + c0;
                        pb[e * w..(e + 1) * w]
                            .iter_mut()
                            .zip(&u[src..src + w])
                            .zip(&mk[src..src + w])
                            .for_each(|((p, &a), &m)| *p = a * m);
                    }
                    (&pb[..], View::rm(0, n, w))
                }
                None => (
                    u,
                    View {
                        off: c0,
                        rows: n,
                        cols: w,
                        rs: oi,
                        cs: 1,
                    },
                ),
            };
            let v = View::rm(0, g, w);
            gemm(
                blk,
                v,
                true,
                &coef,
                View::rm(0, g, n),
                rhs,
                rv,
                plan.alpha,
                false,
            );
            for gg in 0..g {
                // SAFETY: block b alone writes columns c0..c0+w of every row of out.
                let dst = unsafe { op.slice(gg * oi + c0, w, total) };
                copy_streaming(dst, &blk[gg * w..(gg + 1) * w]);
            }
        },
    );
}

/// merged_bias[g] = e_b + alpha * sum_i s[g,i] (b_i - e_b).
fn bias_forward<F: Float>(plan: &Plan<F>, eb: &HostTensor<F>, b: &HostTensor<F>) -> HostTensor<F> {
    let (n, o) = (plan.n, plan.o);
    HostTensor::from_fn(&[plan.g, o], |idx| {
        let (gg, oo) = (idx / o, idx % o);
        let e0 = eb.data()[oo];
        let mut s = F::ZERO;
        for e in 0..n {
            s += plan.scores[gg * n + e] * (b.data()[e * o + oo] - e0);
        }
        e0 + plan.alpha * s
    })
}

/// The merge's reverse, part 1 (needs no U): sum_g Gbar_g and
/// H_i = alpha * m_i (.) sum_g s[g,i] zeta[g,i] Gbar_g.
struct MergeBack<F> {
    sum_g: Vec<F>,
    h: HostTensor<F>,
}

/// Columns per block of [`merge_back_h`]: Gbar's [G, w] block and the [N + 1, w] result stay in L2.
const BACK_BLOCK: usize = 2048;

fn merge_back_h<F: Float>(plan: &Plan<F>, mask: Option<&[F]>, gbar: &[F]) -> MergeBack<F> {
    let (g, n, oi) = (plan.g, plan.n, plan.oi);
    let alpha = plan.alpha;
    let mut h = HostTensor::zeros(&[n, plan.o, plan.i]);
    let scale = |e: usize, q: usize| match mask {
        Some(m) => alpha * m[e * oi + q],
        None => alpha,
    };
    if let Some(d) = plan.element_dare() {
        h.data_mut()
            .par_chunks_mut(oi)
            .enumerate()
            .for_each(|(e, he)| {
                for (q, hv) in he.iter_mut().enumerate() {
                    let mut s = F::ZERO;
                    for gg in 0..g {
                        s += plan.scores[gg * n + e] * plan.zeta(&d, gg, e, q) * gbar[gg * oi + q];
                    }
                    *hv = scale(e, q) * s;
                }
            });
        let sum_g = super::sum_stack(gbar, oi);
        return MergeBack { sum_g, h };
    }
    // Per column block, [(s zeta)^T; 1] [N + 1, G] @ Gbar [G, w]: H's rows and sum_g in one read
    // of Gbar, scaled by alpha and the mask while the block is in cache. No [G, N, O, I] tensor.
    let coef = plan.coef();
    let mut lhs = vec![F::ONE; (n + 1) * g];
    for gg in 0..g {
        for e in 0..n {
            lhs[e * g + gg] = coef[gg * n + e];
        }
    }
    let mut sum_g = vec![F::ZERO; oi];
    let (hp, sp) = (
        SyncPtr(h.data_mut().as_mut_ptr()),
        SyncPtr(sum_g.as_mut_ptr()),
    );
    (0..oi.div_ceil(BACK_BLOCK)).into_par_iter().for_each_init(
        || vec![F::ZERO; (n + 1) * BACK_BLOCK],
        |buf, b| {
            let c0 = b * BACK_BLOCK;
            let w = BACK_BLOCK.min(oi - c0);
            let rhs = View {
                off: c0,
                rows: g,
                cols: w,
                rs: oi,
                cs: 1,
            };
            gemm(
                buf,
                View::rm(0, n + 1, w),
                false,
                &lhs,
                View::rm(0, n + 1, g),
                gbar,
                rhs,
                F::ONE,
                false,
            );
            for e in 0..n {
                // SAFETY: block b alone writes columns c0..c0+w of each row of H (blocks are
                // disjoint); no other reference to H lives during the loop.
                let dst = unsafe { hp.slice(e * oi + c0, w, n * oi) };
                for (k, (d, &v)) in dst.iter_mut().zip(&buf[e * w..(e + 1) * w]).enumerate() {
                    *d = scale(e, c0 + k) * v;
                }
            }
            // SAFETY: as above, for sum_g.
            let dst = unsafe { sp.slice(c0, w, oi) };
            dst.copy_from_slice(&buf[n * w..(n + 1) * w]);
        },
    );
    MergeBack { sum_g, h }
}

/// Columns per split-k chunk of [`merge_back_ip`].
const IP_CHUNK: usize = 16384;

/// The merge's reverse, part 2: raw inner products ip[g,i] = <Gbar_g, zeta[g,i] (.) P_i>.
fn merge_back_ip<F: Float>(plan: &Plan<F>, p: &[F], gbar: &[F]) -> Vec<F> {
    let (g, n, oi) = (plan.g, plan.n, plan.oi);
    let mut ip = vec![F::ZERO; g * n];
    if let Some(d) = plan.element_dare() {
        ip.par_iter_mut().enumerate().for_each(|(gi, v)| {
            let (gg, e) = (gi / n, gi % n);
            let mut s = F::ZERO;
            for q in 0..oi {
                s += gbar[gg * oi + q] * plan.zeta(&d, gg, e, q) * p[e * oi + q];
            }
            *v = s;
        });
        return ip;
    }
    // ip = Gbar [G, OI] @ P^T [OI, N], then the expert-level zeta per (g, i). k = OI is long and
    // the G x N output small (one thread in a plain GEMM), so as fixed split-k chunks in parallel,
    // partials added in chunk order.
    let partials: Vec<Vec<F>> = (0..oi.div_ceil(IP_CHUNK))
        .into_par_iter()
        .map(|c| {
            let c0 = c * IP_CHUNK;
            let w = IP_CHUNK.min(oi - c0);
            let mut part = vec![F::ZERO; g * n];
            xyt(
                &mut part,
                n,
                false,
                &gbar[c0..],
                oi,
                &p[c0..],
                oi,
                (g, n, w),
                (1, 0),
            );
            part
        })
        .collect();
    for part in &partials {
        ip.iter_mut().zip(part).for_each(|(v, &x)| *v += x);
    }
    if let Some(d) = plan.dare {
        let scale = F::from_f64(d.scale);
        for gg in 0..g {
            for e in 0..n {
                if !d.keep_expert(gg, e, n) {
                    ip[gg * n + e] = F::ZERO;
                } else {
                    ip[gg * n + e] *= scale;
                }
            }
        }
    }
    ip
}

/// Bias reverse: (grad_base_bias, grad_expert_bias), and adds to ip the bias inner products
/// <dbbar_g, b_i - e_b> (which feed grad_scores and grad_alpha exactly like the weight's).
fn bias_back<F: Float>(
    plan: &Plan<F>,
    eb: &HostTensor<F>,
    b: &HostTensor<F>,
    dbb: &[F],
    ip: &mut [F],
) -> (HostTensor<F>, HostTensor<F>) {
    let (g, n, o) = (plan.g, plan.n, plan.o);
    let alpha = plan.alpha;
    let grad_eb = HostTensor::from_fn(&[o], |oo| {
        let mut s = F::ZERO;
        for gg in 0..g {
            let ssum: F = (0..n).map(|e| plan.scores[gg * n + e]).sum();
            s += (F::ONE - alpha * ssum) * dbb[gg * o + oo];
        }
        s
    });
    let grad_b = HostTensor::from_fn(&[n, o], |idx| {
        let (e, oo) = (idx / o, idx % o);
        let mut s = F::ZERO;
        for gg in 0..g {
            s += plan.scores[gg * n + e] * dbb[gg * o + oo];
        }
        alpha * s
    });
    for gg in 0..g {
        for e in 0..n {
            let mut s = F::ZERO;
            for oo in 0..o {
                s += dbb[gg * o + oo] * (b.data()[e * o + oo] - eb.data()[oo]);
            }
            ip[gg * n + e] += s;
        }
    }
    (grad_eb, grad_b)
}

/// grad_scores = alpha * ip, grad_alpha = sum s * ip.
fn score_grads<F: Float>(plan: &Plan<F>, ip: &[F]) -> (HostTensor<F>, F) {
    let gs = HostTensor::from_fn(&[plan.g, plan.n], |k| plan.alpha * ip[k]);
    let ga = ip.iter().zip(plan.scores).map(|(&a, &s)| a * s).sum();
    (gs, ga)
}

/// Validates a merge; returns the plan and the biases.
#[allow(clippy::type_complexity)]
fn plan_merge<'a, F: Float>(
    inputs: &'a MergeInputs<'a, F>,
    alpha: f64,
    dare: &Dare,
) -> Result<(Plan<'a, F>, Option<(&'a HostTensor<F>, &'a HostTensor<F>)>)> {
    let (n, o, i) = check_weights(inputs.base, inputs.curved).map_err(|e| match e {
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
    })?;
    if let Some(m) = inputs.mask {
        expect_shape("mask", m.shape(), &[n, o, i])?;
        check_binary_mask(m)?;
    }
    let g = check_scores(inputs.scores, n)?;
    let biases = check_biases(inputs.base_bias, inputs.expert_bias, n, o, "merge")?;
    check_alpha::<F>(alpha)?;
    dare.validate()?;
    Ok((
        Plan {
            g,
            n,
            oi: o * i,
            o,
            i,
            alpha: F::from_f64(alpha),
            scores: inputs.scores.data(),
            dare: DareDraw::from_options(dare),
        },
        biases,
    ))
}

/// P = m (.) U (a copy only when there is a mask).
fn masked<'a, F: Float>(u: &'a [F], mask: Option<&[F]>) -> std::borrow::Cow<'a, [F]> {
    match mask {
        None => std::borrow::Cow::Borrowed(u),
        Some(m) => std::borrow::Cow::Owned(
            u.par_iter()
                .zip(m.par_iter())
                .map(|(&a, &b)| a * b)
                .collect(),
        ),
    }
}

/// `merge`: `Wbar_g = E + alpha * sum_i s[g,i] zeta[g,i] (m_i (.) curved_i)`, and the bias merge.
pub fn merge<F: Float>(
    inputs: &MergeInputs<F>,
    alpha: f64,
    dare: &Dare,
) -> Result<MergeOutputs<F>> {
    let (plan, biases) = plan_merge(inputs, alpha, dare)?;
    super::budget::<F>(&merge_bufs(&plan, false, biases.is_some(), false))?;
    let mut merged = HostTensor::zeros(&[plan.g, plan.o, plan.i]);
    let merged_bias = merge_planned(&plan, inputs, biases, &mut merged);
    Ok(MergeOutputs {
        merged,
        merged_bias,
    })
}

/// The body of [`merge`] and [`merge_into`], on checked inputs and outputs: the weighted sum
/// into `merged` and the merged bias.
fn merge_planned<F: Float>(
    plan: &Plan<F>,
    inputs: &MergeInputs<F>,
    biases: Option<(&HostTensor<F>, &HostTensor<F>)>,
    merged: &mut HostTensor<F>,
) -> Option<HostTensor<F>> {
    weighted_sum_into(
        plan,
        inputs.base.data(),
        inputs.curved.data(),
        inputs.mask.map(|m| m.data()),
        merged.data_mut(),
        MERGE_BLOCK,
    );
    biases.map(|(eb, b)| bias_forward(plan, eb, b))
}

/// [`merge`] into the caller's outputs (every element overwritten, same bits as [`merge`]):
/// `merged` [G, O, I], and `merged_bias` [G, O] exactly when the biases are given. Reusing the
/// outputs across calls saves page-faulting a fresh [G, O, I] in on every call. A wrong-sized
/// output is an [`Error::Shape`] naming it; a missing or unexpected `merged_bias` is an error too.
pub fn merge_into<F: Float>(
    inputs: &MergeInputs<F>,
    alpha: f64,
    dare: &Dare,
    merged: &mut HostTensor<F>,
    merged_bias: Option<&mut HostTensor<F>>,
) -> Result<()> {
    let (plan, biases) = plan_merge(inputs, alpha, dare)?;
    expect_shape("merged", merged.shape(), &[plan.g, plan.o, plan.i])?;
    let bias_out = match (biases, merged_bias) {
        (Some(bb), Some(mb)) => {
            expect_shape("merged_bias", mb.shape(), &[plan.g, plan.o])?;
            Some((bb, mb))
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(Error::option(
                "merged_bias",
                format!(
                    "missing: the merge has biases, so an output of shape [{}, {}] is needed",
                    plan.g, plan.o
                ),
            ))
        }
        (None, Some(_)) => {
            return Err(Error::option(
                "merged_bias",
                "given, but the merge has no base_bias/expert_bias",
            ))
        }
    };
    // Only the small workspaces: the outputs exist already.
    let mut bufs = vec![("workspace (coefficients)", vec![plan.g, plan.n])];
    if bias_out.is_some() {
        bufs.push(("merged_bias", vec![plan.g, plan.o]));
    }
    super::budget::<F>(&bufs)?;
    let (biases, mb) = match bias_out {
        Some((bb, mb)) => (Some(bb), Some(mb)),
        None => (None, None),
    };
    if let (Some(b), Some(mb)) = (merge_planned(&plan, inputs, biases, merged), mb) {
        *mb = b;
    }
    Ok(())
}

/// `merge_backward`: gradients for base, curved, scores, alpha and the biases.
pub fn merge_backward<F: Float>(
    inputs: &MergeInputs<F>,
    alpha: f64,
    dare: &Dare,
    grad_merged: &HostTensor<F>,
    grad_merged_bias: Option<&HostTensor<F>>,
) -> Result<MergeGrads<F>> {
    let (plan, biases) = plan_merge(inputs, alpha, dare)?;
    expect_shape(
        "grad_merged",
        grad_merged.shape(),
        &[plan.g, plan.o, plan.i],
    )?;
    super::budget::<F>(&merge_bufs(
        &plan,
        inputs.mask.is_some(),
        biases.is_some(),
        true,
    ))?;
    check_grad_merged_bias(
        grad_merged_bias.map(|t| t.shape()),
        biases.is_some(),
        plan.g,
        plan.o,
    )?;
    let dbb = grad_bias_data(grad_merged_bias, plan.g, plan.o);
    let mask = inputs.mask.map(|m| m.data());
    let p = masked(inputs.curved.data(), mask);
    let back = merge_back_h(&plan, mask, grad_merged.data());
    let mut ip = merge_back_ip(&plan, &p, grad_merged.data());
    let (grad_base_bias, grad_expert_bias) = match biases {
        Some((eb, b)) => {
            let (ge, gb) = bias_back(&plan, eb, b, &dbb, &mut ip);
            (Some(ge), Some(gb))
        }
        None => (None, None),
    };
    let (grad_scores, grad_alpha) = score_grads(&plan, &ip);
    Ok(MergeGrads {
        grad_base: HostTensor::new(&[plan.o, plan.i], back.sum_g)?,
        grad_curved: back.h,
        grad_scores,
        grad_alpha,
        grad_base_bias,
        grad_expert_bias,
    })
}

/// `grad_merged_bias`'s values (checked by the caller), zeros when absent.
fn grad_bias_data<F: Float>(grad: Option<&HostTensor<F>>, g: usize, o: usize) -> Vec<F> {
    grad.map_or_else(|| vec![F::ZERO; g * o], |t| t.data().to_vec())
}

/// Validates a CA-merge; returns dims, plan and biases.
#[allow(clippy::type_complexity)]
fn plan_ca<'a, F: Float>(
    inputs: &'a CaMergeInputs<'a, F>,
    opts: &MergeOptions,
) -> Result<(
    Dims,
    Plan<'a, F>,
    Option<(&'a HostTensor<F>, &'a HostTensor<F>)>,
)> {
    let (n, o, i) = check_weights(inputs.base, inputs.experts)?;
    let dims = check_curvature(n, o, i, &inputs.curvature)?;
    let g = check_scores(inputs.scores, n)?;
    let biases = check_biases(inputs.base_bias, inputs.expert_bias, n, o, "ca_merge")?;
    opts.validate_for(F::DTYPE)?;
    Ok((
        dims,
        Plan {
            g,
            n,
            oi: o * i,
            o,
            i,
            alpha: F::from_f64(opts.alpha),
            scores: inputs.scores.data(),
            dare: DareDraw::from_options(&opts.dare),
        },
        biases,
    ))
}

/// The fused CA-merge forward: curvature, mask, DARE, weighted sum over experts, plus base;
/// `next_base` when `opts.beta` is set and `curved` when `opts.want_curved`.
pub fn ca_merge<F: Float>(
    inputs: &CaMergeInputs<F>,
    opts: &MergeOptions,
) -> Result<CaMergeOutputs<F>> {
    let (dims, plan, biases) = plan_ca(inputs, opts)?;
    let (n, o, i) = (dims.n, dims.o, dims.i);
    let mut bufs = merge_bufs(&plan, opts.mask != Mask::None, biases.is_some(), false);
    bufs.push(("curved", vec![n, o, i]));
    bufs.push(("next_base", vec![2, o, i]));
    bufs.extend(curved_workspace(&dims, &inputs.curvature));
    bufs.extend(mask_workspace(n, o, i, opts.mask));
    super::budget::<F>(&bufs)?;
    let u = curved_unchecked(inputs.base, inputs.experts, &inputs.curvature, &dims);
    let next_base = opts.beta.map(|b| next_base_unchecked(inputs.base, &u, b));
    let m = mask_unchecked(inputs.base, inputs.experts, opts.mask);
    let mut merged = HostTensor::zeros(&[plan.g, plan.o, plan.i]);
    weighted_sum_into(
        &plan,
        inputs.base.data(),
        u.data(),
        m.as_ref().map(|t| t.data()),
        merged.data_mut(),
        CA_MERGE_BLOCK,
    );
    drop(m);
    Ok(CaMergeOutputs {
        merged,
        merged_bias: biases.map(|(eb, b)| bias_forward(&plan, eb, b)),
        next_base,
        curved: if opts.want_curved { Some(u) } else { None },
    })
}

/// The fused CA-merge backward. `grad_next_base` is required exactly when `opts.beta` is set
/// (absent means zero); `grad_merged_bias` is optional with biases (absent means zero). U is
/// recomputed on the way (no [N, O, I] kept between the passes); a caller that kept the forward's
/// `curved` skips that recomputation with [`ca_merge_backward_with_curved`].
pub fn ca_merge_backward<F: Float>(
    inputs: &CaMergeInputs<F>,
    opts: &MergeOptions,
    grad_merged: &HostTensor<F>,
    grad_merged_bias: Option<&HostTensor<F>>,
    grad_next_base: Option<&HostTensor<F>>,
) -> Result<CaMergeGrads<F>> {
    backward_ca(
        inputs,
        opts,
        None,
        grad_merged,
        grad_merged_bias,
        grad_next_base,
    )
}

/// [`ca_merge_backward`] given the forward's U (`curved` [N, O, I], from [`ca_merge`] with
/// `opts.want_curved`), as an autodiff framework keeps it between the passes: the reverse pass
/// then skips U's x4 product and its read-modify-write per rank. `curved` must be that forward's
/// output for these inputs (only its shape can be checked); the gradients are the same bits as
/// [`ca_merge_backward`]'s.
pub fn ca_merge_backward_with_curved<F: Float>(
    inputs: &CaMergeInputs<F>,
    opts: &MergeOptions,
    curved: &HostTensor<F>,
    grad_merged: &HostTensor<F>,
    grad_merged_bias: Option<&HostTensor<F>>,
    grad_next_base: Option<&HostTensor<F>>,
) -> Result<CaMergeGrads<F>> {
    backward_ca(
        inputs,
        opts,
        Some(curved),
        grad_merged,
        grad_merged_bias,
        grad_next_base,
    )
}

fn backward_ca<F: Float>(
    inputs: &CaMergeInputs<F>,
    opts: &MergeOptions,
    curved: Option<&HostTensor<F>>,
    grad_merged: &HostTensor<F>,
    grad_merged_bias: Option<&HostTensor<F>>,
    grad_next_base: Option<&HostTensor<F>>,
) -> Result<CaMergeGrads<F>> {
    let (dims, plan, biases) = plan_ca(inputs, opts)?;
    let shapes = CaBackwardShapes {
        curved: curved.map(|u| u.shape()),
        grad_merged: grad_merged.shape(),
        grad_merged_bias: grad_merged_bias.map(|t| t.shape()),
        grad_next_base: grad_next_base.map(|t| t.shape()),
    };
    let gnoi = [plan.g, dims.n, dims.o, dims.i];
    check_ca_backward(gnoi, biases.is_some(), opts.beta.is_some(), &shapes)?;
    let dbb = grad_bias_data(grad_merged_bias, plan.g, plan.o);
    let (n, o, i) = (dims.n, dims.o, dims.i);
    let mut bufs = merge_bufs(&plan, opts.mask != Mask::None, biases.is_some(), true);
    bufs.push(("grad_next_base (zeros)", vec![o, i]));
    bufs.push(("grad_base", vec![2, o, i]));
    let recompute = curved.is_none();
    bufs.extend(fused_backward_workspace(
        &dims,
        &inputs.curvature,
        recompute,
    ));
    bufs.extend(mask_workspace(n, o, i, opts.mask));
    super::budget::<F>(&bufs)?;
    // H needs only the mask; U, unless given, is recomputed inside the fused reverse pass (cheaper
    // than storing [N, O, I] between passes for callers that did not ask for it).
    let m = mask_unchecked(inputs.base, inputs.experts, opts.mask);
    let mask = m.as_ref().map(|t| t.data());
    let mut back = merge_back_h(&plan, mask, grad_merged.data());
    let oi = plan.oi;
    let zeros;
    let gn = match grad_next_base {
        Some(t) => t.data(),
        None => {
            zeros = vec![F::ZERO; oi];
            &zeros
        }
    };
    if let Some(beta) = opts.beta {
        let c = F::from_f64(beta / plan.n as f64);
        back.h
            .data_mut()
            .par_chunks_mut(oi)
            .for_each(|he| he.iter_mut().zip(gn).for_each(|(h, &g)| *h += c * g));
        back.sum_g.iter_mut().zip(gn).for_each(|(s, &g)| *s += g);
    }
    let fused = fused_backward(
        inputs.base,
        inputs.experts,
        &inputs.curvature,
        &dims,
        back.h,
        recompute,
    );
    let (grad_beta, mut ip) = {
        let u = match curved {
            Some(u) => u,
            None => fused
                .curved
                .as_ref()
                .expect("fused_backward returns U when asked"),
        };
        let p = masked(u.data(), mask);
        (
            opts.beta.map(|_| grad_beta_unchecked(u, gn, plan.n)),
            merge_back_ip(&plan, &p, grad_merged.data()),
        )
    };
    drop(fused.curved);
    let (grad_tau, factors) = (fused.grad_tau, fused.factors);
    let neg = neg_sum_experts(&grad_tau, &dims);
    let grad_base = HostTensor::from_fn(&[plan.o, plan.i], |q| back.sum_g[q] + neg.data()[q]);
    let (grad_base_bias, grad_expert_bias) = match biases {
        Some((eb, b)) => {
            let (ge, gb) = bias_back(&plan, eb, b, &dbb, &mut ip);
            (Some(ge), Some(gb))
        }
        None => (None, None),
    };
    let (grad_scores, grad_alpha) = score_grads(&plan, &ip);
    Ok(CaMergeGrads {
        grad_base,
        grad_experts: grad_tau,
        grad_scores,
        factors,
        grad_alpha,
        grad_beta,
        grad_base_bias,
        grad_expert_bias,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Dare;

    /// The weighted sum as it was before the blocked form: base copied into every row, P = m (.) U
    /// stored whole, one [G, N] @ [N, O*I] GEMM over the whole output.
    fn one_gemm<F: Float>(plan: &Plan<F>, base: &[F], u: &[F], mask: Option<&[F]>) -> Vec<F> {
        let (g, n, oi) = (plan.g, plan.n, plan.oi);
        let p = masked(u, mask);
        let mut merged = vec![F::ZERO; g * oi];
        for gg in 0..g {
            merged[gg * oi..(gg + 1) * oi].copy_from_slice(base);
        }
        gemm(
            &mut merged,
            View::rm(0, g, oi),
            true,
            &plan.coef(),
            View::rm(0, g, n),
            &p,
            View::rm(0, n, oi),
            plan.alpha,
            true,
        );
        merged
    }

    fn vals<F: Float>(seed: u64, len: usize, scale: f64) -> Vec<F> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                F::from_f64(scale * (((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0))
            })
            .collect()
    }

    /// Same bits as the one-GEMM form, for widths that are not a multiple of the block, with and
    /// without a mask, expert-level DARE, any G and N (N beyond a register tile too).
    fn blocked_matches_one_gemm<F: Float>() {
        for &(g, n, o, i) in &[
            (1, 1, 3, 5),
            (5, 7, 48, 50),
            (16, 7, 64, 64),
            (3, 19, 40, 77),
        ] {
            let oi = o * i;
            let base = vals::<F>(1, oi, 0.05);
            let u = vals::<F>(2, n * oi, 0.01);
            let scores = vals::<F>(3, g * n, 1.0);
            let mask: Vec<F> = vals::<F>(4, n * oi, 1.0)
                .iter()
                .map(|&v| if v > F::ZERO { F::ONE } else { F::ZERO })
                .collect();
            for dare in [Dare::None, Dare::Expert { p: 0.3, seed: 9 }] {
                let plan = Plan {
                    g,
                    n,
                    oi,
                    o,
                    i,
                    alpha: F::from_f64(0.7),
                    scores: &scores,
                    dare: DareDraw::from_options(&dare),
                };
                for (mk, block) in [(None, MERGE_BLOCK), (Some(&mask[..]), CA_MERGE_BLOCK)]
                    .into_iter()
                    .chain([(None, 64), (Some(&mask[..]), 64)])
                {
                    let want = one_gemm(&plan, &base, &u, mk);
                    let mut got = vec![F::from_f64(f64::NAN); g * oi];
                    weighted_sum_into(&plan, &base, &u, mk, &mut got, block);
                    let bits = |v: &[F]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "G={g} N={n} O={o} I={i} {dare:?} mask={}",
                        mk.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn blocked_weighted_sum_is_bit_identical_f32() {
        blocked_matches_one_gemm::<f32>();
    }

    #[test]
    fn blocked_weighted_sum_is_bit_identical_f64() {
        blocked_matches_one_gemm::<f64>();
    }
}
