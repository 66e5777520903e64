//! The CPU path's matrix products: a bounds-checked wrapper over the `gemm` crate's strided
//! micro-kernel (candle's CPU GEMM), and, for f32 on x86, the crate's own kernels for the small
//! products of the Kronecker path ([`gemm_small`], [`xyt`]).
//!
//! No hot loop is a naive triple loop. Strides are in elements and may be any positive value, which
//! turns transposes and mode-k views into stride choices instead of copies.

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
    // SAFETY: dst is an exclusive borrow of dst.len() elements.
    unsafe {
        gemm_raw(
            dst.as_mut_ptr(),
            dst.len(),
            d,
            accumulate,
            lhs,
            l,
            rhs,
            r,
            scale,
            parallel,
        )
    }
}

/// [`gemm`] into a destination given as a pointer and a length, for parallel tasks that each own
/// disjoint column blocks of one row-major matrix (which no `&mut` slice can express).
///
/// # Safety
/// `dst` must be valid for reads and writes of `dst_len` elements, and for the duration of the call
/// no one else may access the elements that the view `d` touches; lhs and rhs must not alias them.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw<F: Float>(
    dst: *mut F,
    dst_len: usize,
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
    assert!(d.end() <= dst_len && l.end() <= lhs.len() && r.end() <= rhs.len());
    if d.rows == 0 || d.cols == 0 {
        return;
    }
    if l.cols == 0 {
        if !accumulate {
            for i in 0..d.rows {
                for j in 0..d.cols {
                    *dst.add(d.off + i * d.rs + j * d.cs) = F::ZERO;
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
    // SAFETY: every index the kernel touches is inside its buffer (checked above); the caller
    // guarantees exclusive access to dst's view and no aliasing with lhs or rhs. gemm computes
    // dst = alpha*dst + beta*lhs*rhs.
    gemm::gemm(
        d.rows,
        d.cols,
        l.cols,
        dst.add(d.off),
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

/// dst [m, n] (+)= sum_s x_s [m, k] @ y_s [n, k]^T with both operands contiguous along k (row
/// strides `xs`, `ys`, `dld` for dst; `segs` = (count, stride) of the summed segments s, the same
/// for x and y): the factor-gradient contractions dA, dB, dC of the Kronecker backward (dC sums
/// over the o2 rows of a slab as segments) and the merge's inner products.
///
/// The `gemm` crate packs such operands with a transpose and runs them at about 40 % of its rate
/// (measured at 64 x 64 x 512 on Zen 4), so f32 on x86 takes a register-blocked dot-product
/// kernel instead: an MR x NR block of outputs in vector accumulators, k in vector steps, one
/// horizontal sum per output at the end, 4 x 2 blocks on AVX-512 and on AVX2+FMA. Measured on
/// Zen 4, one thread, GFLOP/s at the dB / dC / dA shapes of T5-small: `gemm` crate 40 / 26 / -,
/// AVX2 4 x 4 60 / 54 / 62 (16 accumulators and the loads spill 16 registers), AVX2 4 x 2
/// 90 / 61 / 95, against a GEMM peak of 106. AVX-512 4 x 4 reached 105 alone but spilled inside
/// the crate (ca_merge forward+backward 751 ms against 615 ms with 4 x 2). The order of additions
/// depends only on the shapes and the instruction set, never on the thread count.
/// Other types and machines use the `gemm` crate.
#[allow(clippy::too_many_arguments)]
pub(crate) fn xyt<F: Float>(
    dst: &mut [F],
    dld: usize,
    accumulate: bool,
    x: &[F],
    xs: usize,
    y: &[F],
    ys: usize,
    (m, n, k): (usize, usize, usize),
    (segs, seg_stride): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    let span = |rows: usize, ld: usize, cols: usize| (rows - 1) * ld + cols;
    let seg_end = segs.saturating_sub(1) * seg_stride;
    assert!(
        span(m, dld, n) <= dst.len()
            && (segs == 0 || k == 0 || seg_end + span(m, xs, k) <= x.len())
            && (segs == 0 || k == 0 || seg_end + span(n, ys, k) <= y.len()),
        "camex internal: xyt views out of bounds"
    );
    if segs == 0 || k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dld..r * dld + n].fill(F::ZERO);
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let (Some(isa), Some(d), Some(xf), Some(yf)) = (isa(), as_f32_mut(dst), as_f32(x), as_f32(y))
    {
        let args = xyt_x86::Args {
            dld,
            accumulate,
            xs,
            ys,
            m,
            n,
            k,
            segs,
            seg_stride,
        };
        // SAFETY: the instruction set is present (`isa` detected it); every index is inside its
        // slice (asserted above), and dst does not alias x or y (distinct borrows).
        unsafe {
            match isa {
                Isa::Avx512 => xyt_x86::avx512::run(d, xf, yf, &args),
                Isa::Avx2 => xyt_x86::avx2::run(d, xf, yf, &args),
            }
        }
        return;
    }
    for s in 0..segs {
        let dv = View {
            off: 0,
            rows: m,
            cols: n,
            rs: dld,
            cs: 1,
        };
        let xv = View {
            off: s * seg_stride,
            rows: m,
            cols: k,
            rs: xs,
            cs: 1,
        };
        let yv = View {
            off: s * seg_stride,
            rows: n,
            cols: k,
            rs: ys,
            cs: 1,
        };
        gemm(
            dst,
            dv,
            accumulate || s > 0,
            x,
            xv,
            y,
            yv.t(),
            F::ONE,
            false,
        );
    }
}

/// The vector instruction set of this module's f32 kernels on this machine.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Isa {
    Avx512,
    Avx2,
}

/// AVX-512F where present, else AVX2 with FMA, else none (the `gemm` crate then).
#[cfg(target_arch = "x86_64")]
fn isa() -> Option<Isa> {
    if std::arch::is_x86_feature_detected!("avx512f") {
        Some(Isa::Avx512)
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        Some(Isa::Avx2)
    } else {
        None
    }
}

/// The slice as f32 when `F` is f32.
#[cfg(target_arch = "x86_64")]
fn as_f32<F: Float>(s: &[F]) -> Option<&[f32]> {
    (std::any::TypeId::of::<F>() == std::any::TypeId::of::<f32>())
        // SAFETY: F is f32 (same type id), so the cast changes nothing.
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) })
}

/// The mutable slice as f32 when `F` is f32.
#[cfg(target_arch = "x86_64")]
fn as_f32_mut<F: Float>(s: &mut [F]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<F>() == std::any::TypeId::of::<f32>())
        // SAFETY: F is f32 (same type id), so the cast changes nothing.
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) })
}

#[cfg(target_arch = "x86_64")]
mod xyt_x86 {
    /// The shape of one [`super::xyt`] call, as it checked it.
    pub(super) struct Args {
        pub dld: usize,
        pub accumulate: bool,
        pub xs: usize,
        pub ys: usize,
        pub m: usize,
        pub n: usize,
        pub k: usize,
        pub segs: usize,
        pub seg_stride: usize,
    }

    /// One kernel per instruction set: the same loops over its vector type. Full MR x NR blocks
    /// first, then every output of the m % MR rows and n % NR columns as a 1 x 1 block.
    macro_rules! xyt_kernel {
        ($name:ident, $feature:literal, $vec:ty, $lanes:literal, $mr:literal, $nr:literal,
         $zero:path, $load:path, $tail:path, $fma:path, $hsum:path) => {
            pub(super) mod $name {
                use super::Args;
                #[allow(unused_imports)]
                use std::arch::x86_64::*;

                /// Callers check the instruction set and that every view is inside its slice.
                #[target_feature(enable = $feature)]
                pub(in super::super) unsafe fn run(
                    dst: &mut [f32],
                    x: &[f32],
                    y: &[f32],
                    a: &Args,
                ) {
                    let (dp, xp, yp) = (dst.as_mut_ptr(), x.as_ptr(), y.as_ptr());
                    let (mf, nf) = (a.m / $mr * $mr, a.n / $nr * $nr);
                    for i in (0..mf).step_by($mr) {
                        for j in (0..nf).step_by($nr) {
                            let (d, xb, yb) =
                                (dp.add(i * a.dld + j), xp.add(i * a.xs), yp.add(j * a.ys));
                            block::<$mr, $nr>(d, xb, yb, a);
                        }
                    }
                    for i in 0..a.m {
                        for j in 0..a.n {
                            if i >= mf || j >= nf {
                                let (d, xb, yb) =
                                    (dp.add(i * a.dld + j), xp.add(i * a.xs), yp.add(j * a.ys));
                                block::<1, 1>(d, xb, yb, a);
                            }
                        }
                    }
                }

                /// dst[MR, NR] (+)= sum_s x_s[MR, k] y_s[NR, k]^T. The k % lanes tail of every
                /// segment is one more vector step on zero-filled (masked) loads.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn block<const MR: usize, const NR: usize>(
                    d: *mut f32,
                    x: *const f32,
                    y: *const f32,
                    a: &Args,
                ) {
                    let mut acc: [[$vec; NR]; MR] = [[$zero(); NR]; MR];
                    let kv = a.k / $lanes * $lanes;
                    for s in 0..a.segs {
                        let (x, y) = (x.add(s * a.seg_stride), y.add(s * a.seg_stride));
                        let mut p = 0;
                        while p < kv {
                            step::<MR, NR>(&mut acc, x, y, p, a, |q| $load(q));
                            p += $lanes;
                        }
                        if kv < a.k {
                            step::<MR, NR>(&mut acc, x, y, kv, a, |q| $tail(q, a.k - kv));
                        }
                    }
                    for (r, row) in acc.iter().enumerate() {
                        for (b, c) in row.iter().enumerate() {
                            let v = $hsum(*c);
                            let o = d.add(r * a.dld + b);
                            *o = if a.accumulate { *o + v } else { v };
                        }
                    }
                }

                /// One vector step of the sum at element p, loading through `load`.
                #[inline(always)]
                unsafe fn step<const MR: usize, const NR: usize>(
                    acc: &mut [[$vec; NR]; MR],
                    x: *const f32,
                    y: *const f32,
                    p: usize,
                    a: &Args,
                    load: impl Fn(*const f32) -> $vec,
                ) {
                    let mut yv: [$vec; NR] = [$zero(); NR];
                    #[allow(clippy::needless_range_loop)]
                    for b in 0..NR {
                        yv[b] = load(y.add(b * a.ys + p));
                    }
                    #[allow(clippy::needless_range_loop)]
                    for r in 0..MR {
                        let xv = load(x.add(r * a.xs + p));
                        for b in 0..NR {
                            acc[r][b] = $fma(xv, yv[b], acc[r][b]);
                        }
                    }
                }
            }
        };
    }

    xyt_kernel!(
        avx512,
        "avx512f",
        __m512,
        16,
        4,
        2,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        super::tail512,
        _mm512_fmadd_ps,
        super::hsum512
    );
    xyt_kernel!(
        avx2,
        "avx2,fma",
        __m256,
        8,
        4,
        2,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        super::tail256,
        _mm256_fmadd_ps,
        super::hsum256
    );

    /// The first `count` (< 16) f32 at p, zeros after (masked: nothing past them is read).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tail512(p: *const f32, count: usize) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_maskz_loadu_ps(((1u32 << count) - 1) as u16, p)
    }

    /// The first `count` (< 8) f32 at p, zeros after (masked: nothing past them is read).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn tail256(p: *const f32, count: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(count as i32), lane);
        _mm256_maskload_ps(p, mask)
    }

    /// The sum of the 16 lanes.
    #[target_feature(enable = "avx512f")]
    unsafe fn hsum512(v: std::arch::x86_64::__m512) -> f32 {
        std::arch::x86_64::_mm512_reduce_add_ps(v)
    }

    /// The sum of the 8 lanes.
    #[target_feature(enable = "avx")]
    unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
        use std::arch::x86_64::*;
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

/// dst (+)= lhs @ rhs for the small products of the Kronecker path (k, or m and n, at most a few
/// dozen): the x1, x2, x4 mode products, the x3 rows ([`left_small`]) and dD.
///
/// The `gemm` crate packs both operands and sets up per call; at these shapes that ran the mode
/// products at about half its large-GEMM rate (perf of a T5-small forward+backward on Zen 4: its
/// micro-kernels and packing 57 % of the time for 71 % of the FLOPs, while the crate's own
/// broadcast kernel ran the x3 rows at 1.7 times that rate per FLOP). So f32 on x86 takes a
/// broadcast kernel: an MR x NV-vector block of dst in accumulators, and per step q of the sum
/// one vector load of rhs's row q per column vector and one broadcast of lhs (r, q) per row.
/// dst's rows must be contiguous, and rhs's too unless it is small: a small rhs that is strided,
/// or not 64-byte aligned where dst has 64 rows or more (D^T and D in the x4 products, from the
/// caller's factors), is packed into an aligned buffer first, as unaligned vector loads straddle
/// two cache lines (see [`super::Scratch`]). Every output sums q in order from zero with fused
/// multiply-adds, then adds dst when `accumulate`, in the vector blocks and the scalar edge alike:
/// the bits depend on the shapes only. Other types, layouts and machines use [`gemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_small<F: Float>(
    dst: &mut [F],
    d: View,
    accumulate: bool,
    lhs: &[F],
    l: View,
    rhs: &[F],
    r: View,
) {
    // SAFETY: dst is an exclusive borrow of dst.len() elements.
    unsafe { gemm_small_raw(dst.as_mut_ptr(), dst.len(), d, accumulate, lhs, l, rhs, r) }
}

/// Elements of the stack buffer that a small rhs is packed into (16 KiB in f32).
#[cfg(target_arch = "x86_64")]
const PACK: usize = 4096;

/// That buffer, 64-byte aligned: a vector load from a row never straddles two cache lines.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct Packed([f32; PACK]);

/// [`gemm_small`] into a destination given as a pointer and a length, as [`gemm_raw`].
///
/// # Safety
/// As [`gemm_raw`]: `dst` valid for `dst_len` elements, the view `d` exclusively ours for the call,
/// lhs and rhs not aliasing it.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_small_raw<F: Float>(
    dst: *mut F,
    dst_len: usize,
    d: View,
    accumulate: bool,
    lhs: &[F],
    l: View,
    rhs: &[F],
    r: View,
) {
    #[cfg(target_arch = "x86_64")]
    let isa = isa();
    #[cfg(not(target_arch = "x86_64"))]
    let isa = None;
    gemm_small_isa(isa, dst, dst_len, d, accumulate, lhs, l, rhs, r)
}

/// [`gemm_small_raw`] on the given instruction set (none: the `gemm` crate), so that tests reach
/// the AVX2 kernel on AVX-512 machines.
///
/// # Safety
/// As [`gemm_small_raw`], and `isa` must be present on this machine.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_small_isa<F: Float>(
    isa: Option<Isa>,
    dst: *mut F,
    dst_len: usize,
    d: View,
    accumulate: bool,
    lhs: &[F],
    l: View,
    rhs: &[F],
    r: View,
) {
    #[cfg(target_arch = "x86_64")]
    // A packed rhs keeps its rows 64-byte aligned (row stride a multiple of 16 elements).
    let packed_len = r.rows * r.cols.next_multiple_of(16);
    #[cfg(target_arch = "x86_64")]
    if let (Some(isa), true) = (isa, d.cs == 1 && (r.cs == 1 || packed_len <= PACK)) {
        if let (Some(lf), Some(rf)) = (as_f32(lhs), as_f32(rhs)) {
            assert!(
                d.rows == l.rows && d.cols == r.cols && l.cols == r.rows,
                "camex internal: gemm_small shapes"
            );
            assert!(d.end() <= dst_len && l.end() <= lhs.len() && r.end() <= rhs.len());
            if d.rows == 0 || d.cols == 0 {
                return;
            }
            let args = |rs| bcast_x86::Args {
                m: d.rows,
                n: d.cols,
                k: l.cols,
                lrs: l.rs,
                lcs: l.cs,
                rs,
                ds: d.rs,
                accumulate,
            };
            // F is f32 (as_f32 matched), so dst is an f32 pointer.
            let dp = dst.cast::<f32>().add(d.off);
            // Wrapping: with k = 0 the views of lhs and rhs are empty and never read.
            let lp = lf.as_ptr().wrapping_add(l.off);
            let run = |rp: *const f32, a: &bcast_x86::Args| match isa {
                // SAFETY: the instruction set is present (`isa` detected it); every element the
                // views touch is inside its buffer (asserted above; a packed rhs is r.rows x
                // r.cols <= PACK), and the caller guarantees dst's view is ours and unaliased.
                Isa::Avx512 => unsafe { bcast_x86::avx512::run(dp, lp, rp, a) },
                Isa::Avx2 => unsafe { bcast_x86::avx2::run(dp, lp, rp, a) },
            };
            let rp = rf.as_ptr().wrapping_add(r.off);
            // Packing an unaligned rhs pays where its rows are read many times (x4: 1024 rows of
            // dst), not in the x3 rows (16).
            let aligned = rp.align_offset(64) == 0 && r.rs.is_multiple_of(16);
            if r.cs == 1 && (aligned || d.rows < 64 || packed_len > PACK) {
                run(rp, &args(r.rs));
            } else {
                // Uninitialised: the kernel reads only the r.cols elements of each row written here.
                let mut packed = std::mem::MaybeUninit::<Packed>::uninit();
                let pp = packed.as_mut_ptr().cast::<f32>();
                let ps = r.cols.next_multiple_of(16);
                for q in 0..r.rows {
                    for c in 0..r.cols {
                        pp.add(q * ps + c).write(rf[r.off + q * r.rs + c * r.cs]);
                    }
                }
                run(pp, &args(ps));
            }
            return;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    gemm_raw(dst, dst_len, d, accumulate, lhs, l, rhs, r, F::ONE, false)
}

/// y_b = M x_b for every b < `rows`, with x_b, y_b the contiguous [k, w] matrices at b*k*w and M
/// the k x k matrix at `m[m_off..]` (M^T when `transpose`): the mode-3 product of a slab, o2
/// products of 16 x 16 @ 16 x 32 each at T5-small, each a [`gemm_small`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn left_small<F: Float>(
    y: &mut [F],
    x: &[F],
    rows: usize,
    (k, w): (usize, usize),
    m: &[F],
    m_off: usize,
    transpose: bool,
) {
    let mv = View::rm(m_off, k, k);
    let mv = if transpose { mv.t() } else { mv };
    for b in 0..rows {
        let v = View::rm(b * k * w, k, w);
        gemm_small(y, v, false, m, mv, x, v);
    }
}

#[cfg(target_arch = "x86_64")]
mod bcast_x86 {
    /// The shape of one [`super::gemm_small`] call: lhs (r, q) at r*lrs + q*lcs, rhs row q at
    /// q*rs, dst row r at r*ds, both rows contiguous.
    pub(super) struct Args {
        pub m: usize,
        pub n: usize,
        pub k: usize,
        pub lrs: usize,
        pub lcs: usize,
        pub rs: usize,
        pub ds: usize,
        pub accumulate: bool,
    }

    /// One kernel per instruction set. Blocks of MR rows by NV vectors (24 accumulators on
    /// AVX-512, 12 on AVX2's 16 registers): a wide block where dst has the columns, a tall one
    /// where it has two vectors or fewer (the x4 product's i2 = 32). Column panels outermost, so
    /// rhs's panel stays in L1 over the row blocks; then one-vector panels, then scalar columns.
    macro_rules! bcast_kernel {
        ($name:ident, $feature:literal, $vec:ty, $lanes:literal, ($mr:literal, $nv:literal),
         ($mr_tall:literal, $nv_tall:literal), $zero:path, $load:path, $store:path, $set1:path,
         $fma:path, $add:path) => {
            pub(super) mod $name {
                use super::{Args, PANEL};
                #[allow(unused_imports)]
                use std::arch::x86_64::*;

                /// Callers check the instruction set and that every view is inside its buffer.
                #[target_feature(enable = $feature)]
                pub(in super::super) unsafe fn run(
                    d: *mut f32,
                    l: *const f32,
                    r: *const f32,
                    a: &Args,
                ) {
                    if a.n < $nv * $lanes {
                        panels::<$mr_tall, $nv_tall>(d, l, r, a)
                    } else {
                        panels::<$mr, $nv>(d, l, r, a)
                    }
                }

                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn panels<const MR: usize, const NV: usize>(
                    d: *mut f32,
                    l: *const f32,
                    r: *const f32,
                    a: &Args,
                ) {
                    let mut j = 0;
                    while j + NV * $lanes <= a.n {
                        rows::<MR, NV>(d, l, r, j, a);
                        j += NV * $lanes;
                    }
                    while j + $lanes <= a.n {
                        rows::<MR, 1>(d, l, r, j, a);
                        j += $lanes;
                    }
                    for i in 0..a.m {
                        for c in j..a.n {
                            let mut s = 0f32;
                            for q in 0..a.k {
                                s = (*l.add(i * a.lrs + q * a.lcs))
                                    .mul_add(*r.add(q * a.rs + c), s);
                            }
                            let o = d.add(i * a.ds + c);
                            *o = if a.accumulate { *o + s } else { s };
                        }
                    }
                }

                /// Columns j..j + NV * lanes of every row: MR-row blocks, then 4, then 1.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn rows<const MR: usize, const NV: usize>(
                    d: *mut f32,
                    l: *const f32,
                    r: *const f32,
                    j: usize,
                    a: &Args,
                ) {
                    // rhs rows a multiple of 1 KiB apart (x2's I = 512 or 768) fall into a few
                    // L1 sets, and the panel's k rows evict each other between row blocks: on
                    // Zen 4 the AVX2 blocks ran x2 at 70 GFLOP/s, and at 99 to 113 with rows
                    // 528 apart. So a panel that several row blocks read is copied into a
                    // contiguous buffer first (the copy is exact).
                    let mut panel = std::mem::MaybeUninit::<[$vec; PANEL]>::uninit();
                    let (rp, rs) = if a.m > MR && a.rs.is_multiple_of(256) && a.k * NV <= PANEL {
                        let pp = panel.as_mut_ptr().cast::<f32>();
                        for q in 0..a.k {
                            for v in 0..NV {
                                let x = $load(r.add(q * a.rs + j + v * $lanes));
                                $store(pp.add((q * NV + v) * $lanes), x);
                            }
                        }
                        (pp as *const f32, NV * $lanes)
                    } else {
                        (r.add(j), a.rs)
                    };
                    // The first block also prefetches the next panel's rows of rhs: at x1's
                    // shape they come from L3 (a row stride of 128 KiB).
                    let next = j + 2 * NV * $lanes <= a.n;
                    // Only read (prefetched) when `next`; wrapping: past the last panel it may
                    // point outside rhs.
                    let pf = r.wrapping_add(j + NV * $lanes);
                    let d = d.add(j);
                    let mut i = 0;
                    if next && MR <= a.m {
                        block::<MR, NV, true>(d, l, rp, rs, pf, i, a);
                        i += MR;
                    }
                    while i + MR <= a.m {
                        block::<MR, NV, false>(d, l, rp, rs, pf, i, a);
                        i += MR;
                    }
                    while i + 4 <= a.m {
                        block::<4, NV, false>(d, l, rp, rs, pf, i, a);
                        i += 4;
                    }
                    while i < a.m {
                        block::<1, NV, false>(d, l, rp, rs, pf, i, a);
                        i += 1;
                    }
                }

                /// dst rows i..i + MR of the panel at d, rhs's panel at r (row stride rs); with
                /// PREFETCH, the next panel's rows at pf (row stride a.rs) too.
                #[inline]
                #[target_feature(enable = $feature)]
                #[allow(clippy::too_many_arguments)]
                unsafe fn block<const MR: usize, const NV: usize, const PREFETCH: bool>(
                    d: *mut f32,
                    l: *const f32,
                    r: *const f32,
                    rs: usize,
                    pf: *const f32,
                    i: usize,
                    a: &Args,
                ) {
                    let mut acc: [[$vec; NV]; MR] = [[$zero(); NV]; MR];
                    for q in 0..a.k {
                        if PREFETCH {
                            for v in 0..NV {
                                let p = pf.wrapping_add(q * a.rs + v * $lanes);
                                _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>());
                            }
                        }
                        let mut rv: [$vec; NV] = [$zero(); NV];
                        #[allow(clippy::needless_range_loop)]
                        for v in 0..NV {
                            rv[v] = $load(r.add(q * rs + v * $lanes));
                        }
                        #[allow(clippy::needless_range_loop)]
                        for ii in 0..MR {
                            let b = $set1(*l.add((i + ii) * a.lrs + q * a.lcs));
                            for v in 0..NV {
                                acc[ii][v] = $fma(b, rv[v], acc[ii][v]);
                            }
                        }
                    }
                    #[allow(clippy::needless_range_loop)]
                    for ii in 0..MR {
                        for v in 0..NV {
                            let o = d.add((i + ii) * a.ds + v * $lanes);
                            let s = if a.accumulate {
                                $add($load(o), acc[ii][v])
                            } else {
                                acc[ii][v]
                            };
                            $store(o, s);
                        }
                    }
                }
            }
        };
    }

    /// Vectors of the buffer a panel of rhs is copied into (24 KiB with AVX-512: k up to 128 at
    /// three vectors).
    const PANEL: usize = 384;

    bcast_kernel!(
        avx512,
        "avx512f",
        __m512,
        16,
        (8, 3),
        (12, 2),
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps
    );
    bcast_kernel!(
        avx2,
        "avx2,fma",
        __m256,
        8,
        (6, 2),
        (6, 2),
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps
    );
}

/// dst = src with non-temporal stores where the CPU has them (x86-64: SSE2, always): a large
/// output written once (the [G, O, I] merged weights) then skips the read-for-ownership of every
/// cache line and does not evict the inputs, a third less memory traffic for the merge. The bytes
/// are copied as they are, so any `Float` type goes through the same f32-lane path.
pub(crate) fn copy_streaming<F: Float>(dst: &mut [F], src: &[F]) {
    assert_eq!(
        dst.len(),
        src.len(),
        "camex internal: copy_streaming lengths"
    );
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_sfence, _mm_stream_ps};
        let lanes = std::mem::size_of_val(dst) / 4;
        let (dp, sp) = (dst.as_mut_ptr().cast::<f32>(), src.as_ptr().cast::<f32>());
        // Scalar lanes up to the first 16-byte boundary of dst, then 4 lanes per store.
        let head = (dp.align_offset(16)).min(lanes);
        // SAFETY: dst and src hold `lanes` f32 lanes each (same byte length, asserted above) and do
        // not overlap (distinct borrows); every _mm_stream_ps address is 16-byte aligned (after the
        // head); SSE2 is part of x86-64. The sfence orders the streaming stores before any later
        // store, so that the rayon join after this task publishes them.
        unsafe {
            for k in 0..head {
                *dp.add(k) = *sp.add(k);
            }
            let mut k = head;
            while k + 4 <= lanes {
                _mm_stream_ps(dp.add(k), _mm_loadu_ps(sp.add(k)));
                k += 4;
            }
            for j in k..lanes {
                *dp.add(j) = *sp.add(j);
            }
            _mm_sfence();
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

#[cfg(test)]
mod tests {
    use super::{xyt, View};
    use crate::tensor::{DType, Float};

    type Call<F> =
        fn(&mut [F], usize, bool, &[F], usize, &[F], usize, (usize, usize, usize), (usize, usize));

    /// xyt against plain f64 loops, at shapes that fill the 4 x 2 blocks and the vector steps and
    /// shapes that leave edges and tails, with and without accumulation, output poisoned first.
    fn check<F: Float>(call: Call<F>) {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        };
        for &(m, n, k, segs) in &[
            (1, 1, 1, 1),
            (4, 2, 16, 1),
            (5, 3, 37, 1),
            (17, 9, 70, 3),
            (16, 16, 32, 64),
            (32, 32, 1024, 1),
            (3, 7, 15, 2),
            (2, 2, 0, 1),
        ] {
            let (xs, ys, dld) = (k + 3, k + 1, n + 2);
            let stride = m.max(n) * (k + 3) + 5;
            let len = (segs.max(1) - 1) * stride + m.max(n) * (k + 3) + 1;
            let x: Vec<F> = (0..len).map(|_| F::from_f64(next())).collect();
            let y: Vec<F> = (0..len).map(|_| F::from_f64(next())).collect();
            for accumulate in [false, true] {
                let init: Vec<F> = (0..m * dld).map(|_| F::from_f64(next())).collect();
                let mut dst = init.clone();
                if !accumulate {
                    dst.iter_mut().for_each(|v| *v = F::from_f64(f64::NAN));
                }
                call(
                    &mut dst,
                    dld,
                    accumulate,
                    &x,
                    xs,
                    &y,
                    ys,
                    (m, n, k),
                    (segs, stride),
                );
                for i in 0..m {
                    for j in 0..n {
                        let (mut want, mut mag) = (0.0, 0.0);
                        for s in 0..segs {
                            for p in 0..k {
                                let a = x[s * stride + i * xs + p].to_f64();
                                let b = y[s * stride + j * ys + p].to_f64();
                                want += a * b;
                                mag += (a * b).abs();
                            }
                        }
                        if accumulate {
                            want += init[i * dld + j].to_f64();
                            mag += init[i * dld + j].to_f64().abs();
                        }
                        let got = dst[i * dld + j].to_f64();
                        let eps = if F::DTYPE == DType::F32 {
                            1.2e-7
                        } else {
                            2.3e-16
                        };
                        let tol = 2.0 * eps * (segs * k + 2) as f64 * mag.max(1e-30);
                        assert!(
                            (got - want).abs() <= tol,
                            "xyt {m}x{n}x{k} segs {segs} acc {accumulate} at ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn xyt_matches_f64_loops_f32() {
        check::<f32>(xyt);
    }

    #[test]
    fn xyt_matches_f64_loops_f64() {
        check::<f64>(xyt);
    }

    /// The AVX2 kernel on its own: AVX-512 machines dispatch past it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn xyt_avx2_matches_f64_loops() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            eprintln!("skipped: no AVX2+FMA here");
            return;
        }
        check::<f32>(
            |dst, dld, accumulate, x, xs, y, ys, (m, n, k), (segs, seg_stride)| {
                if segs == 0 || k == 0 {
                    return xyt(
                        dst,
                        dld,
                        accumulate,
                        x,
                        xs,
                        y,
                        ys,
                        (m, n, k),
                        (segs, seg_stride),
                    );
                }
                let args = super::xyt_x86::Args {
                    dld,
                    accumulate,
                    xs,
                    ys,
                    m,
                    n,
                    k,
                    segs,
                    seg_stride,
                };
                // SAFETY: AVX2 and FMA are present (checked above); the test's views are inside
                // their slices (the same ones xyt asserts in the other tests).
                unsafe { super::xyt_x86::avx2::run(dst, x, y, &args) }
            },
        );
    }

    /// gemm_small against plain f64 loops: row counts that fill the MR-row blocks and that leave
    /// 4-row and single rows, widths with wide, one-vector and scalar column panels, lhs plain
    /// and transposed, rhs contiguous and packed (transposed), strided rows, with and without
    /// accumulation, output poisoned first; on the given instruction set.
    fn check_small(isa: Option<super::Isa>) {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        };
        for &(m, n, k) in &[
            (1, 1, 1),
            (16, 32, 16),
            (5, 7, 2),
            (13, 20, 9),
            (29, 33, 6),
            (8, 64, 4),
            (64, 112, 64),
            (32, 32, 70),
            (70, 20, 9),
            (100, 32, 32),
            (3, 17, 0),
        ] {
            let (lo, ro, dpad) = (3, 5, 2);
            let lhs: Vec<f32> = (0..lo + m * k + m + k).map(|_| next() as f32).collect();
            // rhs rows a multiple of 256 apart (odd k) take the kernel's panel copy.
            let rrs = if k % 2 == 1 {
                (n + 3usize).next_multiple_of(256)
            } else {
                n + 3
            };
            let rhs: Vec<f32> = (0..ro + k * rrs + n * (k + 1))
                .map(|_| next() as f32)
                .collect();
            let ds = n + dpad;
            for (lt, rt, accumulate) in [
                (false, false, false),
                (true, false, true),
                (false, true, true),
                (true, true, false),
            ] {
                let l = if lt {
                    View::rm(lo, k, m).t()
                } else {
                    View::rm(lo, m, k)
                };
                let r = if rt {
                    View {
                        off: ro,
                        rows: k,
                        cols: n,
                        rs: 1,
                        cs: k + 1,
                    }
                } else {
                    View {
                        off: ro,
                        rows: k,
                        cols: n,
                        rs: rrs,
                        cs: 1,
                    }
                };
                let d = View {
                    off: 1,
                    rows: m,
                    cols: n,
                    rs: ds,
                    cs: 1,
                };
                let init: Vec<f32> = (0..1 + m * ds).map(|_| next() as f32).collect();
                let mut dst = init.clone();
                if !accumulate {
                    for i in 0..m {
                        dst[1 + i * ds..1 + i * ds + n].fill(f32::NAN);
                    }
                }
                // SAFETY: the views are inside the test's buffers, and isa is present (callers).
                unsafe {
                    super::gemm_small_isa(
                        isa,
                        dst.as_mut_ptr(),
                        dst.len(),
                        d,
                        accumulate,
                        &lhs,
                        l,
                        &rhs,
                        r,
                    )
                };
                for i in 0..m {
                    for j in 0..n {
                        let (mut want, mut mag) = (0.0, 0.0);
                        for q in 0..k {
                            let a = lhs[l.off + i * l.rs + q * l.cs] as f64;
                            let b = rhs[r.off + q * r.rs + j * r.cs] as f64;
                            want += a * b;
                            mag += (a * b).abs();
                        }
                        if accumulate {
                            want += init[1 + i * ds + j] as f64;
                            mag += (init[1 + i * ds + j] as f64).abs();
                        }
                        let got = dst[1 + i * ds + j] as f64;
                        assert!(
                            (got - want).abs() <= 2.4e-7 * (k + 2) as f64 * mag.max(1e-30),
                            "gemm_small {m}x{n}x{k} lt={lt} rt={rt} acc={accumulate} at ({i},{j}): {got} vs {want}"
                        );
                    }
                    // Padding between dst's rows and the element before it are left alone.
                    assert!(dst[1 + i * ds + n..1 + (i + 1) * ds]
                        .iter()
                        .zip(&init[1 + i * ds + n..])
                        .all(|(a, b)| a.to_bits() == b.to_bits()));
                }
                assert_eq!(dst[0].to_bits(), init[0].to_bits());
            }
        }
    }

    #[test]
    fn gemm_small_matches_f64_loops() {
        #[cfg(target_arch = "x86_64")]
        check_small(super::isa());
        check_small(None);
    }

    /// The AVX2 kernel on its own: AVX-512 machines dispatch past it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn gemm_small_avx2_matches_f64_loops() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            eprintln!("skipped: no AVX2+FMA here");
            return;
        }
        check_small(Some(super::Isa::Avx2));
    }

    /// left_small (the x3 rows) is gemm_small per row: M and M^T against plain f64 loops.
    #[test]
    fn left_small_matches_f64_loops() {
        let (rows, k, w, m_off) = (3, 16, 33, 3);
        let m: Vec<f32> = (0..m_off + k * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let x: Vec<f32> = (0..rows * k * w).map(|i| (i % 11) as f32 * 0.25).collect();
        for transpose in [false, true] {
            let mut y = vec![f32::NAN; rows * k * w];
            super::left_small(&mut y, &x, rows, (k, w), &m, m_off, transpose);
            for b in 0..rows {
                for r in 0..k {
                    for j in 0..w {
                        let want: f64 = (0..k)
                            .map(|q| {
                                let mv = if transpose {
                                    m[m_off + q * k + r]
                                } else {
                                    m[m_off + r * k + q]
                                };
                                mv as f64 * x[b * k * w + q * w + j] as f64
                            })
                            .sum();
                        // Small integers and quarters: every partial sum is exact in f32.
                        assert_eq!(
                            y[b * k * w + r * w + j] as f64,
                            want,
                            "left_small ({b},{r},{j}) t={transpose}"
                        );
                    }
                }
            }
        }
    }

    /// copy_streaming copies every element exactly, at every alignment and length (head, 4-lane
    /// body, tail), for f32 and f64, and leaves the elements around the target alone.
    #[test]
    fn copy_streaming_is_exact() {
        fn run<F: Float>() {
            for off in 0..5 {
                for len in [0, 1, 3, 4, 7, 16, 37] {
                    let src: Vec<F> = (0..len)
                        .map(|k| F::from_f64(k as f64 * 1.5 - 7.25))
                        .collect();
                    let mut buf = vec![F::from_f64(-1.0); off + len + 3];
                    super::copy_streaming(&mut buf[off..off + len], &src);
                    assert!(buf[..off].iter().all(|&v| v == F::from_f64(-1.0)));
                    assert!(buf[off..off + len]
                        .iter()
                        .zip(&src)
                        .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits()));
                    assert!(buf[off + len..].iter().all(|&v| v == F::from_f64(-1.0)));
                }
            }
        }
        run::<f32>();
        run::<f64>();
    }
}
