//! `camex bench` (feature `cli`): its arguments (clap) and the loop that prints one roofline line
//! per case.

use super::*;
use std::str::FromStr;

/// What `camex bench --help` adds after the options: the output lines.
pub const AFTER_HELP: &str = concat!(
    "Prints a machine line (measured GEMM rate and copy bandwidth), then one line per case:\n",
    "op= shape= device= dtype= pass= median_ms= gflops= floor_ms= peak_mem_mb=, then\n",
    "impl=camex|camex-recompute|candle-unfused|xla-official gbps= x_floor= [speedup_vs_peer=\n",
    "mem_vs_peer=] [speedup_vs_xla=]. The peer (the official unfused formulation in candle) runs when\n",
    "built with --features peer. ca_merge's forward+backward on the CPU is timed twice: `camex` keeps\n",
    "the forward's U for the backward (as autodiff keeps intermediates), `camex-recompute` does not.",
);

/// `--pass`: one pass, or `all` (forward, then forward+backward).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passes(pub Vec<Pass>);

impl FromStr for Passes {
    type Err = Error;
    fn from_str(s: &str) -> Result<Passes> {
        match s {
            "all" => Ok(Passes(vec![Pass::Fwd, Pass::FwdBwd])),
            _ => s
                .parse::<Pass>()
                .map(|p| Passes(vec![p]))
                .map_err(|_| Error::option("pass", format!("expected fwd|fwd+bwd|all, got `{s}`"))),
        }
    }
}

/// Options of `camex bench`: time every operator at the shapes of SPEC section 8.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct BenchArgs {
    /// One operator family (default: all):
    /// ca_merge|curvature|merge|ties_mask|merged_linear|dynamic_merge|segment_scores
    #[arg(long, value_name = "OP")]
    pub op: Option<Op>,
    /// The setting of SPEC section 8: t5-small|t5-base|gpt2|minilm
    #[arg(long, default_value = "t5-small", value_name = "SHAPE")]
    pub shape: ShapeName,
    /// Where to run: cpu|cuda
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: Device,
    /// Storage dtype: f32|f64|f16|bf16 (default f32 on cpu, bf16 on cuda)
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<DType>,
    /// fwd|fwd+bwd|all
    #[arg(long = "pass", default_value = "all", value_name = "PASS")]
    pub passes: Passes,
    /// Timed iterations per case (at least 1)
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub iters: usize,
    /// Untimed iterations before them
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub warmup: usize,
    /// Skip the peer (the official unfused formulation in candle, feature `peer`)
    #[arg(long)]
    pub no_peer: bool,
    /// Also time the official formulation under JAX/XLA on the CPU (scripts/jax_baseline.py, f32,
    /// ca_merge|curvature|merge; its first run installs jax into .venv-jax), one process per case,
    /// with this run's floor
    #[arg(long)]
    pub xla: bool,
}

impl BenchArgs {
    /// The operators to time, in the order of [`Op::ALL`].
    pub fn ops(&self) -> Vec<Op> {
        self.op.map_or_else(|| Op::ALL.to_vec(), |o| vec![o])
    }
    /// The storage dtype: as given, else bf16 on cuda and f32 on the CPU.
    pub fn dtype(&self) -> DType {
        self.dtype.unwrap_or(match self.device {
            Device::Cuda => DType::BF16,
            Device::Cpu => DType::F32,
        })
    }
    pub fn iters(&self) -> usize {
        self.iters.max(1)
    }
    /// Whether the candle peer runs: built with `peer` and not `--no-peer`.
    pub fn peer(&self) -> bool {
        cfg!(feature = "peer") && !self.no_peer
    }
}

/// Runs `camex bench`: prints the machine line, then one line per case to `out`.
pub fn run_cli(a: &BenchArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let io = |e: std::io::Error| Error::io_source(e.to_string(), e);
    if a.device == Device::Cuda {
        #[cfg(feature = "cuda")]
        return run_cli_cuda(a, out);
        #[cfg(not(feature = "cuda"))]
        return Err(Error::cuda(
            "camex bench --device cuda needs a build with --features cuda",
        ));
    }
    if !matches!(a.dtype(), DType::F32 | DType::F64) {
        return Err(Error::DType {
            tensor: "bench inputs".into(),
            expected: "f32 or f64 on the CPU (f16/bf16 are storage types of the CUDA path)".into(),
            actual: a.dtype().name().into(),
        });
    }
    let machine = match a.dtype() {
        DType::F64 => measure_cpu::<f64>(),
        _ => measure_cpu::<f32>(),
    };
    writeln!(out, "{}", machine_line(&machine, a.dtype())).map_err(io)?;
    if !a.peer() {
        writeln!(
            out,
            "# peer (candle, unfused) not run: {}",
            if cfg!(feature = "peer") {
                "--no-peer"
            } else {
                "built without --features peer"
            }
        )
        .map_err(io)?;
    }
    // One case timed; its inputs and outputs are freed before the next case is prepared.
    let timed = |c: &Case| {
        let mut run = prepare(c)?;
        measure(&mut run, a.warmup, a.iters())
    };
    for &op in &a.ops() {
        for &pass in &a.passes.0 {
            if pass == Pass::FwdBwd && !op.has_backward() {
                continue;
            }
            let case = Case {
                op,
                shape: a.shape,
                imp: Impl::Camex,
                device: a.device,
                dtype: a.dtype(),
                pass,
            };
            let peer_m = if a.peer() {
                let pc = Case {
                    imp: Impl::Candle,
                    ..case
                };
                let m = timed(&pc)?;
                writeln!(out, "{}", line(&pc, &m, &machine, None)).map_err(io)?;
                Some(m)
            } else {
                None
            };
            let xla_ms = if a.xla {
                let (l, ms) = xla_peer(&case, &machine, a.iters());
                writeln!(out, "{l}").map_err(io)?;
                ms
            } else {
                None
            };
            let m = timed(&case)?;
            let mut l = line(&case, &m, &machine, peer_m.as_ref());
            if let Some(x) = xla_ms {
                l += &format!(" speedup_vs_xla={:.2}", x / (m.median_s * 1e3));
            }
            writeln!(out, "{l}").map_err(io)?;
            // The ca_merge backward that keeps nothing between the passes, beside the one above.
            if op == Op::CaMerge && pass == Pass::FwdBwd && a.device == Device::Cpu {
                let rc = Case {
                    imp: Impl::CamexRecompute,
                    ..case
                };
                let m = timed(&rc)?;
                writeln!(out, "{}", line(&rc, &m, &machine, peer_m.as_ref())).map_err(io)?;
            }
        }
    }
    Ok(())
}

/// The XLA peer of one case: `scripts/jax_baseline.py` in its own process (so that XLA's memory and
/// threads stay out of this one's counters), given this run's GEMM rate and bandwidth so that its
/// line has the same floor. Returns its line (or a `#` comment saying why there is none) and its
/// median in ms. `CAMEX_JAX_SCRIPT` and `CAMEX_PYTHON` override the script and the interpreter.
fn xla_peer(case: &Case, machine: &Machine, iters: usize) -> (String, Option<f64>) {
    if !matches!(case.op, Op::CaMerge | Op::Curvature | Op::Merge) || case.dtype != DType::F32 {
        return (
            format!(
                "# xla peer: not run for {} {} (the script times ca_merge, curvature and merge in f32)",
                case.op.name(),
                case.dtype.name()
            ),
            None,
        );
    }
    let script = std::env::var("CAMEX_JAX_SCRIPT").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/jax_baseline.py").to_string()
    });
    let python = std::env::var("CAMEX_PYTHON").unwrap_or_else(|_| "python3".into());
    let run = std::process::Command::new(&python)
        .arg(&script)
        .args(["--shape", case.shape.name(), "--op", case.op.name()])
        .args(["--pass", case.pass.name(), "--iters", &iters.to_string()])
        .arg(format!("--gemm-gflops={}", machine.gemm_flops / 1e9))
        .arg(format!("--copy-gbps={}", machine.copy_bytes_per_s / 1e9))
        .stderr(std::process::Stdio::inherit())
        .output();
    let stdout = match run {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            return (
                format!("# xla peer: {script} exited with {}", o.status),
                None,
            )
        }
        Err(e) => {
            return (
                format!("# xla peer: could not run {python} {script}: {e}"),
                None,
            )
        }
    };
    // One line per form of the gating (`impl=xla-official`, `impl=xla-einsum`); the speed-up is
    // taken against the faster, the XLA a user would get at best.
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("op=")).collect();
    if lines.is_empty() {
        return (format!("# xla peer: no case line from {script}"), None);
    }
    let ms = lines
        .iter()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("median_ms="))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .min_by(f64::total_cmp);
    (lines.join("\n"), ms)
}

/// `camex bench --device cuda`: the fused ops and, when built with `peer`, the candle peer on the
/// GPU next to each (`--no-peer` skips it; the PyTorch peer is `scripts/torch_baseline.py`).
#[cfg(feature = "cuda")]
fn run_cli_cuda(a: &BenchArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let io = |e: std::io::Error| Error::io_source(e.to_string(), e);
    let machine = gpu::h200_datasheet(a.dtype());
    writeln!(
        out,
        "machine device=cuda floor=h200-datasheet gemm_{}_gflops={:.0} copy_gbps={:.0}",
        a.dtype().name(),
        machine.gemm_flops / 1e9,
        machine.copy_bytes_per_s / 1e9
    )
    .map_err(io)?;
    for &op in &a.ops() {
        if !matches!(
            op,
            Op::CaMerge | Op::Curvature | Op::Merge | Op::MergedLinear
        ) {
            continue;
        }
        for &pass in &a.passes.0 {
            let case = Case {
                op,
                shape: a.shape,
                imp: Impl::Camex,
                device: Device::Cuda,
                dtype: a.dtype(),
                pass,
            };
            let peer = if a.peer() {
                let (pm, pl) = gpu::peer_on_gpu(&case, &machine, a.warmup.max(1), a.iters());
                writeln!(out, "{pl}").map_err(io)?;
                pm
            } else {
                None
            };
            let m = gpu::measure_case(&case, 0, a.warmup.max(1), a.iters())?;
            let mut l = line(&case, &m, &machine, peer.as_ref());
            if gpu::tensor_cores_serve(op, a.dtype()) && camex::cuda::tensor_cores() {
                l = gpu::tensor_core_line(&l);
            }
            writeln!(out, "{l}").map_err(io)?;
        }
    }
    Ok(())
}
