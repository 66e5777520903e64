//! Times the CPU CA-merge forward and backward at a SPEC section 8 shape.
//!
//! `cargo run --release --example ca_merge_cpu -- [t5-small|t5-base|gpt2|minilm|tiny]`
use camex::cpu::{self, CaMergeInputs, Curvature, Factors};
use camex::{HostTensor, MergeOptions, Split};
use std::time::Instant;

fn rand_tensor(shape: &[usize], seed: u64, scale: f32) -> HostTensor<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    HostTensor::from_fn(shape, |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
    })
}

fn main() -> camex::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "t5-small".into());
    let (o, i, n, r, g) = match which.as_str() {
        "t5-small" => (2048, 512, 7, 8, 16),
        "t5-base" => (3072, 768, 7, 8, 16),
        "gpt2" => (3072, 768, 7, 8, 32),
        "minilm" => (1536, 384, 7, 8, 32),
        _ => (96, 40, 3, 2, 4),
    };
    let split = Split::default_for(o, i);
    let base = rand_tensor(&[o, i], 1, 1.0);
    let experts = rand_tensor(&[n, o, i], 2, 1.0);
    let scores = rand_tensor(&[g, n], 3, 1.0);
    let [a, b, c, d] = cpu::identity_factors::<f32>(r, n, split, true);
    let inputs = CaMergeInputs {
        base: &base,
        experts: &experts,
        scores: &scores,
        curvature: Curvature::Kronecker(Factors {
            a: &a,
            b: &b,
            c: &c,
            d: &d,
        }),
        base_bias: None,
        expert_bias: None,
    };
    let opts = MergeOptions::default();
    let flops = 2.0 * (n * r * o * i * (split.o1 + split.o2 + split.i1 + split.i2)) as f64
        + 2.0 * (g * n * o * i) as f64;
    println!(
        "shape={which} O={o} I={i} N={n} R={r} G={g} split={split:?} threads={}",
        rayon::current_num_threads()
    );
    for rep in 0..2 {
        let t = Instant::now();
        let out = cpu::ca_merge(&inputs, &opts)?;
        let fwd = t.elapsed().as_secs_f64();
        let gm = rand_tensor(out.merged.shape(), 4, 1.0);
        let t = Instant::now();
        let grads = cpu::ca_merge_backward(&inputs, &opts, &gm, None, None)?;
        let bwd = t.elapsed().as_secs_f64();
        println!(
            "rep={rep} ca_merge fwd {:.3} s ({:.1} GFLOP/s)  bwd {:.3} s  grad_alpha={:.4e}",
            fwd,
            flops / fwd / 1e9,
            bwd,
            grads.grad_alpha
        );
    }
    Ok(())
}
