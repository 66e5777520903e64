//! Hostile input (issue 16): each class of input that used to break the contract "a clear error,
//! exit status 2, nothing lost, nothing left behind" now holds it, through the built `camex`
//! binary, and with bounded memory. Every run:
//! - has its address space limited to 1 GB (`RLIMIT_AS` set in the child before exec), so an
//!   attempt to allocate the terabyte-scale output would abort instead of passing;
//! - must exit with status 2, print a message naming the tensor or path, leave the directory as
//!   it was (no output, no temporary file) and leave the input bytes as they were;
//! - peak resident memory of the children (`getrusage(RUSAGE_CHILDREN)`) stays under 1 GB.
//!
//! The library side (`run_op`, the CPU operators, `read_safetensors`) is checked too.
#![cfg(unix)]

use camex::cpu;
use camex::named::{self, read_safetensors, run_op, write_safetensors, RunOptions};
use camex::{AnyTensor, Error, HostTensor, MemoryLimit};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Output;

mod cli_common;
use cli_common::*;

const AS_LIMIT: u64 = 1_000_000_000;

/// Runs `camex args` with its address space limited to [`AS_LIMIT`].
fn camex_limited(args: &[&str]) -> Output {
    let mut cmd = camex_command(args);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: AS_LIMIT as libc::rlim_t,
                rlim_max: AS_LIMIT as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("the camex binary runs")
}

/// Peak resident memory of every child waited for so far, in bytes.
fn children_peak_rss() -> u64 {
    // SAFETY: getrusage writes one rusage struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    assert_eq!(rc, 0);
    ru.ru_maxrss as u64 * 1024
}

/// The run must fail with status 2 and a message containing every needle, leave `dir` holding
/// exactly `files`, and stay within the memory bound. Returns the message.
fn expect_refused(dir: &TempDir, files: &[&str], args: &[&str], needles: &[&str]) -> String {
    let start = std::time::Instant::now();
    let o = camex_limited(args);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert!(o.stdout.is_empty(), "{args:?}: stdout {}", text(&o.stdout));
    assert!(err.starts_with("camex: error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: `{n}` not in: {err}");
    }
    let mut want: Vec<String> = files.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(dir.files(), want, "{args:?}: files left behind");
    assert!(
        children_peak_rss() < AS_LIMIT,
        "peak RSS {} bytes",
        children_peak_rss()
    );
    assert!(
        start.elapsed().as_secs() < 60,
        "{args:?} took {:?}",
        start.elapsed()
    );
    eprintln!("{args:?}\n  -> {}", err.trim_end());
    err
}

fn f32t(shape: &[usize], v: f32) -> AnyTensor {
    AnyTensor::F32(HostTensor::full(shape, v))
}

fn write(path: &Path, tensors: &[(&str, AnyTensor)]) {
    let m: BTreeMap<String, AnyTensor> = tensors
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    write_safetensors(path, &m).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Amplification
// ---------------------------------------------------------------------------------------------

/// 12 MB of input asks `merge` for a 4 TiB `merged` [G, O, I]: an Err naming it, not an abort.
#[test]
fn amplification_huge_g() {
    let d = TempDir::new("hostile-amp-g");
    let (g, o, i) = (1usize << 20, 1024, 1024);
    let inp = d.path("in.safetensors");
    write(
        &inp,
        &[
            ("base", f32t(&[o, i], 0.5)),
            ("curved", f32t(&[1, o, i], 0.25)),
            ("scores", f32t(&[g, 1], 1.0)),
        ],
    );
    let out = d.path("out.safetensors");
    let args = ["run", "merge", "--inputs", s(&inp), "--outputs", s(&out)];
    expect_refused(
        &d,
        &["in.safetensors"],
        &args,
        &["`merged`", "[1048576, 1024, 1024]", "4398046511104 bytes"],
    );
    // An explicit limit names itself.
    let mut a = args.to_vec();
    a.extend(["--max-memory", "64M"]);
    expect_refused(
        &d,
        &["in.safetensors"],
        &a,
        &["`merged`", "over the memory limit of 67108864 bytes"],
    );
}

/// A long T in `merged_linear`: x [1, T, 1] and merged [1, O, 1] (8 MB) ask for y of 4 TiB.
#[test]
fn amplification_long_t() {
    let d = TempDir::new("hostile-amp-t");
    let (t, o) = (1usize << 20, 1usize << 20);
    let inp = d.path("in.safetensors");
    write(
        &inp,
        &[
            ("x", f32t(&[1, t, 1], 1.0)),
            ("merged", f32t(&[1, o, 1], 1.0)),
        ],
    );
    let out = d.path("out.safetensors");
    expect_refused(
        &d,
        &["in.safetensors"],
        &[
            "run",
            "merged_linear",
            "--inputs",
            s(&inp),
            "--outputs",
            s(&out),
        ],
        &["`y`", "[1, 1048576, 1048576]", "4398046511104 bytes"],
    );
}

/// The same through the library: `run_op` with a memory limit, and the CPU operator directly
/// under `camex::memory::with_limit`.
#[test]
fn amplification_library() {
    let (g, o, i) = (1usize << 14, 64, 64);
    let inputs: BTreeMap<String, AnyTensor> = [
        ("base", f32t(&[o, i], 0.5)),
        ("curved", f32t(&[1, o, i], 0.25)),
        ("scores", f32t(&[g, 1], 1.0)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let opts = RunOptions {
        memory_limit: Some(MemoryLimit::Bytes(64 << 20)),
        ..Default::default()
    };
    match run_op("merge", &inputs, &opts).unwrap_err() {
        Error::Memory {
            tensor,
            shape,
            bytes,
            ..
        } => {
            assert_eq!(tensor, "merged");
            assert_eq!(shape, vec![g, o, i]);
            assert_eq!(bytes, Some((g * o * i * 4) as u64));
        }
        e => panic!("{e}"),
    }
    // Under the limit it runs.
    let ok = RunOptions {
        memory_limit: Some(MemoryLimit::Bytes(1 << 30)),
        ..Default::default()
    };
    assert!(run_op("merge", &inputs, &ok).is_ok());
    // Overflowing sizes: a shape whose bytes do not fit in 64 bits is an Err as well.
    let x = HostTensor::<f32>::full(&[1, 1 << 16, 1], 1.0);
    let w = HostTensor::<f32>::full(&[1, 1 << 16, 1], 1.0);
    let e = camex::memory::with_limit(MemoryLimit::Bytes(1 << 30), || {
        cpu::merged_linear(&x, &w, None)
    })
    .unwrap_err();
    assert!(
        matches!(&e, Error::Memory { tensor, .. } if tensor == "y"),
        "{e}"
    );
    let e = camex::memory::check_against(
        &[camex::memory::need("y", &[usize::MAX, usize::MAX], 4)],
        MemoryLimit::Unlimited,
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("more than 2^64 bytes"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// 2. Endless input
// ---------------------------------------------------------------------------------------------

#[test]
fn endless_input_char_device() {
    let d = TempDir::new("hostile-dev");
    let out = d.path("out.safetensors");
    expect_refused(
        &d,
        &[],
        &[
            "run",
            "merge",
            "--inputs",
            "/dev/zero",
            "--outputs",
            s(&out),
        ],
        &["/dev/zero", "character device", "not a regular file"],
    );
    let e = read_safetensors("/dev/zero").unwrap_err();
    assert!(
        matches!(e, Error::Io { ref message, .. } if message.contains("/dev/zero")),
        "{e}"
    );
}

/// A FIFO with no writer: opening it for reading would block forever; it is refused before.
#[test]
fn endless_input_fifo() {
    let d = TempDir::new("hostile-fifo");
    let fifo = d.path("in.fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let out = d.path("out.safetensors");
    expect_refused(
        &d,
        &["in.fifo"],
        &["run", "merge", "--inputs", s(&fifo), "--outputs", s(&out)],
        &["in.fifo", "pipe (FIFO)", "not a regular file"],
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Outputs over inputs
// ---------------------------------------------------------------------------------------------

#[test]
fn outputs_equal_to_inputs() {
    let d = TempDir::new("hostile-same");
    let inp = d.path("in.safetensors");
    write(
        &inp,
        &[
            ("base", f32t(&[2, 3], 1.0)),
            ("curved", f32t(&[2, 2, 3], 2.0)),
        ],
    );
    let before = std::fs::read(&inp).unwrap();
    std::fs::hard_link(&inp, d.path("hard.safetensors")).unwrap();
    std::os::unix::fs::symlink(&inp, d.path("sym.safetensors")).unwrap();
    let files = ["hard.safetensors", "in.safetensors", "sym.safetensors"];
    let dotted = d.0.join(".").join("in.safetensors");
    for out in [
        inp.clone(),
        dotted,
        d.path("hard.safetensors"),
        d.path("sym.safetensors"),
    ] {
        expect_refused(
            &d,
            &files,
            &[
                "run",
                "dynamic_merge",
                "--beta",
                "0.5",
                "--inputs",
                s(&inp),
                "--outputs",
                s(&out),
            ],
            &[s(&out), "is the same file as the input", s(&inp)],
        );
        assert_eq!(std::fs::read(&inp).unwrap(), before);
    }
    // Input through the link, output the real file.
    expect_refused(
        &d,
        &files,
        &[
            "run",
            "dynamic_merge",
            "--beta",
            "0.5",
            "--inputs",
            s(&d.path("sym.safetensors")),
            "--outputs",
            s(&inp),
        ],
        &["is the same file as the input"],
    );
    assert_eq!(std::fs::read(&inp).unwrap(), before);
    // A device as the output is refused too (the rename would replace it).
    assert!(named::check_output_is_not_input(&inp, d.path("absent.safetensors")).is_ok());
}

// ---------------------------------------------------------------------------------------------
// 4. Duplicate names
// ---------------------------------------------------------------------------------------------

/// A safetensors file written byte by byte with the header given as is.
fn raw_safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

#[test]
fn duplicate_names() {
    let d = TempDir::new("hostile-dup");
    let inp = d.path("in.safetensors");
    let data: Vec<u8> = [1.0f32, 2.0, 3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    raw_safetensors(
        &inp,
        r#"{"base":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]},"curved":{"dtype":"F32","shape":[1,1,1],"data_offsets":[4,8]},"base":{"dtype":"F32","shape":[1,1],"data_offsets":[8,12]}}"#,
        &data,
    );
    let out = d.path("out.safetensors");
    expect_refused(
        &d,
        &["in.safetensors"],
        &[
            "run",
            "dynamic_merge",
            "--beta",
            "1",
            "--inputs",
            s(&inp),
            "--outputs",
            s(&out),
        ],
        &["in.safetensors", "`base`", "more than once"],
    );
    // An escaped spelling of the same name is the same name.
    raw_safetensors(
        &inp,
        r#"{"base":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]},"curved":{"dtype":"F32","shape":[1,1,1],"data_offsets":[4,8]},"b\u0061se":{"dtype":"F32","shape":[1,1],"data_offsets":[8,12]}}"#,
        &data,
    );
    let e = read_safetensors(&inp).unwrap_err();
    assert!(e.to_string().contains("`base` more than once"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// 5. Scalars that overflow the storage dtype
// ---------------------------------------------------------------------------------------------

#[test]
fn overflowing_alpha_and_beta() {
    let d = TempDir::new("hostile-scalar");
    let inp = d.path("in.safetensors");
    write(
        &inp,
        &[
            ("base", f32t(&[2, 3], 1.0)),
            ("curved", f32t(&[2, 2, 3], 2.0)),
            ("scores", f32t(&[2, 2], 0.5)),
        ],
    );
    let inpd = d.path("dyn.safetensors");
    write(
        &inpd,
        &[
            ("base", f32t(&[2, 3], 1.0)),
            ("curved", f32t(&[2, 2, 3], 2.0)),
        ],
    );
    let inp16 = d.path("in16.safetensors");
    write(
        &inp16,
        &[
            (
                "base",
                AnyTensor::F16(HostTensor::full(&[2, 3], half::f16::ONE)),
            ),
            (
                "curved",
                AnyTensor::F16(HostTensor::full(&[2, 2, 3], half::f16::ONE)),
            ),
        ],
    );
    let files = ["dyn.safetensors", "in.safetensors", "in16.safetensors"];
    let out = d.path("out.safetensors");
    let run = |op: &str, input: &Path, flag: &str, v: &str, needles: &[&str]| {
        expect_refused(
            &d,
            &files,
            &[
                "run",
                op,
                "--inputs",
                s(input),
                "--outputs",
                s(&out),
                flag,
                v,
            ],
            needles,
        )
    };
    run(
        "merge",
        &inp,
        "--alpha",
        "1e300",
        &["`alpha`", "1e300", "f32"],
    );
    run("merge", &inp, "--alpha", "-4e38", &["`alpha`", "f32"]);
    run(
        "dynamic_merge",
        &inpd,
        "--beta",
        "1e300",
        &["`beta`", "1e300", "f32"],
    );
    run(
        "dynamic_merge",
        &inpd,
        "--beta",
        "inf",
        &["`beta`", "finite"],
    );
    run(
        "dynamic_merge",
        &inp16,
        "--beta",
        "70000",
        &["`beta`", "7e4", "f16", "6.5504e4"],
    );
    // Within range it runs.
    let o = camex_limited(&[
        "run",
        "dynamic_merge",
        "--inputs",
        s(&inp16),
        "--outputs",
        s(&out),
        "--beta",
        "65504",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // And in the library, for each storage dtype.
    let e = cpu::dynamic_merge(
        &HostTensor::<f32>::full(&[1, 1], 1.0),
        &HostTensor::<f32>::full(&[1, 1, 1], 1.0),
        1e300,
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::Option { name, .. } if name == "beta"),
        "{e}"
    );
    assert!(cpu::dynamic_merge(
        &HostTensor::<f64>::full(&[1, 1], 1.0),
        &HostTensor::<f64>::full(&[1, 1, 1], 1.0),
        1e300,
    )
    .is_ok());
}

// ---------------------------------------------------------------------------------------------
// 6. Non-binary masks
// ---------------------------------------------------------------------------------------------

#[test]
fn non_binary_and_nan_masks() {
    let d = TempDir::new("hostile-mask");
    let out = d.path("out.safetensors");
    for (file, v, needle) in [
        ("half.safetensors", 0.5f32, "is 0.5"),
        ("nan.safetensors", f32::NAN, "is NaN"),
        ("two.safetensors", 2.0, "is 2"),
        ("neg.safetensors", -1.0, "is -1"),
    ] {
        let inp = d.path(file);
        let mut m = HostTensor::<f32>::full(&[2, 2, 3], 1.0);
        m.data_mut()[7] = v;
        write(
            &inp,
            &[
                ("base", f32t(&[2, 3], 1.0)),
                ("curved", f32t(&[2, 2, 3], 2.0)),
                ("scores", f32t(&[2, 2], 0.5)),
                ("mask", AnyTensor::F32(m)),
            ],
        );
        for op in ["merge", "merge_backward"] {
            let mut args = vec!["run", op, "--inputs", s(&inp), "--outputs", s(&out)];
            if op == "merge_backward" {
                // merge_backward needs grad_merged too: write it next to the others.
                let mut all = read_safetensors(&inp).unwrap();
                all.insert("grad_merged".into(), f32t(&[2, 2, 3], 1.0));
                let p = d.path(&format!("bw-{file}"));
                write_safetensors(&p, &all).unwrap();
                let o = camex_limited(&["run", op, "--inputs", s(&p), "--outputs", s(&out)]);
                assert_eq!(o.status.code(), Some(2));
                let err = text(&o.stderr);
                assert!(err.contains("`mask`") && err.contains(needle), "{err}");
                std::fs::remove_file(&p).unwrap();
                args.clear();
            }
            if !args.is_empty() {
                let mut files: Vec<String> = d
                    .files()
                    .into_iter()
                    .filter(|f| f.ends_with(".safetensors") && f != "out.safetensors")
                    .collect();
                files.sort();
                let files: Vec<&str> = files.iter().map(String::as_str).collect();
                expect_refused(&d, &files, &args, &["`mask`", "element [1, 0, 1]", needle]);
            }
        }
    }
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

/// An unexpected tensor is reported as a tensor (not an "option"), with the likely spelling;
/// a missing factor names the operator and the factor, and says why.
#[test]
fn mended_messages() {
    let d = TempDir::new("hostile-msg");
    let inp = d.path("in.safetensors");
    let out = d.path("out.safetensors");
    write(
        &inp,
        &[
            ("base", f32t(&[2, 4], 1.0)),
            ("experts", f32t(&[1, 2, 4], 2.0)),
            ("factor_A", f32t(&[1, 1, 1, 1], 1.0)),
        ],
    );
    let err = expect_refused(
        &d,
        &["in.safetensors"],
        &[
            "run",
            "curvature",
            "--inputs",
            s(&inp),
            "--outputs",
            s(&out),
        ],
        &[
            "tensor `factor_A`",
            "operator `curvature` does not read",
            "did you mean `factor_a`?",
        ],
    );
    assert!(!err.contains("option"), "{err}");
    write(
        &inp,
        &[
            ("base", f32t(&[2, 4], 1.0)),
            ("experts", f32t(&[1, 2, 4], 2.0)),
            ("factor_a", f32t(&[1, 1, 1, 1], 1.0)),
            ("factor_b", f32t(&[1, 1, 2, 2], 1.0)),
            ("factor_c", f32t(&[1, 1, 2, 2], 1.0)),
        ],
    );
    expect_refused(
        &d,
        &["in.safetensors"],
        &[
            "run",
            "curvature",
            "--inputs",
            s(&inp),
            "--outputs",
            s(&out),
        ],
        &[
            "operator `curvature` needs tensor `factor_d`, which is missing",
            "given: factor_a, factor_b, factor_c",
        ],
    );
}
