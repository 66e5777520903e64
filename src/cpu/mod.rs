//! The CPU path: exact reference for the CUDA kernels and the fallback of the framework adapters.
//!
//! One module per operator family, the same split as `kernels/` and `src/cuda/`:
//! [`curvature`](mod@curvature) (domain vectors and M_i), [`mask`] (TIES), [`merge`](mod@merge) (merge and the fused
//! CA-merge), [`linear`] (merged linear), [`dynamic`] (dynamic merge), [`segment`] (causal segment
//! scores). Generic over [`Float`] (f32, f64); every reduction accumulates in the storage
//! type or wider, and results do not depend on the thread count (fixed partitions, no atomics).

pub mod curvature;
pub mod dynamic;
pub(crate) mod gemm;
pub mod linear;
pub mod mask;
pub mod merge;
pub mod segment;

pub use curvature::{
    curvature, curvature_backward, identity_factors, Curvature, CurvatureGrads, FactorGrads,
    Factors,
};
pub use dynamic::{dynamic_merge, dynamic_merge_backward, DynamicGrads};
pub use linear::{merged_linear, merged_linear_backward, LinearGrads};
pub use mask::{ties_mask, ties_mask_into};
pub use merge::{
    ca_merge, ca_merge_backward, ca_merge_backward_with_curved, merge, merge_backward, merge_into,
    CaMergeGrads, CaMergeInputs, CaMergeOutputs, MergeGrads, MergeInputs, MergeOutputs,
};
pub use segment::{segment_scores, segment_scores_backward};

use crate::error::Result;
use crate::memory::{self, need};
use crate::tensor::Float;
use rayon::prelude::*;

/// Checks the buffers one call will allocate (outputs and the larger workspaces, `(name, shape)`
/// in elements of `F`) against the memory limit in force ([`crate::memory`]), before any of them
/// is allocated. Workspace shapes are upper bounds, not exact.
pub(crate) fn budget<F>(bufs: &[(&str, Vec<usize>)]) -> Result<()> {
    let e = std::mem::size_of::<F>();
    let needs: Vec<memory::Need<'_>> = bufs.iter().map(|(n, s)| need(n, s, e)).collect();
    memory::check(&needs)
}

/// Rows of per-thread scratch a parallel loop may hold at once.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// sum_k data[k*len .. (k+1)*len] for k = 0..data.len()/len, in k order (so the bits do not depend on
/// the thread count): sums over experts or groups of [*, O, I] tensors.
pub(crate) fn sum_stack<F: Float>(data: &[F], len: usize) -> Vec<F> {
    const CH: usize = 4096;
    let count = data.len() / len;
    let mut out = vec![F::ZERO; len];
    out.par_chunks_mut(CH).enumerate().for_each(|(c, chunk)| {
        for (j, v) in chunk.iter_mut().enumerate() {
            let q = c * CH + j;
            let mut s = F::ZERO;
            for k in 0..count {
                s += data[k * len + q];
            }
            *v = s;
        }
    });
    out
}

/// A zeroed scratch buffer whose first element is 64-byte aligned: one cache line and one AVX-512
/// vector, so the f32 kernels' vector loads of rows a multiple of 16 elements apart never straddle
/// two cache lines. Allocations above malloc's mmap threshold start 16 bytes into a page, and the
/// contraction kernel then ran at 75 GFLOP/s against 97 aligned (dB's shape, one Zen 4 thread).
pub(crate) struct Scratch<F> {
    buf: Vec<F>,
    off: usize,
    len: usize,
}

impl<F> Scratch<F> {
    /// Elements allocated beyond `len` for the alignment (64 bytes' worth), for the memory check.
    pub const PAD: usize = 64 / std::mem::size_of::<F>();
}

impl<F: Float> Scratch<F> {
    pub fn zeros(len: usize) -> Self {
        let buf = vec![F::ZERO; len + Self::PAD];
        // align_offset may decline (usize::MAX); the buffer is then merely unaligned.
        let off = buf.as_ptr().align_offset(64).min(Self::PAD);
        Scratch { buf, off, len }
    }
}

impl<F> std::ops::Deref for Scratch<F> {
    type Target = [F];
    fn deref(&self) -> &[F] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl<F> std::ops::DerefMut for Scratch<F> {
    fn deref_mut(&mut self) -> &mut [F] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// A raw pointer that may cross threads: parallel tasks that each own disjoint, strided ranges of
/// one buffer (column blocks of a row-major matrix) write through it, one row segment at a time.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub *mut T);
// SAFETY: used only for writes to disjoint ranges from different threads.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    pub fn get(self) -> *mut T {
        self.0
    }
    /// The `len` elements at `off` of a buffer of `total` elements, as a slice.
    ///
    /// # Safety
    /// No other live reference may touch `off..off + len` of the buffer while the slice lives.
    pub unsafe fn slice<'a>(self, off: usize, len: usize, total: usize) -> &'a mut [T] {
        assert!(off + len <= total, "camex internal: segment out of range");
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}
