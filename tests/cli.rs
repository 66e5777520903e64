//! The `camex` CLI (`camex run`): for every operator, forward and backward, and every input
//! variant, a safetensors input file run through the built binary gives the same named tensors as
//! the library (`camex::named::run_op`), bit for bit; f16 and bf16 files and `--dtype` too. Errors
//! (missing tensor, wrong shape, unknown operator, bad or inapplicable option) exit with status 2,
//! print to stderr and leave no output file. `--help` lists every operator with what it reads and
//! writes.

use camex::named::{self, read_safetensors, run_op, write_safetensors, RunOptions};
use camex::{AnyTensor, DType, Dare, Mask, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

// ---------------------------------------------------------------------------------------------
// Random cases (the same generator as tests/named.rs)
// ---------------------------------------------------------------------------------------------

const N: usize = 3;
const O: usize = 6;
const I: usize = 4;
const O1: usize = 2;
const I1: usize = 2;
const R: usize = 2;
const G: usize = 2;
const T: usize = 3;
const B: usize = 2;
const J: usize = 3;

/// splitmix64 -> uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// One test input: named f64 values (converted to the dtype under test) and options.
#[derive(Clone)]
struct Case {
    label: String,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
    opts: RunOptions,
}

impl Case {
    fn new(label: &str, opts: RunOptions) -> Case {
        Case {
            label: label.to_string(),
            tensors: BTreeMap::new(),
            opts,
        }
    }
    fn add(&mut self, rng: &mut Rng, name: &str, shape: &[usize]) {
        let n: usize = shape.iter().product();
        let v = if name == "mask" {
            (0..n)
                .map(|_| if rng.uniform() > 0.0 { 1.0 } else { 0.0 })
                .collect()
        } else {
            (0..n).map(|_| rng.uniform()).collect()
        };
        self.tensors.insert(name.to_string(), (shape.to_vec(), v));
    }
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn any(&self, dtype: DType) -> BTreeMap<String, AnyTensor> {
        self.tensors
            .iter()
            .map(|(k, (s, v))| {
                let t = Tensor::new(s, v.clone()).unwrap();
                (k.clone(), AnyTensor::from_f64(&t, dtype))
            })
            .collect()
    }
}

fn opts_with(f: impl FnOnce(&mut RunOptions)) -> RunOptions {
    let mut o = RunOptions::default();
    f(&mut o);
    o
}

fn add_factors(c: &mut Case, rng: &mut Rng) {
    let (o2, i2) = (O / O1, I / I1);
    c.add(rng, "factor_a", &[R, N, O1, O1]);
    c.add(rng, "factor_b", &[R, N, o2, o2]);
    c.add(rng, "factor_c", &[R, N, I1, I1]);
    c.add(rng, "factor_d", &[R, N, i2, i2]);
}

fn add_biases(c: &mut Case, rng: &mut Rng) {
    c.add(rng, "base_bias", &[O]);
    c.add(rng, "expert_bias", &[N, O]);
}

/// Every input variant of `op` (forward or backward), seeded by `seed`.
fn cases(op: &str, seed: u64) -> Vec<Case> {
    let fwd = op.strip_suffix("_backward").unwrap_or(op);
    let backward = fwd != op;
    let mut rng = Rng(seed);
    let rng = &mut rng;
    let mut out = Vec::new();
    match fwd {
        "curvature" => {
            for kron in [false, true] {
                let mut c = Case::new(
                    if kron { "kronecker" } else { "identity" },
                    opts_with(|_| {}),
                );
                c.add(rng, "base", &[O, I]);
                c.add(rng, "experts", &[N, O, I]);
                if kron {
                    add_factors(&mut c, rng);
                }
                out.push(c);
            }
        }
        "ties_mask" => {
            for (label, mask) in [
                ("none", Mask::None),
                ("ties_sign", Mask::TiesSign),
                ("ties_trim", Mask::TiesTrim(0.3)),
            ] {
                let mut c = Case::new(label, opts_with(|o| o.mask = mask));
                c.add(rng, "base", &[O, I]);
                c.add(rng, "experts", &[N, O, I]);
                out.push(c);
            }
        }
        "merge" => {
            let variants = [
                ("plain", false, false, Dare::None, 1.0),
                (
                    "mask+bias+dare_expert",
                    true,
                    true,
                    Dare::Expert { p: 0.3, seed: 7 },
                    0.7,
                ),
                (
                    "bias+dare_element",
                    false,
                    true,
                    Dare::Element { p: 0.2, seed: 9 },
                    1.3,
                ),
            ];
            for (label, mask, bias, dare, alpha) in variants {
                let mut c = Case::new(
                    label,
                    opts_with(|o| {
                        o.dare = dare;
                        o.alpha = alpha;
                    }),
                );
                c.add(rng, "base", &[O, I]);
                c.add(rng, "curved", &[N, O, I]);
                c.add(rng, "scores", &[G, N]);
                if mask {
                    c.add(rng, "mask", &[N, O, I]);
                }
                if bias {
                    add_biases(&mut c, rng);
                }
                out.push(c);
            }
        }
        "ca_merge" => {
            let variants = [
                ("identity", false, false, None, Mask::None, Dare::None, 1.0),
                (
                    "kron+bias+beta+ties_sign+dare_element",
                    true,
                    true,
                    Some(0.4),
                    Mask::TiesSign,
                    Dare::Element { p: 0.25, seed: 3 },
                    0.8,
                ),
                (
                    "kron+ties_trim+dare_expert",
                    true,
                    false,
                    None,
                    Mask::TiesTrim(0.5),
                    Dare::Expert { p: 0.4, seed: 11 },
                    1.0,
                ),
                (
                    "identity+beta",
                    false,
                    false,
                    Some(-0.6),
                    Mask::None,
                    Dare::None,
                    1.5,
                ),
            ];
            for (label, kron, bias, beta, mask, dare, alpha) in variants {
                let mut c = Case::new(
                    label,
                    opts_with(|o| {
                        o.beta = beta;
                        o.mask = mask;
                        o.dare = dare;
                        o.alpha = alpha;
                    }),
                );
                c.add(rng, "base", &[O, I]);
                c.add(rng, "experts", &[N, O, I]);
                c.add(rng, "scores", &[G, N]);
                if kron {
                    add_factors(&mut c, rng);
                }
                if bias {
                    add_biases(&mut c, rng);
                }
                out.push(c);
            }
        }
        "merged_linear" => {
            for bias in [false, true] {
                let mut c = Case::new(if bias { "bias" } else { "no_bias" }, opts_with(|_| {}));
                c.add(rng, "x", &[G, T, I]);
                c.add(rng, "merged", &[G, O, I]);
                if bias {
                    c.add(rng, "merged_bias", &[G, O]);
                }
                out.push(c);
            }
        }
        "dynamic_merge" => {
            let mut c = Case::new("beta", opts_with(|o| o.beta = Some(0.3)));
            c.add(rng, "base", &[O, I]);
            c.add(rng, "curved", &[N, O, I]);
            out.push(c);
        }
        "segment_scores" => {
            let mut c = Case::new("plain", opts_with(|_| {}));
            c.add(rng, "router_scores", &[B, J, N]);
            out.push(c);
        }
        other => panic!("no cases for operator `{other}`: add them here"),
    }
    if backward {
        for c in &mut out {
            match fwd {
                "curvature" => c.add(rng, "grad_curved", &[N, O, I]),
                "merge" | "ca_merge" => {
                    c.add(rng, "grad_merged", &[G, O, I]);
                    if c.has("base_bias") {
                        c.add(rng, "grad_merged_bias", &[G, O]);
                    }
                    if c.opts.beta.is_some() {
                        c.add(rng, "grad_next_base", &[O, I]);
                    }
                }
                "merged_linear" => c.add(rng, "grad_y", &[G, T, O]),
                "dynamic_merge" => c.add(rng, "grad_next_base", &[O, I]),
                "segment_scores" => c.add(rng, "grad_scores", &[B, J, N]),
                _ => {}
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------

/// A fresh, empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p =
            std::env::temp_dir().join(format!("camex-cli-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// Names of the files in the directory (to see that nothing, not even a temp file, is left).
    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn camex(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_camex"))
        .args(args)
        .output()
        .expect("the camex binary runs")
}

/// The command-line flags that express `o` (only the non-default ones).
fn flags(o: &RunOptions) -> Vec<String> {
    let mut f = Vec::new();
    if o.alpha != 1.0 {
        f.extend(["--alpha".to_string(), o.alpha.to_string()]);
    }
    if let Some(b) = o.beta {
        f.extend(["--beta".to_string(), b.to_string()]);
    }
    match o.mask {
        Mask::None => {}
        Mask::TiesSign => f.extend(["--mask".to_string(), "ties_sign".to_string()]),
        Mask::TiesTrim(k) => f.extend(["--mask".to_string(), format!("ties_trim:{k}")]),
    }
    match o.dare {
        Dare::None => {}
        Dare::Expert { p, seed } => f.extend(["--dare".to_string(), format!("expert:{p}:{seed}")]),
        Dare::Element { p, seed } => {
            f.extend(["--dare".to_string(), format!("element:{p}:{seed}")])
        }
    }
    if let Some(d) = o.dtype {
        f.extend(["--dtype".to_string(), d.name().to_string()]);
    }
    f
}

/// Writes `inputs`, runs `camex run op` with `extra` flags; returns the process output and the
/// output path.
fn run_cli(
    dir: &TempDir,
    op: &str,
    inputs: &BTreeMap<String, AnyTensor>,
    extra: &[String],
) -> (Output, PathBuf) {
    let inp = dir.path("in.safetensors");
    let out = dir.path("out.safetensors");
    let _ = std::fs::remove_file(&out);
    write_safetensors(&inp, inputs).unwrap();
    let mut args: Vec<String> = vec![
        "run".into(),
        op.into(),
        "--inputs".into(),
        inp.to_string_lossy().into(),
        "--outputs".into(),
        out.to_string_lossy().into(),
    ];
    args.extend(extra.iter().cloned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    (camex(&refs), out)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// Status 2, a message on stderr containing every one of `needles`, and no output file.
fn assert_fails(o: &Output, out: &Path, needles: &[&str]) {
    assert_eq!(o.status.code(), Some(2), "stderr: {}", text(&o.stderr));
    let err = text(&o.stderr);
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`: {err}");
    }
    assert!(!out.exists(), "an output file was left after a failure");
}

// ---------------------------------------------------------------------------------------------
// Every operator round-trips through the CLI
// ---------------------------------------------------------------------------------------------

/// Every operator, forward and backward, every variant: the CLI's output file equals the library.
#[test]
fn every_op_round_trips_through_the_cli() {
    let dir = TempDir::new("ops");
    let mut ran = 0;
    for (k, info) in named::ops().iter().enumerate() {
        for case in cases(info.name, 700 + k as u64) {
            let inputs = case.any(DType::F32);
            let want = run_op(info.name, &inputs, &case.opts).unwrap();
            let (o, out) = run_cli(&dir, info.name, &inputs, &flags(&case.opts));
            assert!(
                o.status.success(),
                "{} [{}]: {}",
                info.name,
                case.label,
                text(&o.stderr)
            );
            let got = read_safetensors(&out).unwrap();
            assert_eq!(got, want, "{} [{}]", info.name, case.label);
            assert_eq!(dir.files(), ["in.safetensors", "out.safetensors"]);
            ran += 1;
        }
    }
    assert!(ran >= named::ops().len());
}

/// f64, f16 and bf16 files, and `--dtype` overriding the storage dtype.
#[test]
fn dtypes_through_the_cli() {
    let dir = TempDir::new("dtypes");
    for op in [
        "ca_merge_backward",
        "merged_linear",
        "segment_scores_backward",
    ] {
        let case = cases(op, 41).pop().unwrap();
        for stored in [DType::F64, DType::F16, DType::BF16] {
            let inputs = case.any(stored);
            let want = run_op(op, &inputs, &case.opts).unwrap();
            let (o, out) = run_cli(&dir, op, &inputs, &flags(&case.opts));
            assert!(o.status.success(), "{op} {stored:?}: {}", text(&o.stderr));
            let got = read_safetensors(&out).unwrap();
            assert!(got.values().all(|t| t.dtype() == stored));
            assert_eq!(got, want, "{op} {stored:?}");
        }
        for target in [DType::F64, DType::F16, DType::BF16] {
            let inputs = case.any(DType::F32);
            let opts = RunOptions {
                dtype: Some(target),
                ..case.opts
            };
            let want = run_op(op, &inputs, &opts).unwrap();
            let (o, out) = run_cli(&dir, op, &inputs, &flags(&opts));
            assert!(
                o.status.success(),
                "{op} --dtype {target:?}: {}",
                text(&o.stderr)
            );
            let got = read_safetensors(&out).unwrap();
            assert!(got.values().all(|t| t.dtype() == target));
            assert_eq!(got, want, "{op} --dtype {target:?}");
        }
    }
}

/// `--flag=value` is the same as `--flag value`.
#[test]
fn inline_option_values() {
    let dir = TempDir::new("inline");
    let case = cases("ca_merge", 42).remove(1);
    let inputs = case.any(DType::F32);
    let want = run_op("ca_merge", &inputs, &case.opts).unwrap();
    let f = flags(&case.opts);
    let inline: Vec<String> = f.chunks(2).map(|p| format!("{}={}", p[0], p[1])).collect();
    let (o, out) = run_cli(&dir, "ca_merge", &inputs, &inline);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(read_safetensors(&out).unwrap(), want);
}

// ---------------------------------------------------------------------------------------------
// Failures: status 2, stderr, no output file
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_tensor_exits_2_without_output() {
    let dir = TempDir::new("missing");
    for info in named::ops() {
        let case = &cases(info.name, 43)[0];
        let name = info.required().last().unwrap();
        let mut inputs = case.any(DType::F32);
        inputs.remove(name);
        let (o, out) = run_cli(&dir, info.name, &inputs, &flags(&case.opts));
        assert_fails(&o, &out, &[name, info.name, "missing"]);
        assert_eq!(dir.files(), ["in.safetensors"]);
    }
}

#[test]
fn wrong_shape_exits_2_without_output() {
    let dir = TempDir::new("shape");
    let case = cases("ca_merge_backward", 44).remove(1);
    let mut inputs = case.any(DType::F32);
    inputs.insert(
        "experts".into(),
        AnyTensor::F32(Tensor::zeros(&[N, O + 1, I])),
    );
    let (o, out) = run_cli(&dir, "ca_merge_backward", &inputs, &flags(&case.opts));
    assert_fails(&o, &out, &["experts", "[3, 7, 4]"]);
    let mut inputs = case.any(DType::F32);
    inputs.insert(
        "grad_merged".into(),
        AnyTensor::F32(Tensor::zeros(&[G, O, I + 1])),
    );
    let (o, out) = run_cli(&dir, "ca_merge_backward", &inputs, &flags(&case.opts));
    assert_fails(&o, &out, &["grad_merged"]);
    assert_eq!(dir.files(), ["in.safetensors"]);
}

/// A failure does not touch a file already at the output path.
#[test]
fn failure_keeps_an_existing_output_file() {
    let dir = TempDir::new("keep");
    let case = &cases("merge", 45)[0];
    let mut inputs = case.any(DType::F32);
    inputs.remove("scores");
    let inp = dir.path("in.safetensors");
    let out = dir.path("out.safetensors");
    write_safetensors(&inp, &inputs).unwrap();
    std::fs::write(&out, b"previous").unwrap();
    let o = camex(&[
        "run",
        "merge",
        "--inputs",
        inp.to_str().unwrap(),
        "--outputs",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(std::fs::read(&out).unwrap(), b"previous");
    assert_eq!(dir.files(), ["in.safetensors", "out.safetensors"]);
}

#[test]
fn bad_usage_exits_2_without_output() {
    let dir = TempDir::new("usage");
    let case = &cases("ca_merge", 46)[0];
    let inputs = case.any(DType::F32);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let bad: Vec<(&str, Vec<String>, &[&str])> = vec![
        ("ca_merge", s(&["--mask", "ties_trim:0"]), &["mask"]),
        ("ca_merge", s(&["--mask", "ties"]), &["mask"]),
        ("ca_merge", s(&["--dare", "expert:1.5:3"]), &["dare"]),
        ("ca_merge", s(&["--dare", "row:0.1:3"]), &["dare"]),
        ("ca_merge", s(&["--alpha", "nan"]), &["alpha"]),
        ("ca_merge", s(&["--alpha"]), &["--alpha", "value"]),
        ("ca_merge", s(&["--beta", "x"]), &["beta"]),
        ("ca_merge", s(&["--dtype", "f8"]), &["dtype"]),
        ("ca_merge", s(&["--device", "tpu"]), &["device"]),
        ("ca_merge", s(&["--speed", "9"]), &["--speed"]),
        ("ca_merge", s(&["--alpha", "1", "--alpha", "2"]), &["twice"]),
        ("ca_merge", s(&["extra"]), &["extra"]),
        ("curvature", s(&["--alpha", "2"]), &["--alpha", "curvature"]),
        ("merge", s(&["--mask", "ties_sign"]), &["--mask", "merge"]),
        ("ca_merge_fwd", vec![], &["ca_merge_fwd", "unknown"]),
    ];
    for (op, extra, needles) in bad {
        let (o, out) = run_cli(&dir, op, &inputs, &extra);
        assert_fails(&o, &out, needles);
    }
    // Absent input file; no operator; no subcommand; unknown subcommand.
    let out = dir.path("out.safetensors");
    let o = camex(&[
        "run",
        "merge",
        "--inputs",
        dir.path("absent.safetensors").to_str().unwrap(),
        "--outputs",
        out.to_str().unwrap(),
    ]);
    assert_fails(&o, &out, &["absent.safetensors"]);
    let o = camex(&["run", "--inputs", "a", "--outputs", out.to_str().unwrap()]);
    assert_fails(&o, &out, &["operator"]);
    let o = camex(&[]);
    assert_fails(&o, &out, &["subcommand"]);
    let o = camex(&["frobnicate"]);
    assert_fails(&o, &out, &["frobnicate"]);
}

/// Without the `cuda` feature, `--device cuda` is a clear error (status 2), not a CPU run.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_feature_exits_2() {
    let dir = TempDir::new("cuda");
    let case = &cases("merge", 47)[0];
    let inputs = case.any(DType::F32);
    let (o, out) = run_cli(&dir, "merge", &inputs, &["--device".into(), "cuda".into()]);
    assert_fails(&o, &out, &["cuda", "feature"]);
}

// ---------------------------------------------------------------------------------------------
// Help
// ---------------------------------------------------------------------------------------------

/// `camex run --help` and `camex --help` list every operator with every tensor it reads and writes.
#[test]
fn help_lists_every_op() {
    for args in [&["run", "--help"][..], &["--help"][..], &["run", "-h"][..]] {
        let o = camex(args);
        assert!(o.status.success(), "{args:?}");
        let help = text(&o.stdout);
        for info in named::ops() {
            // The operator's block: from its name line to the next blank line.
            let start = help
                .find(&format!("\n  {}\n", info.name))
                .unwrap_or_else(|| panic!("{args:?}: `{}` not listed", info.name));
            let block = &help[start..];
            let block = &block[..block[1..].find("\n\n").map_or(block.len(), |e| e + 1)];
            let reads = block
                .lines()
                .find(|l| l.trim_start().starts_with("reads:"))
                .unwrap();
            let writes = block
                .lines()
                .find(|l| l.trim_start().starts_with("writes:"))
                .unwrap();
            for s in info.reads {
                assert!(
                    block.contains(&format!("{} {}", s.name, s.shape)),
                    "{}: {}",
                    info.name,
                    s.name
                );
                if s.when.is_none() {
                    assert!(reads.contains(s.name), "{}: {}", info.name, s.name);
                }
            }
            for s in info.writes {
                assert!(writes.contains(s.name), "{}: {}", info.name, s.name);
            }
        }
    }
}
