//! The official formulation in the storage dtype: SPEC section 5's bound 2 reference.
//!
//! SPEC section 3's einsums as the official code (and `scripts/torch_baseline.py`'s `curvature` and
//! `merge`) runs them: tau = experts - base, broadcast to [R, N, O, I], four mode products on the
//! 6-D view in the order a, b, c, d, a sum over R, the [G, N, O, I] gating
//! `scores[:, :, None, None] * P[None]` summed over N, times alpha, plus base; and the backward
//! autograd would run through that graph. Every value is rounded to the storage dtype the way
//! PyTorch does in that dtype: each einsum (one batched GEMM) accumulates in f32 and rounds its
//! output once; each elementwise op rounds once; each reduction (sum, mean, the backward of a
//! broadcast) accumulates in f32 and rounds once; gradients that autograd accumulates for a tensor
//! used twice are added (and rounded) in the order the graph uses them.
//!
//! Plain loops, nothing from `src/`; `q` rounds an f64 to the storage dtype and back. The error of
//! these results against the f64 oracle is E_off; a kernel's error must stay <= 2 E_off + 1e-6.
//! Scalars (grad_alpha, grad_beta) and grad_scores are held to bound 1 alone, so they are not here.

use super::{dare_zeta, CaRefIn, DareRef, Dims, KronRef, Split4};

/// Rounds an f64 to the storage dtype (and back to f64).
pub type Q<'a> = &'a dyn Fn(f64) -> f64;

/// f32 accumulation: the running sum is an f32.
#[derive(Clone, Copy, Default)]
struct Acc(f32);

impl Acc {
    fn add(&mut self, v: f64) {
        self.0 = (f64::from(self.0) + v) as f32;
    }
    fn get(self) -> f64 {
        f64::from(self.0)
    }
}

fn factor(t: &[f64], r: usize, e: usize, n: usize, k: usize) -> &[f64] {
    let off = (r * n + e) * k * k;
    &t[off..off + k * k]
}

fn transpose(m: &[f64], k: usize) -> Vec<f64> {
    let mut t = vec![0.0; k * k];
    for a in 0..k {
        for b in 0..k {
            t[b * k + a] = m[a * k + b];
        }
    }
    t
}

fn dims(s: Split4) -> [usize; 4] {
    [s.o1, s.o2, s.i1, s.i2]
}

/// (size, stride) of mode `md` of the row-major 4-D view [o1, o2, i1, i2].
fn mode_of(s: Split4, md: usize) -> (usize, usize) {
    let d = dims(s);
    (d[md], d[md + 1..].iter().product())
}

/// One einsum mode product `y[.., j, ..] = sum_j2 m[j, j2] x[.., j2, ..]`: f32 accumulation, output
/// rounded once.
fn mode(q: Q, x: &[f64], s: Split4, md: usize, m: &[f64]) -> Vec<f64> {
    let (k, st) = mode_of(s, md);
    let mut y = vec![0.0; x.len()];
    for (idx, out) in y.iter_mut().enumerate() {
        let j = (idx / st) % k;
        let base = idx - j * st;
        let mut acc = Acc::default();
        for j2 in 0..k {
            acc.add(m[j * k + j2] * x[base + j2 * st]);
        }
        *out = q(acc.get());
    }
    y
}

/// The factor gradient of one einsum mode product: `dm[j, j2] = sum_{others} gy[.., j, ..] x[.., j2, ..]`
/// (one einsum: f32 accumulation, rounded once).
fn mode_grad(q: Q, gy: &[f64], x: &[f64], s: Split4, md: usize) -> Vec<f64> {
    let (k, st) = mode_of(s, md);
    let mut acc = vec![Acc::default(); k * k];
    for (idx, &g) in gy.iter().enumerate() {
        let j = (idx / st) % k;
        let base = idx - j * st;
        for j2 in 0..k {
            acc[j * k + j2].add(g * x[base + j2 * st]);
        }
    }
    acc.iter().map(|a| q(a.get())).collect()
}

fn factors_of(kr: &KronRef, r: usize, e: usize, n: usize) -> [&[f64]; 4] {
    let s = kr.split;
    [
        factor(&kr.a, r, e, n, s.o1),
        factor(&kr.b, r, e, n, s.o2),
        factor(&kr.c, r, e, n, s.i1),
        factor(&kr.d, r, e, n, s.i2),
    ]
}

/// tau = experts - base, rounded (one elementwise op).
pub fn tau(q: Q, base: &[f64], experts: &[f64], n: usize) -> Vec<f64> {
    let oi = base.len();
    (0..n * oi).map(|k| q(experts[k] - base[k % oi])).collect()
}

/// The four rounded mode products of one (r, e): [Y0 = tau_e, Y1, Y2, Y3, Y4].
fn chain(q: Q, tau_e: &[f64], kr: &KronRef, r: usize, e: usize, n: usize) -> Vec<Vec<f64>> {
    let f = factors_of(kr, r, e, n);
    let mut ys = vec![tau_e.to_vec()];
    for (md, m) in f.iter().enumerate() {
        let y = mode(q, &ys[md], kr.split, md, m);
        ys.push(y);
    }
    ys
}

/// U [N, O, I] from a rounded tau: the mode products per (r, e), summed over R (f32, rounded once).
pub fn curve_tau(q: Q, tau: &[f64], kr: Option<&KronRef>, n: usize, oi: usize) -> Vec<f64> {
    let Some(kr) = kr else {
        return tau.to_vec();
    };
    let mut u = vec![0.0; n * oi];
    for e in 0..n {
        let mut acc = vec![Acc::default(); oi];
        for r in 0..kr.r {
            let ys = chain(q, &tau[e * oi..(e + 1) * oi], kr, r, e, n);
            for k in 0..oi {
                acc[k].add(ys[4][k]);
            }
        }
        for k in 0..oi {
            u[e * oi + k] = q(acc[k].get());
        }
    }
    u
}

/// `curvature` in the dtype.
pub fn curvature(q: Q, base: &[f64], experts: &[f64], kr: Option<&KronRef>, n: usize) -> Vec<f64> {
    curve_tau(q, &tau(q, base, experts, n), kr, n, base.len())
}

/// Autograd of [`curve_tau`] for H = dL/dU (rounded): (dL/dtau, factor grads). Per (r, e), from
/// the last mode product back: dFactor = einsum(gY, Y_prev), gY_prev = gY x_mode Factor^T; dtau sums
/// the ranks' gY0 (the backward of the broadcast: f32, rounded once).
pub fn curve_tau_backward(
    q: Q,
    tau: &[f64],
    kr: Option<&KronRef>,
    n: usize,
    oi: usize,
    h: &[f64],
) -> (Vec<f64>, Option<[Vec<f64>; 4]>) {
    let Some(kr) = kr else {
        return (h.to_vec(), None);
    };
    let s = kr.split;
    let ks = dims(s);
    let mut gtau = vec![0.0; n * oi];
    let mut gf: [Vec<f64>; 4] = [
        vec![0.0; kr.a.len()],
        vec![0.0; kr.b.len()],
        vec![0.0; kr.c.len()],
        vec![0.0; kr.d.len()],
    ];
    for e in 0..n {
        let he = &h[e * oi..(e + 1) * oi];
        let mut acc = vec![Acc::default(); oi];
        for r in 0..kr.r {
            let ys = chain(q, &tau[e * oi..(e + 1) * oi], kr, r, e, n);
            let f = factors_of(kr, r, e, n);
            let mut g = he.to_vec();
            for md in (0..4).rev() {
                let k = ks[md];
                let dm = mode_grad(q, &g, &ys[md], s, md);
                let off = (r * n + e) * k * k;
                gf[md][off..off + k * k].copy_from_slice(&dm);
                g = mode(q, &g, s, md, &transpose(f[md], k));
            }
            for k in 0..oi {
                acc[k].add(g[k]);
            }
        }
        for k in 0..oi {
            gtau[e * oi + k] = q(acc[k].get());
        }
    }
    (gtau, Some(gf))
}

/// -sum_e gtau_e (the backward of tau = experts - base for base): f32, rounded once.
fn neg_sum(q: Q, gtau: &[f64], n: usize, oi: usize) -> Vec<f64> {
    (0..oi)
        .map(|k| {
            let mut acc = Acc::default();
            for e in 0..n {
                acc.add(-gtau[e * oi + k]);
            }
            q(acc.get())
        })
        .collect()
}

/// HostTensor gradients of `curvature_backward` in the dtype: (grad_base, grad_experts, factor grads).
#[allow(clippy::type_complexity)]
pub fn curvature_backward(
    q: Q,
    base: &[f64],
    experts: &[f64],
    kr: Option<&KronRef>,
    n: usize,
    grad_curved: &[f64],
) -> (Vec<f64>, Vec<f64>, Option<[Vec<f64>; 4]>) {
    let oi = base.len();
    let t = tau(q, base, experts, n);
    let (gtau, gf) = curve_tau_backward(q, &t, kr, n, oi, grad_curved);
    (neg_sum(q, &gtau, n, oi), gtau, gf)
}

/// zeta[g, e] per element (1 without DARE).
fn zeta(dare: DareRef, d: Dims, g: usize, e: usize, k: usize) -> f64 {
    dare_zeta(dare, d, g, e, k / d.i, k % d.i)
}

/// Merge outputs in the dtype: (merged [G, O, I], merged_bias [G, O]).
#[allow(clippy::too_many_arguments)]
pub fn merge(
    q: Q,
    d: Dims,
    base: &[f64],
    curved: &[f64],
    scores: &[f64],
    mask: Option<&[f64]>,
    biases: Option<(&[f64], &[f64])>,
    alpha: f64,
    dare: DareRef,
) -> (Vec<f64>, Option<Vec<f64>>) {
    let oi = d.oi();
    let mut merged = vec![0.0; d.g * oi];
    for g in 0..d.g {
        for k in 0..oi {
            let mut acc = Acc::default();
            for e in 0..d.n {
                // P = m (.) U (exact), gating s * P, then DARE's dropout (x * z / (1 - p)).
                let p = q(mask.map_or(1.0, |m| m[e * oi + k]) * curved[e * oi + k]);
                let mut x = q(scores[g * d.n + e] * p);
                if dare != DareRef::None {
                    x = q(x * zeta(dare, d, g, e, k));
                }
                acc.add(x);
            }
            let a = q(alpha * q(acc.get()));
            merged[g * oi + k] = q(base[k] + a);
        }
    }
    let merged_bias = biases.map(|(eb, b)| {
        let mut out = vec![0.0; d.g * d.o];
        for g in 0..d.g {
            for p in 0..d.o {
                let mut acc = Acc::default();
                for e in 0..d.n {
                    acc.add(q(scores[g * d.n + e] * q(b[e * d.o + p] - eb[p])));
                }
                out[g * d.o + p] = q(eb[p] + q(alpha * q(acc.get())));
            }
        }
        out
    });
    (merged, merged_bias)
}

/// HostTensor gradients of the merge in the dtype.
pub struct MergeGradsQ {
    /// From `base + ...` alone: sum_g grad_merged.
    pub grad_base: Vec<f64>,
    /// dL/dU (masked).
    pub grad_curved: Vec<f64>,
    pub grad_base_bias: Option<Vec<f64>>,
    pub grad_expert_bias: Option<Vec<f64>>,
}

#[allow(clippy::too_many_arguments)]
pub fn merge_backward(
    q: Q,
    d: Dims,
    scores: &[f64],
    mask: Option<&[f64]>,
    biases: Option<(&[f64], &[f64])>,
    alpha: f64,
    dare: DareRef,
    grad_merged: &[f64],
    grad_merged_bias: Option<&[f64]>,
) -> MergeGradsQ {
    let oi = d.oi();
    let grad_base = (0..oi)
        .map(|k| {
            let mut acc = Acc::default();
            for g in 0..d.g {
                acc.add(grad_merged[g * oi + k]);
            }
            q(acc.get())
        })
        .collect();
    let mut grad_curved = vec![0.0; d.n * oi];
    for e in 0..d.n {
        for k in 0..oi {
            let mut acc = Acc::default();
            for g in 0..d.g {
                // d(alpha * S) -> alpha * G; dropout's backward; the gating's: * s, summed over g.
                let mut gx = q(alpha * grad_merged[g * oi + k]);
                if dare != DareRef::None {
                    gx = q(gx * zeta(dare, d, g, e, k));
                }
                acc.add(q(gx * scores[g * d.n + e]));
            }
            grad_curved[e * oi + k] = mask.map_or(1.0, |m| m[e * oi + k]) * q(acc.get());
        }
    }
    let (mut grad_base_bias, mut grad_expert_bias) = (None, None);
    if biases.is_some() {
        let zero = vec![0.0; d.g * d.o];
        let gmb = grad_merged_bias.unwrap_or(&zero);
        let mut geb = vec![0.0; d.o];
        let mut gb = vec![0.0; d.n * d.o];
        for p in 0..d.o {
            let mut direct = Acc::default();
            for g in 0..d.g {
                direct.add(gmb[g * d.o + p]);
            }
            let mut through = Acc::default();
            for e in 0..d.n {
                let mut acc = Acc::default();
                for g in 0..d.g {
                    acc.add(q(q(alpha * gmb[g * d.o + p]) * scores[g * d.n + e]));
                }
                gb[e * d.o + p] = q(acc.get());
                through.add(-gb[e * d.o + p]);
            }
            geb[p] = q(q(direct.get()) + q(through.get()));
        }
        grad_base_bias = Some(geb);
        grad_expert_bias = Some(gb);
    }
    MergeGradsQ {
        grad_base,
        grad_curved,
        grad_base_bias,
        grad_expert_bias,
    }
}

/// next_base = base + beta * mean_e(U_e) in the dtype.
pub fn dynamic_merge(q: Q, base: &[f64], curved: &[f64], n: usize, beta: f64) -> Vec<f64> {
    let oi = base.len();
    (0..oi)
        .map(|k| {
            let mut acc = Acc::default();
            for e in 0..n {
                acc.add(curved[e * oi + k]);
            }
            let mean = q(acc.get() / n as f64);
            q(base[k] + q(beta * mean))
        })
        .collect()
}

/// dL/dU_e of the dynamic merge (the mean's backward of beta * grad_next_base), the same for every e.
pub fn dynamic_merge_grad_curved(q: Q, n: usize, beta: f64, grad_next_base: &[f64]) -> Vec<f64> {
    grad_next_base
        .iter()
        .map(|&g| q(q(beta * g) / n as f64))
        .collect()
}

/// The fused op's tensor outputs in the dtype: (merged, merged_bias, next_base, curved).
#[allow(clippy::type_complexity)]
pub fn ca_merge(
    q: Q,
    x: &CaRefIn,
    mask: &[f64],
) -> (Vec<f64>, Option<Vec<f64>>, Option<Vec<f64>>, Vec<f64>) {
    let d = x.d;
    let t = tau(q, x.base, x.experts, d.n);
    let u = curve_tau(q, &t, x.kron, d.n, d.oi());
    let (merged, merged_bias) = merge(
        q,
        d,
        x.base,
        &u,
        x.scores,
        Some(mask),
        x.biases,
        x.alpha,
        x.dare,
    );
    let next_base = x.beta.map(|b| dynamic_merge(q, x.base, &u, d.n, b));
    (merged, merged_bias, next_base, u)
}

/// The fused op's tensor gradients in the dtype.
pub struct CaGradsQ {
    pub grad_base: Vec<f64>,
    pub grad_experts: Vec<f64>,
    pub factors: Option<[Vec<f64>; 4]>,
    pub grad_base_bias: Option<Vec<f64>>,
    pub grad_expert_bias: Option<Vec<f64>>,
}

pub fn ca_merge_backward(
    q: Q,
    x: &CaRefIn,
    mask: &[f64],
    grad_merged: &[f64],
    grad_merged_bias: Option<&[f64]>,
    grad_next_base: Option<&[f64]>,
) -> CaGradsQ {
    let d = x.d;
    let oi = d.oi();
    let t = tau(q, x.base, x.experts, d.n);
    let mg = merge_backward(
        q,
        d,
        x.scores,
        Some(mask),
        x.biases,
        x.alpha,
        x.dare,
        grad_merged,
        grad_merged_bias,
    );
    let mut h = mg.grad_curved;
    let mut grad_base = mg.grad_base;
    if let Some(beta) = x.beta {
        let zero = vec![0.0; oi];
        let gnb = grad_next_base.unwrap_or(&zero);
        let gu = dynamic_merge_grad_curved(q, d.n, beta, gnb);
        for e in 0..d.n {
            for k in 0..oi {
                h[e * oi + k] = q(h[e * oi + k] + gu[k]);
            }
        }
        for k in 0..oi {
            grad_base[k] = q(grad_base[k] + gnb[k]);
        }
    }
    let (gtau, factors) = curve_tau_backward(q, &t, x.kron, d.n, oi, &h);
    let ns = neg_sum(q, &gtau, d.n, oi);
    for k in 0..oi {
        grad_base[k] = q(grad_base[k] + ns[k]);
    }
    CaGradsQ {
        grad_base,
        grad_experts: gtau,
        factors,
        grad_base_bias: mg.grad_base_bias,
        grad_expert_bias: mg.grad_expert_bias,
    }
}

/// y = bmm(x, merged^T) (+ bias) in the dtype; x [G, T, I], merged [G, O, I], bias [G, O].
pub fn merged_linear(
    q: Q,
    d: Dims,
    t: usize,
    x: &[f64],
    merged: &[f64],
    bias: Option<&[f64]>,
) -> Vec<f64> {
    let mut y = vec![0.0; d.g * t * d.o];
    for g in 0..d.g {
        for tt in 0..t {
            for p in 0..d.o {
                let mut acc = Acc::default();
                for c in 0..d.i {
                    acc.add(merged[(g * d.o + p) * d.i + c] * x[(g * t + tt) * d.i + c]);
                }
                let v = q(acc.get());
                y[(g * t + tt) * d.o + p] = bias.map_or(v, |b| q(v + b[g * d.o + p]));
            }
        }
    }
    y
}

/// (grad_x, grad_merged, grad_merged_bias) in the dtype: two GEMMs and a reduction over T.
pub fn merged_linear_backward(
    q: Q,
    d: Dims,
    t: usize,
    x: &[f64],
    merged: &[f64],
    grad_y: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut gx = vec![0.0; d.g * t * d.i];
    let mut gm = vec![0.0; d.g * d.o * d.i];
    let mut gb = vec![0.0; d.g * d.o];
    for g in 0..d.g {
        for tt in 0..t {
            for c in 0..d.i {
                let mut acc = Acc::default();
                for p in 0..d.o {
                    acc.add(merged[(g * d.o + p) * d.i + c] * grad_y[(g * t + tt) * d.o + p]);
                }
                gx[(g * t + tt) * d.i + c] = q(acc.get());
            }
        }
        for p in 0..d.o {
            for c in 0..d.i {
                let mut acc = Acc::default();
                for tt in 0..t {
                    acc.add(grad_y[(g * t + tt) * d.o + p] * x[(g * t + tt) * d.i + c]);
                }
                gm[(g * d.o + p) * d.i + c] = q(acc.get());
            }
            let mut acc = Acc::default();
            for tt in 0..t {
                acc.add(grad_y[(g * t + tt) * d.o + p]);
            }
            gb[g * d.o + p] = q(acc.get());
        }
    }
    (gx, gm, gb)
}
