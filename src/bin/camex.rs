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
//! The arguments are clap's (derive); usage errors exit with status 2 as clap's do.

// The benchmark harness lives with the benches (it is no part of the library).
#[path = "../../benches/common/mod.rs"]
mod bench;

use camex::named::{self, Device, OpInfo, RunOptions};
use camex::{DType, Dare, Error, Mask, MemoryLimit};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

/// camex: curvature-aware merging of experts (SPEC.md)
#[derive(Parser)]
#[command(name = "camex")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run one operator on the named tensors of a safetensors file
    Run(RunArgs),
    /// Time every operator at the shapes of SPEC section 8 (one roofline line per case)
    Bench(bench::cli::BenchArgs),
}

// `camex bench` reports peak heap memory per case: count live bytes (a few atomics per allocation).
#[global_allocator]
static ALLOC: bench::CountingAlloc = bench::CountingAlloc;

fn main() -> ExitCode {
    // The operator list is generated from `named::ops`, so it is attached at run time.
    let ops = ops_help();
    let cmd = Cli::command()
        .after_help(ops.clone())
        .mut_subcommand("run", |c| c.after_help(format!("{RUN_NOTES}\n{ops}")))
        .mut_subcommand("bench", |c| c.after_help(bench::cli::AFTER_HELP));
    // Help prints to stdout with status 0; usage errors go to stderr as every error does
    // (`camex: error: ...`), with status 2.
    let cli = match cmd
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            eprint!("camex: {}", e.render());
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        None => Err("a subcommand is needed: run, bench (see camex --help)".to_string()),
        Some(Command::Run(a)) => cmd_run(a),
        Some(Command::Bench(a)) => {
            bench::cli::run_cli(&a, &mut std::io::stdout().lock()).map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("camex: error: {msg}");
            ExitCode::from(2)
        }
    }
}

const RUN_NOTES: &str = "\
An option the operator does not use is an error. The inputs must be a regular file, and the
outputs another file. Exit status: 0 ok, 2 error.
";

/// Every operator with what it reads and writes, generated from [`named::ops`].
fn ops_help() -> String {
    let mut s =
        String::from("Operators (SPEC section 7; tensor shapes in SPEC section 2 symbols):\n");
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

/// The `camex run` command line.
#[derive(clap::Args)]
struct RunArgs {
    /// The operator (listed below)
    op: Option<String>,
    /// safetensors file with the tensors OP reads (names as below)
    #[arg(long, value_name = "PATH")]
    inputs: Option<String>,
    /// safetensors file to write (atomically; nothing is written on error)
    #[arg(long, value_name = "PATH")]
    outputs: Option<String>,
    /// Where to run: cpu|cuda
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: Device,
    /// Storage dtype: f32|f64|f16|bf16 (default: the inputs' dtype, which must be one for all);
    /// f16/bf16 compute in f32 and round the outputs back
    #[arg(long, value_name = "DTYPE")]
    dtype: Option<DType>,
    /// Merge scale (default 1)
    #[arg(long, value_name = "A", value_parser = finite("alpha"), allow_negative_numbers = true)]
    alpha: Option<f64>,
    /// Dynamic-merge step (dynamic_merge*: required; ca_merge*: adds next_base)
    #[arg(long, value_name = "B", value_parser = finite("beta"), allow_negative_numbers = true)]
    beta: Option<f64>,
    /// TIES mask: none|ties_sign|ties_trim:K (default none)
    #[arg(long, value_name = "MASK")]
    mask: Option<Mask>,
    /// DARE dropout: none|expert:P:SEED|element:P:SEED (default none)
    #[arg(long, value_name = "DARE")]
    dare: Option<Dare>,
    /// Memory the inputs, outputs and workspaces may take: BYTES[K|M|G|T]|available|unlimited
    /// (default: available, what the machine, cgroup and rlimits still give); over it is an error
    #[arg(long, value_name = "LIMIT")]
    max_memory: Option<MemoryLimit>,
}

/// A value parser for a finite number (the scalar options).
fn finite(name: &'static str) -> impl Fn(&str) -> Result<f64, Error> + Clone {
    move |v: &str| match v.parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => Err(Error::option(
            name,
            format!("expected a finite number, got `{v}`"),
        )),
    }
}

/// `camex run`: read, check, run, write (only on success).
fn cmd_run(a: RunArgs) -> Result<(), String> {
    let op =
        a.op.ok_or("an operator is needed: camex run OP ... (see camex run --help)")?;
    let inputs = a.inputs.ok_or("`--inputs IN.safetensors` is needed")?;
    let outputs = a.outputs.ok_or("`--outputs OUT.safetensors` is needed")?;
    let mut opts = RunOptions {
        device: a.device,
        dtype: a.dtype,
        memory_limit: a.max_memory,
        ..RunOptions::default()
    };
    // The operator-specific options given, checked against the operator's list.
    let mut given = Vec::new();
    if let Some(x) = a.alpha {
        opts.alpha = x;
        given.push("alpha");
    }
    if let Some(x) = a.beta {
        opts.beta = Some(x);
        given.push("beta");
    }
    if let Some(m) = a.mask {
        opts.mask = m;
        given.push("mask");
    }
    if let Some(d) = a.dare {
        opts.dare = d;
        given.push("dare");
    }
    let info = named::op_info(&op).map_err(|e| e.to_string())?;
    if let Some(k) = given.iter().find(|k| !info.uses_option(k)) {
        let uses = if info.options.is_empty() {
            "none".to_string()
        } else {
            info.options
                .iter()
                .map(|o| format!("--{o}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(format!(
            "option `--{k}` does not apply to operator `{}` (its options: {uses})",
            info.name
        ));
    }
    // The limit covers reading the inputs too.
    if let Some(l) = opts.memory_limit {
        camex::memory::set_limit(l);
    }
    let go = || -> Result<(), Error> {
        named::check_output_is_not_input(&inputs, &outputs)?;
        let tensors = named::read_safetensors(&inputs)?;
        let results = named::run_op(&op, &tensors, &opts)?;
        named::write_safetensors(&outputs, &results)
    };
    go().map_err(|e| e.to_string())
}
