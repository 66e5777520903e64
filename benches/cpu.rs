//! CPU benchmarks: every operator family, forward and forward+backward, at the shapes of SPEC
//! section 8, next to the peer (the official unfused formulation composed from candle ops, built
//! with `--features peer`), with a roofline line per case (see `benches/common` and BENCHMARKS.md).
//!
//! `cargo bench --bench cpu --features peer` runs the T5-small set (a few minutes on 2 cores).
//! `CAMEX_BENCH_SHAPES=t5-small,t5-base,gpt2,minilm` picks the shapes; `CAMEX_BENCH_PEER=0` skips
//! the peer. Criterion filters (`-- ca_merge`) work as usual. Without `--bench` (as under
//! `cargo test --all-targets`) every case runs once at the smallest shape and nothing is timed.

#[path = "common/mod.rs"]
mod bench;

use bench::{
    line, machine_line, measure_cpu, peak_since, peak_start, Case, CountingAlloc, Device, Impl,
    Measured, Op, Pass, ShapeName,
};
use camex::DType;
use criterion::{Criterion, SamplingMode};
use std::cell::RefCell;
use std::time::{Duration, Instant};

// Peak memory: the high-water mark of live heap bytes (candle's CPU storage is on the heap too).
#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn shapes() -> Vec<ShapeName> {
    match std::env::var("CAMEX_BENCH_SHAPES") {
        Ok(v) => v
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.trim()
                    .parse::<ShapeName>()
                    .unwrap_or_else(|e| panic!("CAMEX_BENCH_SHAPES: {e}"))
            })
            .collect(),
        Err(_) => vec![ShapeName::T5Small],
    }
}

/// Runs one case under criterion and returns the per-iteration times it saw and the peak memory.
fn run_case(c: &mut Criterion, case: &Case) -> Option<Measured> {
    if !criterion_filter_matches(case) {
        return None;
    }
    let mut run = match bench::prepare(case) {
        Ok(r) => r,
        Err(e) => {
            println!("# skipped {} {}: {e}", case.op.name(), case.id());
            return None;
        }
    };
    // Peak memory over one untimed run (the probe, which is also the first warm-up): the
    // criterion loop below keeps its own samples on the heap, which must not count.
    let base = peak_start();
    let t0 = Instant::now();
    run().expect("benchmark case failed");
    let probe = t0.elapsed().as_secs_f64();
    let peak_bytes = peak_since(base);
    // Cases of seconds per iteration (the peer's fwd+bwd) are timed directly, 3 iterations,
    // instead of criterion's 10-sample minimum.
    if probe > SLOW_S {
        let m = bench::measure(&mut run, 0, 3).expect("benchmark case failed");
        println!(
            "{}/{}: timed directly (3 iterations, probe {probe:.2} s)",
            case.op.name(),
            case.id()
        );
        return Some(Measured { peak_bytes, ..m });
    }
    // One entry per criterion sample: the mean time of its iterations.
    let times = RefCell::new(Vec::<f64>::new());
    {
        let mut g = c.benchmark_group(case.op.name());
        // One iteration takes up to seconds: few flat samples, short windows.
        g.sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        g.bench_function(case.id(), |b| {
            b.iter_custom(|iters| {
                let t0 = Instant::now();
                for _ in 0..iters {
                    run().expect("benchmark case failed");
                }
                let total = t0.elapsed();
                times
                    .borrow_mut()
                    .push(total.as_secs_f64() / iters.max(1) as f64);
                total
            })
        });
        g.finish();
    }
    let mut t = times.into_inner();
    if t.is_empty() {
        return None; // filtered out
    }
    t.sort_by(|a, b| a.total_cmp(b));
    let k = t.len();
    let median_s = if k % 2 == 1 {
        t[k / 2]
    } else {
        0.5 * (t[k / 2 - 1] + t[k / 2])
    };
    Some(Measured {
        median_s,
        min_s: t[0],
        iters: k,
        peak_bytes,
    })
}

/// Iterations slower than this are timed directly.
const SLOW_S: f64 = 2.0;

/// Criterion's positional filter (a regex there; here a substring, backslash escapes dropped),
/// applied to `op/id`, so that filtered-out cases are not even prepared.
fn criterion_filter_matches(case: &Case) -> bool {
    const VALUED: [&str; 14] = [
        "--save-baseline",
        "--baseline",
        "--load-baseline",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--output-format",
        "--color",
        "--profile-time",
        "--plotting-backend",
    ];
    let full = format!("{}/{}", case.op.name(), case.id());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut filters = Vec::new();
    let mut k = 0;
    while k < args.len() {
        let a = &args[k];
        if VALUED.contains(&a.as_str()) {
            k += 2;
            continue;
        }
        if !a.starts_with('-') {
            filters.push(a.replace('\\', ""));
        }
        k += 1;
    }
    filters.is_empty() || filters.iter().any(|f| full.contains(f.as_str()))
}

/// `cargo test --all-targets` runs this binary without `--bench`: then every camex case runs once
/// at the smallest shape (MiniLM), as a smoke test, and nothing is timed.
fn smoke_test() {
    for op in Op::ALL {
        for pass in [Pass::Fwd, Pass::FwdBwd] {
            if pass == Pass::FwdBwd && !op.has_backward() {
                continue;
            }
            let case = Case {
                op,
                shape: ShapeName::MiniLm,
                imp: Impl::Camex,
                device: Device::Cpu,
                dtype: DType::F32,
                pass,
            };
            let mut run = bench::prepare(&case).expect("prepare");
            run().expect("benchmark case failed");
            println!("smoke {} {}: ok", op.name(), case.id());
        }
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        smoke_test();
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    let machine = measure_cpu::<f32>();
    let with_peer =
        cfg!(feature = "peer") && std::env::var("CAMEX_BENCH_PEER").as_deref() != Ok("0");
    let mut lines = vec![machine_line(&machine, DType::F32)];
    println!("{}", lines[0]);
    if !with_peer {
        println!("# peer not run (build with --features peer, and leave CAMEX_BENCH_PEER unset)");
    }
    for shape in shapes() {
        for op in Op::ALL {
            for pass in [Pass::Fwd, Pass::FwdBwd] {
                if pass == Pass::FwdBwd && !op.has_backward() {
                    continue;
                }
                let case = Case {
                    op,
                    shape,
                    imp: Impl::Camex,
                    device: Device::Cpu,
                    dtype: DType::F32,
                    pass,
                };
                let peer_case = Case {
                    imp: Impl::Candle,
                    ..case
                };
                let peer = if with_peer {
                    run_case(&mut c, &peer_case)
                } else {
                    None
                };
                if let Some(p) = &peer {
                    let l = line(&peer_case, p, &machine, None);
                    println!("{l}");
                    lines.push(l);
                }
                if let Some(m) = run_case(&mut c, &case) {
                    let l = line(&case, &m, &machine, peer.as_ref());
                    println!("{l}");
                    lines.push(l);
                }
            }
        }
    }
    println!("\n# roofline summary");
    for l in &lines {
        println!("{l}");
    }
    c.final_summary();
}
