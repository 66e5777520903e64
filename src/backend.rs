//! One definition of every operator's inputs, outputs and gradients, generic over where the tensors
//! live, and the [`Backend`] trait that runs the operators there.
//!
//! The types take the tensor type `X` as a parameter: [`HostTensor`] for [`crate::cpu`], and
//! `CudaTensor` for `crate::cuda` (feature `cuda`). The two modules name them with aliases
//! (`cpu::Factors<'_, f32>`, `cuda::Factors<'_, bf16>`), so each struct is written once. Scalar
//! gradients (`grad_alpha`, `grad_beta`) are a second parameter `S`: a host value on the CPU, a 0-d
//! device tensor on CUDA (reading it back would synchronise the stream).
//!
//! [`Backend`] is the one wiring of the operators per place: frontends that work on either (the
//! named-tensor table of the CLI, the candle ops) are written once against it. [`Cpu`] is the host
//! implementation; `crate::cuda::Cuda` (a stream) the device one.

use crate::error::{Error, Result};
use crate::options::{Dare, Mask, MergeOptions};
use crate::shape::{expect_nonempty, expect_rank, expect_shape, Split};
use crate::tensor::{Float, HostTensor};

/// What the shape checks need of a tensor, host or device.
pub trait Shaped {
    fn shape(&self) -> &[usize];
}

impl<T> Shaped for HostTensor<T> {
    fn shape(&self) -> &[usize] {
        HostTensor::shape(self)
    }
}

/// The four Kronecker factors `factor_a` [R, N, o1, o1], `factor_b` [R, N, o2, o2],
/// `factor_c` [R, N, i1, i1], `factor_d` [R, N, i2, i2].
#[derive(Debug)]
pub struct Factors<'a, X> {
    pub a: &'a X,
    pub b: &'a X,
    pub c: &'a X,
    pub d: &'a X,
}

/// Which M_i to apply.
#[derive(Debug)]
pub enum Curvature<'a, X> {
    /// U_i = tau_i: domain-specific merging, no curvature.
    Identity,
    /// U_i = sum_r (A (x) B) tau_i (C (x) D)^T.
    Kronecker(Factors<'a, X>),
}

impl<'a, X> Curvature<'a, X> {
    /// `[a, b, c, d]` as the Kronecker curvature; an empty slice as the identity.
    pub fn from_slice(factors: &'a [X]) -> Result<Self> {
        match factors {
            [] => Ok(Curvature::Identity),
            [a, b, c, d] => Ok(Curvature::Kronecker(Factors { a, b, c, d })),
            other => Err(Error::option(
                "factors",
                format!("four (a, b, c, d) or none, got {}", other.len()),
            )),
        }
    }
}

/// Gradients of the four factors, shaped like them.
#[derive(Debug, Clone, PartialEq)]
pub struct FactorGrads<X> {
    pub grad_factor_a: X,
    pub grad_factor_b: X,
    pub grad_factor_c: X,
    pub grad_factor_d: X,
}

impl<X> FactorGrads<X> {
    /// `[grad_factor_a, .., grad_factor_d]`.
    pub fn into_array(self) -> [X; 4] {
        [
            self.grad_factor_a,
            self.grad_factor_b,
            self.grad_factor_c,
            self.grad_factor_d,
        ]
    }
}

/// Gradients of `curvature`: `factors` is `None` for the identity curvature.
#[derive(Debug, Clone, PartialEq)]
pub struct CurvatureGrads<X> {
    pub grad_base: X,
    pub grad_experts: X,
    pub factors: Option<FactorGrads<X>>,
}

/// Inputs of `merge`: `curved` are the U_i (already curved), `mask` an optional 0/1 [N, O, I].
#[derive(Debug)]
pub struct MergeInputs<'a, X> {
    pub base: &'a X,
    pub curved: &'a X,
    pub scores: &'a X,
    pub mask: Option<&'a X>,
    pub base_bias: Option<&'a X>,
    pub expert_bias: Option<&'a X>,
}

/// `merged` [G, O, I] and, with biases, `merged_bias` [G, O].
#[derive(Debug, Clone, PartialEq)]
pub struct MergeOutputs<X> {
    pub merged: X,
    pub merged_bias: Option<X>,
}

/// Gradients of `merge`.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeGrads<X, S = X> {
    pub grad_base: X,
    pub grad_curved: X,
    pub grad_scores: X,
    pub grad_alpha: S,
    pub grad_base_bias: Option<X>,
    pub grad_expert_bias: Option<X>,
}

/// Inputs of the fused `ca_merge`.
#[derive(Debug)]
pub struct CaMergeInputs<'a, X> {
    pub base: &'a X,
    pub experts: &'a X,
    pub scores: &'a X,
    pub curvature: Curvature<'a, X>,
    pub base_bias: Option<&'a X>,
    pub expert_bias: Option<&'a X>,
}

/// Outputs of `ca_merge`: `next_base` when `beta` is set, `curved` (unmasked U) when asked.
#[derive(Debug, Clone, PartialEq)]
pub struct CaMergeOutputs<X> {
    pub merged: X,
    pub merged_bias: Option<X>,
    pub next_base: Option<X>,
    pub curved: Option<X>,
}

/// Gradients of `ca_merge`: `factors` for the Kronecker curvature, `grad_beta` when beta is set.
#[derive(Debug, Clone, PartialEq)]
pub struct CaMergeGrads<X, S = X> {
    pub grad_base: X,
    pub grad_experts: X,
    pub grad_scores: X,
    pub factors: Option<FactorGrads<X>>,
    pub grad_alpha: S,
    pub grad_beta: Option<S>,
    pub grad_base_bias: Option<X>,
    pub grad_expert_bias: Option<X>,
}

/// Gradients of `merged_linear`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearGrads<X> {
    pub grad_x: X,
    pub grad_merged: X,
    pub grad_merged_bias: Option<X>,
}

/// Gradients of `dynamic_merge`.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicGrads<X, S = X> {
    pub grad_base: X,
    pub grad_curved: X,
    pub grad_beta: S,
}

// The input views are references: copyable whatever the tensor type (a derive would ask X: Copy).
macro_rules! copy_view {
    ($($t:ident),*) => {$(
        impl<X> Clone for $t<'_, X> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<X> Copy for $t<'_, X> {}
    )*};
}
copy_view!(Factors, Curvature, MergeInputs, CaMergeInputs);

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
}

/// Checks a curvature against (N, O, I) and returns the full dimensions; the identity is the split
/// (1, O, 1, I) of rank 0.
pub(crate) fn check_curvature<X: Shaped>(
    n: usize,
    o: usize,
    i: usize,
    curv: &Curvature<X>,
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
    let sa = f.a.shape();
    expect_rank("factor_a", sa, 4, "[R, N, o1, o1]")?;
    expect_nonempty("factor_a", sa)?;
    let (r, o1) = (sa[0], sa[2]);
    expect_shape("factor_a", sa, &[r, n, o1, o1])?;
    if !o.is_multiple_of(o1) {
        return Err(Error::shape(
            "factor_a",
            format!("[R, N, o1, o1] with o1 dividing O = {o}"),
            sa,
        ));
    }
    let o2 = o / o1;
    expect_rank("factor_b", f.b.shape(), 4, "[R, N, o2, o2]")?;
    expect_shape("factor_b", f.b.shape(), &[r, n, o2, o2])?;
    let sc = f.c.shape();
    expect_rank("factor_c", sc, 4, "[R, N, i1, i1]")?;
    expect_nonempty("factor_c", sc)?;
    let i1 = sc[2];
    if !i.is_multiple_of(i1) {
        return Err(Error::shape(
            "factor_c",
            format!("[R, N, i1, i1] with i1 dividing I = {i}"),
            sc,
        ));
    }
    expect_shape("factor_c", sc, &[r, n, i1, i1])?;
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

/// Where the operators run, in element type `E`: the one place that wires each operator of SPEC
/// section 7 to an implementation. Frontends generic over it (the named-tensor table, the candle
/// ops) are written once for every backend.
pub trait Backend<E> {
    /// A tensor of `E` on this backend.
    type Tensor: Shaped;
    /// A scalar gradient: a value on the host, a 0-d tensor on a device.
    type Scalar;

    /// A scalar gradient as a 0-d tensor.
    fn scalar_tensor(&self, s: Self::Scalar) -> Result<Self::Tensor>;
    /// A host tensor of f64 values as a tensor of `E` (rounded once).
    fn host_f64(&self, t: &HostTensor<f64>) -> Result<Self::Tensor>;
    /// Pieces of the given shapes from a flat `packed` tensor, in order (the inverse of [`pack`]).
    ///
    /// # Safety
    /// The pieces may be views of `packed`'s memory (on a device, no copy): the caller only reads
    /// them, and drops them before `packed` (and, for a view, before the owner of its memory).
    ///
    /// [`pack`]: Backend::pack
    unsafe fn unpack(
        &self,
        packed: &Self::Tensor,
        shapes: &[Vec<usize>],
    ) -> Result<Vec<Self::Tensor>>;
    /// The pieces flattened and concatenated, as one 1-d tensor.
    fn pack(&self, pieces: Vec<Self::Tensor>) -> Result<Self::Tensor>;
    /// Runs `f` on the CA-merge inputs of the adapters' packed convention: `packed` is
    /// [scores, factor_a, factor_b, factor_c, factor_d] flattened (no factors for the identity
    /// curvature) with the pieces' `shapes`; no biases.
    fn with_packed_ca_inputs<R>(
        &self,
        base: &Self::Tensor,
        experts: &Self::Tensor,
        packed: &Self::Tensor,
        shapes: &[Vec<usize>],
        f: impl FnOnce(&CaMergeInputs<Self::Tensor>) -> Result<R>,
    ) -> Result<R> {
        packed_ca_inputs(self, base, experts, packed, shapes, f)
    }

    fn curvature(
        &self,
        base: &Self::Tensor,
        experts: &Self::Tensor,
        curv: &Curvature<Self::Tensor>,
    ) -> Result<Self::Tensor>;
    fn curvature_backward(
        &self,
        base: &Self::Tensor,
        experts: &Self::Tensor,
        curv: &Curvature<Self::Tensor>,
        grad_curved: &Self::Tensor,
    ) -> Result<CurvatureGrads<Self::Tensor>>;
    fn ties_mask(
        &self,
        base: &Self::Tensor,
        experts: &Self::Tensor,
        mask: Mask,
    ) -> Result<Self::Tensor>;
    fn merge(
        &self,
        x: &MergeInputs<Self::Tensor>,
        alpha: f64,
        dare: &Dare,
    ) -> Result<MergeOutputs<Self::Tensor>>;
    fn merge_backward(
        &self,
        x: &MergeInputs<Self::Tensor>,
        alpha: f64,
        dare: &Dare,
        grad_merged: &Self::Tensor,
        grad_merged_bias: Option<&Self::Tensor>,
    ) -> Result<MergeGrads<Self::Tensor, Self::Scalar>>;
    fn ca_merge(
        &self,
        x: &CaMergeInputs<Self::Tensor>,
        opts: &MergeOptions,
    ) -> Result<CaMergeOutputs<Self::Tensor>>;
    fn ca_merge_backward(
        &self,
        x: &CaMergeInputs<Self::Tensor>,
        opts: &MergeOptions,
        grad_merged: &Self::Tensor,
        grad_merged_bias: Option<&Self::Tensor>,
        grad_next_base: Option<&Self::Tensor>,
    ) -> Result<CaMergeGrads<Self::Tensor, Self::Scalar>>;
    fn merged_linear(
        &self,
        x: &Self::Tensor,
        merged: &Self::Tensor,
        merged_bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;
    fn merged_linear_backward(
        &self,
        x: &Self::Tensor,
        merged: &Self::Tensor,
        merged_bias: Option<&Self::Tensor>,
        grad_y: &Self::Tensor,
    ) -> Result<LinearGrads<Self::Tensor>>;
    fn dynamic_merge(
        &self,
        base: &Self::Tensor,
        curved: &Self::Tensor,
        beta: f64,
    ) -> Result<Self::Tensor>;
    fn dynamic_merge_backward(
        &self,
        base: &Self::Tensor,
        curved: &Self::Tensor,
        beta: f64,
        grad_next_base: &Self::Tensor,
    ) -> Result<DynamicGrads<Self::Tensor, Self::Scalar>>;
    fn segment_scores(&self, router_scores: &Self::Tensor) -> Result<Self::Tensor>;
    fn segment_scores_backward(&self, grad_scores: &Self::Tensor) -> Result<Self::Tensor>;
}

/// The host: [`crate::cpu`], in the compute type `F` (f32 or f64).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl<F: Float> Backend<F> for Cpu {
    type Tensor = HostTensor<F>;
    type Scalar = F;

    fn scalar_tensor(&self, s: F) -> Result<HostTensor<F>> {
        Ok(HostTensor::scalar(s))
    }
    fn host_f64(&self, t: &HostTensor<f64>) -> Result<HostTensor<F>> {
        Ok(t.map(F::from_f64))
    }
    // Copies: no view outlives `packed`.
    unsafe fn unpack(
        &self,
        packed: &HostTensor<F>,
        shapes: &[Vec<usize>],
    ) -> Result<Vec<HostTensor<F>>> {
        check_packed(packed.len(), shapes)?;
        let mut at = 0;
        shapes
            .iter()
            .map(|s| {
                let n: usize = s.iter().product();
                at += n;
                HostTensor::new(s, packed.data()[at - n..at].to_vec())
            })
            .collect()
    }
    fn pack(&self, pieces: Vec<HostTensor<F>>) -> Result<HostTensor<F>> {
        let data: Vec<F> = pieces.into_iter().flat_map(|t| t.into_data()).collect();
        HostTensor::new(&[data.len()], data)
    }

    fn curvature(
        &self,
        base: &HostTensor<F>,
        experts: &HostTensor<F>,
        curv: &Curvature<HostTensor<F>>,
    ) -> Result<HostTensor<F>> {
        crate::cpu::curvature(base, experts, curv)
    }
    fn curvature_backward(
        &self,
        base: &HostTensor<F>,
        experts: &HostTensor<F>,
        curv: &Curvature<HostTensor<F>>,
        grad_curved: &HostTensor<F>,
    ) -> Result<CurvatureGrads<HostTensor<F>>> {
        crate::cpu::curvature_backward(base, experts, curv, grad_curved)
    }
    fn ties_mask(
        &self,
        base: &HostTensor<F>,
        experts: &HostTensor<F>,
        mask: Mask,
    ) -> Result<HostTensor<F>> {
        crate::cpu::ties_mask(base, experts, mask)
    }
    fn merge(
        &self,
        x: &MergeInputs<HostTensor<F>>,
        alpha: f64,
        dare: &Dare,
    ) -> Result<MergeOutputs<HostTensor<F>>> {
        crate::cpu::merge(x, alpha, dare)
    }
    fn merge_backward(
        &self,
        x: &MergeInputs<HostTensor<F>>,
        alpha: f64,
        dare: &Dare,
        grad_merged: &HostTensor<F>,
        grad_merged_bias: Option<&HostTensor<F>>,
    ) -> Result<MergeGrads<HostTensor<F>, F>> {
        crate::cpu::merge_backward(x, alpha, dare, grad_merged, grad_merged_bias)
    }
    fn ca_merge(
        &self,
        x: &CaMergeInputs<HostTensor<F>>,
        opts: &MergeOptions,
    ) -> Result<CaMergeOutputs<HostTensor<F>>> {
        crate::cpu::ca_merge(x, opts)
    }
    fn ca_merge_backward(
        &self,
        x: &CaMergeInputs<HostTensor<F>>,
        opts: &MergeOptions,
        grad_merged: &HostTensor<F>,
        grad_merged_bias: Option<&HostTensor<F>>,
        grad_next_base: Option<&HostTensor<F>>,
    ) -> Result<CaMergeGrads<HostTensor<F>, F>> {
        crate::cpu::ca_merge_backward(x, opts, grad_merged, grad_merged_bias, grad_next_base)
    }
    fn merged_linear(
        &self,
        x: &HostTensor<F>,
        merged: &HostTensor<F>,
        merged_bias: Option<&HostTensor<F>>,
    ) -> Result<HostTensor<F>> {
        crate::cpu::merged_linear(x, merged, merged_bias)
    }
    fn merged_linear_backward(
        &self,
        x: &HostTensor<F>,
        merged: &HostTensor<F>,
        merged_bias: Option<&HostTensor<F>>,
        grad_y: &HostTensor<F>,
    ) -> Result<LinearGrads<HostTensor<F>>> {
        crate::cpu::merged_linear_backward(x, merged, merged_bias, grad_y)
    }
    fn dynamic_merge(
        &self,
        base: &HostTensor<F>,
        curved: &HostTensor<F>,
        beta: f64,
    ) -> Result<HostTensor<F>> {
        crate::cpu::dynamic_merge(base, curved, beta)
    }
    fn dynamic_merge_backward(
        &self,
        base: &HostTensor<F>,
        curved: &HostTensor<F>,
        beta: f64,
        grad_next_base: &HostTensor<F>,
    ) -> Result<DynamicGrads<HostTensor<F>, F>> {
        crate::cpu::dynamic_merge_backward(base, curved, beta, grad_next_base)
    }
    fn segment_scores(&self, router_scores: &HostTensor<F>) -> Result<HostTensor<F>> {
        crate::cpu::segment_scores(router_scores)
    }
    fn segment_scores_backward(&self, grad_scores: &HostTensor<F>) -> Result<HostTensor<F>> {
        crate::cpu::segment_scores_backward(grad_scores)
    }
}

/// Errors unless the pieces' element counts add up to the packed tensor's.
pub(crate) fn check_packed(len: usize, shapes: &[Vec<usize>]) -> Result<()> {
    let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    if total != len {
        return Err(Error::shape("packed", format!("[{total}]"), &[len]));
    }
    Ok(())
}

/// [`Backend::with_packed_ca_inputs`]'s work, which a backend's own version may wrap.
pub(crate) fn packed_ca_inputs<T, B: Backend<T> + ?Sized, R>(
    b: &B,
    base: &B::Tensor,
    experts: &B::Tensor,
    packed: &B::Tensor,
    shapes: &[Vec<usize>],
    f: impl FnOnce(&CaMergeInputs<B::Tensor>) -> Result<R>,
) -> Result<R> {
    // SAFETY: the pieces are read only by `f`, and dropped at the end of this call, before
    // `packed` (which the caller still borrows).
    let mut pieces = unsafe { b.unpack(packed, shapes) }?;
    let factors = pieces.split_off(1);
    f(&CaMergeInputs {
        base,
        experts,
        scores: &pieces[0],
        curvature: Curvature::from_slice(&factors)?,
        base_bias: None,
        expert_bias: None,
    })
}
