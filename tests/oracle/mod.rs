//! A float64 oracle for every camex operator (SPEC sections 3 and 4), shared by the CPU test files.
//!
//! It shares no code with `src/`: plain loops over plain `Vec<f64>`, the Kronecker curvature built as
//! the explicit O x O matrix (A (x) B) and I x I matrix (C (x) D), its own Philox4x32-10 (checked
//! against the Random123 known-answer vectors in `cpu_ops.rs`), and backward formulas derived here
//! from the matrix form. Slow on purpose: it only runs on small shapes. `glue` converts to and from
//! `camex::HostTensor` and draws the random test inputs.
#![allow(dead_code)]

pub mod glue;
pub mod official;

/// Sizes of a merge: G groups, N experts, weights O x I.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub g: usize,
    pub n: usize,
    pub o: usize,
    pub i: usize,
}

impl Dims {
    pub fn oi(&self) -> usize {
        self.o * self.i
    }
}

/// O = o1*o2, I = i1*i2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split4 {
    pub o1: usize,
    pub o2: usize,
    pub i1: usize,
    pub i2: usize,
}

/// Kronecker factors, row-major: a [R, N, o1, o1], b [R, N, o2, o2], c [R, N, i1, i1], d [R, N, i2, i2].
#[derive(Clone, Debug)]
pub struct KronRef {
    pub r: usize,
    pub split: Split4,
    pub a: Vec<f64>,
    pub b: Vec<f64>,
    pub c: Vec<f64>,
    pub d: Vec<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaskRef {
    None,
    Sign,
    Trim(f64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DareRef {
    None,
    Expert { p: f64, seed: u64 },
    Element { p: f64, seed: u64 },
}

// ----------------------------------------------------------------------------------------------
// Philox4x32-10 and the DARE draw
// ----------------------------------------------------------------------------------------------

/// Philox4x32 with 10 rounds (Salmon et al., SC'11); round j uses key + j * (golden-ratio bumps).
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const MUL_A: u64 = 0xD251_1F53;
    const MUL_B: u64 = 0xCD9E_8D57;
    const BUMP_0: u32 = 0x9E37_79B9;
    const BUMP_1: u32 = 0xBB67_AE85;
    let mut c = ctr;
    for round in 0..10u32 {
        let k0 = key[0].wrapping_add(BUMP_0.wrapping_mul(round));
        let k1 = key[1].wrapping_add(BUMP_1.wrapping_mul(round));
        let prod_a = MUL_A * u64::from(c[0]);
        let prod_b = MUL_B * u64::from(c[2]);
        c = [
            ((prod_b >> 32) as u32) ^ c[1] ^ k0,
            (prod_b & 0xffff_ffff) as u32,
            ((prod_a >> 32) as u32) ^ c[3] ^ k1,
            (prod_a & 0xffff_ffff) as u32,
        ];
    }
    c
}

/// zeta[g, i, p, q] = z / (1 - p) with z the DARE keep bit (SPEC section 3), or 1 without DARE.
pub fn dare_zeta(dare: DareRef, d: Dims, g: usize, i: usize, p: usize, q: usize) -> f64 {
    let (prob, seed, e, stream) = match dare {
        DareRef::None => return 1.0,
        DareRef::Expert { p: prob, seed } => (prob, seed, (g * d.n + i) as u64, 1u32),
        DareRef::Element { p: prob, seed } => (
            prob,
            seed,
            (((g * d.n + i) * d.o + p) * d.i + q) as u64,
            0u32,
        ),
    };
    let u = philox4x32_10(
        [e as u32, (e >> 32) as u32, stream, 0],
        [seed as u32, (seed >> 32) as u32],
    )[0];
    let threshold = (prob * 4294967296.0).floor();
    if f64::from(u) >= threshold {
        1.0 / (1.0 - prob)
    } else {
        0.0
    }
}

// ----------------------------------------------------------------------------------------------
// Small dense matrix helpers
// ----------------------------------------------------------------------------------------------

/// (A (x) B) for A m x m and B n x n: element ((x, y), (x2, y2)) = A[x, x2] * B[y, y2].
pub fn kron(a: &[f64], m: usize, b: &[f64], n: usize) -> Vec<f64> {
    let s = m * n;
    let mut out = vec![0.0; s * s];
    for x in 0..m {
        for y in 0..n {
            for x2 in 0..m {
                for y2 in 0..n {
                    out[(x * n + y) * s + (x2 * n + y2)] = a[x * m + x2] * b[y * n + y2];
                }
            }
        }
    }
    out
}

/// (m x k) times (k x n).
pub fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for r in 0..m {
        for c in 0..n {
            let mut s = 0.0;
            for j in 0..k {
                s += a[r * k + j] * b[j * n + c];
            }
            out[r * n + c] = s;
        }
    }
    out
}

/// The transpose of an m x n matrix (n x m).
pub fn transpose(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for r in 0..m {
        for c in 0..n {
            out[c * m + r] = a[r * n + c];
        }
    }
    out
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut s = 0.0;
    for k in 0..a.len() {
        s += a[k] * b[k];
    }
    s
}

/// Factor (r, expert e) of size k x k from a [R, N, k, k] tensor.
fn factor(t: &[f64], r: usize, e: usize, n: usize, k: usize) -> Vec<f64> {
    let off = (r * n + e) * k * k;
    t[off..off + k * k].to_vec()
}

impl KronRef {
    /// (A_re (x) B_re), O x O.
    pub fn kab(&self, r: usize, e: usize, n: usize) -> Vec<f64> {
        let s = self.split;
        kron(
            &factor(&self.a, r, e, n, s.o1),
            s.o1,
            &factor(&self.b, r, e, n, s.o2),
            s.o2,
        )
    }
    /// (C_re (x) D_re), I x I.
    pub fn kcd(&self, r: usize, e: usize, n: usize) -> Vec<f64> {
        let s = self.split;
        kron(
            &factor(&self.c, r, e, n, s.i1),
            s.i1,
            &factor(&self.d, r, e, n, s.i2),
            s.i2,
        )
    }
}

// ----------------------------------------------------------------------------------------------
// Curvature
// ----------------------------------------------------------------------------------------------

/// tau [N, O, I] = experts[i] - base.
pub fn domain_vectors(base: &[f64], experts: &[f64], n: usize, oi: usize) -> Vec<f64> {
    let mut tau = vec![0.0; n * oi];
    for e in 0..n {
        for k in 0..oi {
            tau[e * oi + k] = experts[e * oi + k] - base[k];
        }
    }
    tau
}

/// U_e = sum_r (A (x) B) tau_e (C (x) D)^T for a tau [N, O, I] (tau itself for the identity).
pub fn curve_tau(tau: &[f64], kr: Option<&KronRef>, n: usize, o: usize, i: usize) -> Vec<f64> {
    let kr = match kr {
        None => return tau.to_vec(),
        Some(k) => k,
    };
    let oi = o * i;
    let mut u = vec![0.0; n * oi];
    for e in 0..n {
        let t = &tau[e * oi..(e + 1) * oi];
        for r in 0..kr.r {
            let left = matmul(&kr.kab(r, e, n), t, o, o, i);
            let full = matmul(&left, &transpose(&kr.kcd(r, e, n), i, i), o, i, i);
            for k in 0..oi {
                u[e * oi + k] += full[k];
            }
        }
    }
    u
}

/// `curvature`: curved [N, O, I].
pub fn curvature(
    base: &[f64],
    experts: &[f64],
    kr: Option<&KronRef>,
    n: usize,
    o: usize,
    i: usize,
) -> Vec<f64> {
    curve_tau(&domain_vectors(base, experts, n, o * i), kr, n, o, i)
}

pub struct CurvGradsRef {
    pub grad_base: Vec<f64>,
    pub grad_experts: Vec<f64>,
    /// [grad_factor_a, grad_factor_b, grad_factor_c, grad_factor_d] for the Kronecker curvature.
    pub factors: Option<[Vec<f64>; 4]>,
}

/// Backward of U = sum_r K1_r tau K2_r^T (K1 = A (x) B, K2 = C (x) D) for H = dL/dU:
/// dtau = sum_r K1^T H K2, dK1 = H K2 tau^T, dK2 = H^T K1 tau, and dA[x, x2] = sum_{y,y2}
/// dK1[(x,y),(x2,y2)] B[y, y2] (likewise dB with A, dC with D, dD with C).
/// Returns (dL/dtau [N, O, I], factor grads).
pub fn curve_tau_backward(
    tau: &[f64],
    kr: Option<&KronRef>,
    n: usize,
    o: usize,
    i: usize,
    h: &[f64],
) -> (Vec<f64>, Option<[Vec<f64>; 4]>) {
    let kr = match kr {
        None => return (h.to_vec(), None),
        Some(k) => k,
    };
    let s = kr.split;
    let oi = o * i;
    let mut gtau = vec![0.0; n * oi];
    let mut ga = vec![0.0; kr.a.len()];
    let mut gb = vec![0.0; kr.b.len()];
    let mut gc = vec![0.0; kr.c.len()];
    let mut gd = vec![0.0; kr.d.len()];
    for e in 0..n {
        let t = &tau[e * oi..(e + 1) * oi];
        let he = &h[e * oi..(e + 1) * oi];
        for r in 0..kr.r {
            let k1 = kr.kab(r, e, n);
            let k2 = kr.kcd(r, e, n);
            let dt = matmul(&matmul(&transpose(&k1, o, o), he, o, o, i), &k2, o, i, i);
            for k in 0..oi {
                gtau[e * oi + k] += dt[k];
            }
            let dk1 = matmul(&matmul(he, &k2, o, i, i), &transpose(t, o, i), o, i, o);
            let dk2 = matmul(&matmul(&transpose(he, o, i), &k1, i, o, o), t, i, o, i);
            let fa = factor(&kr.a, r, e, n, s.o1);
            let fb = factor(&kr.b, r, e, n, s.o2);
            let fc = factor(&kr.c, r, e, n, s.i1);
            let fd = factor(&kr.d, r, e, n, s.i2);
            let (oa, ob) = ((r * n + e) * s.o1 * s.o1, (r * n + e) * s.o2 * s.o2);
            let (oc, od) = ((r * n + e) * s.i1 * s.i1, (r * n + e) * s.i2 * s.i2);
            for x in 0..s.o1 {
                for x2 in 0..s.o1 {
                    for y in 0..s.o2 {
                        for y2 in 0..s.o2 {
                            let g = dk1[(x * s.o2 + y) * o + (x2 * s.o2 + y2)];
                            ga[oa + x * s.o1 + x2] += g * fb[y * s.o2 + y2];
                            gb[ob + y * s.o2 + y2] += g * fa[x * s.o1 + x2];
                        }
                    }
                }
            }
            for x in 0..s.i1 {
                for x2 in 0..s.i1 {
                    for y in 0..s.i2 {
                        for y2 in 0..s.i2 {
                            let g = dk2[(x * s.i2 + y) * i + (x2 * s.i2 + y2)];
                            gc[oc + x * s.i1 + x2] += g * fd[y * s.i2 + y2];
                            gd[od + y * s.i2 + y2] += g * fc[x * s.i1 + x2];
                        }
                    }
                }
            }
        }
    }
    (gtau, Some([ga, gb, gc, gd]))
}

/// grad_base = -sum_e dtau_e.
fn neg_sum(gtau: &[f64], n: usize, oi: usize) -> Vec<f64> {
    let mut out = vec![0.0; oi];
    for e in 0..n {
        for k in 0..oi {
            out[k] -= gtau[e * oi + k];
        }
    }
    out
}

/// `curvature_backward` for grad_curved [N, O, I].
pub fn curvature_backward(
    base: &[f64],
    experts: &[f64],
    kr: Option<&KronRef>,
    n: usize,
    o: usize,
    i: usize,
    grad_curved: &[f64],
) -> CurvGradsRef {
    let tau = domain_vectors(base, experts, n, o * i);
    let (gtau, factors) = curve_tau_backward(&tau, kr, n, o, i, grad_curved);
    CurvGradsRef {
        grad_base: neg_sum(&gtau, n, o * i),
        grad_experts: gtau,
        factors,
    }
}

/// x (.)_mode M on the 4-D view [o1, o2, i1, i2]: y[.., j, ..] = sum_j2 M[j, j2] x[.., j2, ..].
pub fn mode_product_4d(x: &[f64], s: Split4, mode: usize, m: &[f64]) -> Vec<f64> {
    let dims = [s.o1, s.o2, s.i1, s.i2];
    let at = |v: [usize; 4]| ((v[0] * s.o2 + v[1]) * s.i1 + v[2]) * s.i2 + v[3];
    let k = dims[mode];
    let mut y = vec![0.0; x.len()];
    for a in 0..s.o1 {
        for b in 0..s.o2 {
            for c in 0..s.i1 {
                for d in 0..s.i2 {
                    let v = [a, b, c, d];
                    let mut acc = 0.0;
                    for j2 in 0..k {
                        let mut w = v;
                        w[mode] = j2;
                        acc += m[v[mode] * k + j2] * x[at(w)];
                    }
                    y[at(v)] = acc;
                }
            }
        }
    }
    y
}

/// SPEC section 4's factor gradients of one (r, e), written the 4-D way (a second route, to
/// cross-check [`curve_tau_backward`]): dA[a, a2] = sum_{b,c,d} H[a,b,c,d] Y[a2,b,c,d] with
/// Y = tau x2 B x3 C x4 D, and likewise for B, C, D.
pub fn factor_grads_4d(
    tau_e: &[f64],
    h_e: &[f64],
    kr: &KronRef,
    r: usize,
    e: usize,
    n: usize,
) -> [Vec<f64>; 4] {
    let s = kr.split;
    let f = [
        factor(&kr.a, r, e, n, s.o1),
        factor(&kr.b, r, e, n, s.o2),
        factor(&kr.c, r, e, n, s.i1),
        factor(&kr.d, r, e, n, s.i2),
    ];
    let dims = [s.o1, s.o2, s.i1, s.i2];
    let at = |v: [usize; 4]| ((v[0] * s.o2 + v[1]) * s.i1 + v[2]) * s.i2 + v[3];
    let mut out: [Vec<f64>; 4] = Default::default();
    for mode in 0..4 {
        let mut y = tau_e.to_vec();
        for (other, fm) in f.iter().enumerate() {
            if other != mode {
                y = mode_product_4d(&y, s, other, fm);
            }
        }
        let k = dims[mode];
        let mut g = vec![0.0; k * k];
        for a in 0..s.o1 {
            for b in 0..s.o2 {
                for c in 0..s.i1 {
                    for d in 0..s.i2 {
                        let v = [a, b, c, d];
                        for j2 in 0..k {
                            let mut w = v;
                            w[mode] = j2;
                            g[v[mode] * k + j2] += h_e[at(v)] * y[at(w)];
                        }
                    }
                }
            }
        }
        out[mode] = g;
    }
    out
}

// ----------------------------------------------------------------------------------------------
// TIES masks
// ----------------------------------------------------------------------------------------------

/// sgn with sgn(0) = 0 and sgn(NaN) = NaN.
pub fn sgn(x: f64) -> f64 {
    if x.is_nan() {
        x
    } else if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Mask [N, O, I] of 0/1 from tau [N, O, I].
pub fn ties_mask(tau: &[f64], n: usize, oi: usize, kind: MaskRef) -> Vec<f64> {
    let mut m = vec![0.0; n * oi];
    match kind {
        MaskRef::None => m.iter_mut().for_each(|v| *v = 1.0),
        MaskRef::Sign => {
            for k in 0..oi {
                let mut sum = 0.0;
                for e in 0..n {
                    sum += tau[e * oi + k];
                }
                let elect = sgn(sum);
                for e in 0..n {
                    m[e * oi + k] = if sgn(tau[e * oi + k]) == elect {
                        1.0
                    } else {
                        0.0
                    };
                }
            }
        }
        MaskRef::Trim(frac) => {
            let count = ((frac * oi as f64).ceil() as usize).clamp(1, oi);
            let mut trimmed = vec![0.0; n * oi];
            for e in 0..n {
                let mut mags: Vec<f64> = (0..oi).map(|k| tau[e * oi + k].abs()).collect();
                // Descending, NaN first (largest).
                mags.sort_by(|x, y| match (x.is_nan(), y.is_nan()) {
                    (true, true) => std::cmp::Ordering::Equal,
                    (true, false) => std::cmp::Ordering::Less,
                    (false, true) => std::cmp::Ordering::Greater,
                    _ => y.partial_cmp(x).unwrap(),
                });
                let threshold = mags[count - 1];
                for k in 0..oi {
                    let t = tau[e * oi + k];
                    if t.abs() >= threshold || t.is_nan() {
                        trimmed[e * oi + k] = t;
                    }
                }
            }
            for k in 0..oi {
                let mut sum = 0.0;
                for e in 0..n {
                    sum += trimmed[e * oi + k];
                }
                let elect = sgn(sum);
                for e in 0..n {
                    let keep = trimmed[e * oi + k] != 0.0 && sgn(tau[e * oi + k]) == elect;
                    m[e * oi + k] = if keep { 1.0 } else { 0.0 };
                }
            }
        }
    }
    m
}

// ----------------------------------------------------------------------------------------------
// Merge
// ----------------------------------------------------------------------------------------------

pub struct MergeRefOut {
    pub merged: Vec<f64>,
    pub merged_bias: Option<Vec<f64>>,
}

/// merged[g] = base + alpha sum_i s[g,i] zeta[g,i] (mask_i (.) curved_i);
/// merged_bias[g] = e_b + alpha sum_i s[g,i] (b_i - e_b).
#[allow(clippy::too_many_arguments)]
pub fn merge(
    d: Dims,
    base: &[f64],
    curved: &[f64],
    scores: &[f64],
    mask: Option<&[f64]>,
    biases: Option<(&[f64], &[f64])>,
    alpha: f64,
    dare: DareRef,
) -> MergeRefOut {
    let oi = d.oi();
    let mut merged = vec![0.0; d.g * oi];
    for g in 0..d.g {
        for p in 0..d.o {
            for q in 0..d.i {
                let k = p * d.i + q;
                let mut acc = 0.0;
                for e in 0..d.n {
                    let m = mask.map_or(1.0, |m| m[e * oi + k]);
                    let z = dare_zeta(dare, d, g, e, p, q);
                    acc += scores[g * d.n + e] * z * m * curved[e * oi + k];
                }
                merged[g * oi + k] = base[k] + alpha * acc;
            }
        }
    }
    let merged_bias = biases.map(|(eb, b)| {
        let mut out = vec![0.0; d.g * d.o];
        for g in 0..d.g {
            for p in 0..d.o {
                let mut acc = 0.0;
                for e in 0..d.n {
                    acc += scores[g * d.n + e] * (b[e * d.o + p] - eb[p]);
                }
                out[g * d.o + p] = eb[p] + alpha * acc;
            }
        }
        out
    });
    MergeRefOut {
        merged,
        merged_bias,
    }
}

pub struct MergeRefGrads {
    pub grad_base: Vec<f64>,
    pub grad_curved: Vec<f64>,
    pub grad_scores: Vec<f64>,
    pub grad_alpha: f64,
    pub grad_base_bias: Option<Vec<f64>>,
    pub grad_expert_bias: Option<Vec<f64>>,
}

/// Backward of [`merge`] for grad_merged [G, O, I] and grad_merged_bias [G, O] (when biases).
#[allow(clippy::too_many_arguments)]
pub fn merge_backward(
    d: Dims,
    base: &[f64],
    curved: &[f64],
    scores: &[f64],
    mask: Option<&[f64]>,
    biases: Option<(&[f64], &[f64])>,
    alpha: f64,
    dare: DareRef,
    grad_merged: &[f64],
    grad_merged_bias: Option<&[f64]>,
) -> MergeRefGrads {
    let _ = base;
    let oi = d.oi();
    let mut grad_base = vec![0.0; oi];
    let mut grad_curved = vec![0.0; d.n * oi];
    let mut grad_scores = vec![0.0; d.g * d.n];
    let mut grad_alpha = 0.0;
    for g in 0..d.g {
        for k in 0..oi {
            grad_base[k] += grad_merged[g * oi + k];
        }
        for e in 0..d.n {
            let s = scores[g * d.n + e];
            let mut inner = 0.0; // < Gbar_g, zeta (.) P_e >
            for p in 0..d.o {
                for q in 0..d.i {
                    let k = p * d.i + q;
                    let m = mask.map_or(1.0, |m| m[e * oi + k]);
                    let z = dare_zeta(dare, d, g, e, p, q);
                    let gm = grad_merged[g * oi + k];
                    inner += gm * z * m * curved[e * oi + k];
                    grad_curved[e * oi + k] += alpha * m * s * z * gm;
                }
            }
            grad_scores[g * d.n + e] += alpha * inner;
            grad_alpha += s * inner;
        }
    }
    let (mut grad_base_bias, mut grad_expert_bias) = (None, None);
    if let Some((eb, b)) = biases {
        let zero = vec![0.0; d.g * d.o];
        let gmb = grad_merged_bias.unwrap_or(&zero);
        let mut geb = vec![0.0; d.o];
        let mut gb = vec![0.0; d.n * d.o];
        for g in 0..d.g {
            let mut ssum = 0.0;
            for e in 0..d.n {
                ssum += scores[g * d.n + e];
            }
            for p in 0..d.o {
                geb[p] += (1.0 - alpha * ssum) * gmb[g * d.o + p];
            }
            for e in 0..d.n {
                let s = scores[g * d.n + e];
                let mut inner = 0.0;
                for p in 0..d.o {
                    gb[e * d.o + p] += alpha * s * gmb[g * d.o + p];
                    inner += gmb[g * d.o + p] * (b[e * d.o + p] - eb[p]);
                }
                grad_scores[g * d.n + e] += alpha * inner;
                grad_alpha += s * inner;
            }
        }
        grad_base_bias = Some(geb);
        grad_expert_bias = Some(gb);
    }
    MergeRefGrads {
        grad_base,
        grad_curved,
        grad_scores,
        grad_alpha,
        grad_base_bias,
        grad_expert_bias,
    }
}

/// SPEC section 5's S (the sum of the absolute values of the terms) of the merge's cancelling
/// scalar gradients: (S of grad_alpha, S of each grad_scores[g, e] [G, N]). grad_scores[g, e] sums
/// alpha * Gbar[g,p,q] zeta m_e U_e and alpha * dL/dbbar[g,p] (b_e - e_b)[p]; grad_alpha sums the same
/// terms with s[g, e] for alpha, over g and e.
#[allow(clippy::too_many_arguments)]
pub fn merge_backward_scales(
    d: Dims,
    curved: &[f64],
    scores: &[f64],
    mask: Option<&[f64]>,
    biases: Option<(&[f64], &[f64])>,
    alpha: f64,
    dare: DareRef,
    grad_merged: &[f64],
    grad_merged_bias: Option<&[f64]>,
) -> (f64, Vec<f64>) {
    let oi = d.oi();
    let mut s_alpha = 0.0;
    let mut s_scores = vec![0.0; d.g * d.n];
    for g in 0..d.g {
        for e in 0..d.n {
            let mut inner = 0.0;
            for p in 0..d.o {
                for q in 0..d.i {
                    let k = p * d.i + q;
                    let m = mask.map_or(1.0, |m| m[e * oi + k]);
                    let z = dare_zeta(dare, d, g, e, p, q);
                    inner += (grad_merged[g * oi + k] * z * m * curved[e * oi + k]).abs();
                }
            }
            if let (Some((eb, b)), Some(gmb)) = (biases, grad_merged_bias) {
                for p in 0..d.o {
                    inner += (gmb[g * d.o + p] * (b[e * d.o + p] - eb[p])).abs();
                }
            }
            s_scores[g * d.n + e] = alpha.abs() * inner;
            s_alpha += scores[g * d.n + e].abs() * inner;
        }
    }
    (s_alpha, s_scores)
}

/// S of grad_beta = (1/N) sum_{e,k} grad_next_base[k] U_e[k]: (1/N) sum |grad_next_base[k] U_e[k]|.
pub fn beta_scale(curved: &[f64], n: usize, grad_next_base: &[f64]) -> f64 {
    let oi = grad_next_base.len();
    let mut s = 0.0;
    for e in 0..n {
        for k in 0..oi {
            s += (grad_next_base[k] * curved[e * oi + k]).abs();
        }
    }
    s / n as f64
}

// ----------------------------------------------------------------------------------------------
// Dynamic merge
// ----------------------------------------------------------------------------------------------

/// next_base = base + beta/N sum_i curved_i.
pub fn dynamic_merge(base: &[f64], curved: &[f64], n: usize, beta: f64) -> Vec<f64> {
    let oi = base.len();
    let mut out = base.to_vec();
    for k in 0..oi {
        let mut s = 0.0;
        for e in 0..n {
            s += curved[e * oi + k];
        }
        out[k] += beta / n as f64 * s;
    }
    out
}

/// (grad_base, grad_curved, grad_beta).
pub fn dynamic_merge_backward(
    curved: &[f64],
    n: usize,
    beta: f64,
    grad_next_base: &[f64],
) -> (Vec<f64>, Vec<f64>, f64) {
    let oi = grad_next_base.len();
    let mut grad_curved = vec![0.0; n * oi];
    let mut grad_beta = 0.0;
    for e in 0..n {
        for k in 0..oi {
            grad_curved[e * oi + k] = beta / n as f64 * grad_next_base[k];
            grad_beta += grad_next_base[k] * curved[e * oi + k] / n as f64;
        }
    }
    (grad_next_base.to_vec(), grad_curved, grad_beta)
}

// ----------------------------------------------------------------------------------------------
// CA-merge (curvature, mask, merge, optional dynamic merge)
// ----------------------------------------------------------------------------------------------

pub struct CaRefIn<'a> {
    pub d: Dims,
    pub base: &'a [f64],
    pub experts: &'a [f64],
    pub scores: &'a [f64],
    pub kron: Option<&'a KronRef>,
    pub biases: Option<(&'a [f64], &'a [f64])>,
    pub alpha: f64,
    pub mask: MaskRef,
    pub dare: DareRef,
    pub beta: Option<f64>,
}

pub struct CaRefOut {
    pub merged: Vec<f64>,
    pub merged_bias: Option<Vec<f64>>,
    pub next_base: Option<Vec<f64>>,
    /// U (unmasked).
    pub curved: Vec<f64>,
}

pub fn ca_merge(x: &CaRefIn) -> CaRefOut {
    let d = x.d;
    let tau = domain_vectors(x.base, x.experts, d.n, d.oi());
    let u = curve_tau(&tau, x.kron, d.n, d.o, d.i);
    let m = ties_mask(&tau, d.n, d.oi(), x.mask);
    let mo = merge(d, x.base, &u, x.scores, Some(&m), x.biases, x.alpha, x.dare);
    let next_base = x.beta.map(|beta| dynamic_merge(x.base, &u, d.n, beta));
    CaRefOut {
        merged: mo.merged,
        merged_bias: mo.merged_bias,
        next_base,
        curved: u,
    }
}

pub struct CaRefGrads {
    pub grad_base: Vec<f64>,
    pub grad_experts: Vec<f64>,
    pub grad_scores: Vec<f64>,
    pub factors: Option<[Vec<f64>; 4]>,
    pub grad_alpha: f64,
    pub grad_beta: Option<f64>,
    pub grad_base_bias: Option<Vec<f64>>,
    pub grad_expert_bias: Option<Vec<f64>>,
}

pub fn ca_merge_backward(
    x: &CaRefIn,
    grad_merged: &[f64],
    grad_merged_bias: Option<&[f64]>,
    grad_next_base: Option<&[f64]>,
) -> CaRefGrads {
    let d = x.d;
    let oi = d.oi();
    let tau = domain_vectors(x.base, x.experts, d.n, oi);
    let u = curve_tau(&tau, x.kron, d.n, d.o, d.i);
    let m = ties_mask(&tau, d.n, oi, x.mask);
    let mg = merge_backward(
        d,
        x.base,
        &u,
        x.scores,
        Some(&m),
        x.biases,
        x.alpha,
        x.dare,
        grad_merged,
        grad_merged_bias,
    );
    // H = dL/dU: from the merge and, with beta, from next_base.
    let mut h = mg.grad_curved;
    let mut grad_base = mg.grad_base;
    let mut grad_beta = None;
    if let Some(beta) = x.beta {
        let zero = vec![0.0; oi];
        let gnb = grad_next_base.unwrap_or(&zero);
        let (gb, gc, gbeta) = dynamic_merge_backward(&u, d.n, beta, gnb);
        for k in 0..oi {
            grad_base[k] += gb[k];
        }
        for k in 0..d.n * oi {
            h[k] += gc[k];
        }
        grad_beta = Some(gbeta);
    }
    let (gtau, factors) = curve_tau_backward(&tau, x.kron, d.n, d.o, d.i, &h);
    let ns = neg_sum(&gtau, d.n, oi);
    for k in 0..oi {
        grad_base[k] += ns[k];
    }
    CaRefGrads {
        grad_base,
        grad_experts: gtau,
        grad_scores: mg.grad_scores,
        factors,
        grad_alpha: mg.grad_alpha,
        grad_beta,
        grad_base_bias: mg.grad_base_bias,
        grad_expert_bias: mg.grad_expert_bias,
    }
}

// ----------------------------------------------------------------------------------------------
// Merged linear
// ----------------------------------------------------------------------------------------------

/// y[g,t,o] = sum_q merged[g,o,q] x[g,t,q] + merged_bias[g,o].
pub fn merged_linear(
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
                let mut acc = bias.map_or(0.0, |b| b[g * d.o + p]);
                for q in 0..d.i {
                    acc += merged[(g * d.o + p) * d.i + q] * x[(g * t + tt) * d.i + q];
                }
                y[(g * t + tt) * d.o + p] = acc;
            }
        }
    }
    y
}

/// (grad_x, grad_merged, grad_merged_bias).
pub fn merged_linear_backward(
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
            for p in 0..d.o {
                let dy = grad_y[(g * t + tt) * d.o + p];
                gb[g * d.o + p] += dy;
                for q in 0..d.i {
                    gx[(g * t + tt) * d.i + q] += merged[(g * d.o + p) * d.i + q] * dy;
                    gm[(g * d.o + p) * d.i + q] += dy * x[(g * t + tt) * d.i + q];
                }
            }
        }
    }
    (gx, gm, gb)
}

// ----------------------------------------------------------------------------------------------
// Causal segment scores
// ----------------------------------------------------------------------------------------------

/// S[b, 0] = R[b, 0] (stop-gradient), S[b, j] = R[b, j-1] for j >= 1. router [B, J, N].
pub fn segment_scores(router: &[f64], b: usize, j: usize, n: usize) -> Vec<f64> {
    let mut s = vec![0.0; b * j * n];
    for bb in 0..b {
        for jj in 0..j {
            let src = if jj == 0 { 0 } else { jj - 1 };
            for e in 0..n {
                s[(bb * j + jj) * n + e] = router[(bb * j + src) * n + e];
            }
        }
    }
    s
}

/// dR[b, j] = dS[b, j+1] for j < J-1, dR[b, J-1] = 0 (nothing through S[b, 0]).
pub fn segment_scores_backward(grad_scores: &[f64], b: usize, j: usize, n: usize) -> Vec<f64> {
    let mut g = vec![0.0; b * j * n];
    for bb in 0..b {
        for jj in 0..j.saturating_sub(1) {
            for e in 0..n {
                g[(bb * j + jj) * n + e] = grad_scores[(bb * j + jj + 1) * n + e];
            }
        }
    }
    g
}

/// <a, b> (public, for linear functionals in the gradient tests).
pub fn inner(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    dot(a, b)
}
