//! Shape checks and the Kronecker factorisation O = o1*o2, I = i1*i2 (SPEC section 2).

use crate::error::{Error, Result};

/// How a weight [O, I] is viewed as the 4-D tensor X[a, b, c, d] of shape [o1, o2, i1, i2].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Split {
    pub o1: usize,
    pub o2: usize,
    pub i1: usize,
    pub i2: usize,
}

impl Split {
    /// The official default: o1 = the largest divisor of O that is <= floor(sqrt(O)), and likewise i1.
    pub fn default_for(o: usize, i: usize) -> Split {
        let (o1, o2) = default_pair(o);
        let (i1, i2) = default_pair(i);
        Split { o1, o2, i1, i2 }
    }
    /// An explicit split; errors when o1 does not divide O or i1 does not divide I.
    pub fn new(o: usize, i: usize, o1: usize, i1: usize) -> Result<Split> {
        if o1 == 0 || !o.is_multiple_of(o1) {
            return Err(Error::option(
                "o1",
                format!("O = {o} is not divisible by o1 = {o1}"),
            ));
        }
        if i1 == 0 || !i.is_multiple_of(i1) {
            return Err(Error::option(
                "i1",
                format!("I = {i} is not divisible by i1 = {i1}"),
            ));
        }
        Ok(Split {
            o1,
            o2: o / o1,
            i1,
            i2: i / i1,
        })
    }
    pub fn o(&self) -> usize {
        self.o1 * self.o2
    }
    pub fn i(&self) -> usize {
        self.i1 * self.i2
    }
}

/// (n1, n/n1) with n1 the largest divisor of n not above floor(sqrt(n)); (1, n) for n <= 1... and primes.
pub fn default_pair(n: usize) -> (usize, usize) {
    if n == 0 {
        return (1, 0);
    }
    let mut r = (n as f64).sqrt() as usize;
    while r * r > n {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= n {
        r += 1;
    }
    let mut d = r.max(1);
    while !n.is_multiple_of(d) {
        d -= 1;
    }
    (d, n / d)
}

/// Errors unless `actual == expected`, naming the tensor and both shapes.
pub fn expect_shape(tensor: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual != expected {
        return Err(Error::shape(tensor, format!("{expected:?}"), actual));
    }
    Ok(())
}

/// Errors unless the tensor has `rank` dimensions (`what` describes them, e.g. "[N, O, I]").
pub fn expect_rank(tensor: &str, actual: &[usize], rank: usize, what: &str) -> Result<()> {
    if actual.len() != rank {
        return Err(Error::shape(tensor, format!("rank {rank} {what}"), actual));
    }
    Ok(())
}

/// Errors when any dimension is zero: SPEC operators are not defined on empty tensors.
pub fn expect_nonempty(tensor: &str, actual: &[usize]) -> Result<()> {
    if actual.contains(&0) {
        return Err(Error::shape(tensor, "no zero-sized dimension", actual));
    }
    Ok(())
}

/// `grad_merged_bias` of a merge backward: [G, O], and only where the merge has biases (absent
/// means zero). The CPU and CUDA backwards share it.
pub(crate) fn check_grad_merged_bias(
    shape: Option<&[usize]>,
    has_bias: bool,
    g: usize,
    o: usize,
) -> Result<()> {
    if let Some(s) = shape {
        if !has_bias {
            return Err(Error::option(
                "grad_merged_bias",
                "given, but the merge has no base_bias/expert_bias",
            ));
        }
        expect_shape("grad_merged_bias", s, &[g, o])?;
    }
    Ok(())
}

/// The shapes a CA-merge backward is given besides its inputs (`None`: not given).
pub(crate) struct CaBackwardShapes<'a> {
    /// The forward's U, [N, O, I].
    pub curved: Option<&'a [usize]>,
    /// [G, O, I].
    pub grad_merged: &'a [usize],
    /// [G, O], only with biases.
    pub grad_merged_bias: Option<&'a [usize]>,
    /// [O, I], only with `beta` (the dynamic merge's next base).
    pub grad_next_base: Option<&'a [usize]>,
}

/// Checks a CA-merge backward's upstream gradients (and U, when given) against the merge's
/// [G, N, O, I]; the CPU and CUDA backwards share it, so both name the same tensor for the same
/// mistake.
pub(crate) fn check_ca_backward(
    [g, n, o, i]: [usize; 4],
    has_bias: bool,
    has_beta: bool,
    s: &CaBackwardShapes,
) -> Result<()> {
    if let Some(u) = s.curved {
        expect_shape("curved", u, &[n, o, i])?;
    }
    expect_shape("grad_merged", s.grad_merged, &[g, o, i])?;
    check_grad_merged_bias(s.grad_merged_bias, has_bias, g, o)?;
    if let Some(gn) = s.grad_next_base {
        if !has_beta {
            return Err(Error::option(
                "grad_next_base",
                "given, but beta is not set",
            ));
        }
        expect_shape("grad_next_base", gn, &[o, i])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn official_default_splits() {
        for (n, want) in [
            (768, (24, 32)),
            (3072, (48, 64)),
            (512, (16, 32)),
            (2048, (32, 64)),
            (384, (16, 24)),
            (1536, (32, 48)),
            (7, (1, 7)),
            (1, (1, 1)),
            (16, (4, 4)),
        ] {
            assert_eq!(default_pair(n), want, "n = {n}");
        }
    }
}
