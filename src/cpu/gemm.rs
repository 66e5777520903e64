//! A bounds-checked wrapper over the `gemm` crate's strided micro-kernel (candle's CPU GEMM).
//!
//! All mode products and contractions of the CPU path go through [`gemm`], so no hot loop is a
//! naive triple loop. Strides are in elements and may be any positive value, which turns
//! transposes and mode-k views into stride choices instead of copies.

use crate::tensor::Float;

/// A strided matrix view into a slice: element (r, c) is `data[off + r*rs + c*cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    pub off: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl View {
    /// A contiguous row-major rows x cols matrix at `off`.
    pub fn rm(off: usize, rows: usize, cols: usize) -> View {
        View {
            off,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    pub fn t(self) -> View {
        View {
            off: self.off,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
    /// One past the largest index the view touches (0 when empty).
    fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            self.off + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// dst = (accumulate ? dst : 0) + scale * lhs @ rhs.
///
/// Panics (an internal bug, never reachable from validated input) when a view leaves its slice or
/// the inner dimensions disagree; this is what keeps the `unsafe` call below sound.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<F: Float>(
    dst: &mut [F],
    d: View,
    accumulate: bool,
    lhs: &[F],
    l: View,
    rhs: &[F],
    r: View,
    scale: F,
    parallel: bool,
) {
    assert!(
        d.rows == l.rows && d.cols == r.cols && l.cols == r.rows,
        "camex internal: gemm shapes {}x{} = {}x{} @ {}x{}",
        d.rows,
        d.cols,
        l.rows,
        l.cols,
        r.rows,
        r.cols
    );
    assert!(d.end() <= dst.len() && l.end() <= lhs.len() && r.end() <= rhs.len());
    if d.rows == 0 || d.cols == 0 {
        return;
    }
    if l.cols == 0 {
        if !accumulate {
            for i in 0..d.rows {
                for j in 0..d.cols {
                    dst[d.off + i * d.rs + j * d.cs] = F::ZERO;
                }
            }
        }
        return;
    }
    let par = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the kernel touches is inside its slice (checked above); dst does not
    // alias lhs or rhs (distinct borrows). gemm computes dst = alpha*dst + beta*lhs*rhs.
    unsafe {
        gemm::gemm(
            d.rows,
            d.cols,
            l.cols,
            dst.as_mut_ptr().add(d.off),
            d.cs as isize,
            d.rs as isize,
            accumulate,
            lhs.as_ptr().add(l.off),
            l.cs as isize,
            l.rs as isize,
            rhs.as_ptr().add(r.off),
            r.cs as isize,
            r.rs as isize,
            F::ONE,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}
