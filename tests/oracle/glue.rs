//! Test glue: the tests' RNG (tests/rng), random cases, conversions between `Vec<f64>` and
//! `camex::HostTensor<F>`, and SPEC section 5's bound 1: the relative Frobenius error of a tensor, and
//! |out - ref| <= tol * S for a cancelling sum.

use super::{DareRef, Dims, KronRef, MaskRef, Split4};
use camex::cpu::{Curvature, Factors};
use camex::{DType, Dare, Float, HostTensor, Mask};

#[path = "../rng/mod.rs"]
mod rng;
pub use rng::Rng;

/// One shape to test: G, N, O, I, the split and the rank R, and T tokens per group.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub d: Dims,
    pub split: Split4,
    pub r: usize,
    pub t: usize,
}

pub fn shape(
    g: usize,
    n: usize,
    (o1, o2): (usize, usize),
    (i1, i2): (usize, usize),
    r: usize,
    t: usize,
) -> Shape {
    Shape {
        d: Dims {
            g,
            n,
            o: o1 * o2,
            i: i1 * i2,
        },
        split: Split4 { o1, o2, i1, i2 },
        r,
        t,
    }
}

/// Small shapes covering R in {1,2,3}, N in {1,3}, G in {1,4}, non-square splits and splits with a 1.
pub fn shapes() -> Vec<Shape> {
    vec![
        shape(1, 1, (2, 3), (5, 2), 1, 3),
        shape(4, 3, (2, 3), (5, 2), 2, 2),
        shape(1, 3, (1, 6), (7, 1), 3, 1),
        shape(4, 1, (2, 2), (1, 7), 3, 2),
        shape(4, 3, (5, 1), (3, 2), 2, 3),
        shape(1, 3, (3, 3), (2, 4), 1, 2),
    ]
}

/// Random inputs for every operator at one shape (all f64; tests round them to F first).
#[derive(Clone, Debug)]
pub struct Case {
    pub s: Shape,
    pub base: Vec<f64>,
    pub experts: Vec<f64>,
    pub scores: Vec<f64>,
    pub kron: KronRef,
    pub base_bias: Vec<f64>,
    pub expert_bias: Vec<f64>,
    pub x: Vec<f64>,
}

impl Case {
    pub fn random(s: Shape, seed: u64) -> Case {
        let mut rng = Rng::new(seed);
        let d = s.d;
        let sp = s.split;
        let r = s.r;
        Case {
            s,
            base: rng.dyadic(d.oi()),
            experts: rng.dyadic(d.n * d.oi()),
            scores: rng.range(d.g * d.n, 0.05, 1.0),
            kron: KronRef {
                r,
                split: sp,
                a: rng.vec(r * d.n * sp.o1 * sp.o1),
                b: rng.vec(r * d.n * sp.o2 * sp.o2),
                c: rng.vec(r * d.n * sp.i1 * sp.i1),
                d: rng.vec(r * d.n * sp.i2 * sp.i2),
            },
            base_bias: rng.vec(d.o),
            expert_bias: rng.vec(d.n * d.o),
            x: rng.vec(d.g * s.t * d.i),
        }
    }

    /// The same values rounded to F (so the oracle sees exactly what the operator sees).
    pub fn rounded<F: Float>(&self) -> Case {
        let r = |v: &Vec<f64>| rounded::<F>(v);
        Case {
            s: self.s,
            base: r(&self.base),
            experts: r(&self.experts),
            scores: r(&self.scores),
            kron: KronRef {
                r: self.kron.r,
                split: self.kron.split,
                a: r(&self.kron.a),
                b: r(&self.kron.b),
                c: r(&self.kron.c),
                d: r(&self.kron.d),
            },
            base_bias: r(&self.base_bias),
            expert_bias: r(&self.expert_bias),
            x: r(&self.x),
        }
    }

    pub fn tensors<F: Float>(&self) -> CaseT<F> {
        let d = self.s.d;
        let sp = self.s.split;
        let r = self.s.r;
        CaseT {
            base: tensor(&[d.o, d.i], &self.base),
            experts: tensor(&[d.n, d.o, d.i], &self.experts),
            scores: tensor(&[d.g, d.n], &self.scores),
            a: tensor(&[r, d.n, sp.o1, sp.o1], &self.kron.a),
            b: tensor(&[r, d.n, sp.o2, sp.o2], &self.kron.b),
            c: tensor(&[r, d.n, sp.i1, sp.i1], &self.kron.c),
            d: tensor(&[r, d.n, sp.i2, sp.i2], &self.kron.d),
            base_bias: tensor(&[d.o], &self.base_bias),
            expert_bias: tensor(&[d.n, d.o], &self.expert_bias),
            x: tensor(&[d.g, self.s.t, d.i], &self.x),
        }
    }
}

/// A [`Case`] as camex tensors.
pub struct CaseT<F> {
    pub base: HostTensor<F>,
    pub experts: HostTensor<F>,
    pub scores: HostTensor<F>,
    pub a: HostTensor<F>,
    pub b: HostTensor<F>,
    pub c: HostTensor<F>,
    pub d: HostTensor<F>,
    pub base_bias: HostTensor<F>,
    pub expert_bias: HostTensor<F>,
    pub x: HostTensor<F>,
}

impl<F: Float> CaseT<F> {
    pub fn curvature(&self, kronecker: bool) -> Curvature<'_, F> {
        if kronecker {
            Curvature::Kronecker(Factors {
                a: &self.a,
                b: &self.b,
                c: &self.c,
                d: &self.d,
            })
        } else {
            Curvature::Identity
        }
    }
}

pub fn tensor<F: Float>(shape: &[usize], v: &[f64]) -> HostTensor<F> {
    HostTensor::new(shape, v.iter().map(|&x| F::from_f64(x)).collect()).expect("tensor shape")
}

pub fn vals<F: Float>(t: &HostTensor<F>) -> Vec<f64> {
    t.data().iter().map(|x| x.to_f64()).collect()
}

pub fn rounded<F: Float>(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| F::from_f64(x).to_f64()).collect()
}

/// ||out - ref|| / ||ref|| (Frobenius); ||out|| when ref is exactly zero.
pub fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len(), "length");
    let mut num = 0.0;
    let mut den = 0.0;
    for (o, r) in out.iter().zip(reference) {
        num += (o - r) * (o - r);
        den += r * r;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// SPEC section 5 tolerance for the storage type (f64 gets 1e-12).
pub fn tol<F: Float>() -> f64 {
    match F::DTYPE {
        DType::F64 => 1e-12,
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
    }
}

/// Asserts the shape and the relative error of `out` against `reference`.
pub fn check<F: Float>(what: &str, out: &HostTensor<F>, shape: &[usize], reference: &[f64]) {
    assert_eq!(out.shape(), shape, "{what}: shape");
    let e = rel_err(&vals(out), reference);
    assert!(
        e < tol::<F>(),
        "{what} ({}): relative error {e:e} >= {:e}",
        F::DTYPE.name(),
        tol::<F>()
    );
}

/// SPEC section 5's bound 1 for a long reduction that can cancel (grad_alpha, grad_beta):
/// |out - ref| <= tol * S, with `scale` = S the sum of the absolute values of its terms (a relative
/// error means nothing when the exact value is near zero).
pub fn check_scalar<F: Float>(what: &str, out: F, reference: f64, scale: f64) {
    let e = (out.to_f64() - reference).abs();
    assert!(
        e <= tol::<F>() * scale,
        "{what} ({}): got {out}, want {reference}, |error| {e:e} > tol * S = {:e} * {scale:e}",
        F::DTYPE.name(),
        tol::<F>()
    );
}

/// [`check_scalar`] for every entry of a tensor of cancelling sums (grad_scores), with their S.
pub fn check_sums<F: Float>(
    what: &str,
    out: &HostTensor<F>,
    shape: &[usize],
    reference: &[f64],
    scales: &[f64],
) {
    assert_eq!(out.shape(), shape, "{what}: shape");
    assert_eq!(reference.len(), scales.len(), "{what}: scales");
    for (k, ((o, r), s)) in vals(out).iter().zip(reference).zip(scales).enumerate() {
        let e = (o - r).abs();
        assert!(
            e <= tol::<F>() * s,
            "{what} ({}) entry {k}: got {o}, want {r}, |error| {e:e} > tol * S = {:e} * {s:e}",
            F::DTYPE.name(),
            tol::<F>()
        );
    }
}

pub fn mask_of(m: MaskRef) -> Mask {
    match m {
        MaskRef::None => Mask::None,
        MaskRef::Sign => Mask::TiesSign,
        MaskRef::Trim(k) => Mask::TiesTrim(k),
    }
}

pub fn dare_of(d: DareRef) -> Dare {
    match d {
        DareRef::None => Dare::None,
        DareRef::Expert { p, seed } => Dare::Expert { p, seed },
        DareRef::Element { p, seed } => Dare::Element { p, seed },
    }
}

/// Every mask kind (trim fractions chosen so that k*O*I is never a rounding-borderline integer).
pub fn masks() -> Vec<MaskRef> {
    vec![
        MaskRef::None,
        MaskRef::Sign,
        MaskRef::Trim(1.0),
        MaskRef::Trim(0.5),
        MaskRef::Trim(0.37),
    ]
}

/// No DARE and both DARE granularities.
pub fn dares() -> Vec<DareRef> {
    vec![
        DareRef::None,
        DareRef::Expert { p: 0.3, seed: 7 },
        DareRef::Element {
            p: 0.25,
            seed: 0x1234_5678_9abc,
        },
    ]
}
