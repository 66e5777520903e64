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
//!     cargo run --release --features candle --example train
//!     cargo run --release --features candle --example train -- --help
//!
//! On a GPU: `cargo run --release --features candle,cuda --example train` (candle's CUDA backend
//! and the crate's kernels; needs the CUDA 13 libraries, see README "candle on CUDA"). The default
//! `--device auto` takes the GPU when the build has `cuda` and one is present, else the CPU.
//! The GPU run has not been tried yet (no GPU session since the candle CUDA ops were written).

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
  --seed N [1]
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
        for _ in 0..a.layers {
            let wqkv = Var::from_tensor(&rng.randn(&[3 * d, d], std, dt, dev)?)?;
            let wo = Var::from_tensor(&rng.randn(
                &[d, d],
                std / (2.0 * a.layers as f64).sqrt(),
                dt,
                dev,
            )?)?;
            let dense = DenseFfn::new(d, a.d_ff, std, &mut rng, dt, dev)?;
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
                    Ffn::Camex(Box::new(CamexFfn::upcycle(
                        &dense,
                        config,
                        &mut router_rng,
                    )?))
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
        Ok(Model {
            tok,
            pos,
            blocks,
            lnf: ln(dev)?,
            heads: a.heads,
            causal: Tensor::from_vec(mask, (l, l), dev)?,
        })
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
        train: vec![],
        val: vec![],
        final_val: f64::NAN,
        secs: 0.0,
        params,
        active,
    };
    println!(
        "== {} : {params} parameters, {active} active per token",
        label(variant)
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
    let mut runs = Vec::new();
    for v in &a.variants {
        runs.push(train(v, &c, &a, &dev).map_err(|e| format!("{v}: {e}"))?);
    }
    println!(
        "\nresults after {} steps (validation: {} windows of {} characters)",
        a.steps,
        a.eval_batches * a.batch,
        a.seq_len
    );
    println!(
        "{:38} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "variant", "params", "active", "val loss", "val ppl", "time"
    );
    for r in &runs {
        println!(
            "{:38} {:>10} {:>10} {:>10.4} {:>10.3} {:>7.0}s",
            label(&r.name),
            r.params,
            r.active,
            r.final_val,
            r.final_val.exp(),
            r.secs
        );
    }
    match plot::write(&a.plot, &runs) {
        Ok(()) => println!("loss curves: {}", a.plot),
        Err(e) => eprintln!("could not write {}: {e}", a.plot),
    }
    println!("total time {:.0}s", t0.elapsed().as_secs_f64());
    Ok(())
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

    /// Training loss (moving average, thin) and validation loss (thick, with dots) per variant.
    pub fn write(path: &str, runs: &[Run]) -> std::io::Result<()> {
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
        let curves: Vec<Vec<(usize, f64)>> = runs.iter().map(smooth).collect();
        let all = curves
            .iter()
            .flatten()
            .chain(runs.iter().flat_map(|r| r.val.iter()))
            .map(|p| p.1)
            .filter(|v| v.is_finite());
        let (mut lo, mut hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let (lo, hi) = (lo - pad, hi + pad);
        let smax = runs
            .iter()
            .flat_map(|r| r.train.last())
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
        for (k, (r, c)) in runs.iter().zip(&curves).enumerate() {
            let col = COLORS[k % COLORS.len()];
            let light = [col[0] / 2 + 127, col[1] / 2 + 127, col[2] / 2 + 127];
            for w in c.windows(2) {
                cv.line(px(w[0].0, w[0].1), px(w[1].0, w[1].1), light, 1);
            }
            for w in r.val.windows(2) {
                cv.line(px(w[0].0, w[0].1), px(w[1].0, w[1].1), col, 3);
            }
            for &(s, v) in &r.val {
                let (x, y) = px(s, v);
                cv.rect(x as i64 - 3, y as i64 - 3, 7, 7, col);
            }
            let name = match r.name.as_str() {
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
                &format!("{name} VAL {:.3}", r.final_val),
                [0, 0, 0],
            );
        }
        cv.text(
            x0 as i64 + 10,
            8,
            2,
            "LOSS: VALIDATION (THICK) TRAINING (THIN)",
            [0, 0, 0],
        );
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
