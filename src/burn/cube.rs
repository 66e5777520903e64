//! [`CamexBackend`] for burn's CubeCL backend on CUDA (features `burn` and `cuda`): the crate's
//! kernels ([`crate::cuda`]) on CubeCL's device memory.
//!
//! burn 0.22 has one CubeCL backend, `Cube` (`burn::backend::Cuda` is the same type), and a
//! tensor's device says which runtime it runs on; this crate turns on only burn's `cuda` runtime
//! and not burn's `fusion`, so `FloatTensor<Cube>` is burn-cubecl's `CubeTensor` and nothing is
//! deferred. A `Cube` tensor on any other runtime panics here (there is no error channel).
//!
//! What one op does:
//!
//! 1. Inputs are made row-major contiguous by burn/CubeCL first (a storage-tiled matmul output
//!    is untiled by burn's reshape, a strided view copied by CubeCL's `into_contiguous`); a
//!    contiguous input is used in place.
//! 2. CubeCL's stream is fenced with `client.sync()` (a host wait), because CubeCL does not expose
//!    its `CUstream` and the crate's kernels run on the crate's own stream (one per device, in the
//!    same primary context CubeCL uses).
//! 3. Each input's device pointer comes from `client.get_resource::<CudaServer>(handle)`:
//!    `GpuResource::ptr` already includes the handle's offsets, and the `ManagedResource` (which
//!    keeps the allocation in place) is held until the crate's stream has been synchronised; its
//!    `binding` is never used.
//! 4. The kernels allocate their outputs on the crate's stream; each is copied (one
//!    device-to-device copy per output, counted by [`crate::cuda::device_copies`]) into a buffer
//!    from `client.empty(bytes)`, returned as `CubeTensor::new_contiguous`. A launcher variant
//!    writing into caller-given outputs would remove these copies.
//! 5. The crate's stream is synchronised before returning (a second host wait), so CubeCL's later
//!    work on the outputs, and its reuse of the inputs' memory, come after the kernels.
//!
//! Cost: two host synchronisations per op (and per backward). CubeCL exposing its stream (or
//! accepting an event to wait on) would make both unnecessary: the kernels would be enqueued on
//! its stream, as the candle adapter does on candle's.
//!
//! Storage dtypes f32, f16 and bf16 go to the kernels as they are; f64 is not a CUDA dtype of
//! burn's CubeCL backend.
//!
//! **Status:** built, linked and its test run (skipping without a GPU) in CI, against an LLVM
//! stand-in: burn's `cuda` feature needs `cubecl-llvm`, whose build downloads an LLVM bundle from
//! GitHub, which the machine it was written on cannot reach; `scripts/llvm-standin.sh` stands in
//! for it, with the `cubecl-nvrtc` feature so that CubeCL never calls LLVM (README, "burn on
//! CUDA"). Nothing of it has run on a GPU yet. `tests/burn_cuda.rs`
//! compares it with the Flex path and skips where there is no CUDA driver or device.

use super::{expect_ok, CaMergeSpec, CamexBackend};
use crate::backend::{Backend as _, CaMergeInputs, FactorGrads};
use crate::cuda::{Cuda, CudaTensor, Element};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Cube, CubeDevice, TensorMetadata};
use burn::cubecl::cuda::CudaRuntime;
use burn::cubecl::future::block_on;
// cubecl 0.11 re-exports its `Runtime` trait only here (the server type of a runtime is named
// through it; `CudaServer` itself is not exported).
use burn::cubecl::__private::Runtime;
use burn::tensor::{DType, Shape};
use cudarc::driver::CudaStream;
use half::{bf16, f16};
use std::sync::{Arc, Mutex, OnceLock};

/// burn-cubecl's `CubeTensor` (not re-exported by burn; named through the backend).
type CubeTensor = FloatTensor<Cube>;
type CudaServer = <CudaRuntime as Runtime>::Server;

/// The crate's stream on device `ordinal`, one per device for the process.
fn stream(ordinal: usize) -> crate::Result<Arc<CudaStream>> {
    static STREAMS: OnceLock<Mutex<Vec<Option<Arc<CudaStream>>>>> = OnceLock::new();
    let mut streams = STREAMS
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if streams.len() <= ordinal {
        streams.resize(ordinal + 1, None);
    }
    if let Some(s) = &streams[ordinal] {
        return Ok(s.clone());
    }
    let s = crate::cuda::new_stream(ordinal)?;
    streams[ordinal] = Some(s.clone());
    Ok(s)
}

fn ordinal(t: &CubeTensor) -> crate::Result<usize> {
    match &t.device {
        CubeDevice::Cuda(d) => Ok(d.index),
        #[allow(unreachable_patterns)]
        d => Err(crate::Error::cuda(format!(
            "camex burn: a Cube tensor on {d:?}; only CUDA devices run the crate's kernels"
        ))),
    }
}

/// `t` in row-major contiguous layout (no copy when it is already).
fn contiguous(t: CubeTensor) -> CubeTensor {
    // burn's reshape untiles a storage-tiled matmul output; to the same shape it changes nothing
    // else.
    let shape = t.shape();
    let t = Cube::float_reshape(t, shape);
    if t.is_contiguous() {
        return t;
    }
    let (client, device, dtype) = (t.client.clone(), t.device.clone(), t.dtype);
    let out = burn::cubecl::std::tensor::into_contiguous(
        &client,
        t.binding(),
        dtype_to_storage_type(dtype),
    );
    CubeTensor::new(client, out.handle, *out.metadata, device, dtype)
}

/// The inputs of one op, contiguous, their memory pinned by CubeCL (`resources`, CubeCL's
/// `ManagedResource`s) until dropped; `ptrs` their device addresses.
struct Pinned<R> {
    tensors: Vec<CubeTensor>,
    resources: Vec<R>,
    ptrs: Vec<u64>,
}

fn pin(inputs: Vec<CubeTensor>) -> crate::Result<Pinned<impl Sized>> {
    let tensors: Vec<CubeTensor> = inputs.into_iter().map(contiguous).collect();
    let mut resources = Vec::with_capacity(tensors.len());
    let mut ptrs = Vec::with_capacity(tensors.len());
    for t in &tensors {
        let r = t
            .client
            .get_resource::<CudaServer>(t.handle.clone())
            .map_err(|e| crate::Error::cuda(format!("camex burn: CubeCL get_resource: {e}")))?;
        let need = t.shape().num_elements() * t.dtype.size();
        if (r.resource().size as usize) < need {
            return Err(crate::Error::cuda(format!(
                "camex burn: CubeCL buffer of {} bytes for a tensor of {need}",
                r.resource().size
            )));
        }
        ptrs.push(r.resource().ptr);
        resources.push(r);
    }
    Ok(Pinned {
        tensors,
        resources,
        ptrs,
    })
}

impl<R> Pinned<R> {
    /// The views of the pinned inputs as the crate's device tensors.
    ///
    /// # Safety
    /// The views are used only while `self` is alive, and only on `stream`, which the caller
    /// synchronises before dropping `self`.
    unsafe fn views<T: Element>(&self) -> crate::Result<Vec<CudaTensor<T>>> {
        self.tensors
            .iter()
            .zip(&self.ptrs)
            .map(|(t, &ptr)| {
                let shape = t.shape().as_slice().to_vec();
                let n: usize = shape.iter().product();
                if n == 0 {
                    return Err(crate::Error::shape("input", "non-empty", &shape));
                }
                // SAFETY: `r` keeps n elements at ptr allocated (checked in `pin`); ordering per
                // this fn's contract (CubeCL was fenced before, the stream is synchronised after).
                unsafe { CudaTensor::borrowed(&shape, ptr, n) }
            })
            .collect()
    }
}

/// Copies the crate's outputs into CubeCL buffers on `like`'s client and device.
fn adopt<T: Element>(
    stream: &Arc<CudaStream>,
    like: &CubeTensor,
    outs: Vec<CudaTensor<T>>,
) -> crate::Result<Vec<CubeTensor>> {
    let mut result = Vec::with_capacity(outs.len());
    let mut keep = Vec::with_capacity(outs.len());
    for o in &outs {
        let bytes = o.len() * std::mem::size_of::<T>();
        let handle = like.client.empty(bytes);
        if bytes > 0 {
            let r = like
                .client
                .get_resource::<CudaServer>(handle.clone())
                .map_err(|e| crate::Error::cuda(format!("camex burn: CubeCL get_resource: {e}")))?;
            let (src, guard) = o.device_ptr(stream);
            // SAFETY: both live allocations of at least `bytes` (the output owns its buffer, or
            // its piece of a packed one; `r` pins the new buffer, held until the stream is
            // synchronised below).
            unsafe { crate::cuda::copy_dtod_raw(stream, r.resource().ptr, src, bytes) }?;
            keep.push((r, guard));
        }
        result.push(CubeTensor::new_contiguous(
            like.client.clone(),
            like.device.clone(),
            Shape::from(o.shape().to_vec()),
            handle,
            like.dtype,
        ));
    }
    stream
        .synchronize()
        .map_err(|e| crate::Error::cuda(format!("camex burn: synchronize: {e:?}")))?;
    drop(keep);
    drop(outs);
    Ok(result)
}

fn fence(t: &CubeTensor) -> crate::Result<()> {
    block_on(t.client.sync())
        .map_err(|e| crate::Error::cuda(format!("camex burn: CubeCL sync: {e}")))
}

/// Runs `f` on the pinned inputs' views (base, experts, packed split, then the extra ones) and
/// hands back its outputs as CubeCL tensors.
fn run<T: Element>(
    inputs: Vec<CubeTensor>,
    spec: &CaMergeSpec,
    f: impl FnOnce(
        &Cuda,
        &CaMergeInputs<CudaTensor<T>>,
        &[CudaTensor<T>],
    ) -> crate::Result<Vec<CudaTensor<T>>>,
) -> crate::Result<Vec<CubeTensor>> {
    let dev = ordinal(&inputs[0])?;
    for t in &inputs[1..] {
        if ordinal(t)? != dev {
            return Err(crate::Error::cuda(
                "camex burn: inputs on different CUDA devices",
            ));
        }
    }
    let stream = stream(dev)?;
    let pinned = pin(inputs)?;
    let like = pinned.tensors[0].clone();
    // CubeCL's writes of the inputs (and the contiguous copies) are done before the kernels read.
    fence(&like)?;
    let b = Cuda::new(stream.clone());
    // SAFETY: the views live in this scope only; `adopt` synchronises the stream before `pinned`
    // is dropped.
    let mut views = unsafe { pinned.views::<T>() }?;
    let extra = views.split_off(3);
    let [base, experts, packed]: [CudaTensor<T>; 3] = views
        .try_into()
        .map_err(|_| crate::Error::option("inputs", "base, experts, packed"))?;
    let outs =
        b.with_packed_ca_inputs(&base, &experts, &packed, &spec.packed, |x| f(&b, x, &extra));
    let outs = match outs {
        Ok(o) => o,
        Err(e) => {
            // Let the inputs' memory go only after whatever was enqueued has run.
            let _ = stream.synchronize();
            return Err(e);
        }
    };
    let result = adopt(&stream, &like, outs);
    if result.is_err() {
        let _ = stream.synchronize();
    }
    drop(pinned.resources);
    result
}

fn forward<T: Element>(
    base: CubeTensor,
    experts: CubeTensor,
    packed: CubeTensor,
    spec: &CaMergeSpec,
) -> crate::Result<CubeTensor> {
    let mut out = run::<T>(vec![base, experts, packed], spec, |b, x, _| {
        Ok(vec![b.ca_merge(x, &spec.opts)?.merged])
    })?;
    out.pop()
        .ok_or_else(|| crate::Error::option("outputs", "merged"))
}

fn backward<T: Element>(
    base: CubeTensor,
    experts: CubeTensor,
    packed: CubeTensor,
    grad: CubeTensor,
    spec: &CaMergeSpec,
) -> crate::Result<(CubeTensor, CubeTensor, CubeTensor)> {
    let out = run::<T>(vec![base, experts, packed, grad], spec, |b, x, extra| {
        let grad = extra
            .first()
            .ok_or_else(|| crate::Error::option("inputs", "grad_merged"))?;
        let g = b.ca_merge_backward(x, &spec.opts, grad, None, None)?;
        let mut grad_packed = vec![g.grad_scores];
        grad_packed.extend(g.factors.map(FactorGrads::into_array).into_iter().flatten());
        Ok(vec![g.grad_base, g.grad_experts, b.pack(grad_packed)?])
    })?;
    let [gb, ge, gp]: [CubeTensor; 3] = out
        .try_into()
        .map_err(|_| crate::Error::option("outputs", "three gradients"))?;
    Ok((gb, ge, gp))
}

fn dtype_err<R>(dtype: DType) -> crate::Result<R> {
    Err(crate::Error::DType {
        tensor: "base".into(),
        expected: "f32|f16|bf16 (burn's CUDA backend)".into(),
        actual: format!("{dtype:?}"),
    })
}

impl CamexBackend for Cube {
    fn camex_ca_merge(
        base: FloatTensor<Self>,
        experts: FloatTensor<Self>,
        packed: FloatTensor<Self>,
        spec: CaMergeSpec,
    ) -> FloatTensor<Self> {
        expect_ok(match base.dtype {
            DType::F32 => forward::<f32>(base, experts, packed, &spec),
            DType::F16 => forward::<f16>(base, experts, packed, &spec),
            DType::BF16 => forward::<bf16>(base, experts, packed, &spec),
            d => dtype_err(d),
        })
    }

    fn camex_ca_merge_backward(
        base: FloatTensor<Self>,
        experts: FloatTensor<Self>,
        packed: FloatTensor<Self>,
        grad_merged: FloatTensor<Self>,
        spec: CaMergeSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // The incoming gradient may come in another float dtype; the kernels take base's.
        let grad_merged = if grad_merged.dtype != base.dtype {
            Cube::float_cast(grad_merged, base.dtype.into())
        } else {
            grad_merged
        };
        expect_ok(match base.dtype {
            DType::F32 => backward::<f32>(base, experts, packed, grad_merged, &spec),
            DType::F16 => backward::<f16>(base, experts, packed, grad_merged, &spec),
            DType::BF16 => backward::<bf16>(base, experts, packed, grad_merged, &spec),
            d => dtype_err(d),
        })
    }
}
