//! The fused CUDA kernels (`kernels/*.cu`) behind a safe API over cudarc streams.
//!
//! Testing: `tests/gpu.rs` compares every operator and gradient in f32, f16 and bf16 with the f64
//! CPU path ([`crate::cpu`]) at odd and T5-base shapes, with NaN-poisoned outputs and bit-identical
//! reruns; where no GPU is present it skips and says why. The CPU emulation of the kernels
//! (`CAMEX_KERNEL_EMU=1`, kernels/emu.h: every thread a fiber, barriers, shared memory, atomics, and
//! mma.sync with the PTX fragment layout) runs the same kernels without a GPU; it covers indexing,
//! tiling, reductions and orchestration, not the GPU memory model, the CUDA runtime, or speed. What
//! has run where is in the README ("Status").
//!
//! Conventions:
//! - Every op takes the stream it runs on (`&Arc<CudaStream>`) and device tensors ([`CudaTensor`]),
//!   validates all shapes before launching anything (the same [`Error`] messages as the CPU path),
//!   enqueues its kernels on that stream only and returns without synchronising. Outputs are fresh
//!   tensors allocated on the stream; scalar gradients are 0-d device tensors.
//! - Storage dtypes f32, f16, bf16 ([`Element`]); all accumulation is in f32; reductions run in a
//!   fixed order (no float atomics), so two runs give the same bits.
//! - Every CUDA failure is returned as [`Error::Cuda`]; where no CUDA driver is installed the
//!   ops return an [`Error::Cuda`] saying "no CUDA driver (libcuda) on this machine" instead of panicking.
//! - With feature `nvtx`, each op is wrapped in an NVTX range named after it.

mod backend;
pub mod curvature;
pub mod dynamic;
pub mod linear;
pub mod mask;
pub mod merge;
pub mod segment;

pub use backend::Cuda;
pub use curvature::{
    curvature, curvature_backward, CudaCurvature, CudaCurvatureGrads, CudaFactorGrads, CudaFactors,
};
pub use dynamic::{dynamic_merge, dynamic_merge_backward, CudaDynamicGrads};
pub use linear::{merged_linear, merged_linear_backward, CudaLinearGrads};
pub use mask::ties_mask;
pub use merge::{
    ca_merge, ca_merge_backward, ca_merge_backward_with_curved, merge, merge_backward,
    CudaCaMergeGrads, CudaCaMergeInputs, CudaCaMergeOutputs, CudaMergeGrads, CudaMergeInputs,
    CudaMergeOutputs,
};
pub use segment::{segment_scores, segment_scores_backward};

use crate::error::{Error, Result};
use crate::ffi;
use crate::options::Dare;
use crate::philox::DareDraw;
use crate::tensor::{DType, HostTensor};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, SyncOnDrop,
};
use half::{bf16, f16};
use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use cudarc::driver::{CudaContext as Context, CudaStream as Stream};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// Storage element types of the kernels: f32, f16, bf16 (sealed).
pub trait Element:
    sealed::Sealed
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + Copy
    + Send
    + Sync
    + Unpin
    + 'static
{
    const DTYPE: DType;
    /// `camex_dtype` code of kernels/camex.h.
    const CODE: i32;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    const CODE: i32 = ffi::camex_dtype_CAMEX_F32 as i32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    const CODE: i32 = ffi::camex_dtype_CAMEX_F16 as i32;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    const CODE: i32 = ffi::camex_dtype_CAMEX_BF16 as i32;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// Whether a CUDA driver library can be loaded on this machine (checked before any cudarc call:
/// cudarc panics when it is missing).
pub fn driver_present() -> bool {
    // Asked once per process: every launch checks it, and the answer cannot change.
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(|| {
        // cudarc's own check (`is_culib_present`) exists only when it loads the driver at run
        // time; with candle's CUDA backend it links it instead, so ask the loader for the same
        // names here.
        ["libcuda.so.1", "libcuda.so", "nvcuda.dll"]
            .iter()
            // SAFETY: loading the driver library runs only its initialisers; no CUDA call is made.
            .any(|name| unsafe { libloading::Library::new(*name) }.is_ok())
    })
}

fn require_driver() -> Result<()> {
    if driver_present() {
        Ok(())
    } else {
        Err(Error::cuda("no CUDA driver (libcuda) on this machine"))
    }
}

/// A driver call's error, kept as the source; the message is its `Debug` form
/// (`DriverError(CUDA_ERROR_..., "...")`), as before.
pub(crate) fn cuda_err(e: cudarc::driver::DriverError) -> Error {
    Error::cuda_source(format!("{e:?}"), e)
}

/// Opens device `ordinal` (primary context). Errors, without panicking, where there is no driver
/// or no such device.
pub fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    require_driver()?;
    let count = CudaContext::device_count().map_err(cuda_err)?;
    if ordinal as i64 >= count as i64 {
        return Err(Error::cuda(format!(
            "no CUDA device {ordinal} (found {count})"
        )));
    }
    CudaContext::new(ordinal).map_err(cuda_err)
}

/// A new non-blocking stream on device `ordinal`.
pub fn new_stream(ordinal: usize) -> Result<Arc<CudaStream>> {
    context(ordinal)?.new_stream().map_err(cuda_err)
}

static POISON: AtomicBool = AtomicBool::new(false);

/// Debug aid (used by tests/gpu.rs): when on, every output buffer and workspace is filled with NaN
/// bit patterns (all bytes 0xFF) before the kernels run, so an element a kernel forgets to write,
/// or scratch it reads before writing, shows up.
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::SeqCst);
}

/// Chooses, for the calling thread, whether f16/bf16 operators use the tensor cores: the two-stage
/// Kronecker curvature forward of `kernels/kron_tc.cuh` (standalone `curvature`, the fused CA-merge,
/// and the recompute inside their backward), the fused Kronecker backward of
/// `kernels/kron_tc_bwd.cuh` (three kernels per round of ranks for dL/dtau and the four factor
/// gradients), the bf16 merge backward's dots in H's pass (`h_dots_kernel`, `kernels/merge.cuh`),
/// and the tensor-core strided GEMM behind the merged linear layer and the reverse chain
/// of shapes the fused kernels do not take (`kernels/gemm.cuh`). All accumulate in f32; which
/// operands go through as bf16 hi + lo halves rather than once depends on the storage type and the
/// kernel (`TcSplit` and `Prec` in `kernels/mma.cuh` say why). `Some(true)` on, `Some(false)`
/// off, `None` the process default (the environment variable `CAMEX_TENSOR_CORES=1` turns it on; off
/// otherwise).
///
/// They are opt-in (the README's "Status" says why); the scalar kernels are the
/// default. f32 storage always takes the scalar kernels (SPEC's 1e-5 needs f32 products).
pub fn set_tensor_cores(mode: Option<bool>) {
    let m = match mode {
        None => -1,
        Some(false) => 0,
        Some(true) => 1,
    };
    // SAFETY: sets a thread-local flag in the kernels library; no device access.
    unsafe { ffi::camex_set_tensor_cores(m) }
}

/// Whether the tensor-core path applies on this thread now (see [`set_tensor_cores`]).
pub fn tensor_cores() -> bool {
    // SAFETY: reads a flag in the kernels library; no device access.
    unsafe { ffi::camex_tensor_cores() == 1 }
}

thread_local! {
    /// Device-to-device copies enqueued by this thread ([`copy_dtod`]).
    static DEVICE_COPIES: Cell<u64> = const { Cell::new(0) };
}

/// How many device-to-device copies the crate has enqueued from the calling thread. Every such
/// copy of the crate's Rust code goes through one function that counts it, so a test can read
/// this before and after an op to prove that the op copies nothing (per thread, so that tests
/// running in parallel do not disturb each other; candle's ops run on the calling thread). The
/// kernels library itself makes one copy, in the identity-curvature (`R = 0`) branch of
/// `curvature_backward` (kernels/curvature.cu), which this does not count.
pub fn device_copies() -> u64 {
    DEVICE_COPIES.with(|c| c.get())
}

/// The one device-to-device copy of the crate: `dst` = `src` on `stream`, counted for
/// [`device_copies`].
// Only the candle adapter copies (and borrows memory, below); without it these are unused.
#[cfg_attr(not(feature = "candle"), allow(dead_code))]
pub(crate) fn copy_dtod<T, S: DevicePtr<T>, D: DevicePtrMut<T>>(
    stream: &Arc<CudaStream>,
    src: &S,
    dst: &mut D,
) -> Result<()> {
    DEVICE_COPIES.with(|c| c.set(c.get() + 1));
    stream.memcpy_dtod(src, dst).map_err(cuda_err)
}

/// `bytes` bytes from `src` to `dst`, device memory the crate does not own (the burn adapter's
/// outputs, in CubeCL's memory), on `stream`; counted for [`device_copies`].
///
/// # Safety
/// `src` and `dst` address `bytes` live bytes each in the stream's context, not overlapping, and
/// stay allocated until the copy has run (the caller synchronises the stream).
#[cfg(feature = "burn")]
pub(crate) unsafe fn copy_dtod_raw(
    stream: &Arc<CudaStream>,
    dst: CUdeviceptr,
    src: CUdeviceptr,
    bytes: usize,
) -> Result<()> {
    DEVICE_COPIES.with(|c| c.set(c.get() + 1));
    stream.context().bind_to_thread().map_err(cuda_err)?;
    // SAFETY: per this fn's contract.
    unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }
        .map_err(cuda_err)
}

/// Where a [`CudaTensor`]'s elements live.
#[derive(Debug)]
#[cfg_attr(not(feature = "candle"), allow(dead_code))]
enum Data<T> {
    /// A buffer the tensor owns.
    Owned(CudaSlice<T>),
    /// The tensor's elements at `ptr`, memory someone else owns (candle's storage): no copy in,
    /// no free. Whoever made it ([`CudaTensor::borrowed`]) keeps the memory alive and holds
    /// cudarc's read/write guards for it through every launch that uses it.
    Borrowed {
        ptr: CUdeviceptr,
        _t: PhantomData<T>,
    },
    /// Elements `at..` of `whole`, a buffer that an op filled with several outputs at once (the
    /// packed gradients the adapters return, [`PackedOutputs`]): read-only, and turned back into
    /// the whole buffer without a copy when every piece comes home ([`CudaTensor::unpack_parts`]).
    Part { whole: Arc<CudaSlice<T>>, at: usize },
}

/// A dense row-major tensor in device memory (SPEC section 2 layout): a buffer it owns, or (inside
/// the crate, for the framework adapters) a view of device memory another library owns.
#[derive(Debug)]
pub struct CudaTensor<T> {
    shape: Vec<usize>,
    data: Data<T>,
}

fn borrowed_err(what: &str) -> Error {
    Error::option(
        "tensor",
        format!("{what}: this tensor is a view of memory the crate does not own"),
    )
}

fn part_err(what: &str) -> Error {
    Error::option(
        "tensor",
        format!("{what}: this tensor is a piece of a packed output (read it, or pack the pieces)"),
    )
}

impl<T: Element> CudaTensor<T> {
    /// Copies a host tensor to the device (asynchronously on `stream`). Errors with
    /// [`Error::Memory`] when it does not fit in the device's free memory (or the
    /// [`crate::memory`] limit); an empty tensor holds one element, like every output.
    pub fn upload(stream: &Arc<CudaStream>, t: &HostTensor<T>) -> Result<Self> {
        device_check::<T>(stream, "upload", t.shape())?;
        // SAFETY: plain-old-data device memory; the copy below writes the tensor's elements.
        let mut data = unsafe { stream.alloc::<T>(t.data().len().max(1)) }.map_err(cuda_err)?;
        stream.memcpy_htod(t.data(), &mut data).map_err(cuda_err)?;
        Ok(CudaTensor {
            shape: t.shape().to_vec(),
            data: Data::Owned(data),
        })
    }
    /// Copies to the host; waits for the stream's work on this tensor.
    pub fn download(&self, stream: &Arc<CudaStream>) -> Result<HostTensor<T>> {
        let v = stream.clone_dtoh(&self.view()?).map_err(cuda_err)?;
        HostTensor::new(&self.shape, v)
    }
    /// A view of `len` elements of device memory at `ptr` that the caller owns, without a copy.
    ///
    /// # Safety
    /// `ptr` addresses `len` live elements of `T` in the stream's context. The caller keeps them
    /// allocated, and holds cudarc's read guard (or write guard, if a launch writes the view) for
    /// them, until every launch using the view has been enqueued; the memory is freed only in
    /// the order of that stream (cudarc frees asynchronously on the buffer's stream).
    #[cfg_attr(not(feature = "candle"), allow(dead_code))]
    pub(crate) unsafe fn borrowed(shape: &[usize], ptr: CUdeviceptr, len: usize) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != len {
            return Err(Error::option(
                "data",
                format!("shape {shape:?} holds {n} elements, device view has {len}"),
            ));
        }
        Ok(CudaTensor {
            shape: shape.to_vec(),
            data: Data::Borrowed {
                ptr,
                _t: PhantomData,
            },
        })
    }
    /// A view of the elements `at..at + product(shape)` of this tensor, read as `shape`, without a
    /// copy (e.g. the pieces of a packed input).
    ///
    /// # Safety
    /// The view must not outlive `self`'s memory, and it is read-only: it may be read by launches
    /// while `self` is not written. For a view of a borrowed tensor, the conditions of
    /// [`CudaTensor::borrowed`] carry over.
    #[cfg_attr(not(feature = "candle"), allow(dead_code))]
    pub(crate) unsafe fn sub_view(
        &self,
        stream: &Arc<CudaStream>,
        at: usize,
        shape: &[usize],
    ) -> Result<Self> {
        let n: usize = shape.iter().product();
        let total = self.len();
        if at.checked_add(n).is_none_or(|end| end > total) {
            return Err(Error::shape(
                "packed",
                format!("at least {} elements", at.saturating_add(n)),
                &self.shape,
            ));
        }
        // The guard only records a read event now; the reads happen in later launches on this
        // stream, ordered after anything enqueued before them.
        let (base, _g) = self.device_ptr(stream);
        let off = (at * std::mem::size_of::<T>()) as CUdeviceptr;
        // SAFETY: in bounds of self's memory (checked above); lifetime per this fn's contract.
        unsafe { Self::borrowed(shape, base + off, n) }
    }
    /// A zero-filled tensor. Errors with [`Error::Memory`] when it does not fit in the device's
    /// free memory (or the [`crate::memory`] limit).
    pub fn zeros(stream: &Arc<CudaStream>, shape: &[usize]) -> Result<Self> {
        require_driver()?;
        device_check::<T>(stream, "zeros", shape)?;
        let n: usize = shape.iter().product();
        let data = stream.alloc_zeros::<T>(n.max(1)).map_err(cuda_err)?;
        Ok(CudaTensor {
            shape: shape.to_vec(),
            data: Data::Owned(data),
        })
    }
    /// An output buffer named `name` (for the errors): uninitialised (every kernel writes all of
    /// its outputs), or NaN-filled under [`set_poison_outputs`]. Its size is checked against the
    /// device's free memory first ([`device_check`]).
    pub(crate) fn output(stream: &Arc<CudaStream>, name: &str, shape: &[usize]) -> Result<Self> {
        device_check::<T>(stream, name, shape)?;
        let n: usize = shape.iter().product::<usize>().max(1);
        // Every op writes all of it before it is read.
        let data = alloc_unwritten::<T>(stream, n)?;
        Ok(CudaTensor {
            shape: shape.to_vec(),
            data: Data::Owned(data),
        })
    }
    /// Wraps an existing device buffer; errors when its length differs from the shape's element count.
    pub fn from_slice(shape: &[usize], data: CudaSlice<T>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::option(
                "data",
                format!(
                    "shape {shape:?} holds {n} elements, device buffer has {}",
                    data.len()
                ),
            ));
        }
        Ok(CudaTensor {
            shape: shape.to_vec(),
            data: Data::Owned(data),
        })
    }
}

impl<T> CudaTensor<T> {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The device buffer it owns (an error for a view of memory it does not own).
    pub fn data(&self) -> Result<&CudaSlice<T>> {
        match &self.data {
            Data::Owned(s) => Ok(s),
            Data::Borrowed { .. } => Err(borrowed_err("data")),
            Data::Part { .. } => Err(part_err("data")),
        }
    }
    pub fn data_mut(&mut self) -> Result<&mut CudaSlice<T>> {
        match &mut self.data {
            Data::Owned(s) => Ok(s),
            Data::Borrowed { .. } => Err(borrowed_err("data_mut")),
            Data::Part { .. } => Err(part_err("data_mut")),
        }
    }
    /// The device buffer. It holds at least one element: a tensor with no elements still owns
    /// a one-element allocation. Outputs of the ops always own theirs.
    pub fn into_slice(self) -> Result<CudaSlice<T>> {
        match self.data {
            Data::Owned(s) => Ok(s),
            Data::Borrowed { .. } => Err(borrowed_err("into_slice")),
            Data::Part { .. } => Err(part_err("into_slice")),
        }
    }
    /// The tensor's elements as a device view (a buffer it owns, or its piece of a packed one).
    pub fn view(&self) -> Result<CudaView<'_, T>> {
        let n = self.len();
        match &self.data {
            Data::Owned(s) => Ok(s.slice(0..n)),
            Data::Part { whole, at } => Ok(whole.slice(*at..*at + n)),
            Data::Borrowed { .. } => Err(borrowed_err("view")),
        }
    }
    /// The device address of the first element, with cudarc's read guard of the buffer where the
    /// crate owns one (dropping the guard records the stream's read event).
    pub(crate) fn device_ptr<'s>(
        &'s self,
        stream: &'s Arc<CudaStream>,
    ) -> (CUdeviceptr, Option<SyncOnDrop<'s>>) {
        match &self.data {
            Data::Owned(s) => {
                let (p, g) = s.device_ptr(stream);
                (p, Some(g))
            }
            Data::Part { whole, at } => {
                let (p, g) = whole.device_ptr(stream);
                (p + (at * std::mem::size_of::<T>()) as CUdeviceptr, Some(g))
            }
            // The view's owner holds the guard (CudaTensor::borrowed).
            Data::Borrowed { ptr, .. } => (*ptr, None),
        }
    }
    /// The buffer that `pieces` are the consecutive parts of, in order and covering it, without a
    /// copy; otherwise the pieces back, unchanged.
    pub(crate) fn unpack_parts(
        pieces: Vec<CudaTensor<T>>,
    ) -> std::result::Result<CudaSlice<T>, Vec<CudaTensor<T>>> {
        let whole = match pieces.first().map(|p| &p.data) {
            Some(Data::Part { whole, .. }) => whole.clone(),
            _ => return Err(pieces),
        };
        let mut next = 0;
        for p in &pieces {
            match &p.data {
                Data::Part { whole: w, at } if Arc::ptr_eq(w, &whole) && *at == next => {
                    next += p.len()
                }
                _ => return Err(pieces),
            }
        }
        // A buffer always holds at least one element (`output`), also for no elements.
        if next != whole.len() && !(next == 0 && whole.len() == 1) {
            return Err(pieces);
        }
        drop(pieces);
        // The pieces were the only other holders (unless a caller cloned one out: then no).
        Arc::try_unwrap(whole).map_err(|w| {
            vec![CudaTensor {
                shape: vec![next],
                data: Data::Part { whole: w, at: 0 },
            }]
        })
    }
}

/// Several outputs of one op in one buffer, in order: the gradients the adapters return packed
/// (`scores`', then the factors'), so that packing them again ([`crate::backend::Backend::pack`])
/// is free ([`CudaTensor::unpack_parts`]), with no device copy.
pub(crate) struct PackedOutputs<T> {
    whole: CudaSlice<T>,
    shapes: Vec<Vec<usize>>,
    /// Where each piece starts in `whole`, in elements.
    starts: Vec<usize>,
}

impl<T: Element> PackedOutputs<T> {
    /// One output buffer for pieces of `shapes` (`name` in its errors).
    pub fn new(stream: &Arc<CudaStream>, name: &str, shapes: Vec<Vec<usize>>) -> Result<Self> {
        let mut starts = Vec::with_capacity(shapes.len());
        let mut total = 0;
        for s in &shapes {
            starts.push(total);
            total += s.iter().product::<usize>();
        }
        let whole = CudaTensor::<T>::output(stream, name, &[total])?.into_slice()?;
        Ok(PackedOutputs {
            whole,
            shapes,
            starts,
        })
    }
    /// The device address of each piece, for the one launch that writes them all.
    pub fn ptrs<'a>(&'a mut self, l: &mut Launch<'a>) -> Vec<u64> {
        let base = l.write_slice(&mut self.whole);
        self.starts
            .iter()
            .map(|&at| base + (at * std::mem::size_of::<T>()) as u64)
            .collect()
    }
    /// The pieces, as tensors (read-only views that share the buffer).
    pub fn into_parts(self) -> Vec<CudaTensor<T>> {
        let whole = Arc::new(self.whole);
        self.shapes
            .into_iter()
            .zip(self.starts)
            .map(|(shape, at)| CudaTensor {
                shape,
                data: Data::Part {
                    whole: whole.clone(),
                    at,
                },
            })
            .collect()
    }
}

/// Device pointers of one launch: keeps cudarc's read/write event guards alive until the launch
/// is enqueued (dropping them records the stream's events).
pub(crate) struct Launch<'a> {
    pub stream: &'a Arc<CudaStream>,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Launch<'a> {
    pub fn new(stream: &'a Arc<CudaStream>) -> Result<Self> {
        require_driver()?;
        // The runtime API (kernel launches in kernels/*.cu) uses the context current to the
        // thread: make it the stream's.
        stream.context().bind_to_thread().map_err(cuda_err)?;
        Ok(Launch {
            stream,
            guards: Vec::new(),
        })
    }
    pub fn read<T>(&mut self, t: &'a CudaTensor<T>) -> u64 {
        let (p, g) = t.device_ptr(self.stream);
        self.guards.extend(g);
        p
    }
    pub fn read_opt<T>(&mut self, t: Option<&'a CudaTensor<T>>) -> u64 {
        t.map_or(0, |t| self.read(t))
    }
    pub fn write<T>(&mut self, t: &'a mut CudaTensor<T>) -> u64 {
        match t.data {
            Data::Owned(ref mut s) => {
                let (p, g) = s.device_ptr_mut(self.stream);
                self.guards.push(g);
                p
            }
            // A borrowed view's owner holds its guard, and pieces are written only through their
            // whole buffer, by the launch that makes them (PackedOutputs): no op writes into a
            // tensor it was given, so these take the address as a read does.
            _ => self.read(t),
        }
    }
    pub fn write_opt<T>(&mut self, t: Option<&'a mut CudaTensor<T>>) -> u64 {
        t.map_or(0, |t| self.write(t))
    }
    pub fn write_slice<T>(&mut self, s: &'a mut CudaSlice<T>) -> u64 {
        let (p, g) = s.device_ptr_mut(self.stream);
        self.guards.push(g);
        p
    }
    pub fn raw_stream(&self) -> ffi::camex_stream_t {
        // CUstream and cudaStream_t are the same handle.
        self.stream.cu_stream() as ffi::camex_stream_t
    }
}

/// Maps a launcher's return code to a Result.
pub(crate) fn check(code: i32, op: &str) -> Result<()> {
    match code {
        0 => Ok(()),
        c if c == ffi::CAMEX_ERR_WORKSPACE as i32 => {
            Err(Error::cuda(format!("{op}: workspace too small (internal)")))
        }
        c if c == ffi::CAMEX_ERR_DIMS as i32 => Err(Error::cuda(format!(
            "{op}: dimensions exceed the kernels' grid limits or are inconsistent"
        ))),
        c => Err(Error::cuda(format!(
            "{op}: CUDA runtime error {c} ({}: {})",
            runtime_str(ffi::camex_error_name, c),
            runtime_str(ffi::camex_error_string, c)
        ))),
    }
}

/// The CUDA runtime's static string for code `c` (cudaGetErrorName / cudaGetErrorString, exported
/// by the kernels' library).
fn runtime_str(f: unsafe extern "C" fn(i32) -> *const std::ffi::c_char, c: i32) -> String {
    // SAFETY: both functions take any int and return a static NUL-terminated string (or, in
    // principle, NULL, which is checked).
    let p = unsafe { f(c) };
    if p.is_null() {
        return "unknown".into();
    }
    // SAFETY: non-null, NUL-terminated and static (the runtime's own string table).
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

/// Checks, before allocating, that `name` of `shape` (elements of `T`) fits in the free memory of
/// the stream's device (`cuMemGetInfo`) and in a [`crate::memory::MemoryLimit::Bytes`] limit if
/// one is in force: otherwise [`Error::Memory`] naming it, its shape and the bytes it needs.
pub(crate) fn device_check<T>(stream: &Arc<CudaStream>, name: &str, shape: &[usize]) -> Result<()> {
    require_driver()?;
    let ctx = stream.context();
    let (free, _total) = ctx.mem_get_info().map_err(cuda_err)?;
    // Memory the stream-ordered pool keeps but no allocation uses (freed with cuMemFreeAsync, by
    // this crate or candle, and not yet released at a synchronisation) serves the next allocation,
    // though cuMemGetInfo counts it as used.
    let free = free.saturating_add(pool_idle_bytes(ctx.cu_device()));
    let ordinal = ctx.ordinal();
    crate::memory::check_against(
        &[crate::memory::need(name, shape, std::mem::size_of::<T>())],
        crate::memory::limit(),
        Some((
            free as u64,
            format!(
                "over the {free} bytes ({}) free on CUDA device {ordinal}",
                crate::memory::human(free as u128)
            ),
        )),
    )
}

/// Bytes the device's default memory pool (the one `cuMemAllocAsync` draws from) holds unused; 0
/// where the driver does not say.
fn pool_idle_bytes(dev: cudarc::driver::sys::CUdevice) -> usize {
    use cudarc::driver::{result, sys::CUmemPool_attribute as A};
    let (mut reserved, mut used) = (0u64, 0u64);
    // SAFETY: `dev` is the context's device; both attributes are cuuint64_t, written into u64s.
    let got = unsafe {
        result::device::get_default_mem_pool(dev).and_then(|pool| {
            result::mem_pool::get_attribute(
                pool,
                A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                (&raw mut reserved).cast(),
            )?;
            result::mem_pool::get_attribute(
                pool,
                A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
                (&raw mut used).cast(),
            )
        })
    };
    match got {
        Ok(()) => usize::try_from(reserved.saturating_sub(used)).unwrap_or(usize::MAX),
        Err(_) => 0,
    }
}

/// A workspace of `bytes` (at least 1) on the stream.
pub(crate) fn workspace(stream: &Arc<CudaStream>, bytes: i64) -> Result<CudaSlice<u8>> {
    let len =
        usize::try_from(bytes.max(1)).map_err(|_| Error::option("workspace", "negative size"))?;
    device_check::<u8>(stream, "workspace", &[len])?;
    // The kernels initialise every byte they read.
    alloc_unwritten::<u8>(stream, len)
}

/// `n` elements of device memory that the caller writes before anything reads them: left
/// uninitialised, or all bytes 0xFF (NaN in every dtype) under [`set_poison_outputs`], so that a
/// kernel reading what it never wrote fails the tests instead of finding the zeros of fresh pool
/// pages.
fn alloc_unwritten<T: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    n: usize,
) -> Result<CudaSlice<T>> {
    // SAFETY: plain-old-data device memory, written (or poisoned below) before it is read.
    let mut data = unsafe { stream.alloc::<T>(n) }.map_err(cuda_err)?;
    if POISON.load(Ordering::SeqCst) {
        let (p, _g) = data.device_ptr_mut(stream);
        // SAFETY: p is a live allocation of n elements on this stream.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                p,
                0xFF,
                n * std::mem::size_of::<T>(),
                stream.cu_stream(),
            )
        }
        .map_err(cuda_err)?;
    }
    Ok(data)
}

/// DARE options resolved exactly like the CPU path (src/philox.rs).
pub(crate) fn dare_params(dare: &Dare) -> ffi::camex_dare {
    match DareDraw::from_options(dare) {
        None => ffi::camex_dare {
            kind: ffi::camex_dare_kind_CAMEX_DARE_NONE as i32,
            threshold: 0,
            seed: 0,
            scale: 1.0,
        },
        Some(d) => ffi::camex_dare {
            kind: match d.granularity {
                crate::philox::Granularity::Expert => ffi::camex_dare_kind_CAMEX_DARE_EXPERT as i32,
                crate::philox::Granularity::Element => {
                    ffi::camex_dare_kind_CAMEX_DARE_ELEMENT as i32
                }
            },
            threshold: d.threshold,
            seed: d.seed,
            scale: d.scale,
        },
    }
}

/// An NVTX range named after the op (feature `nvtx`), nothing otherwise.
pub(crate) struct OpRange {
    #[cfg(feature = "nvtx")]
    _r: nvtx::LocalRange,
}

pub(crate) fn op_range(_name: &'static std::ffi::CStr) -> OpRange {
    OpRange {
        #[cfg(feature = "nvtx")]
        _r: nvtx::LocalRange::new(_name),
    }
}

/// Runs the Philox4x32-10 of kernels/philox.cuh on the device for `ctr` (4 words each) and `key`
/// (2 words each); returns the 4 output words per counter. For the known-answer test.
pub fn philox_device(
    stream: &Arc<CudaStream>,
    ctr: &[[u32; 4]],
    key: &[[u32; 2]],
) -> Result<Vec<[u32; 4]>> {
    if ctr.len() != key.len() {
        return Err(Error::option(
            "key",
            format!("{} keys for {} counters", key.len(), ctr.len()),
        ));
    }
    require_driver()?;
    let c: Vec<u32> = ctr.iter().flatten().copied().collect();
    let k: Vec<u32> = key.iter().flatten().copied().collect();
    let dc = stream.clone_htod(&c).map_err(cuda_err)?;
    let dk = stream.clone_htod(&k).map_err(cuda_err)?;
    let mut out = stream
        .alloc_zeros::<u32>(c.len().max(1))
        .map_err(cuda_err)?;
    {
        let (pc, _g1) = dc.device_ptr(stream);
        let (pk, _g2) = dk.device_ptr(stream);
        let (po, _g3) = out.device_ptr_mut(stream);
        // SAFETY: device pointers of live buffers of the sizes the kernel reads/writes.
        let code = unsafe {
            ffi::camex_philox_test(
                pc,
                pk,
                po,
                ctr.len() as i64,
                stream.cu_stream() as ffi::camex_stream_t,
            )
        };
        check(code, "philox")?;
    }
    let v = stream.clone_dtoh(&out).map_err(cuda_err)?;
    Ok(v.chunks(4)
        .take(ctr.len())
        .map(|w| [w[0], w[1], w[2], w[3]])
        .collect())
}

// ---- shape checks, mirroring the CPU path's messages ----

use crate::shape::{expect_nonempty, expect_rank, expect_shape};

/// `base` [O, I] and `experts` [N, O, I] (named `experts_name`); returns (N, O, I).
pub(crate) fn check_weights(
    base: &[usize],
    experts: &[usize],
    experts_name: &str,
) -> Result<(usize, usize, usize)> {
    expect_rank("base", base, 2, "[O, I]")?;
    expect_nonempty("base", base)?;
    expect_rank(experts_name, experts, 3, "[N, O, I]")?;
    expect_nonempty(experts_name, experts)?;
    let (o, i) = (base[0], base[1]);
    let n = experts[0];
    expect_shape(experts_name, experts, &[n, o, i])?;
    check_size(n * o * i)?;
    Ok((n, o, i))
}

/// Element counts must fit the kernels' 32-bit select counters and i64 indexing.
pub(crate) fn check_size(elements: usize) -> Result<()> {
    if elements >= (1usize << 31) * 2 {
        return Err(Error::option(
            "shape",
            format!("{elements} elements exceed the CUDA path's limit of 2^32"),
        ));
    }
    Ok(())
}

/// `scores` [G, N]; returns G.
pub(crate) fn check_scores(scores: &[usize], n: usize) -> Result<usize> {
    expect_rank("scores", scores, 2, "[G, N]")?;
    expect_nonempty("scores", scores)?;
    let g = scores[0];
    expect_shape("scores", scores, &[g, n])?;
    Ok(g)
}

/// Biases together or not at all: `base_bias` [O], `expert_bias` [N, O].
pub(crate) fn check_biases(
    base_bias: Option<&[usize]>,
    expert_bias: Option<&[usize]>,
    n: usize,
    o: usize,
    op: &str,
) -> Result<bool> {
    match (base_bias, expert_bias) {
        (None, None) => Ok(false),
        (Some(eb), Some(b)) => {
            expect_shape("base_bias", eb, &[o])?;
            expect_shape("expert_bias", b, &[n, o])?;
            Ok(true)
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

/// alpha or beta: finite, and finite in the storage dtype `T` ([`crate::options::check_scalar`]).
pub(crate) fn check_finite<T: Element>(name: &str, v: f64) -> Result<()> {
    crate::options::check_scalar(name, v, T::DTYPE)
}
