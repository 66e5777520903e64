//! The tests' one host RNG: rand's ChaCha8, seeded from a `u64` (`SeedableRng::seed_from_u64`), and
//! the few draws the tests make from it. Included by `tests/oracle/glue.rs`, `tests/cases/mod.rs`
//! and the test files that need nothing else (`#[path = "rng/mod.rs"] mod rng;`).
#![allow(dead_code)]

use rand::rngs::ChaCha8Rng;
use rand::{Rng as _, RngExt, SeedableRng};

/// Deterministic for a seed, on every platform.
pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(ChaCha8Rng::seed_from_u64(seed))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0.random::<f64>()
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        2.0 * self.unit() - 1.0
    }
    /// Standard normal (Box-Muller; rand itself has no normal distribution without rand_distr).
    pub fn normal(&mut self) -> f64 {
        let r = (-2.0 * (1.0 - self.unit()).ln()).sqrt();
        r * (std::f64::consts::TAU * self.unit()).cos()
    }
    /// n values uniform in [-1, 1).
    pub fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.uniform()).collect()
    }
    /// n values k/32 with k in [-64, 64]: exact in f32, and so are their differences, which keeps
    /// the sign tests of TIES identical in f32 and f64 (and makes |tau| ties frequent).
    pub fn dyadic(&mut self, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| self.0.random_range(-64i32..=64) as f64 / 32.0)
            .collect()
    }
    /// n values in [lo, hi).
    pub fn range(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| lo + (hi - lo) * self.unit()).collect()
    }
}
