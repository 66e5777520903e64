//! Deterministic cost counts of the CUDA kernels and the H200 model that turns them into a
//! predicted time, without a GPU (BENCHMARKS.md, "Cost model"). Run it through
//! `scripts/cost-model.sh`, which builds the kernels' CPU emulation (`CAMEX_KERNEL_EMU=1`) and
//! finds ptxas' register and shared-memory counts.
//!
//! Every op and pass runs once through the real launchers (`camex::ffi`) on host buffers, with the
//! emulation counting what each launch executes (`camex_emu_counting`, kernels/emu_runtime.cpp):
//! mma FLOP, shared-memory wavefronts, global sectors and the distinct bytes of each launch. The
//! model, per launch:
//!
//! ```text
//! t = max(mma / (620 TFLOP/s * u), wavefronts / (132 SMs * 1.98 GHz * u),
//!         dram bytes / 4.0 TB/s, global bytes / 6 TB/s) + 2 us
//! ```
//!
//! with `u` the fraction of the 132 SMs the grid keeps busy over its waves (blocks per SM from
//! ptxas' registers and the launch's shared memory). It knows nothing of scalar FMA throughput,
//! latency or overlap between launches: BENCHMARKS.md calibrates it against the H200 run.
#[path = "../benches/common/mod.rs"]
mod bench;

use bench::{cost, Op, Pass, ShapeName};
use camex::ffi;
use clap::Parser;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The H200 model's constants (BENCHMARKS.md, "Cost model", says where each comes from).
mod h200 {
    pub const SMS: f64 = 132.0;
    pub const CLOCK_HZ: f64 = 1.98e9;
    /// mma.sync m16n8k16 bf16 with f32 accumulation, sustained (wgmma's dense peak is 989).
    pub const MMA_FLOPS: f64 = 620e12;
    /// Compulsory traffic: HBM3e at a sustainable fraction of its 4.8 TB/s.
    pub const DRAM_BPS: f64 = 4.0e12;
    /// Sectors between L2 and the SMs.
    pub const L2_BPS: f64 = 6.0e12;
    pub const LAUNCH_S: f64 = 2e-6;
    pub const SMEM_PER_SM: i64 = 228 * 1024;
    pub const SMEM_RESERVED_PER_BLOCK: i64 = 1024;
    pub const REGS_PER_SM: i64 = 65536;
    pub const THREADS_PER_SM: i64 = 2048;
    pub const BLOCKS_PER_SM: i64 = 32;
    /// The datasheet rates SPEC section 8's floor divides by (as `camex bench --device cuda`).
    pub const PEAK_BF16: f64 = 989e12;
    pub const PEAK_F32: f64 = 67e12;
    pub const HBM_BPS: f64 = 4.8e12;
}

#[derive(Parser, Debug)]
#[command(
    about = "Counts what the CUDA kernels execute (CPU emulation) and predicts their H200 time"
)]
struct Args {
    /// SPEC section 8 setting (the `wi` layer).
    #[arg(long, default_value = "t5-base")]
    shape: String,
    /// Storage dtype: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Ops, comma-separated: ca_merge, curvature, merge, merged_linear.
    #[arg(long, default_value = "ca_merge,curvature,merge,merged_linear")]
    ops: String,
    /// Scale the setting down (O and I divided by this, G and T too): the CI gate's small shape.
    #[arg(long, default_value_t = 1)]
    shrink: usize,
    /// ptxas -v log of the sm_90 build (scripts/check-ptxas.sh writes target/ptxas-sm_90.log).
    #[arg(long)]
    ptxas: Option<String>,
    /// Count every block instead of sampling the first, one interior and the last per grid axis.
    #[arg(long)]
    exact: bool,
    /// ca_merge's forward+backward only keeping U: no `-recompute` run. The CI gate's setting (its
    /// kernels all run in the other passes; the run cost a minute of CI).
    #[arg(long)]
    no_recompute: bool,
    /// Compare the counts with this baseline file; exit 1 when one grows by more than 5%.
    #[arg(long)]
    check: Option<String>,
    /// Write the counts to this baseline file.
    #[arg(long)]
    write: Option<String>,
}

/// A zeroed, 256-byte aligned host buffer standing for a device allocation (cudaMalloc's alignment).
struct Buf {
    ptr: *mut u8,
    layout: Layout,
}

impl Buf {
    fn new(bytes: usize) -> Buf {
        let layout = Layout::from_size_align(bytes.max(1), 256).expect("layout");
        // SAFETY: non-zero size; freed in Drop with the same layout.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation of {bytes} bytes failed");
        // SAFETY: records the range with the emulation's counters (distinct bytes per allocation).
        unsafe { ffi::camex_emu_register(ptr as u64, layout.size() as i64, 1) };
        Buf { ptr, layout }
    }
    fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; first forgotten by the counters.
        unsafe {
            ffi::camex_emu_register(self.ptr as u64, 0, 0);
            dealloc(self.ptr, self.layout)
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dt {
    F32,
    F16,
    Bf16,
}

impl Dt {
    fn parse(s: &str) -> Dt {
        match s {
            "f32" => Dt::F32,
            "f16" => Dt::F16,
            "bf16" => Dt::Bf16,
            _ => usage(&format!("--dtype: expected bf16|f16|f32, got `{s}`")),
        }
    }
    fn code(self) -> i32 {
        match self {
            Dt::F32 => ffi::camex_dtype_CAMEX_F32 as i32,
            Dt::F16 => ffi::camex_dtype_CAMEX_F16 as i32,
            Dt::Bf16 => ffi::camex_dtype_CAMEX_BF16 as i32,
        }
    }
    fn size(self) -> usize {
        if self == Dt::F32 {
            4
        } else {
            2
        }
    }
    /// ptxas' mangled template argument for the storage type.
    fn mangled(self) -> &'static str {
        match self {
            Dt::F32 => "Lf",
            Dt::F16 => "6__half",
            Dt::Bf16 => "13__nv_bfloat16",
        }
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("cost_model: {msg}");
    std::process::exit(2)
}

#[derive(Clone, Copy)]
struct Dims {
    o: usize,
    i: usize,
    n: usize,
    r: usize,
    g: usize,
    t: usize,
    o1: usize,
    o2: usize,
    i1: usize,
    i2: usize,
}

/// The sizes of one launch's kernel as ptxas reports them.
#[derive(Clone, Copy, Default)]
struct Resources {
    regs: i64,
    static_smem: i64,
}

/// ptxas -v: "Compiling entry function 'NAME' for 'sm_90'" then "Used R registers, ... S bytes smem".
fn parse_ptxas(text: &str) -> Vec<(String, Resources)> {
    let mut out = Vec::new();
    let mut name: Option<String> = None;
    for line in text.lines() {
        if let Some(k) = line.find("Compiling entry function '") {
            let rest = &line[k + 26..];
            name = rest.find('\'').map(|e| rest[..e].to_string());
        } else if line.contains("Used ") && line.contains("registers") {
            if let Some(n) = name.take() {
                let words: Vec<&str> = line.split_whitespace().collect();
                let mut res = Resources::default();
                for w in 0..words.len() {
                    if words[w] == "Used" {
                        res.regs = words.get(w + 1).and_then(|x| x.parse().ok()).unwrap_or(0);
                    }
                    if words[w].starts_with("smem") && w >= 2 && words[w - 1] == "bytes" {
                        res.static_smem = words[w - 2].parse().unwrap_or(0);
                    }
                }
                out.push((n, res));
            }
        }
    }
    out
}

/// The ptxas entry of a launch's kernel expression ("kron_rows_kernel<T>"): the mangled name holds
/// the base name (as <length><name>) and, for templates on the storage type, its mangled type.
fn resources(ptxas: &[(String, Resources)], kernel: &str, dt: Dt) -> Option<Resources> {
    let base = kernel.split('<').next().unwrap_or(kernel).trim();
    let tag = format!("{}{}", base.len(), base);
    let mut hits = ptxas.iter().filter(|(n, _)| n.contains(&tag));
    let all: Vec<&(String, Resources)> = hits.by_ref().collect();
    let typed = all.iter().filter(|(n, _)| {
        let after = &n[n.find(&tag).unwrap() + tag.len()..];
        after.starts_with(&format!("I{}", dt.mangled()))
            || (dt == Dt::F32 && after.starts_with("If"))
    });
    // Several instantiations (other template arguments): the largest register count.
    let pick = |v: Vec<&&(String, Resources)>| v.into_iter().map(|x| x.1).max_by_key(|r| r.regs);
    pick(typed.collect()).or_else(|| pick(all.iter().collect()))
}

/// One launch, counted and modelled.
struct Launch {
    kernel: String,
    rec: ffi::camex_emu_launch,
    res: Option<Resources>,
}

impl Launch {
    fn blocks_per_sm(&self) -> i64 {
        let threads = self.rec.block_threads.max(1) as i64;
        let res = self.res.unwrap_or_default();
        let by_threads = h200::THREADS_PER_SM / threads;
        let warps = (threads + 31) / 32;
        // Registers are allocated per warp in units of 256.
        let regs_warp = (res.regs.max(1) * 32 + 255) / 256 * 256;
        let by_regs = h200::REGS_PER_SM / (regs_warp * warps).max(1);
        let smem = res.static_smem + self.rec.dyn_smem_bytes + h200::SMEM_RESERVED_PER_BLOCK;
        let by_smem = h200::SMEM_PER_SM / smem.max(1);
        by_threads
            .min(by_regs)
            .min(by_smem)
            .clamp(1, h200::BLOCKS_PER_SM)
    }
    /// The fraction of the SMs the grid keeps busy, averaged over its waves.
    fn utilisation(&self) -> f64 {
        let blocks = self.rec.blocks.max(1) as f64;
        let per_wave = h200::SMS * self.blocks_per_sm() as f64;
        let waves = (blocks / per_wave).ceil();
        (blocks / (waves * h200::SMS)).min(1.0)
    }
    /// (seconds, what bounds it).
    fn predict(&self) -> (f64, &'static str) {
        let u = self.utilisation();
        let terms = [
            (self.rec.mma_flop as f64 / (h200::MMA_FLOPS * u), "mma"),
            (
                self.rec.smem_wavefronts as f64 / (h200::SMS * h200::CLOCK_HZ * u),
                "smem",
            ),
            (self.rec.dram_bytes as f64 / h200::DRAM_BPS, "dram"),
            (self.rec.gmem_bytes as f64 / h200::L2_BPS, "l2"),
        ];
        let (t, what) = terms
            .into_iter()
            .fold((0.0, "launch"), |a, b| if b.0 > a.0 { b } else { a });
        (t + h200::LAUNCH_S, what)
    }
}

/// Sums of one op and pass (or one kernel of it).
#[derive(Default, Clone, Copy)]
struct Sum {
    launches: u64,
    mma: u64,
    wavefronts: u64,
    gmem: u64,
    dram: u64,
    predicted_s: f64,
}

impl Sum {
    fn add(&mut self, l: &Launch) {
        self.launches += 1;
        self.mma += l.rec.mma_flop;
        self.wavefronts += l.rec.smem_wavefronts;
        self.gmem += l.rec.gmem_bytes;
        self.dram += l.rec.dram_bytes;
        self.predicted_s += l.predict().0;
    }
    fn fields(&self) -> String {
        format!(
            "launches={} mma_gflop={:.3} smem_wavefronts={} gmem_mb={:.2} dram_mb={:.2} predicted_ms={:.4}",
            self.launches,
            self.mma as f64 / 1e9,
            self.wavefronts,
            self.gmem as f64 / 1e6,
            self.dram as f64 / 1e6,
            self.predicted_s * 1e3
        )
    }
}

fn ok(code: i32, what: &str) {
    if code != 0 {
        eprintln!("cost_model: {what}: launcher returned {code}");
        std::process::exit(1);
    }
}

fn stream() -> ffi::camex_stream_t {
    std::ptr::null_mut()
}

/// The four Kronecker factors' buffers (or their gradients'): [R, N, k, k] for k = o1, o2, i1, i2.
fn factor_bufs(d: Dims, elem: usize) -> [Buf; 4] {
    [d.o1, d.o2, d.i1, d.i2].map(|k| Buf::new(d.r * d.n * k * k * elem))
}

/// Runs `pass` of `op` once; the emulation records its launches. `keep_u`: ca_merge's forward
/// hands its U (`curved`) to the backward, as a tape keeps it; else the backward recomputes U.
fn run_op(op: Op, pass: Pass, d: Dims, dt: Dt, keep_u: bool) {
    let e = dt.size();
    let (n, o, i, g, r) = (d.n, d.o, d.i, d.g, d.r);
    let oi = o * i;
    let bwd = pass == Pass::FwdBwd;
    let b = |elems: usize| Buf::new(elems * e);
    match op {
        Op::CaMerge | Op::Curvature => {
            let (base, experts, scores) = (b(oi), b(n * oi), b(g * n));
            let [fa, fb, fc, fd] = factor_bufs(d, e);
            if op == Op::CaMerge {
                let mut p = ffi::camex_ca_merge_params {
                    dtype: dt.code(),
                    g: g as i64,
                    n: n as i64,
                    o: o as i64,
                    i: i as i64,
                    r: r as i64,
                    o1: d.o1 as i64,
                    o2: d.o2 as i64,
                    i1: d.i1 as i64,
                    i2: d.i2 as i64,
                    base: base.addr(),
                    experts: experts.addr(),
                    scores: scores.addr(),
                    factor_a: fa.addr(),
                    factor_b: fb.addr(),
                    factor_c: fc.addr(),
                    factor_d: fd.addr(),
                    alpha: 1.0,
                    ..Default::default()
                };
                let merged = b(g * oi);
                p.merged = merged.addr();
                let curved = (bwd && keep_u).then(|| b(n * oi));
                if let Some(c) = &curved {
                    p.curved = c.addr();
                }
                // SAFETY: a size query on plain values.
                let ws = Buf::new(unsafe { ffi::camex_ca_merge_workspace(&p, 0) } as usize);
                p.workspace = ws.addr();
                p.workspace_bytes = ws.layout.size() as i64;
                // SAFETY: every pointer is a live host buffer of the size the params imply
                // (the emulation's "device" memory).
                ok(
                    unsafe { ffi::camex_ca_merge_forward(&p, stream()) },
                    "ca_merge",
                );
                drop(ws);
                if bwd {
                    let (gm, gb, ge, gs, ga) = (b(g * oi), b(oi), b(n * oi), b(g * n), b(1));
                    let [gfa, gfb, gfc, gfd] = factor_bufs(d, e);
                    p.grad_merged = gm.addr();
                    p.grad_base = gb.addr();
                    p.grad_experts = ge.addr();
                    p.grad_scores = gs.addr();
                    p.grad_alpha = ga.addr();
                    p.grad_factor_a = gfa.addr();
                    p.grad_factor_b = gfb.addr();
                    p.grad_factor_c = gfc.addr();
                    p.grad_factor_d = gfd.addr();
                    // SAFETY: as above.
                    let ws = Buf::new(unsafe { ffi::camex_ca_merge_workspace(&p, 1) } as usize);
                    p.workspace = ws.addr();
                    p.workspace_bytes = ws.layout.size() as i64;
                    // SAFETY: as above.
                    ok(
                        unsafe { ffi::camex_ca_merge_backward(&p, stream()) },
                        "ca_merge_backward",
                    );
                }
            } else {
                let mut p = ffi::camex_curvature_params {
                    dtype: dt.code(),
                    n: n as i64,
                    o: o as i64,
                    i: i as i64,
                    r: r as i64,
                    o1: d.o1 as i64,
                    o2: d.o2 as i64,
                    i1: d.i1 as i64,
                    i2: d.i2 as i64,
                    base: base.addr(),
                    experts: experts.addr(),
                    factor_a: fa.addr(),
                    factor_b: fb.addr(),
                    factor_c: fc.addr(),
                    factor_d: fd.addr(),
                    ..Default::default()
                };
                let curved = b(n * oi);
                p.curved = curved.addr();
                // SAFETY: as above.
                let ws = Buf::new(unsafe { ffi::camex_curvature_workspace(&p, 0) } as usize);
                p.workspace = ws.addr();
                p.workspace_bytes = ws.layout.size() as i64;
                // SAFETY: as above.
                ok(
                    unsafe { ffi::camex_curvature_forward(&p, stream()) },
                    "curvature",
                );
                drop(ws);
                if bwd {
                    let (gc, gb, ge) = (b(n * oi), b(oi), b(n * oi));
                    let [gfa, gfb, gfc, gfd] = factor_bufs(d, e);
                    p.grad_curved = gc.addr();
                    p.grad_base = gb.addr();
                    p.grad_experts = ge.addr();
                    p.grad_factor_a = gfa.addr();
                    p.grad_factor_b = gfb.addr();
                    p.grad_factor_c = gfc.addr();
                    p.grad_factor_d = gfd.addr();
                    // SAFETY: as above.
                    let ws = Buf::new(unsafe { ffi::camex_curvature_workspace(&p, 1) } as usize);
                    p.workspace = ws.addr();
                    p.workspace_bytes = ws.layout.size() as i64;
                    // SAFETY: as above.
                    ok(
                        unsafe { ffi::camex_curvature_backward(&p, stream()) },
                        "curvature_backward",
                    );
                }
            }
        }
        Op::Merge => {
            let (base, curved, scores, merged) = (b(oi), b(n * oi), b(g * n), b(g * oi));
            let mut p = ffi::camex_merge_params {
                dtype: dt.code(),
                g: g as i64,
                n: n as i64,
                o: o as i64,
                i: i as i64,
                base: base.addr(),
                curved: curved.addr(),
                scores: scores.addr(),
                alpha: 1.0,
                merged: merged.addr(),
                ..Default::default()
            };
            // SAFETY: as above.
            let ws = Buf::new(unsafe { ffi::camex_merge_workspace(&p, 0) } as usize);
            p.workspace = ws.addr();
            p.workspace_bytes = ws.layout.size() as i64;
            // SAFETY: as above.
            ok(unsafe { ffi::camex_merge_forward(&p, stream()) }, "merge");
            if bwd {
                let (gm, gb, gc, gs, ga) = (b(g * oi), b(oi), b(n * oi), b(g * n), b(1));
                p.grad_merged = gm.addr();
                p.grad_base = gb.addr();
                p.grad_curved = gc.addr();
                p.grad_scores = gs.addr();
                p.grad_alpha = ga.addr();
                // SAFETY: as above.
                let ws = Buf::new(unsafe { ffi::camex_merge_workspace(&p, 1) } as usize);
                p.workspace = ws.addr();
                p.workspace_bytes = ws.layout.size() as i64;
                // SAFETY: as above.
                ok(
                    unsafe { ffi::camex_merge_backward(&p, stream()) },
                    "merge_backward",
                );
            }
        }
        Op::MergedLinear => {
            let t = d.t;
            let (x, merged, y) = (b(g * t * i), b(g * oi), b(g * t * o));
            let (gy, gx, gw) = (b(g * t * o), b(g * t * i), b(g * oi));
            let p = ffi::camex_linear_params {
                dtype: dt.code(),
                g: g as i64,
                t: t as i64,
                o: o as i64,
                i: i as i64,
                x: x.addr(),
                merged: merged.addr(),
                y: y.addr(),
                grad_y: gy.addr(),
                grad_x: gx.addr(),
                grad_merged: gw.addr(),
                ..Default::default()
            };
            // SAFETY: as above.
            ok(
                unsafe { ffi::camex_linear_forward(&p, stream()) },
                "merged_linear",
            );
            if bwd {
                // SAFETY: as above.
                ok(
                    unsafe { ffi::camex_linear_backward(&p, stream()) },
                    "merged_linear_backward",
                );
            }
        }
        other => usage(&format!("op {} is not modelled", other.name())),
    }
}

fn take_launches(ptxas: &[(String, Resources)], dt: Dt) -> Vec<Launch> {
    // SAFETY: a count query, then a copy into a buffer of that many records.
    let n = unsafe { ffi::camex_emu_launches(std::ptr::null_mut(), 0) };
    let mut recs = vec![ffi::camex_emu_launch::default(); n as usize];
    // SAFETY: `recs` holds n records.
    unsafe { ffi::camex_emu_launches(recs.as_mut_ptr(), n) };
    // SAFETY: clears the records.
    unsafe { ffi::camex_emu_reset() };
    recs.into_iter()
        .map(|rec| {
            let bytes: Vec<u8> = rec
                .kernel
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            // A template with several arguments is launched as `(name<T, A, B>)` (a macro argument).
            let kernel = String::from_utf8_lossy(&bytes)
                .trim_start_matches('(')
                .trim_end_matches(')')
                .to_owned();
            let res = resources(ptxas, &kernel, dt);
            Launch { kernel, rec, res }
        })
        .collect()
}

fn main() {
    let a = Args::parse();
    // SAFETY: a constant query.
    if unsafe { ffi::camex_emulated() } != 1 {
        usage("the kernels were built for the GPU; build with CAMEX_KERNEL_EMU=1 (scripts/cost-model.sh does)");
    }
    let dt = Dt::parse(&a.dtype);
    let shape = a
        .shape
        .parse::<ShapeName>()
        .unwrap_or_else(|e| usage(&e.to_string()));
    let mut bs = shape.dims();
    let k = a.shrink.max(1);
    bs.o /= k;
    bs.i /= k;
    bs.g = (bs.g / k).max(1);
    bs.t = (bs.t / k).max(1);
    let sp = bs.split();
    let d = Dims {
        o: bs.o,
        i: bs.i,
        n: bs.n,
        r: bs.r,
        g: bs.g,
        t: bs.t,
        o1: sp.o1,
        o2: sp.o2,
        i1: sp.i1,
        i2: sp.i2,
    };
    let ptxas = match &a.ptxas {
        Some(p) => parse_ptxas(
            &std::fs::read_to_string(p).unwrap_or_else(|e| usage(&format!("--ptxas {p}: {e}"))),
        ),
        None => Vec::new(),
    };
    let shape_name = if k > 1 {
        format!("{}/{}", shape.name(), k)
    } else {
        shape.name().to_string()
    };
    let mut counts = BTreeMap::new();
    let mut kernel_lines = String::new();
    // SAFETY: switches the emulation's counters on (sampled unless --exact).
    unsafe { ffi::camex_emu_counting(if a.exact { 1 } else { 2 }) };
    for op_name in a.ops.split(',') {
        let op = op_name
            .trim()
            .parse::<Op>()
            .unwrap_or_else(|e| usage(&e.to_string()));
        let tc_serves =
            dt != Dt::F32 && matches!(op, Op::CaMerge | Op::Curvature | Op::MergedLinear);
        let impls: &[(&str, i32)] = if tc_serves {
            &[("scalar", 0), ("tc", 1)]
        } else {
            &[("scalar", 0)]
        };
        for &(imp, tc) in impls {
            // SAFETY: a per-thread switch.
            unsafe { ffi::camex_set_tensor_cores(tc) };
            // ca_merge's forward+backward twice: keeping the forward's U for the backward (as an
            // autodiff tape does; the plain name), and recomputing it ("-recompute").
            let mut runs = vec![(Pass::Fwd, true), (Pass::FwdBwd, true)];
            if op == Op::CaMerge && !a.no_recompute {
                runs.push((Pass::FwdBwd, false));
            }
            for (pass, keep_u) in runs {
                let imp = if keep_u {
                    imp.to_string()
                } else {
                    format!("{imp}-recompute")
                };
                // SAFETY: clears the records.
                unsafe { ffi::camex_emu_reset() };
                run_op(op, pass, d, dt, keep_u);
                let launches = take_launches(&ptxas, dt);
                let mut total = Sum::default();
                let mut per_kernel: BTreeMap<String, (Sum, Vec<&Launch>)> = BTreeMap::new();
                for l in &launches {
                    total.add(l);
                    let e = per_kernel.entry(l.kernel.clone()).or_default();
                    e.0.add(l);
                    e.1.push(l);
                }
                let c = cost(op, &bs, pass, dt.size());
                let peak = if dt == Dt::F32 {
                    h200::PEAK_F32
                } else {
                    h200::PEAK_BF16
                };
                let floor = (c.flop / peak).max(c.bytes / h200::HBM_BPS);
                println!(
                    "model op={} shape={shape_name} dtype={} pass={} impl={imp} {} floor_ms={:.4}",
                    op.name(),
                    a.dtype,
                    pass.name(),
                    total.fields(),
                    floor * 1e3
                );
                let key = format!("{}.{}.{}", op.name(), pass.name(), imp);
                counts.insert(format!("{key}.launches"), total.launches);
                counts.insert(format!("{key}.mma_flop"), total.mma);
                counts.insert(format!("{key}.smem_wavefronts"), total.wavefronts);
                counts.insert(format!("{key}.gmem_bytes"), total.gmem);
                counts.insert(format!("{key}.dram_bytes"), total.dram);
                for (kname, (s, ls)) in &per_kernel {
                    let first = ls[0];
                    let res = first.res.unwrap_or_default();
                    let (_, bound) = ls
                        .iter()
                        .map(|l| l.predict())
                        .fold((0.0, "launch"), |x, y| if y.0 > x.0 { y } else { x });
                    let _ = writeln!(
                        kernel_lines,
                        "kernel op={} dtype={} pass={} impl={imp} name={} {} grid={}x{}x{} threads={} regs={} smem_kb={:.1} blocks_per_sm={} bound={bound}",
                        op.name(),
                        a.dtype,
                        pass.name(),
                        kname.replace(' ', ""),
                        s.fields(),
                        first.rec.grid_x,
                        first.rec.grid_y,
                        first.rec.grid_z,
                        first.rec.block_threads,
                        if first.res.is_some() { res.regs.to_string() } else { "?".into() },
                        (res.static_smem + first.rec.dyn_smem_bytes) as f64 / 1024.0,
                        first.blocks_per_sm(),
                    );
                }
            }
        }
        // SAFETY: back to the process default.
        unsafe { ffi::camex_set_tensor_cores(-1) };
    }
    print!("{kernel_lines}");
    if let Some(path) = &a.write {
        let mut s = format!(
            "# scripts/cost-model.sh counts: shape={shape_name} dtype={}{} (regenerate with --write; CI fails when one grows by more than 5%)\n",
            a.dtype,
            if a.no_recompute { " --no-recompute" } else { "" }
        );
        for (k, v) in &counts {
            let _ = writeln!(s, "{k} {v}");
        }
        std::fs::write(path, s).unwrap_or_else(|e| usage(&format!("--write {path}: {e}")));
        eprintln!("cost_model: wrote {} counts to {path}", counts.len());
    }
    if let Some(path) = &a.check {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| usage(&format!("--check {path}: {e}")));
        let mut bad = 0;
        let mut seen = 0;
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let mut it = line.split_whitespace();
            let (Some(k), Some(v)) = (it.next(), it.next()) else {
                continue;
            };
            let Ok(base) = v.parse::<u64>() else { continue };
            seen += 1;
            match counts.get(k) {
                None => {
                    eprintln!("cost-model gate: {k} is in the baseline but was not counted");
                    bad += 1;
                }
                Some(&now) if now as f64 > base as f64 * 1.05 + 0.5 => {
                    eprintln!(
                        "cost-model gate: {k} grew from {base} to {now} (+{:.1}%, over 5%)",
                        100.0 * (now as f64 / base.max(1) as f64 - 1.0)
                    );
                    bad += 1;
                }
                Some(&now) if (now as f64) < base as f64 * 0.95 => {
                    eprintln!("cost-model gate: {k} fell from {base} to {now}: update the baseline (--write) in the same commit");
                }
                _ => {}
            }
        }
        if bad > 0 || seen == 0 {
            eprintln!("cost-model gate: FAILED ({bad} of {seen} counts)");
            std::process::exit(1);
        }
        println!("cost-model gate: {seen} counts within 5% of {path}");
    }
}
