//! Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11), the counter-based generator of cuRAND and
//! PyTorch, and the DARE keep draw of SPEC section 3 built on it.
//!
//! The CUDA kernels implement the same function in `kernels/philox.cuh`; both are checked against the
//! published known-answer vectors, so the CPU and the GPU make the same keep mask bit for bit.

use crate::options::Dare;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = (a as u64) * (b as u64);
    ((p >> 32) as u32, p as u32)
}

/// Ten rounds of Philox4x32 on counter `ctr` with key `key`.
#[inline]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut x = ctr;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, x[0]);
        let (hi1, lo1) = mulhilo(M1, x[2]);
        x = [hi1 ^ x[1] ^ k[0], lo1, hi0 ^ x[3] ^ k[1], lo0];
    }
    x
}

/// The first output word for element counter `e` on `stream`, keyed by `seed` (SPEC section 3).
#[inline]
pub fn draw(seed: u64, e: u64, stream: u32) -> u32 {
    philox4x32_10(
        [e as u32, (e >> 32) as u32, stream, 0],
        [seed as u32, (seed >> 32) as u32],
    )[0]
}

/// floor(p * 2^32): a draw u is kept when u >= this. p in [0, 1).
#[inline]
pub fn keep_threshold(p: f64) -> u32 {
    let t = (p * 4294967296.0).floor();
    if t <= 0.0 {
        0
    } else if t >= 4294967295.0 {
        u32::MAX
    } else {
        t as u32
    }
}

/// Stream of the element-granularity draw.
pub const STREAM_ELEMENT: u32 = 0;
/// Stream of the expert-granularity draw.
pub const STREAM_EXPERT: u32 = 1;

/// A resolved DARE configuration: who draws, the threshold and the 1/(1-p) rescale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DareDraw {
    pub granularity: Granularity,
    pub seed: u64,
    pub threshold: u32,
    pub scale: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Expert,
    Element,
}

impl DareDraw {
    /// None when `dare` is `Dare::None`.
    pub fn from_options(dare: &Dare) -> Option<DareDraw> {
        let (granularity, p, seed) = match *dare {
            Dare::None => return None,
            Dare::Expert { p, seed } => (Granularity::Expert, p, seed),
            Dare::Element { p, seed } => (Granularity::Element, p, seed),
        };
        Some(DareDraw {
            granularity,
            seed,
            threshold: keep_threshold(p),
            scale: 1.0 / (1.0 - p),
        })
    }

    /// Expert granularity: is expert `i` kept in group `g`? (e = g*N + i, stream 1)
    #[inline]
    pub fn keep_expert(&self, g: usize, i: usize, n: usize) -> bool {
        draw(self.seed, (g * n + i) as u64, STREAM_EXPERT) >= self.threshold
    }

    /// Element granularity: is element `pq` = p*I + q of expert `i` kept in group `g`?
    /// e = ((g*N + i)*O + p)*I + q = (g*N + i)*O*I + pq, stream 0.
    #[inline]
    pub fn keep_element(&self, g: usize, i: usize, pq: usize, n: usize, oi: usize) -> bool {
        let e = ((g * n + i) * oi + pq) as u64;
        draw(self.seed, e, STREAM_ELEMENT) >= self.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors of Philox4x32-10 published with Random123 (kat_vectors).
    #[test]
    fn random123_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn threshold_edges() {
        assert_eq!(keep_threshold(0.0), 0);
        assert_eq!(keep_threshold(0.5), 1 << 31);
        assert_eq!(keep_threshold(0.1), 429496729);
    }
}
