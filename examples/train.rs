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

use camex::candle::checkpoint::{self, join};
use camex::candle::{CamexFfn, CamexFfnConfig, CurvatureKind, DenseFfn, Routing, SplitMix};
use camex::{Dare, MergeOptions};
use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use std::io::{Read, Write};
use std::time::Instant;

#[derive(Debug, Clone)]
struct Args {
    steps: usize,
    batch: usize,
    seq_len: usize,
    segment: usize,
    d_model: usize,
    heads: usize,
    layers: usize,
    d_ff: usize,
    experts: usize,
    rank: usize,
    lr: f64,
    dare: f64,
    balance: f64,
    eval_every: usize,
    eval_batches: usize,
    seed: u64,
    seeds: usize,
    save: Option<String>,
    load: Option<String>,
    upcycle_from: Option<String>,
    data: String,
    plot: String,
    variants: Vec<String>,
    device: String,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            steps: 600,
            batch: 16,
            seq_len: 64,
            segment: 16,
            d_model: 64,
            heads: 4,
            layers: 2,
            d_ff: 256,
            experts: 4,
            rank: 4,
            lr: 3e-3,
            dare: 0.1,
            balance: 0.01,
            eval_every: 50,
            eval_batches: 16,
            seed: 1,
            seeds: 1,
            save: None,
            load: None,
            upcycle_from: None,
            data: concat!(env!("CARGO_MANIFEST_DIR"), "/data/kjv-genesis-ruth.txt.gz").into(),
            plot: "target/train-loss.png".into(),
            variants: vec!["camex".into(), "identity".into(), "dense".into()],
            device: "auto".into(),
        }
    }
}

const HELP: &str =
    "train: a small transformer LM with CAMEx FFN layers vs identity merging vs dense FFN

options (defaults in brackets):
  --steps N [600]        optimizer steps per variant
  --batch N [16]         sequences per step
  --seq-len N [64]       tokens per sequence
  --segment N [16]       causal routing segment length (divides seq-len)
  --d-model N [64]  --heads N [4]  --layers N [2]  --d-ff N [256]
  --experts N [4]        routed experts per CAMEx layer (plus the base)
  --rank N [4]           Kronecker rank R
  --lr X [3e-3]          AdamW peak learning rate (warm-up, cosine decay)
  --dare P [0.1]         DARE p at expert granularity during training (0: off)
  --balance X [0.01]     weight of the load-balancing loss
  --eval-every N [50]  --eval-batches N [16]
  --seed N [1]           first seed
  --seeds K [1]          runs per variant, seeds N..N+K-1 (the same for every variant); prints
                         mean and sd per variant and the paired CAMEx gap with its standard error
  --save DIR             write each trained model to DIR/<variant>-seed<S>.safetensors
  --load FILE            start from a saved model (one variant, one seed; --steps 0: evaluate only)
  --upcycle-from FILE    start from a saved dense model: its FFNs are upcycled into CAMEx FFNs
  --data PATH            gzip text [data/kjv-genesis-ruth.txt.gz]
  --plot PATH            PNG of the loss curves [target/train-loss.png]
  --variants LIST        comma list of camex,identity,dense [all three]
  --device auto|cpu|cuda [auto]  (auto: the GPU when built with `cuda` and one is present)";

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--help" || k == "-h" {
            println!("{HELP}");
            std::process::exit(0);
        }
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        let num = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{k}: expected an integer, got `{v}`"))
        };
        let flt = |v: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("{k}: expected a number, got `{v}`"))
        };
        match k.as_str() {
            "--steps" => a.steps = num(&v)?,
            "--batch" => a.batch = num(&v)?,
            "--seq-len" => a.seq_len = num(&v)?,
            "--segment" => a.segment = num(&v)?,
            "--d-model" => a.d_model = num(&v)?,
            "--heads" => a.heads = num(&v)?,
            "--layers" => a.layers = num(&v)?,
            "--d-ff" => a.d_ff = num(&v)?,
            "--experts" => a.experts = num(&v)?,
            "--rank" => a.rank = num(&v)?,
            "--lr" => a.lr = flt(&v)?,
            "--dare" => a.dare = flt(&v)?,
            "--balance" => a.balance = flt(&v)?,
            "--eval-every" => a.eval_every = num(&v)?.max(1),
            "--eval-batches" => a.eval_batches = num(&v)?.max(1),
            "--seed" => a.seed = num(&v)? as u64,
            "--seeds" => a.seeds = num(&v)?,
            "--save" => a.save = Some(v),
            "--load" => a.load = Some(v),
            "--upcycle-from" => a.upcycle_from = Some(v),
            "--data" => a.data = v,
            "--plot" => a.plot = v,
            "--variants" => a.variants = v.split(',').map(|s| s.trim().to_string()).collect(),
            "--device" => a.device = v,
            _ => return Err(format!("unknown option {k} (see --help)")),
        }
    }
    if a.seq_len == 0 || a.segment == 0 || a.seq_len % a.segment != 0 {
        return Err(format!(
            "--segment {} must divide --seq-len {}",
            a.segment, a.seq_len
        ));
    }
    if a.heads == 0 || a.d_model % a.heads != 0 {
        return Err(format!(
            "--heads {} must divide --d-model {}",
            a.heads, a.d_model
        ));
    }
    for v in &a.variants {
        if !["camex", "identity", "dense"].contains(&v.as_str()) {
            return Err(format!("unknown variant `{v}` (camex, identity, dense)"));
        }
    }
    if a.seeds == 0 {
        return Err("--seeds must be at least 1".into());
    }
    if a.load.is_some() && (a.variants.len() != 1 || a.seeds != 1) {
        return Err("--load FILE holds one model: give one --variants and --seeds 1".into());
    }
    if a.load.is_some() && a.upcycle_from.is_some() {
        return Err("--load and --upcycle-from both set the initial weights: give one".into());
    }
    Ok(a)
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

struct Block {
    ln1: (Var, Var),
    wqkv: Var,
    wo: Var,
    ln2: (Var, Var),
    ffn: Ffn,
}

struct Model {
    tok: Var,
    pos: Var,
    blocks: Vec<Block>,
    lnf: (Var, Var),
    heads: usize,
    causal: Tensor,
}

fn layer_norm(x: &Tensor, (w, b): &(Var, Var)) -> Result<Tensor> {
    // Composed from differentiable candle ops (candle-nn's fused layer_norm has no backward).
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

impl Model {
    /// The dense model; `variant` then upcycles every FFN (the same initial function for all three).
    fn new(a: &Args, vocab: usize, variant: &str, dev: &Device) -> Result<Model> {
        let mut rng = SplitMix(a.seed);
        let (d, dt) = (a.d_model, DType::F32);
        let std = 0.02;
        let ln = |dev: &Device| -> Result<(Var, Var)> {
            Ok((Var::ones(d, dt, dev)?, Var::zeros(d, dt, dev)?))
        };
        let tok = Var::from_tensor(&rng.randn(&[vocab, d], std, dt, dev)?)?;
        let pos = Var::from_tensor(&rng.randn(&[a.seq_len, d], std, dt, dev)?)?;
        let mut blocks = Vec::new();
        let mut router_rng = SplitMix(a.seed.wrapping_add(1000));
        for k in 0..a.layers {
            let wqkv = Var::from_tensor(&rng.randn(&[3 * d, d], std, dt, dev)?)?;
            let wo = Var::from_tensor(&rng.randn(
                &[d, d],
                std / (2.0 * a.layers as f64).sqrt(),
                dt,
                dev,
            )?)?;
            let mut dense = DenseFfn::new(d, a.d_ff, std, &mut rng, dt, dev)?;
            let ffn_file = a.upcycle_from.as_deref();
            let ffn_prefix = format!("blocks.{k}.ffn");
            if let (Some(path), "dense") = (ffn_file, variant) {
                dense = DenseFfn::from_safetensors(path, &ffn_prefix, dt, dev)?;
            }
            let ffn = match variant {
                "dense" => Ffn::Dense(dense),
                v => {
                    let curvature = if v == "camex" {
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
                        opts: MergeOptions {
                            dare: if a.dare > 0.0 {
                                Dare::Expert {
                                    p: a.dare,
                                    seed: a.seed,
                                }
                            } else {
                                Dare::None
                            },
                            ..MergeOptions::default()
                        },
                    };
                    Ffn::Camex(Box::new(match ffn_file {
                        // The CAMEx FFN starts from the dense FFN of the checkpoint file.
                        Some(path) => CamexFfn::upcycle_from_safetensors(
                            path,
                            &ffn_prefix,
                            config,
                            &mut router_rng,
                            dt,
                            dev,
                        )?,
                        None => CamexFfn::upcycle(&dense, config, &mut router_rng)?,
                    }))
                }
            };
            blocks.push(Block {
                ln1: ln(dev)?,
                wqkv,
                wo,
                ln2: ln(dev)?,
                ffn,
            });
        }
        let l = a.seq_len;
        let mask: Vec<f32> = (0..l * l)
            .map(|k| if k % l > k / l { -1e9 } else { 0.0 })
            .collect();
        let model = Model {
            tok,
            pos,
            blocks,
            lnf: ln(dev)?,
            heads: a.heads,
            causal: Tensor::from_vec(mask, (l, l), dev)?,
        };
        if let Some(path) = &a.upcycle_from {
            // Everything but the FFNs (made above from the file) comes from the dense checkpoint.
            checkpoint::load_subset(&model.named_vars(false), path)?;
        }
        Ok(model)
    }

    /// Every variable by name (the checkpoint's tensor names); without the FFNs unless `ffn`.
    fn named_vars(&self, ffn: bool) -> Vec<(String, Var)> {
        let mut v = vec![
            ("tok".to_string(), self.tok.clone()),
            ("pos".to_string(), self.pos.clone()),
            ("lnf.weight".to_string(), self.lnf.0.clone()),
            ("lnf.bias".to_string(), self.lnf.1.clone()),
        ];
        for (k, b) in self.blocks.iter().enumerate() {
            let p = format!("blocks.{k}");
            for (n, x) in [
                ("ln1.weight", &b.ln1.0),
                ("ln1.bias", &b.ln1.1),
                ("wqkv", &b.wqkv),
                ("wo", &b.wo),
                ("ln2.weight", &b.ln2.0),
                ("ln2.bias", &b.ln2.1),
            ] {
                v.push((join(&p, n), x.clone()));
            }
            if ffn {
                let p = join(&p, "ffn");
                v.extend(match &b.ffn {
                    Ffn::Dense(f) => f.named_vars(&p),
                    Ffn::Camex(f) => f.named_vars(&p),
                });
            }
        }
        v
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = vec![
            self.tok.clone(),
            self.pos.clone(),
            self.lnf.0.clone(),
            self.lnf.1.clone(),
        ];
        for b in &self.blocks {
            v.extend([
                b.ln1.0.clone(),
                b.ln1.1.clone(),
                b.wqkv.clone(),
                b.wo.clone(),
                b.ln2.0.clone(),
                b.ln2.1.clone(),
            ]);
            match &b.ffn {
                Ffn::Dense(f) => v.extend(f.vars()),
                Ffn::Camex(f) => v.extend(f.vars()),
            }
        }
        v
    }

    /// Parameters a token uses: for a CAMEx layer, one merged `wi` and `wo` (the dense count).
    fn active_params(&self) -> usize {
        let mut n = self.tok.elem_count() + self.pos.elem_count() + 2 * self.lnf.0.elem_count();
        for b in &self.blocks {
            n += 4 * b.ln1.0.elem_count() + b.wqkv.elem_count() + b.wo.elem_count();
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

    /// (logits [B, L, V], load-balancing loss).
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
            let a = layer_norm(&x, &blk.ln1)?;
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
            let a = layer_norm(&x, &blk.ln2)?;
            let f = match &blk.ffn {
                Ffn::Dense(f) => f.forward(&a)?,
                Ffn::Camex(f) => {
                    let out = f.forward(&a, train, seed.wrapping_mul(31).wrapping_add(k as u64))?;
                    aux = (aux + out.balance_loss)?;
                    out.y
                }
            };
            x = (x + f)?;
        }
        let x = layer_norm(&x, &self.lnf)?;
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

fn train(variant: &str, c: &Corpus, a: &Args, dev: &Device) -> Result<Run> {
    let model = Model::new(a, c.vocab.len(), variant, dev)?;
    if let Some(path) = &a.load {
        checkpoint::load(&model.named_vars(true), path)?;
        println!("loaded {path}");
    }
    let vars = model.vars();
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
    let mut rng = SplitMix(a.seed ^ 0xDA7A);
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
        let starts: Vec<usize> = (0..a.batch)
            .map(|_| (rng.next_u64() % span as u64) as usize)
            .collect();
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
        checkpoint::save(&model.named_vars(true), &path)?;
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
    let a = parse_args()?;
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // candle's CPU thread pool waits on a spinning barrier: on a small machine that is busy
        // with anything else it loses several times over (measured 5x on 2 loaded cores). One
        // candle thread; the matmuls (gemm) and the CAMEx operators still use rayon's threads.
        // Set CANDLE_NUM_THREADS yourself to override.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let dev = match a.device.as_str() {
        "auto" => auto_device(),
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).map_err(|e| format!("--device cuda: {e}"))?,
        d => return Err(format!("--device must be auto, cpu or cuda, got `{d}`")),
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
        for v in &a.variants {
            runs.push(train(v, &c, &seeded, &dev).map_err(|e| format!("{v}: {e}"))?);
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
        .map(|v| (v.clone(), runs.iter().filter(|r| &r.name == v).collect()))
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
    }
}

/// A small PNG writer for the loss curves: no plotting crate, one deflate stream (flate2).
mod plot {
    use super::Run;
    use std::io::Write;

    const W: usize = 900;
    const H: usize = 540;
    const COLORS: [[u8; 3]; 3] = [[214, 39, 40], [31, 119, 180], [60, 60, 60]];

    struct Canvas {
        px: Vec<u8>,
    }

    impl Canvas {
        fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
            if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
                let k = (y as usize * W + x as usize) * 3;
                self.px[k..k + 3].copy_from_slice(&c);
            }
        }
        fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
            let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
            for s in 0..=n {
                let t = s as f64 / n as f64;
                let (x, y) = (
                    (x0 + t * (x1 - x0)).round() as i64,
                    (y0 + t * (y1 - y0)).round() as i64,
                );
                for dx in 0..thick {
                    for dy in 0..thick {
                        self.set(x + dx - thick / 2, y + dy - thick / 2, c);
                    }
                }
            }
        }
        /// Mixes `c` into the pixel with weight `a` (overlapping bands stay distinguishable).
        fn blend(&mut self, x: i64, y: i64, c: [u8; 3], a: f64) {
            if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
                let k = (y as usize * W + x as usize) * 3;
                for (p, &c) in self.px[k..k + 3].iter_mut().zip(&c) {
                    *p = (*p as f64 * (1.0 - a) + c as f64 * a).round() as u8;
                }
            }
        }
        fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: [u8; 3]) {
            for yy in y..y + h {
                for xx in x..x + w {
                    self.set(xx, yy, c);
                }
            }
        }
        /// Text in a 3x5 pixel font, scaled by `s`.
        fn text(&mut self, x: i64, y: i64, s: i64, t: &str, c: [u8; 3]) {
            let mut cx = x;
            for ch in t.chars() {
                if let Some(g) = glyph(ch.to_ascii_uppercase()) {
                    for (row, bits) in g.iter().enumerate() {
                        for col in 0..3 {
                            if bits & (4 >> col) != 0 {
                                self.rect(cx + col * s, y + row as i64 * s, s, s, c);
                            }
                        }
                    }
                }
                cx += 4 * s;
            }
        }
    }

    fn glyph(c: char) -> Option<[u8; 5]> {
        Some(match c {
            '0' => [7, 5, 5, 5, 7],
            '1' => [2, 6, 2, 2, 7],
            '2' => [7, 1, 7, 4, 7],
            '3' => [7, 1, 7, 1, 7],
            '4' => [5, 5, 7, 1, 1],
            '5' => [7, 4, 7, 1, 7],
            '6' => [7, 4, 7, 5, 7],
            '7' => [7, 1, 1, 2, 2],
            '8' => [7, 5, 7, 5, 7],
            '9' => [7, 5, 7, 1, 7],
            '.' => [0, 0, 0, 0, 2],
            '-' => [0, 0, 7, 0, 0],
            '(' => [1, 2, 2, 2, 1],
            ')' => [4, 2, 2, 2, 4],
            ':' => [0, 2, 0, 2, 0],
            'A' => [2, 5, 7, 5, 5],
            'B' => [6, 5, 6, 5, 6],
            'C' => [7, 4, 4, 4, 7],
            'D' => [6, 5, 5, 5, 6],
            'E' => [7, 4, 6, 4, 7],
            'F' => [7, 4, 6, 4, 4],
            'G' => [7, 4, 5, 5, 7],
            'H' => [5, 5, 7, 5, 5],
            'I' => [7, 2, 2, 2, 7],
            'K' => [5, 5, 6, 5, 5],
            'L' => [4, 4, 4, 4, 7],
            'M' => [5, 7, 7, 5, 5],
            'N' => [6, 5, 5, 5, 5],
            'O' => [7, 5, 5, 5, 7],
            'P' => [7, 5, 7, 4, 4],
            'R' => [6, 5, 6, 5, 5],
            'S' => [7, 4, 7, 1, 7],
            'T' => [7, 2, 2, 2, 2],
            'U' => [5, 5, 5, 5, 7],
            'V' => [5, 5, 5, 5, 2],
            'W' => [5, 5, 7, 7, 5],
            'X' => [5, 5, 2, 5, 5],
            'Y' => [5, 5, 2, 2, 2],
            ' ' => [0, 0, 0, 0, 0],
            _ => return None,
        })
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }

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

    /// Per variant: training loss (moving average, mean over seeds, thin), validation loss (mean
    /// over seeds, thick, with dots) and, with more than one seed, the min..max band of the
    /// validation loss over seeds (shaded).
    pub fn write(path: &str, groups: &[(String, Vec<&Run>)]) -> std::io::Result<()> {
        if let Some(dir) = std::path::Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)?;
            }
        }
        let mut cv = Canvas {
            px: vec![255; W * H * 3],
        };
        let (x0, x1, y0, y1) = (70.0, W as f64 - 20.0, 30.0, H as f64 - 50.0);
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
        let (lo, hi) = (lo - pad, hi + pad);
        let smax = trains
            .iter()
            .chain(&vals)
            .flat_map(|c| c.last())
            .map(|p| p.0)
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let px = |s: usize, v: f64| {
            (
                x0 + (x1 - x0) * s as f64 / smax,
                y1 - (y1 - y0) * (v - lo) / (hi - lo),
            )
        };
        let grey = [200, 200, 200];
        for k in 0..=5 {
            let v = lo + (hi - lo) * k as f64 / 5.0;
            let (_, y) = px(0, v);
            cv.line((x0, y), (x1, y), grey, 1);
            cv.text(8, y as i64 - 5, 2, &format!("{v:.2}"), [0, 0, 0]);
            let s = (smax * k as f64 / 5.0) as usize;
            let (x, _) = px(s, lo);
            cv.line((x, y0), (x, y1), grey, 1);
            cv.text(x as i64 - 10, y1 as i64 + 10, 2, &s.to_string(), [0, 0, 0]);
        }
        cv.line((x0, y1), (x1, y1), [0, 0, 0], 2);
        cv.line((x0, y0), (x0, y1), [0, 0, 0], 2);
        cv.text((x1 as i64) - 120, y1 as i64 + 28, 2, "STEP", [0, 0, 0]);
        if seeds > 1 {
            // Bands first, blended, so that every mean curve stays visible on top of them.
            for (k, v) in vals.iter().enumerate() {
                let col = COLORS[k % COLORS.len()];
                for w in v.windows(2) {
                    let ((xa, la), (xb, lb)) = (px(w[0].0, w[0].2), px(w[1].0, w[1].2));
                    let ((_, ha), (_, hb)) = (px(w[0].0, w[0].3), px(w[1].0, w[1].3));
                    for x in xa.round() as i64..=xb.round() as i64 {
                        let t = ((x as f64 - xa) / (xb - xa).max(1e-9)).clamp(0.0, 1.0);
                        let (ylo, yhi) = (la + t * (lb - la), ha + t * (hb - ha));
                        for y in yhi.round() as i64..=ylo.round() as i64 {
                            cv.blend(x, y, col, 0.25);
                        }
                    }
                }
            }
        }
        for (k, ((name, _), (t, v))) in groups.iter().zip(trains.iter().zip(&vals)).enumerate() {
            let col = COLORS[k % COLORS.len()];
            let light = [col[0] / 2 + 127, col[1] / 2 + 127, col[2] / 2 + 127];
            for w in t.windows(2) {
                cv.line(px(w[0].0, w[0].1), px(w[1].0, w[1].1), light, 1);
            }
            for w in v.windows(2) {
                cv.line(px(w[0].0, w[0].1), px(w[1].0, w[1].1), col, 3);
            }
            for &(s, m, _, _) in v {
                let (x, y) = px(s, m);
                cv.rect(x as i64 - 3, y as i64 - 3, 7, 7, col);
            }
            let label = match name.as_str() {
                "camex" => "CAMEX KRONECKER",
                "identity" => "IDENTITY MERGING",
                _ => "DENSE FFN",
            };
            let ly = 40 + 22 * k as i64;
            cv.rect(x1 as i64 - 330, ly, 24, 10, col);
            cv.text(
                x1 as i64 - 296,
                ly - 1,
                2,
                &format!("{label} VAL {:.3}", v.last().map_or(f64::NAN, |p| p.1)),
                [0, 0, 0],
            );
        }
        let title = if seeds > 1 {
            format!("VAL LOSS: MEAN OF {seeds} SEEDS (THICK) AND MIN-MAX (BAND)   TRAINING (THIN)")
        } else {
            "LOSS: VALIDATION (THICK) TRAINING (THIN)".to_string()
        };
        cv.text(x0 as i64 + 10, 8, 2, &title, [0, 0, 0]);
        let mut raw = Vec::with_capacity(H * (W * 3 + 1));
        for row in cv.px.chunks(W * 3) {
            raw.push(0);
            raw.extend_from_slice(row);
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&raw)?;
        let idat = z.finish()?;
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(W as u32).to_be_bytes());
        ihdr.extend_from_slice(&(H as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(&mut png, b"IDAT", &idat);
        chunk(&mut png, b"IEND", &[]);
        std::fs::write(path, png)
    }
}
