//! The candle ops on a CUDA device (features `candle` and `cuda`): `cuda_fwd` and the backward run
//! the crate's kernels ([`crate::cuda`]) on the stream of the tensors' candle device, so they are
//! ordered with candle's own work on it and nothing synchronises.
//!
//! - Storage dtypes f32, f16 and bf16 go to the kernels as they are; f64 on CUDA is refused with an
//!   error (the kernels do not take it; f64 runs on the CPU).
//! - Each input is copied device to device into a buffer the kernels own (one copy per input, at
//!   memory bandwidth: ~20 us for the T5-base `wi` experts in bf16 on an H200). candle hands out
//!   borrowed slices and the crate's [`CudaTensor`] owns its memory; a borrowed-view input type
//!   would remove the copy.
//! - The public ops make their inputs contiguous first; a strided layout reaching this module
//!   anyway is refused with an error naming the tensor.
//!
//! **Status:** compiled and linted in CI; the kernels underneath ran on an H200, but this adapter
//! has not yet run on a GPU (no GPU session since it was written). `tests/candle_cuda.rs` checks it
//! against the CPU ops and skips where there is no GPU.

use super::cerr;
use super::ops::{common_dtype, dtype_error, Kernel};
use crate::cuda::{cuda_err, CudaTensor, Element};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType};
use cudarc::driver::CudaStream;
use half::{bf16, f16};
use std::sync::Arc;

/// The storage types the kernels and candle's CUDA backend share: f32, f16, bf16.
pub(crate) trait DevElem: Element + CudaDType + WithDType {}
impl DevElem for f32 {}
impl DevElem for f16 {}
impl DevElem for bf16 {}

const DEVICE_DTYPES: &str = "f32|f16|bf16 (the CUDA kernels; f64 runs on the CPU)";

/// Copies the elements a contiguous layout addresses into a buffer the kernels own.
fn input<T: DevElem>(
    stream: &Arc<CudaStream>,
    op: &str,
    name: &str,
    s: &CudaStorage,
    l: &Layout,
) -> Result<CudaTensor<T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        return Err(candle_core::Error::Msg(format!(
            "camex {op}: tensor `{name}` is not contiguous (shape {:?}, strides {:?}); \
             call .contiguous() first",
            l.dims(),
            l.stride()
        )));
    };
    if a == b {
        return CudaTensor::zeros(stream, l.dims()).map_err(|e| cerr(op, e));
    }
    let slice = s.as_cuda_slice::<T>()?;
    let view = slice.try_slice(a..b).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "camex {op}: tensor `{name}`: layout {a}..{b} outside its storage of {} elements",
            slice.len()
        ))
    })?;
    let data = stream
        .clone_dtod(&view)
        .map_err(|e| cerr(op, cuda_err(e)))?;
    CudaTensor::from_slice(l.dims(), data).map_err(|e| cerr(op, e))
}

fn wrap<T: DevElem>(t: CudaTensor<T>, dev: &CudaDevice) -> (CudaStorage, Shape) {
    let shape = Shape::from(t.shape().to_vec());
    (T::wrap_cuda_slice(t.into_slice(), dev.clone()), shape)
}

/// `cuda_fwd` of every op: dtype dispatch, copy-in, the kernel, the output as candle storage.
pub(crate) fn forward<K: Kernel>(
    k: &K,
    inputs: &[(&str, &CudaStorage, &Layout)],
) -> Result<(CudaStorage, Shape)> {
    let dts: Vec<(&str, DType)> = inputs.iter().map(|(n, s, _)| (*n, s.dtype())).collect();
    match common_dtype(K::NAME, &dts)? {
        DType::F32 => forward_typed::<K, f32>(k, inputs),
        DType::F16 => forward_typed::<K, f16>(k, inputs),
        DType::BF16 => forward_typed::<K, bf16>(k, inputs),
        d => Err(dtype_error(K::NAME, inputs[0].0, DEVICE_DTYPES, d)),
    }
}

fn forward_typed<K: Kernel, T: DevElem>(
    k: &K,
    inputs: &[(&str, &CudaStorage, &Layout)],
) -> Result<(CudaStorage, Shape)> {
    let dev = &inputs[0].1.device;
    let stream = dev.cuda_stream();
    let bufs = inputs
        .iter()
        .map(|(n, s, l)| input::<T>(&stream, K::NAME, n, s, l))
        .collect::<Result<Vec<_>>>()?;
    let out = k
        .cuda_forward(&stream, bufs)
        .map_err(|e| cerr(K::NAME, e))?;
    Ok(wrap(out, dev))
}

/// The backward of every op on a CUDA device: the gradients come back in the dtype, shape and
/// device of each argument.
pub(crate) fn backward<K: Kernel>(k: &K, args: &[&Tensor], grad: &Tensor) -> Result<Vec<Tensor>> {
    match args[0].dtype() {
        DType::F32 => backward_typed::<K, f32>(k, args, grad),
        DType::F16 => backward_typed::<K, f16>(k, args, grad),
        DType::BF16 => backward_typed::<K, bf16>(k, args, grad),
        d => Err(dtype_error(K::NAME, "input 1", DEVICE_DTYPES, d)),
    }
}

fn backward_typed<K: Kernel, T: DevElem>(
    k: &K,
    args: &[&Tensor],
    grad: &Tensor,
) -> Result<Vec<Tensor>> {
    let Device::Cuda(dev) = args[0].device() else {
        return Err(candle_core::Error::Msg(format!(
            "camex {}: the CUDA backward got a tensor on {:?}",
            K::NAME,
            args[0].device().location()
        )));
    };
    let stream = dev.cuda_stream();
    let named: Vec<(String, &Tensor)> = args
        .iter()
        .enumerate()
        .map(|(j, a)| (format!("input {}", j + 1), *a))
        .chain(std::iter::once(("grad".to_string(), grad)))
        .collect();
    let mut bufs = Vec::with_capacity(named.len());
    for (name, t) in &named {
        // The incoming gradient may be in another dtype or strided (e.g. a broadcast); the kernels
        // want the arguments' dtype, contiguous.
        let t = t.to_dtype(args[0].dtype())?.contiguous()?;
        let (st, l) = t.storage_and_layout();
        let Storage::Cuda(s) = &*st else {
            return Err(candle_core::Error::Msg(format!(
                "camex {}: tensor `{name}` is on {:?}, expected {:?}",
                K::NAME,
                t.device().location(),
                args[0].device().location()
            )));
        };
        bufs.push(input::<T>(&stream, K::NAME, name, s, l)?);
    }
    let grad = bufs.pop().expect("grad was pushed last");
    let grads = k
        .cuda_backward(&stream, bufs, grad)
        .map_err(|e| cerr(K::NAME, e))?;
    args.iter()
        .zip(grads)
        .map(|(a, g)| {
            if g.len() != a.elem_count() {
                return Err(cerr(
                    K::NAME,
                    crate::Error::shape("gradient", format!("{:?}", a.dims()), g.shape()),
                ));
            }
            let (storage, _) = wrap(g, dev);
            Ok(Tensor::from_storage(
                Storage::Cuda(storage),
                a.dims(),
                BackpropOp::none(),
                false,
            ))
        })
        .collect()
}

/// Splits a packed device buffer into pieces of the given shapes (device copies; the pieces are
/// the small scores and factors).
pub(crate) fn unpack<T: Element>(
    stream: &Arc<CudaStream>,
    packed: &CudaTensor<T>,
    shapes: &[Vec<usize>],
) -> crate::Result<Vec<CudaTensor<T>>> {
    let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    if total != packed.len() {
        return Err(crate::Error::shape(
            "packed",
            format!("[{total}]"),
            packed.shape(),
        ));
    }
    let mut out = Vec::with_capacity(shapes.len());
    let mut at = 0;
    for s in shapes {
        let n: usize = s.iter().product();
        if n == 0 {
            out.push(CudaTensor::zeros(stream, s)?);
            continue;
        }
        let view = packed
            .data()
            .try_slice(at..at + n)
            .ok_or_else(|| crate::Error::shape("packed", format!("[{total}]"), packed.shape()))?;
        out.push(CudaTensor::from_slice(
            s,
            stream.clone_dtod(&view).map_err(cuda_err)?,
        )?);
        at += n;
    }
    Ok(out)
}

/// Concatenates flattened pieces into one device buffer (the inverse of [`unpack`]).
pub(crate) fn pack<T: Element>(
    stream: &Arc<CudaStream>,
    pieces: Vec<CudaTensor<T>>,
) -> crate::Result<CudaTensor<T>> {
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    let mut out = CudaTensor::<T>::zeros(stream, &[total])?;
    let mut at = 0;
    for p in &pieces {
        let n = p.len();
        if n == 0 {
            continue;
        }
        let src = p.data().slice(0..n);
        let mut dst = out.data_mut().slice_mut(at..at + n);
        stream.memcpy_dtod(&src, &mut dst).map_err(cuda_err)?;
        at += n;
    }
    Ok(out)
}
