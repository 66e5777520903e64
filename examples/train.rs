//! Trains a small character-level transformer language model three times, with the same active
//! parameters, steps, data and initialisation, differing only in the FFN layers:
//!
//! - `camex`: CAMEx FFN layers, Kronecker curvature (upcycled from the dense initialisation),
//! - `identity`: the same layers with identity curvature (domain-specific merging, the baseline),
//! - `dense`: the dense FFN.
//!
//! Text: `data/kjv-genesis-ruth.txt.gz` (public domain, see `data/README.md`), last 10 % held out.
//! Routing: causal segments (SPEC section 3), so no token sees the future through the router.
//! Prints progress, then the validation loss and perplexity of each variant, and writes a PNG of
//! the loss curves (`--plot`, default `target/train-loss.png`).
//!
//! `--seeds K` trains every variant K times, with the same K seeds (`--seed`, `--seed`+1, ...) for
//! each variant (the seed sets the initialisation, the batches, router noise and DARE), and prints
//! per variant the mean and sample standard deviation of the validation loss and perplexity, and
//! the gap between CAMEx and each baseline, paired over seeds (mean of the per-seed differences,
//! standard error sd/sqrt(K)). The plot then shows the mean curves with a min..max band.
//!
//! Checkpoints (safetensors, candle-nn's `VarMap`, see `camex::candle::checkpoint`): `--save DIR`
//! writes every trained model to `DIR/<variant>-seed<S>.safetensors`; `--load FILE` starts one
//! variant from such a file (`--steps 0` only evaluates it); `--upcycle-from FILE` starts from a
//! dense model's checkpoint: embeddings, attention and norms are loaded, and each CAMEx FFN is
//! upcycled from the dense FFN in the file (`CamexFfn::upcycle_from_safetensors`).
//!
//!     cargo run --release --features candle --example train
//!     cargo run --release --features candle --example train -- --help
//!
//! On a GPU: `cargo run --release --features candle,cuda --example train` (candle's CUDA backend
//! and the crate's kernels; needs the CUDA 13 libraries, see README "candle on CUDA"). The default
//! `--device auto` takes the GPU when the build has `cuda` and one is present, else the CPU.
//! The GPU run has not been tried yet (no GPU session since the candle CUDA ops were written).

use camex::candle::checkpoint;
use camex::candle::{
    Activation, CamexFfn, CamexFfnConfig, CamexLayerConfig, CurvatureKind, DenseFfn, Routing,
    SeededInit,
};
use camex::Dare;
use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use candle_nn::{AdamW, Init, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::{CommandFactory, Parser, ValueEnum};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use std::io::{Read, Write};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Variant {
    /// CAMEx FFN layers, Kronecker curvature.
    Camex,
    /// The same layers with identity curvature (domain-specific merging).
    Identity,
    /// The dense FFN.
    Dense,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Camex => "camex",
            Variant::Identity => "identity",
            Variant::Dense => "dense",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// The GPU when built with `cuda` and one is present, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// train: a small transformer LM with CAMEx FFN layers vs identity merging vs dense FFN.
#[derive(Debug, Clone, Parser)]
#[command(name = "train")]
struct Args {
    /// Optimizer steps per variant.
    #[arg(long, default_value_t = 600)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Causal routing segment length (divides --seq-len).
    #[arg(long, default_value_t = 16)]
    segment: usize,
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 256)]
    d_ff: usize,
    /// Routed experts per CAMEx layer (plus the base).
    #[arg(long, default_value_t = 4)]
    experts: usize,
    /// Kronecker rank R.
    #[arg(long, default_value_t = 4)]
    rank: usize,
    /// AdamW peak learning rate (warm-up, cosine decay).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// DARE p at expert granularity during training (0: off).
    #[arg(long, default_value_t = 0.1)]
    dare: f64,
    /// Weight of the load-balancing loss.
    #[arg(long, default_value_t = 0.01)]
    balance: f64,
    /// Steps between evaluations.
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Validation batches per evaluation.
    #[arg(long, default_value_t = 16)]
    eval_batches: usize,
    /// First seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs per variant, seeds --seed.. --seed+K-1 (the same for every variant); prints mean and
    /// sd per variant and the paired CAMEx gap with its standard error.
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// Write each trained model to DIR/<variant>-seed<S>.safetensors.
    #[arg(long, value_name = "DIR")]
    save: Option<String>,
    /// Start from a saved model (one variant, one seed; --steps 0: evaluate only).
    #[arg(long, value_name = "FILE")]
    load: Option<String>,
    /// Start from a saved dense model: its FFNs are upcycled into CAMEx FFNs.
    #[arg(long, value_name = "FILE")]
    upcycle_from: Option<String>,
    /// Gzip text.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/kjv-genesis-ruth.txt.gz"))]
    data: String,
    /// PNG of the loss curves.
    #[arg(long, default_value = "target/train-loss.png")]
    plot: String,
    /// Comma list of variants.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Variant::Camex, Variant::Identity, Variant::Dense])]
    variants: Vec<Variant>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
}

/// The checks between options: a usage error (exit status 2) names them.
fn check_args(a: &Args) -> std::result::Result<(), String> {
    if a.seq_len == 0 || a.segment == 0 || !a.seq_len.is_multiple_of(a.segment) {
        return Err(format!(
            "--segment {} must divide --seq-len {}",
            a.segment, a.seq_len
        ));
    }
    if a.heads == 0 || !a.d_model.is_multiple_of(a.heads) {
        return Err(format!(
            "--heads {} must divide --d-model {}",
            a.heads, a.d_model
        ));
    }
    if a.eval_every == 0 || a.eval_batches == 0 {
        return Err("--eval-every and --eval-batches must be at least 1".into());
    }
    if a.seeds == 0 {
        return Err("--seeds must be at least 1".into());
    }
    if a.variants.is_empty() {
        return Err("--variants needs at least one of camex, identity, dense".into());
    }
    if a.load.is_some() && (a.variants.len() != 1 || a.seeds != 1) {
        return Err("--load FILE holds one model: give one --variants and --seeds 1".into());
    }
    if a.load.is_some() && a.upcycle_from.is_some() {
        return Err("--load and --upcycle-from both set the initial weights: give one".into());
    }
    Ok(())
}

fn parse_args() -> Args {
    let a = Args::parse();
    if let Err(e) = check_args(&a) {
        Args::command()
            .error(clap::error::ErrorKind::ArgumentConflict, e)
            .exit();
    }
    a
}

/// Character vocabulary and token ids of the text.
struct Corpus {
    vocab: Vec<char>,
    train: Vec<u32>,
    val: Vec<u32>,
}

fn load_corpus(path: &str) -> std::result::Result<Corpus, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .map_err(|e| format!("{path}: {e}"))?;
    let mut vocab: Vec<char> = text
        .chars()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    vocab.sort_unstable();
    let index: std::collections::HashMap<char, u32> = vocab
        .iter()
        .enumerate()
        .map(|(i, &c)| (c, i as u32))
        .collect();
    let ids: Vec<u32> = text.chars().map(|c| index[&c]).collect();
    let cut = ids.len() * 9 / 10;
    Ok(Corpus {
        vocab,
        train: ids[..cut].to_vec(),
        val: ids[cut..].to_vec(),
    })
}

/// A batch of `b` windows of `l + 1` tokens starting at the given offsets: (inputs, targets).
fn batch(ids: &[u32], starts: &[usize], l: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let mut x = Vec::with_capacity(starts.len() * l);
    let mut y = Vec::with_capacity(starts.len() * l);
    for &s in starts {
        x.extend_from_slice(&ids[s..s + l]);
        y.extend_from_slice(&ids[s + 1..s + l + 1]);
    }
    let b = starts.len();
    Ok((
        Tensor::from_vec(x, (b, l), dev)?,
        Tensor::from_vec(y, (b, l), dev)?,
    ))
}

enum Ffn {
    Dense(DenseFfn),
    Camex(Box<CamexFfn>),
}

/// Layer norm from `weight` and `bias` [D]: candle's differentiable composition
/// (`candle_nn::ops::layer_norm_slow`; the fused `layer_norm` has no backward).
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn new(d: usize, vb: VarBuilder) -> Result<Norm> {
        Ok(Norm {
            weight: vb.get_with_hints(d, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(d, "bias", Init::Const(0.0))?,
        })
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, 1e-5)
    }
}

struct Block {
    ln1: Norm,
    wqkv: Tensor,
    wo: Tensor,
    ln2: Norm,
    ffn: Ffn,
}

/// Every variable lives in `vars` under its checkpoint name (candle-nn's `VarMap`).
struct Model {
    vars: VarMap,
    tok: Tensor,
    pos: Tensor,
    blocks: Vec<Block>,
    lnf: Norm,
    heads: usize,
    causal: Tensor,
}

impl Model {
    /// The dense model; `variant` then upcycles every FFN (the same initial function for all three).
    fn new(a: &Args, vocab: usize, variant: Variant, dev: &Device) -> Result<Model> {
        let vars = VarMap::new();
        let dt = DType::F32;
        // One seeded stream for the dense model (the same draws for every variant) and one for
        // the routers.
        let init = SeededInit::new(a.seed);
        let vb = init.var_builder(&vars, dt, dev);
        let routers = SeededInit::new(a.seed.wrapping_add(1000)).var_builder(&vars, dt, dev);
        let d = a.d_model;
        let std = 0.02;
        let randn = |stdev: f64| Init::Randn { mean: 0.0, stdev };
        let tok = vb.get_with_hints((vocab, d), "tok", randn(std))?;
        let pos = vb.get_with_hints((a.seq_len, d), "pos", randn(std))?;
        let mut blocks = Vec::new();
        for k in 0..a.layers {
            let bv = vb.pp(format!("blocks.{k}"));
            let ln1 = Norm::new(d, bv.pp("ln1"))?;
            let wqkv = bv.get_with_hints((3 * d, d), "wqkv", randn(std))?;
            let wo_std = std / (2.0 * a.layers as f64).sqrt();
            let wo = bv.get_with_hints((d, d), "wo", randn(wo_std))?;
            let ln2 = Norm::new(d, bv.pp("ln2"))?;
            let ffn = if variant == Variant::Dense {
                Ffn::Dense(DenseFfn::new(
                    d,
                    a.d_ff,
                    std,
                    Activation::Gelu,
                    bv.pp("ffn"),
                )?)
            } else {
                // The dense FFN that the CAMEx FFN starts from: the dense variant's draws, into a
                // scratch map, so that it is not a variable of this model.
                let scratch = VarMap::new();
                let dense_vb = init.var_builder(&scratch, dt, dev);
                let dense = DenseFfn::new(d, a.d_ff, std, Activation::Gelu, dense_vb)?;
                let curvature = if variant == Variant::Camex {
                    // M_i = I at init (normalised), so the merge starts at the dense scale.
                    CurvatureKind::Kronecker {
                        rank: a.rank,
                        normalised: true,
                    }
                } else {
                    CurvatureKind::Identity
                };
                let config = CamexFfnConfig {
                    n_experts: a.experts,
                    curvature,
                    routing: Routing::CausalSegments {
                        segment_len: a.segment,
                    },
                    top_k: None,
                    noisy: true,
                    layer: CamexLayerConfig {
                        dare: if a.dare > 0.0 {
                            Dare::Expert {
                                p: a.dare,
                                seed: a.seed,
                            }
                        } else {
                            Dare::None
                        },
                        ..CamexLayerConfig::default()
                    },
                    seed: a.seed,
                };
                let prefix = format!("blocks.{k}.ffn");
                let rv = routers.pp(&prefix);
                Ffn::Camex(Box::new(match &a.upcycle_from {
                    // The CAMEx FFN starts from the dense FFN of the checkpoint file.
                    Some(path) => CamexFfn::upcycle_from_safetensors(path, &prefix, config, rv)?,
                    None => CamexFfn::upcycle(&dense, config, rv)?,
                }))
            };
            blocks.push(Block {
                ln1,
                wqkv,
                wo,
                ln2,
                ffn,
            });
        }
        let lnf = Norm::new(d, vb.pp("lnf"))?;
        let l = a.seq_len;
        let mask: Vec<f32> = (0..l * l)
            .map(|k| if k % l > k / l { -1e9 } else { 0.0 })
            .collect();
        let model = Model {
            vars,
            tok,
            pos,
            blocks,
            lnf,
            heads: a.heads,
            causal: Tensor::from_vec(mask, (l, l), dev)?,
        };
        if let Some(path) = &a.upcycle_from {
            // Everything but the CAMEx FFNs (upcycled above from the file) comes from the dense
            // checkpoint.
            let rest: Vec<(String, Var)> = model
                .named_vars()?
                .into_iter()
                .filter(|(n, _)| variant == Variant::Dense || !n.contains(".ffn."))
                .collect();
            checkpoint::load_subset(&rest, path)?;
        }
        Ok(model)
    }

    /// Every variable by its checkpoint name, sorted.
    fn named_vars(&self) -> Result<Vec<(String, Var)>> {
        let data = self
            .vars
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        let mut v: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    /// Parameters a token uses: for a CAMEx layer, one merged `wi` and `wo` (the dense count).
    fn active_params(&self) -> usize {
        let d = self.tok.dims()[1];
        let mut n = self.tok.elem_count() + self.pos.elem_count() + 2 * d;
        for b in &self.blocks {
            n += 4 * d + b.wqkv.elem_count() + b.wo.elem_count();
            n += match &b.ffn {
                Ffn::Dense(f) => f.vars().iter().map(|v| v.elem_count()).sum::<usize>(),
                Ffn::Camex(f) => {
                    let (_, o, i) = f.wi.dims();
                    2 * o * i + o + i
                }
            };
        }
        n
    }

    /// (logits [B, L, V], load-balancing loss); router noise and DARE from `seed` when `train`.
    fn forward(&self, ids: &Tensor, train: bool, seed: u64) -> Result<(Tensor, Tensor)> {
        let (b, l) = ids.dims2()?;
        let d = self.tok.dims()[1];
        let h = self.heads;
        let dh = d / h;
        let mut x = self
            .tok
            .embedding(&ids.flatten_all()?)?
            .reshape((b, l, d))?
            .broadcast_add(&self.pos.narrow(0, 0, l)?)?;
        let mut aux = Tensor::zeros((), x.dtype(), x.device())?;
        for (k, blk) in self.blocks.iter().enumerate() {
            let a = blk.ln1.forward(&x)?;
            let qkv = a.broadcast_matmul(&blk.wqkv.t()?)?;
            let split = |s: usize| -> Result<Tensor> {
                qkv.narrow(2, s * d, d)?
                    .reshape((b, l, h, dh))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, kk, v) = (split(0)?, split(1)?, split(2)?);
            let att = (q.matmul(&kk.t()?)? / (dh as f64).sqrt())?.broadcast_add(&self.causal)?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, l, d))?;
            x = (x + y.broadcast_matmul(&blk.wo.t()?)?)?;
            let a = blk.ln2.forward(&x)?;
            let f = match &blk.ffn {
                Ffn::Dense(f) => f.forward(&a)?,
                Ffn::Camex(f) => {
                    let layer_seed = seed.wrapping_mul(31).wrapping_add(k as u64);
                    let out = f.forward_full(&a, train.then_some(layer_seed))?;
                    aux = (aux + out.balance_loss)?;
                    out.y
                }
            };
            x = (x + f)?;
        }
        let x = self.lnf.forward(&x)?;
        let logits = x.broadcast_matmul(&self.tok.t()?)?;
        Ok((logits, aux))
    }

    fn loss(&self, x: &Tensor, y: &Tensor, train: bool, seed: u64) -> Result<(Tensor, Tensor)> {
        let (logits, aux) = self.forward(x, train, seed)?;
        let v = logits.dim(D::Minus1)?;
        let ce = candle_nn::loss::cross_entropy(&logits.reshape(((), v))?, &y.flatten_all()?)?;
        Ok((ce, aux))
    }
}

/// Mean validation loss over fixed, evenly spread windows.
fn evaluate(m: &Model, c: &Corpus, a: &Args, dev: &Device) -> Result<f64> {
    let span = c.val.len() - a.seq_len - 1;
    let total = a.eval_batches * a.batch;
    let mut sum = 0.0;
    for e in 0..a.eval_batches {
        let starts: Vec<usize> = (0..a.batch)
            .map(|k| (e * a.batch + k) * span / total)
            .collect();
        let (x, y) = batch(&c.val, &starts, a.seq_len, dev)?;
        sum += m.loss(&x, &y, false, 0)?.0.to_scalar::<f32>()? as f64;
    }
    Ok(sum / a.eval_batches as f64)
}

struct Run {
    name: String,
    seed: u64,
    /// (step, training loss) and (step, validation loss).
    train: Vec<(usize, f64)>,
    val: Vec<(usize, f64)>,
    final_val: f64,
    secs: f64,
    params: usize,
    active: usize,
}

fn label(v: &str) -> &'static str {
    match v {
        "camex" => "CAMEx (kronecker)",
        "identity" => "domain-specific merging (identity)",
        _ => "dense FFN",
    }
}

fn train(v: Variant, c: &Corpus, a: &Args, dev: &Device) -> Result<Run> {
    let variant = v.name();
    let model = Model::new(a, c.vocab.len(), v, dev)?;
    if let Some(path) = &a.load {
        checkpoint::load(&model.named_vars()?, path)?;
        println!("loaded {path}");
    }
    let vars = model.vars.all_vars();
    let params: usize = vars.iter().map(|v| v.elem_count()).sum();
    let active = model.active_params();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: a.lr,
            weight_decay: 0.01,
            ..ParamsAdamW::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed ^ 0xDA7A);
    let span = c.train.len() - a.seq_len - 1;
    let warmup = (a.steps / 20).max(1);
    let t0 = Instant::now();
    let mut run = Run {
        name: variant.into(),
        seed: a.seed,
        train: vec![],
        val: vec![],
        final_val: f64::NAN,
        secs: 0.0,
        params,
        active,
    };
    println!(
        "== {} (seed {}): {params} parameters, {active} active per token",
        label(variant),
        a.seed
    );
    let v0 = evaluate(&model, c, a, dev)?;
    run.val.push((0, v0));
    let mut ema = f64::NAN;
    for step in 1..=a.steps {
        let lr = if step <= warmup {
            a.lr * step as f64 / warmup as f64
        } else {
            let p = (step - warmup) as f64 / (a.steps - warmup).max(1) as f64;
            a.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
        };
        opt.set_learning_rate(lr);
        let starts: Vec<usize> = (0..a.batch).map(|_| rng.random_range(0..span)).collect();
        let (x, y) = batch(&c.train, &starts, a.seq_len, dev)?;
        let (ce, aux) = model.loss(
            &x,
            &y,
            true,
            a.seed.wrapping_mul(1_000_003).wrapping_add(step as u64),
        )?;
        let loss = (&ce + (aux * a.balance)?)?;
        opt.backward_step(&loss)?;
        let l = ce.to_scalar::<f32>()? as f64;
        ema = if ema.is_nan() { l } else { 0.9 * ema + 0.1 * l };
        run.train.push((step, l));
        let eval_now = step % a.eval_every == 0 || step == a.steps;
        let mut val_txt = String::new();
        if eval_now {
            let v = evaluate(&model, c, a, dev)?;
            run.val.push((step, v));
            val_txt = format!("  val {v:.4}");
        }
        if eval_now || step % 10 == 0 || step == 1 {
            let el = t0.elapsed().as_secs_f64();
            let eta = el / step as f64 * (a.steps - step) as f64;
            println!(
                "  [{variant:8}] step {step:5}/{}  loss {ema:.4}{val_txt}  lr {lr:.2e}  {:.2} s/step  eta {eta:.0}s",
                a.steps,
                el / step as f64
            );
            let _ = std::io::stdout().flush();
        }
    }
    run.final_val = run.val.last().map_or(f64::NAN, |v| v.1);
    run.secs = t0.elapsed().as_secs_f64();
    if let Some(dir) = &a.save {
        std::fs::create_dir_all(dir).map_err(|e| candle_core::Error::Msg(format!("{dir}: {e}")))?;
        let path = format!("{dir}/{variant}-seed{}.safetensors", a.seed);
        model.vars.save(&path)?;
        println!("saved {path}");
    }
    Ok(run)
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// The GPU when the build has the CUDA kernels and a device answers, else the CPU.
fn auto_device() -> Device {
    #[cfg(feature = "cuda")]
    if camex::cuda::driver_present() {
        match Device::new_cuda(0) {
            Ok(d) => return d,
            Err(e) => {
                // candle appends a backtrace to some errors: the first line says what happened.
                let e = e.to_string();
                let why = e.lines().next().unwrap_or("");
                eprintln!("--device auto: no usable GPU ({why}); using the CPU");
            }
        }
    }
    Device::Cpu
}

fn real_main() -> std::result::Result<(), String> {
    let a = parse_args();
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // candle's CPU thread pool waits on a spinning barrier: on a small machine that is busy
        // with anything else it loses several times over (measured 5x on 2 loaded cores). One
        // candle thread; the matmuls (gemm) and the CAMEx operators still use rayon's threads.
        // Set CANDLE_NUM_THREADS yourself to override.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let dev = match a.device {
        DeviceArg::Auto => auto_device(),
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::new_cuda(0).map_err(|e| format!("--device cuda: {e}"))?,
    };
    let c = load_corpus(&a.data)?;
    println!(
        "text: {} ({} characters, vocabulary {}; {} train / {} validation)",
        a.data,
        c.train.len() + c.val.len(),
        c.vocab.len(),
        c.train.len(),
        c.val.len()
    );
    println!(
        "model: {} layers, d_model {}, {} heads, d_ff {}, context {}; CAMEx: {} experts + base, rank {}, segments of {}; \
         {} steps of {} sequences, AdamW lr {}, device {:?}",
        a.layers, a.d_model, a.heads, a.d_ff, a.seq_len, a.experts, a.rank, a.segment, a.steps, a.batch, a.lr, dev.location()
    );
    let t0 = Instant::now();
    // Seed-major, so that every finished seed has all variants (a paired comparison so far).
    let mut runs: Vec<Run> = Vec::new();
    for k in 0..a.seeds {
        let seeded = Args {
            seed: a.seed + k as u64,
            ..a.clone()
        };
        for &v in &a.variants {
            runs.push(train(v, &c, &seeded, &dev).map_err(|e| format!("{}: {e}", v.name()))?);
        }
    }
    println!(
        "\nresults after {} steps (validation: {} windows of {} characters), {} seed(s): {}",
        a.steps,
        a.eval_batches * a.batch,
        a.seq_len,
        a.seeds,
        (0..a.seeds)
            .map(|k| (a.seed + k as u64).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let groups: Vec<(String, Vec<&Run>)> = a
        .variants
        .iter()
        .map(|v| {
            let name = v.name().to_string();
            let rs = runs.iter().filter(|r| r.name == name).collect();
            (name, rs)
        })
        .collect();
    print!("{}", summary(&groups));
    match plot::write(&a.plot, &groups) {
        Ok(()) => println!(
            "loss curves: {} (mean over seeds{})",
            a.plot,
            if a.seeds > 1 { ", band: min..max" } else { "" }
        ),
        Err(e) => eprintln!("could not write {}: {e}", a.plot),
    }
    println!("total time {:.0}s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Mean and sample standard deviation (divisor n - 1; NaN for fewer than two values).
fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Gap `a - b` paired over seeds: the mean of the per-seed differences and its standard error
/// sd(differences) / sqrt(K) (NaN for one seed). Pairing removes what a seed does to every
/// variant alike (the data order and the shared initialisation).
fn paired_gap(a: &[f64], b: &[f64]) -> (f64, f64) {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let (mean, sd) = mean_sd(&d);
    (mean, sd / (d.len() as f64).sqrt())
}

/// `x`, or `x ± e` when `e` is a number.
fn pm(x: f64, e: f64, digits: usize) -> String {
    if e.is_finite() {
        format!("{x:.digits$} ± {e:.digits$}")
    } else {
        format!("{x:.digits$}")
    }
}

/// The results table: per variant, mean ± sd over seeds of the final validation loss and
/// perplexity; then CAMEx minus each baseline, paired over seeds, ± its standard error.
fn summary(groups: &[(String, Vec<&Run>)]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let k = groups.first().map_or(0, |g| g.1.len());
    let spread = if k > 1 { " (mean ± sd)" } else { "" };
    let _ = writeln!(
        out,
        "{:38} {:>8} {:>8} {:>20} {:>20} {:>8}",
        "variant",
        "params",
        "active",
        format!("val loss{spread}"),
        format!("val ppl{spread}"),
        "time/run"
    );
    for (name, rs) in groups {
        let loss: Vec<f64> = rs.iter().map(|r| r.final_val).collect();
        let ppl: Vec<f64> = loss.iter().map(|l| l.exp()).collect();
        let ((lm, ls), (pmean, psd)) = (mean_sd(&loss), mean_sd(&ppl));
        let secs = rs.iter().map(|r| r.secs).sum::<f64>() / rs.len().max(1) as f64;
        let _ = writeln!(
            out,
            "{:38} {:>8} {:>8} {:>20} {:>20} {:>7.0}s",
            label(name),
            rs.first().map_or(0, |r| r.params),
            rs.first().map_or(0, |r| r.active),
            pm(lm, ls, 4),
            pm(pmean, psd, 3),
            secs
        );
    }
    if k > 1 {
        for (name, rs) in groups {
            let per: Vec<String> = rs
                .iter()
                .map(|r| format!("{}: {:.4}", r.seed, r.final_val))
                .collect();
            let _ = writeln!(out, "  {name:9} val loss per seed  {}", per.join("  "));
        }
    }
    if let Some((_, cx)) = groups.iter().find(|g| g.0 == "camex") {
        let cl: Vec<f64> = cx.iter().map(|r| r.final_val).collect();
        for (name, rs) in groups.iter().filter(|g| g.0 != "camex") {
            let bl: Vec<f64> = rs.iter().map(|r| r.final_val).collect();
            let (g, se) = paired_gap(&cl, &bl);
            let _ = writeln!(
                out,
                "gap CAMEx - {name}: val loss {}{}",
                pm(g, se, 4),
                if k > 1 {
                    format!(" (paired over {k} seeds, ± standard error)")
                } else {
                    " (one seed: no error estimate)".into()
                }
            );
        }
    }
    out
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_check() {
        Args::command().debug_assert();
        let a =
            Args::try_parse_from(["train", "--steps", "3", "--variants", "camex,dense"]).unwrap();
        assert_eq!((a.steps, a.batch), (3, 16));
        assert_eq!(a.variants, [Variant::Camex, Variant::Dense]);
        assert!(check_args(&a).is_ok());
        for bad in [["--variants", "moe"], ["--steps", "x"], ["--device", "tpu"]] {
            let e = Args::try_parse_from(["train", bad[0], bad[1]]).unwrap_err();
            // clap exits with status 2 on usage errors.
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
        let a = Args::try_parse_from(["train", "--segment", "5"]).unwrap();
        assert!(check_args(&a).unwrap_err().contains("--segment 5"));
    }

    #[test]
    fn mean_sd_and_paired_gap() {
        let (m, s) = mean_sd(&[1.0, 2.0, 3.0, 6.0]);
        assert_eq!(m, 3.0);
        assert!((s - (14.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!(mean_sd(&[2.5]).1.is_nan());
        // Differences 1, 2, 3: mean 2, sd 1, standard error 1/sqrt(3).
        let (g, se) = paired_gap(&[2.0, 4.0, 6.0], &[1.0, 2.0, 3.0]);
        assert_eq!(g, 2.0);
        assert!((se - 1.0 / 3f64.sqrt()).abs() < 1e-12);
    }

    fn run(name: &str, seed: u64, v: f64) -> Run {
        Run {
            name: name.into(),
            seed,
            train: vec![(1, v + 1.0), (2, v + 0.5)],
            val: vec![(0, v + 2.0), (2, v)],
            final_val: v,
            secs: 1.0,
            params: 10,
            active: 5,
        }
    }

    #[test]
    fn summary_reports_the_paired_gap() {
        let (c, d) = (
            [run("camex", 1, 1.7), run("camex", 2, 1.8)],
            [run("dense", 1, 1.8), run("dense", 2, 2.0)],
        );
        let groups = vec![
            ("camex".to_string(), c.iter().collect()),
            ("dense".to_string(), d.iter().collect()),
        ];
        let s = summary(&groups);
        // Differences -0.1 and -0.2: mean -0.15, sd 0.0707, standard error 0.05.
        assert!(
            s.contains("gap CAMEx - dense: val loss -0.1500 ± 0.0500"),
            "{s}"
        );
        assert!(s.contains("1.7500 ± 0.0707"), "{s}");
        let png = std::env::temp_dir().join(format!("camex-train-plot-{}.png", std::process::id()));
        plot::write(png.to_str().unwrap(), &groups).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        let _ = std::fs::remove_file(&png);
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height.
        assert_eq!(&bytes[16..24], &[0, 0, 0x03, 0xe8, 0, 0, 0x02, 0x58]);
    }
}
/// The loss curves as a PNG, drawn with plotters (bitmap backend; text from the bundled DejaVu Sans
/// through ab_glyph, so no system font library is needed).
mod plot {
    use super::Run;
    use plotters::prelude::*;
    use plotters::style::{register_font, FontStyle};

    const W: u32 = 1000;
    const H: u32 = 600;
    const COLORS: [RGBColor; 3] = [
        RGBColor(214, 39, 40),
        RGBColor(31, 119, 180),
        RGBColor(60, 60, 60),
    ];
    /// DejaVu Sans (Bitstream Vera licence, `examples/fonts/LICENSE-DejaVu.txt`).
    const FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");

    /// Mean over runs of curves that share their steps (every seed logs the same steps), with
    /// the min and max: (step, mean, min, max).
    fn mean_band(curves: &[Vec<(usize, f64)>]) -> Vec<(usize, f64, f64, f64)> {
        let n = curves.iter().map(|c| c.len()).min().unwrap_or(0);
        (0..n)
            .map(|i| {
                let vals: Vec<f64> = curves.iter().map(|c| c[i].1).collect();
                let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
                let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                (curves[0][i].0, mean, lo, hi)
            })
            .collect()
    }

    fn label(name: &str) -> &'static str {
        match name {
            "camex" => "CAMEx (Kronecker)",
            "identity" => "identity merging",
            _ => "dense FFN",
        }
    }

    /// Per variant: training loss (moving average, mean over seeds, thin), validation loss (mean
    /// over seeds, thick, with dots) and, with more than one seed, the min..max band of the
    /// validation loss over seeds (shaded).
    pub fn write(path: &str, groups: &[(String, Vec<&Run>)]) -> Result<(), String> {
        if let Some(dir) = std::path::Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
        }
        // Registering twice (a second plot in one process) replaces the font with itself.
        register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| "the bundled font does not parse".to_string())?;
        draw(path, groups).map_err(|e| e.to_string())
    }

    fn draw(
        path: &str,
        groups: &[(String, Vec<&Run>)],
    ) -> Result<(), Box<dyn std::error::Error + 'static>> {
        let smooth = |r: &Run| -> Vec<(usize, f64)> {
            let mut e = f64::NAN;
            r.train
                .iter()
                .map(|&(s, l)| {
                    e = if e.is_nan() { l } else { 0.95 * e + 0.05 * l };
                    (s, e)
                })
                .collect()
        };
        let trains: Vec<Vec<(usize, f64, f64, f64)>> = groups
            .iter()
            .map(|(_, rs)| mean_band(&rs.iter().map(|r| smooth(r)).collect::<Vec<_>>()))
            .collect();
        let vals: Vec<Vec<(usize, f64, f64, f64)>> = groups
            .iter()
            .map(|(_, rs)| mean_band(&rs.iter().map(|r| r.val.clone()).collect::<Vec<_>>()))
            .collect();
        let seeds = groups.first().map_or(0, |g| g.1.len());
        let all = trains
            .iter()
            .flatten()
            .map(|p| p.1)
            .chain(vals.iter().flatten().flat_map(|p| [p.2, p.3]))
            .filter(|v| v.is_finite());
        let (mut lo, mut hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let smax = trains
            .iter()
            .chain(&vals)
            .flat_map(|c| c.last())
            .map(|p| p.0)
            .max()
            .unwrap_or(1)
            .max(1) as f64;

        let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
        root.fill(&WHITE)?;
        let title = if seeds > 1 {
            format!(
                "Loss: validation mean of {seeds} seeds (thick, band min..max), training (thin)"
            )
        } else {
            "Loss: validation (thick), training (thin)".to_string()
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d(0f64..smax, (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("cross-entropy (nats per character)")
            .axis_desc_style(("sans-serif", 16))
            .label_style(("sans-serif", 14))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        if seeds > 1 {
            // Bands first, translucent, so that every mean curve stays visible on top of them.
            for (k, v) in vals.iter().enumerate() {
                let col = COLORS[k % COLORS.len()];
                let upper = v.iter().map(|p| (p.0 as f64, p.3));
                let lower = v.iter().rev().map(|p| (p.0 as f64, p.2));
                let outline: Vec<(f64, f64)> = upper.chain(lower).collect();
                chart.draw_series(std::iter::once(Polygon::new(outline, col.mix(0.2))))?;
            }
        }
        for (k, ((name, _), (t, v))) in groups.iter().zip(trains.iter().zip(&vals)).enumerate() {
            let col = COLORS[k % COLORS.len()];
            chart.draw_series(LineSeries::new(
                t.iter().map(|p| (p.0 as f64, p.1)),
                col.mix(0.45).stroke_width(1),
            ))?;
            let last = v.last().map_or(f64::NAN, |p| p.1);
            chart
                .draw_series(LineSeries::new(
                    v.iter().map(|p| (p.0 as f64, p.1)),
                    col.stroke_width(3),
                ))?
                .label(format!("{}: val {last:.3}", label(name)))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], col.stroke_width(3))
                });
            chart.draw_series(
                v.iter()
                    .map(|p| Circle::new((p.0 as f64, p.1), 4, col.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
