//! The CUDA [`Backend`]: the operators of [`crate::cuda`] on one stream.

use super::{copy_dtod, CudaTensor, Element};
use crate::backend::{
    check_packed, Backend, CaMergeGrads, CaMergeInputs, CaMergeOutputs, Curvature, CurvatureGrads,
    DynamicGrads, LinearGrads, MergeGrads, MergeInputs, MergeOutputs, Shaped,
};
use crate::error::Result;
use crate::options::{Dare, Mask, MergeOptions};
use crate::tensor::{AnyTensor, HostTensor};
use cudarc::driver::CudaStream;
use std::sync::Arc;

impl<T> Shaped for CudaTensor<T> {
    fn shape(&self) -> &[usize] {
        CudaTensor::shape(self)
    }
}

/// The device: every operator enqueued on `stream`, in storage type `T` (f32, f16, bf16).
#[derive(Debug, Clone)]
pub struct Cuda {
    pub stream: Arc<CudaStream>,
}

impl Cuda {
    pub fn new(stream: Arc<CudaStream>) -> Self {
        Cuda { stream }
    }
}

type D<T> = CudaTensor<T>;

impl<T: Element> Backend<T> for Cuda {
    type Tensor = CudaTensor<T>;
    type Scalar = CudaTensor<T>;

    fn scalar_tensor(&self, s: D<T>) -> Result<D<T>> {
        Ok(s)
    }
    fn host_f64(&self, t: &HostTensor<f64>) -> Result<D<T>> {
        // Rounded once to the storage dtype, then held exactly.
        let t = AnyTensor::from_f64(t, T::DTYPE).to_f32().map(T::from_f32);
        CudaTensor::upload(&self.stream, &t)
    }
    unsafe fn unpack(&self, packed: &D<T>, shapes: &[Vec<usize>]) -> Result<Vec<D<T>>> {
        check_packed(packed.len(), shapes)?;
        let mut out = Vec::with_capacity(shapes.len());
        let mut at = 0;
        for s in shapes {
            let n: usize = s.iter().product();
            if n == 0 {
                out.push(CudaTensor::zeros(&self.stream, s)?);
                continue;
            }
            // SAFETY: in bounds (sub_view checks); lifetime and read-only use per the contract.
            out.push(unsafe { packed.sub_view(&self.stream, at, s) }?);
            at += n;
        }
        Ok(out)
    }
    /// As the default, holding `packed`'s read guard until `f` returns: its views carry none
    /// (`CudaTensor::sub_view`), so the guard, dropped after `f` enqueued their reads, records
    /// `packed`'s read event after them, and cudarc orders a free or write of `packed` on another
    /// stream after those reads (not only after the views were made).
    fn with_packed_ca_inputs<R>(
        &self,
        base: &D<T>,
        experts: &D<T>,
        packed: &D<T>,
        shapes: &[Vec<usize>],
        f: impl FnOnce(&CaMergeInputs<D<T>>) -> Result<R>,
    ) -> Result<R> {
        let (_ptr, _read) = packed.device_ptr(&self.stream);
        crate::backend::packed_ca_inputs(self, base, experts, packed, shapes, f)
    }
    /// No copy where the pieces are the parts of one op's packed output, in order (the backward
    /// ops' gradients of `scores` and the factors, written into one buffer) or a single piece;
    /// otherwise one device copy per piece, each counted ([`super::device_copies`]).
    fn pack(&self, pieces: Vec<D<T>>) -> Result<D<T>> {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        let mut pieces = match CudaTensor::unpack_parts(pieces) {
            Ok(whole) if whole.len() == total => return CudaTensor::from_slice(&[total], whole),
            Ok(_) => return CudaTensor::zeros(&self.stream, &[total]), // no elements
            Err(pieces) => pieces,
        };
        // A single buffer of its own is the packed tensor already (a view is copied below).
        if pieces.len() == 1 && pieces[0].data().is_ok() {
            if let Some(p) = pieces.pop() {
                return CudaTensor::from_slice(&[total], p.into_slice()?);
            }
        }
        let mut out = CudaTensor::<T>::zeros(&self.stream, &[total])?;
        let mut at = 0;
        for p in &pieces {
            let n = p.len();
            if n == 0 {
                continue;
            }
            let src = p.view()?;
            let mut dst = out.data_mut()?.slice_mut(at..at + n);
            copy_dtod(&self.stream, &src, &mut dst)?;
            at += n;
        }
        Ok(out)
    }

    fn curvature(&self, base: &D<T>, experts: &D<T>, curv: &Curvature<D<T>>) -> Result<D<T>> {
        super::curvature(&self.stream, base, experts, curv)
    }
    fn curvature_backward(
        &self,
        base: &D<T>,
        experts: &D<T>,
        curv: &Curvature<D<T>>,
        grad_curved: &D<T>,
    ) -> Result<CurvatureGrads<D<T>>> {
        super::curvature_backward(&self.stream, base, experts, curv, grad_curved)
    }
    fn ties_mask(&self, base: &D<T>, experts: &D<T>, mask: Mask) -> Result<D<T>> {
        super::ties_mask(&self.stream, base, experts, mask)
    }
    fn merge(&self, x: &MergeInputs<D<T>>, alpha: f64, dare: &Dare) -> Result<MergeOutputs<D<T>>> {
        super::merge(&self.stream, x, alpha, dare)
    }
    fn merge_backward(
        &self,
        x: &MergeInputs<D<T>>,
        alpha: f64,
        dare: &Dare,
        grad_merged: &D<T>,
        grad_merged_bias: Option<&D<T>>,
    ) -> Result<MergeGrads<D<T>>> {
        super::merge_backward(&self.stream, x, alpha, dare, grad_merged, grad_merged_bias)
    }
    fn ca_merge(
        &self,
        x: &CaMergeInputs<D<T>>,
        opts: &MergeOptions,
    ) -> Result<CaMergeOutputs<D<T>>> {
        super::ca_merge(&self.stream, x, opts)
    }
    fn ca_merge_backward(
        &self,
        x: &CaMergeInputs<D<T>>,
        opts: &MergeOptions,
        grad_merged: &D<T>,
        grad_merged_bias: Option<&D<T>>,
        grad_next_base: Option<&D<T>>,
    ) -> Result<CaMergeGrads<D<T>>> {
        super::ca_merge_backward(
            &self.stream,
            x,
            opts,
            grad_merged,
            grad_merged_bias,
            grad_next_base,
        )
    }
    fn merged_linear(&self, x: &D<T>, merged: &D<T>, merged_bias: Option<&D<T>>) -> Result<D<T>> {
        super::merged_linear(&self.stream, x, merged, merged_bias)
    }
    fn merged_linear_backward(
        &self,
        x: &D<T>,
        merged: &D<T>,
        merged_bias: Option<&D<T>>,
        grad_y: &D<T>,
    ) -> Result<LinearGrads<D<T>>> {
        super::merged_linear_backward(&self.stream, x, merged, merged_bias, grad_y)
    }
    fn dynamic_merge(&self, base: &D<T>, curved: &D<T>, beta: f64) -> Result<D<T>> {
        super::dynamic_merge(&self.stream, base, curved, beta)
    }
    fn dynamic_merge_backward(
        &self,
        base: &D<T>,
        curved: &D<T>,
        beta: f64,
        grad_next_base: &D<T>,
    ) -> Result<DynamicGrads<D<T>>> {
        super::dynamic_merge_backward(&self.stream, base, curved, beta, grad_next_base)
    }
    fn segment_scores(&self, router_scores: &D<T>) -> Result<D<T>> {
        super::segment_scores(&self.stream, router_scores)
    }
    fn segment_scores_backward(&self, grad_scores: &D<T>) -> Result<D<T>> {
        super::segment_scores_backward(&self.stream, grad_scores)
    }
}
