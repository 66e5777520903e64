//! GPU benchmarks (feature `cuda`): the fused CA-merge, curvature, merge and merged linear, forward
//! and forward+backward, f32 and bf16, at the shapes of SPEC section 8, timed with CUDA events
//! (criterion `iter_custom`; warm-up, module loading and uploads outside the timed region), then
//! one roofline line per case against the H200 datasheet floor (see `benches/common/gpu.rs`).
//!
//! Ran on an H200 once (2026-11-28, scalar kernels; BENCHMARKS.md). Build it with
//! `scripts/build-gpu-bins.sh` (as `gpu-bin/bench-cuda`); `scripts/gpu-check.sh` runs it. The PyTorch peer is
//! `scripts/torch_baseline.py`; built with `--features cuda,peer`, the candle peer runs on the GPU
//! next to each case (`speedup_vs_peer=`, `mem_vs_peer=`; not yet run on a GPU; `CAMEX_BENCH_PEER=0`
//! skips it). `CAMEX_BENCH_SHAPES` picks shapes (default t5-base);
//! `CAMEX_BENCH_OPS` and `CAMEX_BENCH_DTYPES` narrow the ops and dtypes.

#[path = "common/mod.rs"]
mod bench;

use bench::{gpu, line, Case, Device, Impl, Op, Pass, ShapeName};
use camex::DType;
use criterion::{Criterion, SamplingMode};
use std::time::Duration;

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let shapes: Vec<ShapeName> = match std::env::var("CAMEX_BENCH_SHAPES") {
        Ok(v) => v
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.trim()
                    .parse::<ShapeName>()
                    .unwrap_or_else(|e| panic!("CAMEX_BENCH_SHAPES: {e}"))
            })
            .collect(),
        Err(_) => vec![ShapeName::T5Base],
    };
    // CAMEX_BENCH_OPS / CAMEX_BENCH_DTYPES: comma lists that narrow the cases (default: all).
    let pick = |var: &str, name: &str| {
        std::env::var(var).map_or(true, |v| v.split(',').any(|x| x.trim() == name))
    };
    let stream = match camex::cuda::new_stream(0) {
        Ok(s) => s,
        Err(e) => {
            println!("# cuda benchmarks skipped: {e}");
            return;
        }
    };
    // Every case, then two passes over them: the scalar default (with the peer next to each), then
    // the opt-in tensor cores (not yet run on a GPU) where they serve. A fault there can spoil the
    // context for everything after it, so nothing of the first pass waits behind the second; a
    // case that fails is reported and the rest go on.
    let mut cases = Vec::new();
    for shape in shapes {
        for dtype in [DType::BF16, DType::F32] {
            if !pick("CAMEX_BENCH_DTYPES", dtype.name()) {
                continue;
            }
            for op in [Op::CaMerge, Op::Curvature, Op::Merge, Op::MergedLinear] {
                if !pick("CAMEX_BENCH_OPS", op.name()) {
                    continue;
                }
                for pass in [Pass::Fwd, Pass::FwdBwd] {
                    cases.push(Case {
                        op,
                        shape,
                        imp: Impl::Camex,
                        device: Device::Cuda,
                        dtype,
                        pass,
                    });
                }
            }
        }
    }
    let mut lines = Vec::new();
    let mut peers = Vec::with_capacity(cases.len());
    for case in &cases {
        let machine = gpu::h200_datasheet(case.dtype);
        // The peer (the official unfused formulation from candle ops, on candle's CUDA backend;
        // feature `peer`), once per case: CAMEX_BENCH_PEER=0 skips it.
        let peer = if std::env::var("CAMEX_BENCH_PEER").is_ok_and(|v| v == "0") {
            None
        } else {
            let (pm, pl) = gpu::peer_on_gpu(case, &machine, 2, 5);
            println!("{pl}");
            lines.push(pl);
            pm
        };
        lines.push(bench_case(&mut c, case, false, &stream, peer.as_ref()));
        peers.push(peer);
    }
    for (case, peer) in cases.iter().zip(&peers) {
        if gpu::tensor_cores_serve(case.op, case.dtype) {
            lines.push(bench_case(&mut c, case, true, &stream, peer.as_ref()));
        }
    }
    println!("\n# roofline summary (floor: H200 datasheet)");
    for l in &lines {
        println!("{l}");
    }
    c.final_summary();
}

/// One case on the scalar path or the tensor cores (`tc`): criterion's samples, then its roofline
/// line (printed, and returned for the summary), or a `#` line saying why it failed.
fn bench_case(
    c: &mut Criterion,
    case: &Case,
    tc: bool,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    peer: Option<&bench::Measured>,
) -> String {
    let id = if tc {
        format!("{}/tensor-cores", case.id())
    } else {
        case.id()
    };
    camex::cuda::set_tensor_cores(Some(tc));
    let result = (|| -> camex::Result<String> {
        let mut run = gpu::prepare(case, stream)?;
        // Warm-up: module loading, memory-pool growth; then one timed iteration, whose
        // synchronisation brings out a kernel's asynchronous fault here rather than inside
        // criterion's loop.
        for _ in 0..3 {
            run(stream)?;
        }
        gpu::event_times(&mut run, stream, 1)?;
        let mut failed = None;
        let mut g = c.benchmark_group(format!("cuda/{}", case.op.name()));
        g.sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_secs(2));
        g.bench_function(&id, |b| {
            // After a failure (a spoilt context fails every call at once) nothing more runs;
            // criterion's remaining samples return at once and the case is reported failed.
            b.iter_custom(|iters| {
                if failed.is_some() {
                    return Duration::from_nanos(1);
                }
                match gpu::event_times(&mut run, stream, iters as usize) {
                    Ok(t) => Duration::from_secs_f64(t.iter().sum()),
                    Err(e) => {
                        failed = Some(e);
                        Duration::from_nanos(1)
                    }
                }
            })
        });
        g.finish();
        if let Some(e) = failed {
            return Err(e);
        }
        drop(run);
        let m = gpu::measure_case(case, 0, 3, 10)?;
        let l = line(case, &m, &gpu::h200_datasheet(case.dtype), peer);
        Ok(if tc { gpu::tensor_core_line(&l) } else { l })
    })();
    camex::cuda::set_tensor_cores(None);
    let l = result.unwrap_or_else(|e| format!("# {}/{}: failed: {e}", case.op.name(), id));
    println!("{l}");
    l
}
