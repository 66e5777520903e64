//! The `camex` CLI (`camex run`): for every operator, forward and backward, and every input
//! variant, a safetensors input file run through the built binary gives the same named tensors as
//! the library (`camex::named::run_op`), bit for bit; f16 and bf16 files and `--dtype` too. Errors
//! (missing tensor, wrong shape, unknown operator, bad or inapplicable option) exit with status 2,
//! print to stderr and leave no output file. `--help` lists every operator with what it reads and
//! writes.

use camex::named::{self, read_safetensors, run_op, write_safetensors, RunOptions};
use camex::{AnyTensor, DType, Dare, HostTensor, Mask};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

mod cases;
mod cli_common;
use cases::*;
use cli_common::*;

// ---------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------

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
    let dir = TempDir::new("cli-ops");
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
    let dir = TempDir::new("cli-dtypes");
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
    let dir = TempDir::new("cli-inline");
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
    let dir = TempDir::new("cli-missing");
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
    let dir = TempDir::new("cli-shape");
    let case = cases("ca_merge_backward", 44).remove(1);
    let mut inputs = case.any(DType::F32);
    inputs.insert(
        "experts".into(),
        AnyTensor::F32(HostTensor::zeros(&[N, O + 1, I])),
    );
    let (o, out) = run_cli(&dir, "ca_merge_backward", &inputs, &flags(&case.opts));
    assert_fails(&o, &out, &["experts", "[3, 7, 4]"]);
    let mut inputs = case.any(DType::F32);
    inputs.insert(
        "grad_merged".into(),
        AnyTensor::F32(HostTensor::zeros(&[G, O, I + 1])),
    );
    let (o, out) = run_cli(&dir, "ca_merge_backward", &inputs, &flags(&case.opts));
    assert_fails(&o, &out, &["grad_merged"]);
    assert_eq!(dir.files(), ["in.safetensors"]);
}

/// A failure does not touch a file already at the output path.
#[test]
fn failure_keeps_an_existing_output_file() {
    let dir = TempDir::new("cli-keep");
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
    let dir = TempDir::new("cli-usage");
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
        (
            "ca_merge",
            s(&["--alpha", "1", "--alpha", "2"]),
            &["--alpha", "multiple times"],
        ),
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
    let dir = TempDir::new("cli-cuda");
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
