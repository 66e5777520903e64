//! The candle ops on a CUDA device (features `candle` and `cuda`): `cuda_fwd` and the backward run
//! the crate's kernels ([`crate::cuda`]) on the stream of the tensors' candle device, so they are
//! ordered with candle's own work on it and nothing synchronises.
//!
//! - Storage dtypes f32, f16 and bf16 go to the kernels as they are; f64 on CUDA is refused with an
//!   error (the kernels do not take it; f64 runs on the CPU).
//! - Inputs are read in place from candle's storage: each becomes a view of the
//!   [`CudaStorage`]'s slice at the layout's start offset, with cudarc's read guard held
//!   through the launch (no device copy; `crate::cuda::device_copies` counts the crate's copies and
//!   `tests/candle_cuda.rs` checks that the forward and the backward make none). The packed input
//!   of `ca_merge` and `curvature` is split into views as well.
//! - Outputs are allocated by the kernels on candle's stream and handed to candle with
//!   `wrap_cuda_slice`, without a copy. The gradients of the packed input (scores and factors) are
//!   written by the backward kernels into one buffer in the packed order (`PackedOutputs`), so
//!   `Backend::pack` returns that buffer as it is.
//! - Non-contiguous inputs are made contiguous by candle in the public ops (and in the backward,
//!   for the incoming gradient); a strided layout reaching this module anyway is refused with an
//!   error naming the tensor.
//!
//! **Status:** compiled and linted in CI; the kernels underneath ran on an H200, but this adapter
//! has not yet run on a GPU (no GPU session since it was written). `tests/candle_cuda.rs` checks it
//! against the CPU ops and skips where there is no GPU.

use super::cerr;
use super::ops::{common_dtype, dtype_error, Kernel};
use crate::cuda::{Cuda, CudaTensor, Element};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType};
use cudarc::driver::{CudaStream, DevicePtr, SyncOnDrop};
use half::{bf16, f16};
use std::sync::Arc;

/// The storage types the kernels and candle's CUDA backend share: f32, f16, bf16.
pub(crate) trait DevElem: Element + CudaDType + WithDType {}
impl DevElem for f32 {}
impl DevElem for f16 {}
impl DevElem for bf16 {}

const DEVICE_DTYPES: &str = "f32|f16|bf16 (the CUDA kernels; f64 runs on the CPU)";

/// A view of the elements a contiguous layout addresses in candle's storage (no copy); the read
/// guard that orders the launch after the storage's last write goes to `guards`, which the caller
/// keeps until the launch is enqueued.
fn input<'a, T: DevElem>(
    stream: &'a Arc<CudaStream>,
    op: &str,
    name: &str,
    s: &'a CudaStorage,
    l: &Layout,
    guards: &mut Vec<SyncOnDrop<'a>>,
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
        // No elements: the kernels' shape checks see the shape; the one-element buffer is never read.
        return CudaTensor::zeros(stream, l.dims()).map_err(|e| cerr(op, e));
    }
    let slice = s.as_cuda_slice::<T>()?;
    if b > slice.len() {
        return Err(candle_core::Error::Msg(format!(
            "camex {op}: tensor `{name}`: layout {a}..{b} outside its storage of {} elements",
            slice.len()
        )));
    }
    let (base, guard) = slice.device_ptr(stream);
    guards.push(guard);
    let ptr = base + (a * std::mem::size_of::<T>()) as u64;
    // SAFETY: ptr..ptr + (b - a) elements lie in candle's live slice (checked above); the storage
    // is borrowed for 'a and its read guard is in `guards`, both held by the caller through the
    // launch, which runs on the slice's own stream (candle's), so a later free is ordered after it.
    unsafe { CudaTensor::borrowed(l.dims(), ptr, b - a) }.map_err(|e| cerr(op, e))
}

fn wrap<T: DevElem>(t: CudaTensor<T>, dev: &CudaDevice) -> Result<(CudaStorage, Shape)> {
    let shape = Shape::from(t.shape().to_vec());
    let slice = t.into_slice().map_err(|e| cerr("output", e))?;
    Ok((T::wrap_cuda_slice(slice, dev.clone()), shape))
}

/// `cuda_fwd` of every op: dtype dispatch, inputs viewed in place, the kernel, the output as
/// candle storage.
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
    for (n, s, _) in inputs {
        if !s.device.same_device(dev) {
            return Err(candle_core::Error::Msg(format!(
                "camex {}: tensor `{n}` is on another CUDA device than `{}`",
                K::NAME,
                inputs[0].0
            )));
        }
    }
    let mut guards = Vec::with_capacity(inputs.len());
    let bufs = inputs
        .iter()
        .map(|(n, s, l)| input::<T>(&stream, K::NAME, n, s, l, &mut guards))
        .collect::<Result<Vec<_>>>()?;
    let out = k
        .forward::<T, Cuda>(&Cuda::new(stream.clone()), bufs)
        .map_err(|e| cerr(K::NAME, e));
    // The launches are enqueued: the read guards may record their events now.
    drop(guards);
    wrap(out?, dev)
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
    // The incoming gradient may be in another dtype or strided (e.g. a broadcast); the kernels
    // want the arguments' dtype, contiguous. candle converts it (the arguments themselves are
    // contiguous already, so for them both calls return the same storage, no copy).
    let tensors = named
        .iter()
        .map(|(_, t)| t.to_dtype(args[0].dtype())?.contiguous())
        .collect::<Result<Vec<_>>>()?;
    // Storage read locks, then cudarc's read guards, all held until the launches are enqueued.
    let storages: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut guards = Vec::with_capacity(storages.len());
    let mut bufs = Vec::with_capacity(storages.len());
    for ((name, t), (st, l)) in named.iter().zip(&storages) {
        let Storage::Cuda(s) = &**st else {
            return Err(candle_core::Error::Msg(format!(
                "camex {}: tensor `{name}` is on {:?}, expected {:?}",
                K::NAME,
                t.device().location(),
                args[0].device().location()
            )));
        };
        if !s.device.same_device(dev) {
            return Err(candle_core::Error::Msg(format!(
                "camex {}: tensor `{name}` is on another CUDA device than `input 1`",
                K::NAME
            )));
        }
        bufs.push(input::<T>(&stream, K::NAME, name, s, l, &mut guards)?);
    }
    let grad = bufs.pop().expect("grad was pushed last");
    let grads = k.backward::<T, Cuda>(&Cuda::new(stream.clone()), bufs, grad);
    drop(guards);
    drop(storages);
    let grads = grads.map_err(|e| cerr(K::NAME, e))?;
    args.iter()
        .zip(grads)
        .map(|(a, g)| {
            if g.len() != a.elem_count() {
                return Err(cerr(
                    K::NAME,
                    crate::Error::shape("gradient", format!("{:?}", a.dims()), g.shape()),
                ));
            }
            let (storage, _) = wrap(g, dev)?;
            Ok(Tensor::from_storage(
                Storage::Cuda(storage),
                a.dims(),
                BackpropOp::none(),
                false,
            ))
        })
        .collect()
}
