//! The CUDA half (feature `cuda`): the fused ops of [`camex::cuda`] timed with CUDA events, peak
//! device memory from the default memory pool's high-water mark. Ran on an H200 (2026-11-28,
//! `scripts/gpu-check.sh`; numbers in BENCHMARKS.md) for the scalar kernels.

use super::*;
use camex::cuda::{self as cu, CudaTensor, Element};
use cudarc::driver::{sys, CudaStream};
use std::sync::Arc;

fn err(e: impl std::fmt::Debug) -> Error {
    Error::cuda(format!("{e:?}"))
}

/// Whether the opt-in tensor-core kernels (`camex::cuda::set_tensor_cores`) serve `op` in
/// `dtype`: the Kronecker chain and the strided GEMM, for f16/bf16 storage.
pub fn tensor_cores_serve(op: Op, dtype: DType) -> bool {
    matches!(op, Op::CaMerge | Op::Curvature | Op::MergedLinear)
        && matches!(dtype, DType::F16 | DType::BF16)
}

/// A roofline line of a case the tensor cores ran, labelled `impl=camex-tc`.
pub fn tensor_core_line(line: &str) -> String {
    line.replace("impl=camex", "impl=camex-tc")
}

/// The GPU floor's rates, not measured here (the crate has no cuBLAS to time a GEMM with):
/// the H200 datasheet (dense bf16/f16 989 TFLOP/s, tf32 494, f32 67; HBM3e 4.8 TB/s).
/// `scripts/torch_baseline.py` prints the measured matmul rate and copy bandwidth next to it.
pub fn h200_datasheet(dtype: DType) -> Machine {
    let gemm_flops = match dtype {
        DType::BF16 | DType::F16 => 989e12,
        _ => 67e12,
    };
    Machine {
        gemm_flops,
        copy_bytes_per_s: 4.8e12,
        threads: 0,
    }
}

fn pool(stream: &Arc<CudaStream>) -> Option<sys::CUmemoryPool> {
    let ctx = stream.context();
    ctx.bind_to_thread().ok()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: plain driver query into a local out-parameter.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(pool)
}

fn pool_attr(
    pool: sys::CUmemoryPool,
    attr: sys::CUmemPool_attribute,
    set: Option<u64>,
) -> Option<u64> {
    let mut v: u64 = set.unwrap_or(0);
    let ptr = &mut v as *mut u64 as *mut std::ffi::c_void;
    // SAFETY: the attribute is a u64 (cuuint64_t) for USED_MEM_HIGH / USED_MEM_CURRENT.
    let r = unsafe {
        if set.is_some() {
            sys::cuMemPoolSetAttribute(pool, attr, ptr)
        } else {
            sys::cuMemPoolGetAttribute(pool, attr, ptr)
        }
    };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
}

/// One prepared GPU case: enqueue one iteration on the stream.
pub type GpuRun = Box<dyn FnMut(&Arc<CudaStream>) -> Result<()>>;

fn up<T: Element>(s: &Arc<CudaStream>, t: &HostTensor<f32>) -> Result<CudaTensor<T>> {
    CudaTensor::upload(s, &t.map(T::from_f32))
}

fn prepare_t<T: Element>(case: &Case, s: &Arc<CudaStream>) -> Result<GpuRun> {
    let sh = case.shape.dims();
    let bwd = case.pass == Pass::FwdBwd;
    let mut rng = Rng(0xBE4C_0001);
    let (n, o, i, g, t) = (sh.n, sh.o, sh.i, sh.g, sh.t);
    match case.op {
        Op::CaMerge | Op::Curvature => {
            let d = data::<f32>(&sh);
            let base = up::<T>(s, &d.base)?;
            let experts = up::<T>(s, &d.experts)?;
            let scores = up::<T>(s, &d.scores)?;
            let [fa, fb, fc, fd] = &d.factors;
            let (fa, fb, fc, fd) = (
                up::<T>(s, fa)?,
                up::<T>(s, fb)?,
                up::<T>(s, fc)?,
                up::<T>(s, fd)?,
            );
            let ca = case.op == Op::CaMerge;
            let gshape: &[usize] = if ca { &[g, o, i] } else { &[n, o, i] };
            let grad = up::<T>(s, &rng.tensor(gshape, 1.0))?;
            Ok(Box::new(move |s| {
                let curv = cu::CudaCurvature::Kronecker(cu::CudaFactors {
                    a: &fa,
                    b: &fb,
                    c: &fc,
                    d: &fd,
                });
                if !ca {
                    let u = cu::curvature(s, &base, &experts, &curv)?;
                    if bwd {
                        drop(u);
                        keep(cu::curvature_backward(s, &base, &experts, &curv, &grad))?;
                    }
                    return Ok(());
                }
                let x = cu::CudaCaMergeInputs {
                    base: &base,
                    experts: &experts,
                    scores: &scores,
                    curvature: curv,
                    base_bias: None,
                    expert_bias: None,
                };
                let opts = MergeOptions::default();
                let out = cu::ca_merge(s, &x, &opts)?;
                if bwd {
                    drop(out);
                    keep(cu::ca_merge_backward(s, &x, &opts, &grad, None, None))
                } else {
                    keep(Ok(out))
                }
            }))
        }
        Op::Merge => {
            let d = data::<f32>(&sh);
            let base = up::<T>(s, &d.base)?;
            let scores = up::<T>(s, &d.scores)?;
            let curved = up::<T>(s, &rng.tensor(&[n, o, i], 0.01))?;
            let grad = up::<T>(s, &rng.tensor(&[g, o, i], 1.0))?;
            Ok(Box::new(move |s| {
                let x = cu::CudaMergeInputs {
                    base: &base,
                    curved: &curved,
                    scores: &scores,
                    mask: None,
                    base_bias: None,
                    expert_bias: None,
                };
                let out = cu::merge(s, &x, 1.0, &Dare::None)?;
                if bwd {
                    drop(out);
                    keep(cu::merge_backward(s, &x, 1.0, &Dare::None, &grad, None))
                } else {
                    keep(Ok(out))
                }
            }))
        }
        Op::MergedLinear => {
            let x = up::<T>(s, &rng.tensor(&[g, t, i], 1.0))?;
            let merged = up::<T>(s, &rng.tensor(&[g, o, i], 0.05))?;
            let grad = up::<T>(s, &rng.tensor(&[g, t, o], 1.0))?;
            Ok(Box::new(move |s| {
                let y = cu::merged_linear(s, &x, &merged, None)?;
                if bwd {
                    drop(y);
                    keep(cu::merged_linear_backward(s, &x, &merged, None, &grad))
                } else {
                    keep(Ok(y))
                }
            }))
        }
        op => Err(Error::option(
            "op",
            format!(
                "the GPU benchmark covers ca_merge, curvature, merge, merged_linear; not `{}`",
                op.name()
            ),
        )),
    }
}

/// Times `case` on GPU `ordinal`: `warmup` untimed iterations (module loading, pool growth),
/// then `iters` iterations back to back between CUDA events; peak = the default pool's
/// USED_MEM_HIGH above what was in use before (None where the pool query fails).
pub fn measure_case(case: &Case, ordinal: usize, warmup: usize, iters: usize) -> Result<Measured> {
    if case.imp != Impl::Camex {
        return Err(Error::option(
            "peer",
            "the GPU peer is scripts/torch_baseline.py",
        ));
    }
    let s = cu::new_stream(ordinal)?;
    let mut run = prepare(case, &s)?;
    let s2 = s.clone();
    measure_on(&s, warmup, iters, &mut move || run(&s2))
}

/// The peer (the official unfused formulation from candle ops, [`super::peer`]) on GPU
/// `ordinal` through candle's CUDA backend, timed like [`measure_case`] with CUDA events on
/// candle's stream; the peak is the same memory pool's high-water mark (candle allocates from
/// it, stream-ordered). Not yet run on a GPU.
#[cfg(feature = "peer")]
pub fn measure_peer(case: &Case, ordinal: usize, warmup: usize, iters: usize) -> Result<Measured> {
    cu::context(ordinal)?; // errors, without panicking, where there is no driver or device
    let dev = candle_core::Device::new_cuda(ordinal).map_err(err)?;
    let candle_core::Device::Cuda(cd) = &dev else {
        return Err(Error::cuda("candle did not open a CUDA device"));
    };
    let s = cd.cuda_stream();
    let peer_case = Case {
        imp: Impl::Candle,
        ..*case
    };
    let mut run = super::peer::prepare_on(&peer_case, &dev)?;
    measure_on(&s, warmup, iters, &mut run)
}

/// The candle peer of `case` on GPU 0 and its roofline line (`impl=candle-unfused`), or a
/// `#` line saying why it did not run (built without `peer`, or an error).
pub fn peer_on_gpu(
    case: &Case,
    machine: &Machine,
    warmup: usize,
    iters: usize,
) -> (Option<Measured>, String) {
    #[cfg(feature = "peer")]
    {
        let peer_case = Case {
            imp: Impl::Candle,
            ..*case
        };
        match measure_peer(case, 0, warmup, iters) {
            Ok(m) => (Some(m), line(&peer_case, &m, machine, None)),
            Err(e) => (None, format!("# peer {}: {e}", peer_case.id())),
        }
    }
    #[cfg(not(feature = "peer"))]
    {
        let _ = (machine, warmup, iters);
        (
            None,
            format!(
                "# peer {}: not built (--features cuda,peer; or scripts/torch_baseline.py)",
                case.id()
            ),
        )
    }
}

/// `warmup` untimed iterations of `run`, then `iters` timed ones between CUDA events on `s`,
/// with the peak of the device's default memory pool above what was in use before.
fn measure_on(
    s: &Arc<CudaStream>,
    warmup: usize,
    iters: usize,
    run: &mut dyn FnMut() -> Result<()>,
) -> Result<Measured> {
    for _ in 0..warmup {
        run()?;
    }
    s.synchronize().map_err(err)?;
    let pool = pool(s);
    let used = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;
    let high = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    let base = pool.and_then(|p| {
        let now = pool_attr(p, used, None)?;
        pool_attr(p, high, Some(0))?; // resets the high-water mark to the current use
        Some(now)
    });
    let times = event_times_of(run, s, iters)?;
    let peak = match (pool, base) {
        (Some(p), Some(b)) => pool_attr(p, high, None).map(|h| h.saturating_sub(b) as usize),
        _ => None,
    };
    let min_s = times.iter().cloned().fold(f64::INFINITY, f64::min);
    Ok(Measured {
        median_s: median(times),
        min_s,
        iters: iters.max(1),
        peak_bytes: peak,
    })
}

/// Seconds of each of `iters` iterations, each between two CUDA events on `s`.
pub fn event_times(run: &mut GpuRun, s: &Arc<CudaStream>, iters: usize) -> Result<Vec<f64>> {
    event_times_of(&mut || run(s), s, iters)
}

/// The iterations run back to back, each between the event before it and the one after (one
/// chain, one synchronisation at the end), so that an iteration's host work (output allocation,
/// the memory check, the launches) overlaps the GPU's work on the one before, as a caller's loop
/// would; one untimed iteration goes first, so that the first timed one starts on a busy stream
/// too. Timing each iteration from an idle stream instead counted that host work as GPU time.
/// Where an iteration's host work takes longer than its GPU work, the GPU waits between events
/// and the times include the difference, as the caller's loop would see it.
fn event_times_of(
    run: &mut dyn FnMut() -> Result<()>,
    s: &Arc<CudaStream>,
    iters: usize,
) -> Result<Vec<f64>> {
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut events = Vec::with_capacity(iters.clamp(1, 1 << 16) + 1);
    run()?;
    events.push(s.record_event(timing).map_err(err)?);
    for _ in 0..iters.max(1) {
        run()?;
        events.push(s.record_event(timing).map_err(err)?);
    }
    s.synchronize().map_err(err)?;
    events
        .windows(2)
        .map(|w| Ok(w[0].elapsed_ms(&w[1]).map_err(err)? as f64 / 1e3))
        .collect()
}

/// Uploads the inputs of `case` (a `camex` case on CUDA) and returns its iteration.
pub fn prepare(case: &Case, s: &Arc<CudaStream>) -> Result<GpuRun> {
    match case.dtype {
        DType::F32 => prepare_t::<f32>(case, s),
        DType::F16 => prepare_t::<half::f16>(case, s),
        DType::BF16 => prepare_t::<half::bf16>(case, s),
        DType::F64 => Err(Error::DType {
            tensor: "bench inputs".into(),
            expected: "f32, f16 or bf16 on CUDA".into(),
            actual: "f64".into(),
        }),
    }
}
