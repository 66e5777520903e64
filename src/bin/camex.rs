//! The `camex` command-line tool.
//!
//! `camex run OP --inputs IN.safetensors --outputs OUT.safetensors [options]` runs one operator of
//! SPEC section 7 on the named tensors of a safetensors file and writes the named outputs
//! (see [`camex::named`]). `camex run --help` lists every operator with what it reads and writes.
//!
//! Exit status: 0 on success (and for `--help`), 2 on any error (bad usage, unknown operator,
//! missing tensor, wrong shape or dtype, I/O, outputs over the memory limit, an input that is not
//! a regular file, outputs that are the input file); the message goes to stderr and no output file
//! is written (an existing file at the output path is left untouched).
//!
//! Subcommands are a table ([`SUBCOMMANDS`]): adding one (`bench`, `train`) is a row and a function.

use camex::named::{self, Device, OpInfo, RunOptions};
use camex::{DType, Dare, Error, Mask, MemoryLimit};
use std::process::ExitCode;

/// A subcommand: name, one-line summary, handler (gets the arguments after its name).
struct Subcommand {
    name: &'static str,
    summary: &'static str,
    run: fn(&[String]) -> Result<(), CliError>,
}

const SUBCOMMANDS: &[Subcommand] = &[
    Subcommand {
        name: "run",
        summary: "run one operator on the named tensors of a safetensors file",
        run: cmd_run,
    },
    Subcommand {
        name: "bench",
        summary: "time every operator at the shapes of SPEC section 8 (one roofline line per case)",
        run: cmd_bench,
    },
];

// `camex bench` reports peak heap memory per case: count live bytes (a few atomics per allocation).
#[global_allocator]
static ALLOC: camex::bench::CountingAlloc = camex::bench::CountingAlloc;

/// Why a command stopped: help was printed (success), or an error (exit 2).
enum CliError {
    Help(String),
    Fail(String),
}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        CliError::Fail(e.to_string())
    }
}

fn main() -> ExitCode {
    let mut args = Vec::new();
    for a in std::env::args_os().skip(1) {
        match a.into_string() {
            Ok(s) => args.push(s),
            Err(a) => {
                eprintln!("camex: error: argument {a:?} is not valid UTF-8");
                return ExitCode::from(2);
            }
        }
    }
    let result = match args.first().map(String::as_str) {
        None => Err(CliError::Fail(format!(
            "a subcommand is needed: {} (see camex --help)",
            SUBCOMMANDS
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        Some("-h" | "--help" | "help") => Err(CliError::Help(top_help())),
        Some(name) => match SUBCOMMANDS.iter().find(|s| s.name == name) {
            Some(sub) => (sub.run)(&args[1..]),
            None => Err(CliError::Fail(format!(
                "unknown subcommand `{name}` (expected one of: {}; see camex --help)",
                SUBCOMMANDS
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Help(text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(CliError::Fail(msg)) => {
            eprintln!("camex: error: {msg}");
            ExitCode::from(2)
        }
    }
}

fn top_help() -> String {
    let mut s = String::from(
        "camex: curvature-aware merging of experts (SPEC.md)\n\nUsage: camex <SUBCOMMAND> [ARGS]\n\nSubcommands:\n",
    );
    for sub in SUBCOMMANDS {
        s += &format!("  {:<8} {}\n", sub.name, sub.summary);
    }
    s += "\n";
    s += &run_help();
    s
}

const RUN_USAGE: &str = "\
Usage: camex run OP --inputs IN.safetensors --outputs OUT.safetensors [OPTIONS]

Options:
  --inputs PATH        safetensors file with the tensors OP reads (names as below)
  --outputs PATH       safetensors file to write (atomically; nothing is written on error)
  --device cpu|cuda    where to run (default cpu)
  --dtype f32|f64|f16|bf16
                       storage dtype (default: the inputs' dtype, which must be one for all);
                       f16/bf16 compute in f32 and round the outputs back
  --alpha A            merge scale (default 1)
  --beta B             dynamic-merge step (dynamic_merge*: required; ca_merge*: adds next_base)
  --mask none|ties_sign|ties_trim:K
                       TIES mask (default none)
  --dare none|expert:P:SEED|element:P:SEED
                       DARE dropout (default none)
  --max-memory BYTES[K|M|G|T]|available|unlimited
                       memory the inputs, outputs and workspaces may take (default: available,
                       what the machine, cgroup and rlimits still give); over it is an error
An option the operator does not use is an error. The inputs must be a regular file, and the
outputs another file. Exit status: 0 ok, 2 error.
";

/// `camex run --help`: usage and every operator, generated from [`named::ops`].
fn run_help() -> String {
    let mut s = String::from(RUN_USAGE);
    s += "\nOperators (SPEC section 7; tensor shapes in SPEC section 2 symbols):\n";
    for op in named::ops() {
        s += &op_help(op);
    }
    s
}

fn op_help(op: &OpInfo) -> String {
    // Consecutive tensors with the same note share one "(note)", after the last of them.
    let list = |slots: &mut dyn Iterator<Item = &named::Slot>| -> String {
        let slots: Vec<&named::Slot> = slots.collect();
        let mut parts = Vec::new();
        for (k, t) in slots.iter().enumerate() {
            let mut p = format!("{} {}", t.name, t.shape);
            let last_of_run = slots.get(k + 1).is_none_or(|n| n.when != t.when);
            if let (Some(w), true) = (t.when, last_of_run) {
                p += &format!(" ({w})");
            }
            parts.push(p);
        }
        parts.join(", ")
    };
    let mut s = format!("\n  {}\n      {}\n", op.name, op.summary);
    let required = list(&mut op.reads.iter().filter(|t| t.when.is_none()));
    let optional = list(&mut op.reads.iter().filter(|t| t.when.is_some()));
    s += &format!("      reads:    {required}\n");
    if !optional.is_empty() {
        s += &format!("      optional: {optional}\n");
    }
    s += &format!("      writes:   {}\n", list(&mut op.writes.iter()));
    if !op.options.is_empty() {
        s += &format!(
            "      options:  {}\n",
            op.options
                .iter()
                .map(|o| format!("--{o}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    s
}

/// The parsed `camex run` command line.
struct RunArgs {
    op: String,
    inputs: String,
    outputs: String,
    opts: RunOptions,
    /// Scalar options given explicitly (checked against the operator's list).
    given: Vec<&'static str>,
}

fn parse_run(args: &[String]) -> Result<RunArgs, CliError> {
    let mut op = None;
    let mut inputs = None;
    let mut outputs = None;
    let mut opts = RunOptions::default();
    let mut given: Vec<&'static str> = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            return Err(CliError::Help(run_help()));
        }
        let Some(flag) = arg.strip_prefix("--") else {
            if op.is_some() {
                return Err(CliError::Fail(format!(
                    "unexpected argument `{arg}` (the operator is already `{}`)",
                    op.unwrap_or_default()
                )));
            }
            op = Some(arg.clone());
            continue;
        };
        // --flag value or --flag=value
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        let key: &'static str = match name {
            "inputs" => "inputs",
            "outputs" => "outputs",
            "device" => "device",
            "dtype" => "dtype",
            "alpha" => "alpha",
            "beta" => "beta",
            "mask" => "mask",
            "dare" => "dare",
            "max-memory" => "max-memory",
            _ => {
                return Err(CliError::Fail(format!(
                    "unknown option `--{name}` (see camex run --help)"
                )))
            }
        };
        if given.contains(&key) {
            return Err(CliError::Fail(format!("option `--{key}` given twice")));
        }
        given.push(key);
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| CliError::Fail(format!("option `--{key}` needs a value")))?,
        };
        match key {
            "inputs" => inputs = Some(value),
            "outputs" => outputs = Some(value),
            "device" => opts.device = Device::parse(&value)?,
            "dtype" => opts.dtype = Some(DType::parse(&value)?),
            "alpha" => opts.alpha = parse_scalar("alpha", &value)?,
            "beta" => opts.beta = Some(parse_scalar("beta", &value)?),
            "mask" => opts.mask = Mask::parse(&value)?,
            "dare" => opts.dare = Dare::parse(&value)?,
            "max-memory" => opts.memory_limit = Some(MemoryLimit::parse(&value)?),
            _ => unreachable!("every key is matched above"),
        }
    }
    let op = op.ok_or_else(|| {
        CliError::Fail("an operator is needed: camex run OP ... (see camex run --help)".into())
    })?;
    let inputs =
        inputs.ok_or_else(|| CliError::Fail("`--inputs IN.safetensors` is needed".into()))?;
    let outputs =
        outputs.ok_or_else(|| CliError::Fail("`--outputs OUT.safetensors` is needed".into()))?;
    given.retain(|k| !matches!(*k, "inputs" | "outputs" | "device" | "dtype" | "max-memory"));
    Ok(RunArgs {
        op,
        inputs,
        outputs,
        opts,
        given,
    })
}

fn parse_scalar(name: &str, v: &str) -> Result<f64, CliError> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => Err(CliError::Fail(
            Error::option(name, format!("expected a finite number, got `{v}`")).to_string(),
        )),
    }
}

/// `camex run`: read, check, run, write (only on success).
fn cmd_run(args: &[String]) -> Result<(), CliError> {
    let a = parse_run(args)?;
    let info = named::op_info(&a.op)?;
    if let Some(k) = a.given.iter().find(|k| !info.uses_option(k)) {
        let uses = if info.options.is_empty() {
            "none".to_string()
        } else {
            info.options
                .iter()
                .map(|o| format!("--{o}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(CliError::Fail(format!(
            "option `--{k}` does not apply to operator `{}` (its options: {uses})",
            info.name
        )));
    }
    // The limit covers reading the inputs too.
    if let Some(l) = a.opts.memory_limit {
        camex::memory::set_limit(l);
    }
    named::check_output_is_not_input(&a.inputs, &a.outputs)?;
    let inputs = named::read_safetensors(&a.inputs)?;
    let outputs = named::run_op(&a.op, &inputs, &a.opts)?;
    named::write_safetensors(&a.outputs, &outputs)?;
    Ok(())
}

/// `camex bench [...]`: see [`camex::bench::USAGE`].
fn cmd_bench(args: &[String]) -> Result<(), CliError> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        return Err(CliError::Help(format!("Usage: {}\n", camex::bench::USAGE)));
    }
    camex::bench::run_cli(args, &mut std::io::stdout().lock())?;
    Ok(())
}
