//! The cost counters of the kernels' CPU emulation (kernels/emu_runtime.cpp, `scripts/cost-model.sh`)
//! against counts known in closed form, and block sampling against counting every block.
//!
//! Runs only when the kernels were built as the emulation (`CAMEX_KERNEL_EMU=1 cargo test --release
//! --features cuda --test emu_counters`); otherwise each test says why it skips.
#![cfg(feature = "cuda")]

mod emu_alloc;

use camex::ffi;
use std::sync::Mutex;

/// The counters are process-wide: one test at a time.
static COUNTING: Mutex<()> = Mutex::new(());

fn emulated(test: &str) -> bool {
    // SAFETY: a constant query.
    let e = unsafe { ffi::camex_emulated() } == 1;
    if !e {
        eprintln!(
            "{test}: skipped, kernels built for the GPU (CAMEX_KERNEL_EMU=1 builds the emulation)"
        );
    }
    e
}

/// Runs `f` with counting in `mode` (1 every block, 2 sampled) and returns the launches' records.
fn counted(mode: i32, f: impl FnOnce()) -> Vec<ffi::camex_emu_launch> {
    // SAFETY: switches the counters on and clears the records; `f` launches; then the records are
    // copied into a buffer of the size just reported, and counting is switched off.
    unsafe {
        ffi::camex_emu_reset();
        ffi::camex_emu_counting(mode);
    }
    f();
    unsafe {
        ffi::camex_emu_counting(0);
        let n = ffi::camex_emu_launches(std::ptr::null_mut(), 0);
        let mut v = vec![ffi::camex_emu_launch::default(); n as usize];
        ffi::camex_emu_launches(v.as_mut_ptr(), n);
        ffi::camex_emu_reset();
        v
    }
}

/// 64 floats, 256-byte aligned as cudaMalloc's allocations are (sector counts depend on it).
#[derive(Clone, Copy)]
#[repr(C, align(256))]
struct Chunk([f32; 64]);

fn aligned(floats: usize, v: f32) -> Vec<Chunk> {
    vec![Chunk([v; 64]); floats.div_ceil(64)]
}

/// A curvature call's parameters: dims [N, O, I, R, o1, o2, i1, i2] and the buffers base,
/// experts, the four factors, curved, grad_curved, grad_base, grad_experts and the four factor
/// gradients (workspace left to the caller).
fn curvature_params(
    dtype: i32,
    d: [usize; 8],
    b: [&Vec<Chunk>; 14],
) -> ffi::camex_curvature_params {
    let a = |k: usize| b[k].as_ptr() as u64;
    ffi::camex_curvature_params {
        dtype,
        n: d[0] as i64,
        o: d[1] as i64,
        i: d[2] as i64,
        r: d[3] as i64,
        o1: d[4] as i64,
        o2: d[5] as i64,
        i1: d[6] as i64,
        i2: d[7] as i64,
        base: a(0),
        experts: a(1),
        factor_a: a(2),
        factor_b: a(3),
        factor_c: a(4),
        factor_d: a(5),
        curved: a(6),
        grad_curved: a(7),
        grad_base: a(8),
        grad_experts: a(9),
        grad_factor_a: a(10),
        grad_factor_b: a(11),
        grad_factor_c: a(12),
        grad_factor_d: a(13),
        ..Default::default()
    }
}

/// A curvature forward (and backward) of `p` on the tensor-core path, with a workspace of the size
/// the library asks for. `p`'s buffers must be live host buffers of the sizes its dims imply
/// (curvature_params): the emulation's device memory.
fn run_curvature(p: &mut ffi::camex_curvature_params, backward: bool) {
    // SAFETY: size queries, then host buffers of the implied sizes; the tensor-core setting is
    // per thread and restored.
    unsafe {
        ffi::camex_set_tensor_cores(1);
        let w0 = ffi::camex_curvature_workspace(p, 0) as usize;
        let w1 = ffi::camex_curvature_workspace(p, 1) as usize;
        let ws = aligned(w0.max(w1).div_ceil(4), 0.0);
        p.workspace = ws.as_ptr() as u64;
        p.workspace_bytes = (ws.len() * 256) as i64;
        assert_eq!(ffi::camex_curvature_forward(p, std::ptr::null_mut()), 0);
        if backward {
            assert_eq!(ffi::camex_curvature_backward(p, std::ptr::null_mut()), 0);
        }
        ffi::camex_set_tensor_cores(-1);
    }
}

/// run_curvature in bf16 or f16 (`f16`) at dims `d` with buffers `b` (curvature_params), under the
/// emulated device's opt-in shared memory `limit` (restored after).
fn run_curvature_under(f16: bool, d: [usize; 8], b: [&Vec<Chunk>; 14], limit: i64, backward: bool) {
    let dtype = if f16 {
        ffi::camex_dtype_CAMEX_F16
    } else {
        ffi::camex_dtype_CAMEX_BF16
    };
    let mut p = curvature_params(dtype as i32, d, b);
    // SAFETY: a per-thread setting of the emulation, restored below.
    let prev = unsafe { ffi::camex_emu_smem_limit(limit) };
    run_curvature(&mut p, backward);
    // SAFETY: as above.
    unsafe { ffi::camex_emu_smem_limit(prev) };
}

/// One probe launch: every lane copies the `width`-byte word at element lane * stride of a shared
/// array (filled first, 33 coalesced rounds) and of global memory to two output slots.
fn probe(width: i32, stride: i32) -> ffi::camex_emu_launch {
    let src = aligned(32 * 33 * width as usize / 4, 0.5);
    let dst = aligned(64 * width as usize / 4, 0.0);
    let recs = counted(1, || {
        // SAFETY: src holds 32 * 33 words of `width` bytes, dst 32 floats (host memory is the
        // emulation's device memory).
        let rc = unsafe {
            ffi::camex_counter_probe(
                width,
                stride,
                src.as_ptr() as u64,
                dst.as_ptr() as u64,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 0, "probe launcher");
    });
    assert_eq!(recs.len(), 1, "one launch");
    let copied: Vec<f32> = dst.iter().flat_map(|c| c.0).collect();
    assert!(
        copied[..64 * width as usize / 4].iter().all(|&x| x == 0.5),
        "probe result"
    );
    recs[0]
}

#[test]
fn shared_wavefronts_follow_the_banks() {
    let _g = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    if !emulated("shared_wavefronts_follow_the_banks") {
        return;
    }
    // (width, stride, wavefronts of the strided read): the bank-conflict arithmetic of the CUDA
    // programming guide. The fill before it is 33 conflict-free stores of width/4 wavefronts each.
    let cases = [
        (4, 1, 1),   // consecutive words
        (4, 0, 1),   // one word for every lane: a broadcast
        (4, 2, 2),   // two lanes per bank
        (4, 8, 8),   //
        (4, 32, 32), // every lane in bank 0
        (4, 33, 1),  // the padded-row trick
        (8, 1, 2),   // 256 bytes: two half-warp phases
        (8, 16, 32), // 16 lanes of a phase on the same two banks, 16 words each, twice
        (16, 1, 4),  // 512 bytes: four quarter-warp phases
        (16, 2, 8),  // lanes l and l + 4 of a phase share banks
    ];
    for (w, s, want) in cases {
        let r = probe(w, s);
        let fill = 33 * (w as u64 / 4);
        assert_eq!(
            r.smem_wavefronts,
            fill + want,
            "width {w} stride {s}: wavefronts {} = fill {fill} + read",
            r.smem_wavefronts
        );
        assert_eq!(
            r.smem_bytes,
            34 * 32 * w as u64,
            "bytes: 33 fill rounds and the read"
        );
        assert_eq!(r.mma_flop, 0);
        assert_eq!((r.blocks, r.sampled_blocks, r.block_threads), (1, 1, 32));
    }
}

#[test]
fn global_sectors_and_distinct_bytes() {
    let _g = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    if !emulated("global_sectors_and_distinct_bytes") {
        return;
    }
    // (width, stride, sectors of the strided read)
    for (w, s, read) in [
        (4, 1, 4u64),
        (4, 0, 1),
        (4, 8, 32),
        (16, 1, 16),
        (16, 2, 32),
    ] {
        let r = probe(w, s);
        let fill = 33 * w as u64; // 33 coalesced rounds of 32 x w bytes
        let store = 2 * w as u64; // dst: two rounds of 32 x w bytes
        assert_eq!(
            r.gmem_bytes,
            32 * (fill + read + store),
            "width {w} stride {s}"
        );
        // Every sector of src is read by the fill; dst is written once.
        assert_eq!(r.dram_bytes, 32 * (fill + store), "width {w} stride {s}");
    }
}

/// Sampling (first, a middle pair of neighbours, last block per grid axis, weighted) gives the
/// counts of running every block, on the tensor-core curvature forward and backward at padded
/// factor sizes; distinct bytes may err high (never low) where neighbouring blocks share a sector,
/// by at most 5 % at these grids of 10 slabs.
#[test]
fn sampled_blocks_count_like_every_block() {
    let _g = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    if !emulated("sampled_blocks_count_like_every_block") {
        return;
    }
    // Factors no tile divides (4, 12 | 4, 20, padded to 16 and 32); rows and per-block factor
    // partials of whole 32-byte sectors (as at every shape of SPEC section 8), so that a grid's
    // interior blocks are alike down to their sectors.
    let (n, o, i, r) = (2usize, 48usize, 80usize, 3usize);
    let (o1, o2, i1, i2) = (4usize, 12usize, 4usize, 20usize);
    // bf16 1.0 everywhere; every buffer 256-byte aligned, as cudaMalloc's (sectors depend on it).
    let bf = |k: usize| -> Vec<Chunk> { aligned(k.div_ceil(2), f32::from_bits(0x3c00_3c00)) };
    let (base, experts) = (bf(o * i), bf(n * o * i));
    let (fa, fb) = (bf(r * n * o1 * o1), bf(r * n * o2 * o2));
    let (fc, fd) = (bf(r * n * i1 * i1), bf(r * n * i2 * i2));
    let (curved, gc, gb, ge) = (bf(n * o * i), bf(n * o * i), bf(o * i), bf(n * o * i));
    let (ga, gbb) = (bf(r * n * o1 * o1), bf(r * n * o2 * o2));
    let (gcc, gd) = (bf(r * n * i1 * i1), bf(r * n * i2 * i2));
    let addr = |v: &Vec<Chunk>| v.as_ptr() as u64;
    let run = |mode: i32| {
        counted(mode, || {
            let mut p = curvature_params(
                ffi::camex_dtype_CAMEX_BF16 as i32,
                [n, o, i, r, o1, o2, i1, i2],
                [
                    &base, &experts, &fa, &fb, &fc, &fd, &curved, &gc, &gb, &ge, &ga, &gbb, &gcc,
                    &gd,
                ],
            );
            // Counting is on for both the size queries and the launches (same mode).
            run_curvature(&mut p, true);
        })
    };
    // Registered allocations cap each one's distinct bytes at its size (as scripts/cost-model.sh
    // registers its buffers); sampling still errs high, never low, within them.
    let bufs = [
        &base, &experts, &fa, &fb, &fc, &fd, &curved, &gc, &gb, &ge, &ga, &gbb, &gcc, &gd,
    ];
    for b in bufs {
        // SAFETY: records a live buffer's range with the counters.
        unsafe { ffi::camex_emu_register(addr(b), (b.len() * 256) as i64, 1) };
    }
    let exact = run(1);
    // SAFETY: a setting of the counters: sample grid dimensions of more than 4 blocks (8 by
    // default), so that this small shape's grids are sampled, the 7-block partial reduction's too
    // unless its launch runs whole (CAMEX_LAUNCH_WHOLE), as it must.
    let prev = unsafe { ffi::camex_emu_sample_above(4) };
    let sampled = run(2);
    // SAFETY: as above.
    unsafe { ffi::camex_emu_sample_above(prev) };
    for b in bufs {
        // SAFETY: forgets the ranges registered above.
        unsafe { ffi::camex_emu_register(addr(b), 0, 0) };
    }
    assert_eq!(exact.len(), sampled.len(), "launches");
    assert!(
        sampled.iter().any(|l| l.sampled_blocks < l.blocks),
        "some grid was sampled"
    );
    assert!(exact.iter().any(|l| l.mma_flop > 0), "the tensor cores ran");
    for (e, s) in exact.iter().zip(&sampled) {
        let name = kernel_name(e);
        assert_eq!(e.blocks, s.blocks, "{name}: grid");
        if name.contains("reduce") {
            assert_eq!(s.sampled_blocks, s.blocks, "{name}: run whole");
        }
        assert_eq!(e.mma_flop, s.mma_flop, "{name}: mma");
        assert_eq!(e.smem_wavefronts, s.smem_wavefronts, "{name}: wavefronts");
        assert_eq!(e.smem_bytes, s.smem_bytes, "{name}: shared bytes");
        assert_eq!(e.gmem_bytes, s.gmem_bytes, "{name}: global bytes");
        // Within 5 %: the middle pair counts the 16-byte slab rows that neighbours share once per
        // pair (a lone middle block counted them once per block: 1.10-1.20 here).
        assert!(
            s.dram_bytes >= e.dram_bytes && s.dram_bytes * 100 <= e.dram_bytes * 105,
            "{name}: distinct bytes {} sampled, {} exact",
            s.dram_bytes,
            e.dram_bytes
        );
    }
}

/// ldmatrix.x4 (and .trans) after cp.async, against the fragment layout of the PTX ISA; a missing
/// cp.async wait reads the zeroed tile instead (the emulation lands copies only at their wait).
#[test]
fn ldmatrix_and_cp_async_follow_the_ptx_isa() {
    let _g = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    if !emulated("ldmatrix_and_cp_async_follow_the_ptx_isa") {
        return;
    }
    // Tile values 1..=256 (never 0), row-major 16 x 16, 256-byte aligned.
    let mut src = aligned(128, 0.0);
    let tile: Vec<u16> = (1..=256u16).collect();
    // SAFETY: src holds 128 floats = 512 bytes, exactly the 256 u16 written.
    unsafe { std::ptr::copy_nonoverlapping(tile.as_ptr(), src.as_mut_ptr().cast::<u16>(), 256) };
    let at = |r: usize, c: usize| tile[r * 16 + c] as u32;
    for trans in [false, true] {
        // PTX ISA, ldmatrix: in matrix m, lane l holds row l / 4, columns 2 (l % 4) and + 1 (the
        // lower column in the low half); with .trans, rows 2 (l % 4) and + 1 of column l / 4.
        let want: Vec<u32> = (0..32)
            .flat_map(|l: usize| {
                (0..4).map(move |m: usize| {
                    let (r0, c0) = (8 * (m % 2), 8 * (m / 2));
                    let (r, c) = (l / 4, 2 * (l % 4));
                    if trans {
                        at(r0 + c, c0 + r) | at(r0 + c + 1, c0 + r) << 16
                    } else {
                        at(r0 + r, c0 + c) | at(r0 + r, c0 + c + 1) << 16
                    }
                })
            })
            .collect();
        for wait in [1, 0] {
            let dst = aligned(128, f32::NAN);
            let recs = counted(1, || {
                // SAFETY: src holds the 16 x 16 tile, dst 128 words (emulation: host memory).
                let rc = unsafe {
                    ffi::camex_ldst_probe(
                        trans as i32,
                        wait,
                        src.as_ptr() as u64,
                        dst.as_ptr() as u64,
                        std::ptr::null_mut(),
                    )
                };
                assert_eq!(rc, 0, "probe launcher");
            });
            let got: Vec<u32> = dst
                .iter()
                .flat_map(|c| c.0)
                .take(128)
                .map(f32::to_bits)
                .collect();
            if wait == 1 {
                assert_eq!(got, want, "ldmatrix trans={trans}");
            } else {
                assert!(
                    got.iter().all(|&x| x == 0),
                    "trans={trans}: without the wait the tile is still zero"
                );
            }
            // cp.async: 32 lanes x 16 bytes read (16 sectors); the fragments: 512 bytes written.
            assert_eq!(
                recs[0].gmem_bytes,
                32 * (16 + 16),
                "trans={trans} wait={wait}"
            );
        }
    }
}

/// The name of a launch record's kernel.
fn kernel_name(l: &ffi::camex_emu_launch) -> String {
    let b: Vec<u8> = l
        .kernel
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&b).into_owned()
}

/// `k` 16-bit values in 256-byte aligned memory: bf16 or f16 (`f16`) of the dyadic values
/// (h % 61 - 30) / 16 of a hash h, never all alike.
fn varied(k: usize, seed: u64, f16: bool) -> Vec<Chunk> {
    let mut v = aligned(k.div_ceil(2), 0.0);
    let mut h = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let bits: Vec<u16> = (0..k)
        .map(|_| {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            let x = ((h % 61) as f32 - 30.0) / 16.0;
            if f16 {
                half::f16::from_f32(x).to_bits()
            } else {
                half::bf16::from_f32(x).to_bits()
            }
        })
        .collect();
    // SAFETY: v holds at least k 16-bit values.
    unsafe { std::ptr::copy_nonoverlapping(bits.as_ptr(), v.as_mut_ptr().cast::<u16>(), k) };
    v
}

/// The emulated device's opt-in shared memory per block (`camex_emu_smem_limit`: sm_90's 227 KiB,
/// sm_80's 163 KiB) steers the tensor-core path as the device's would, at T5-base `wi`'s factor
/// sizes (48 x 64; I = 8, one slab, keeps the test quick). Stage 1 of the forward holds the slab of
/// tau for all of a block's ranks where it fits (bf16: 118 KiB), else reads it in chunks per rank,
/// and so does the backward's rows side (bf16: 226 KiB with the slabs of tau and dtau resident on
/// sm_90, 128 KiB with tau's on sm_80, 96 KiB with neither; f16 191 KiB with neither, so only under
/// sm_90's limit, the scalar chain under sm_80's). The forward's bits, and bf16's gradient bits,
/// are the same whichever layout the kernels take: counting every block runs the launchers with the
/// GPU's Z budget (a block loops over all three ranks) and complete outputs; sm_80's backward
/// launches are listed from a sampled run.
#[test]
fn smem_limit_steers_the_tensor_core_path() {
    let _g = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    if !emulated("smem_limit_steers_the_tensor_core_path") {
        return;
    }
    let (n, o, i, r) = (2usize, 3072usize, 8usize, 3usize);
    let (o1, o2, i1, i2) = (48usize, 64usize, 2usize, 4usize);
    for f16 in [false, true] {
        let v = |k: usize, seed: u64| varied(k, seed, f16);
        let (base, experts) = (v(o * i, 1), v(n * o * i, 2));
        let (fa, fb) = (v(r * n * o1 * o1, 3), v(r * n * o2 * o2, 4));
        let (fc, fd) = (v(r * n * i1 * i1, 5), v(r * n * i2 * i2, 6));
        let gc = v(n * o * i, 7);
        // Under `limit`, counted in `mode`: the launches of a forward (and a backward), and the
        // forward's output bits.
        let run = |limit: i64, mode: i32, backward: bool| {
            let (curved, gb, ge) = (v(n * o * i, 0), v(o * i, 0), v(n * o * i, 0));
            let (ga, gbb) = (v(r * n * o1 * o1, 0), v(r * n * o2 * o2, 0));
            let (gcc, gd) = (v(r * n * i1 * i1, 0), v(r * n * i2 * i2, 0));
            let recs = counted(mode, || {
                run_curvature_under(
                    f16,
                    [n, o, i, r, o1, o2, i1, i2],
                    [
                        &base, &experts, &fa, &fb, &fc, &fd, &curved, &gc, &gb, &ge, &ga, &gbb,
                        &gcc, &gd,
                    ],
                    limit,
                    backward,
                )
            });
            // The forward's output bits, then (after a backward) every gradient's.
            let mut bits: Vec<u32> = curved.iter().flat_map(|c| c.0).map(f32::to_bits).collect();
            if backward {
                for g in [&gb, &ge, &ga, &gbb, &gcc, &gd] {
                    bits.extend(g.iter().flat_map(|c| c.0).map(f32::to_bits));
                }
            }
            (recs, bits)
        };
        let dt = if f16 { "f16" } else { "bf16" };
        let smem_of = |recs: &[ffi::camex_emu_launch], kernel: &str| -> Vec<i64> {
            recs.iter()
                .filter(|l| kernel_name(l).starts_with(kernel))
                .map(|l| l.dyn_smem_bytes)
                .collect()
        };
        let (r90, c90) = run(SM90, 1, false);
        let (r80, c80) = run(SM80, 1, false);
        let (b90, g90) = run(SM90, 1, true);
        let (b80, _) = run(SM80, 2, true);
        for (recs, lim) in [(&r90, SM90), (&r80, SM80), (&b90, SM90), (&b80, SM80)] {
            assert!(
                recs.iter().all(|l| l.dyn_smem_bytes <= lim),
                "{dt}: every launch within {lim} bytes"
            );
            // Stage 1 on the tensor cores: bf16 with the slab resident (118 KiB against 73 KiB
            // in chunks); f16, whose resident layout (hi + lo, 236 KiB) fits neither, in chunks.
            let rows = smem_of(recs, "kron_rows_kernel");
            assert!(!rows.is_empty(), "{dt}: the forward's stage 1 ran");
            assert!(
                f16 || rows.iter().all(|&b| b > 100 * 1024),
                "{dt}: stage 1's layout, {rows:?}"
            );
        }
        // The rows-side backward: bf16 with tau resident on both architectures (and dtau on
        // sm_90); f16, whose resident layout (hi + lo, 256 KiB) fits neither, in chunks (191 KiB)
        // on sm_90 and on the scalar chain under sm_80's limit.
        let bwd90 = smem_of(&b90, "kron_rows_bwd_kernel");
        assert!(
            !bwd90.is_empty(),
            "{dt}: sm_90's limit takes the tensor-core backward"
        );
        let bwd80 = smem_of(&b80, "kron_rows_bwd_kernel");
        if f16 {
            assert!(
                bwd80.is_empty(),
                "f16: sm_80's limit sends the backward to the scalar chain"
            );
        } else {
            assert!(
                !bwd80.is_empty()
                    && bwd90.iter().all(|&b| b > 200 * 1024)
                    && bwd80.iter().all(|&b| b > 120 * 1024 && b <= SM80),
                "bf16: the rows-side backward's resident slabs, {bwd90:?} {bwd80:?}"
            );
        }
        assert_eq!(c90, c80, "{dt}: the same forward under both limits");
        if !f16 {
            // Under 100 KiB bf16 reads tau in chunks, stage 1 per rank and the rows-side backward
            // per use: the same forward and gradient bits again.
            let (b100, g100) = run(100 * 1024, 1, true);
            for kernel in ["kron_rows_kernel", "kron_rows_bwd_kernel"] {
                let smem = smem_of(&b100, kernel);
                assert!(
                    !smem.is_empty() && smem.iter().all(|&b| b <= 100 * 1024),
                    "bf16: {kernel} in chunks, {smem:?}"
                );
            }
            assert_eq!(
                g90, g100,
                "bf16: resident and chunked layouts agree bit for bit"
            );
        }
    }
}

/// The columns-side backward sizes its rows per block on the device's shared memory, and the
/// partials' workspace with it: at `wo`'s factor sizes (T5-base: i1 x i2 = 48 x 64) sm_90 takes 6
/// rows a block in bf16 (208 KiB) and 3 in f16, sm_80 4 (154 KiB) and 1, where the rows were once
/// sized on sm_90's limit alone and sm_80 declined the tensor cores. Under 99 KiB (sm_86/89) bf16
/// still fits (1 row, 73 KiB) and f16 (114 KiB) takes the scalar chain. The gradients agree across
/// the limits (the rows' grouping into blocks changes the f32 sums' order, so within a few ulps of
/// the storage type; `emu.rs` checks the values against the oracle).
#[test]
fn the_columns_side_backward_sizes_its_rows_on_the_device() {
    let _g = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    if !emulated("the_columns_side_backward_sizes_its_rows_on_the_device") {
        return;
    }
    for f16 in [false, true] {
        let dt = if f16 { "f16" } else { "bf16" };
        let (c90, g90) = wo_like_backward(f16, SM90);
        let (c80, g80) = wo_like_backward(f16, SM80);
        let (c89, g89) = wo_like_backward(f16, SM89);
        assert!(
            !c90.is_empty() && !c80.is_empty(),
            "{dt}: the columns-side backward on the tensor cores under sm_90's and sm_80's limits"
        );
        assert!(
            c90.iter().all(|&b| b > SM80) && c80.iter().all(|&b| b <= SM80),
            "{dt}: more rows a block under sm_90's limit than sm_80's fits, {:?} KiB against {:?}",
            kib(&c90),
            kib(&c80)
        );
        assert_eq!(
            c89.is_empty(),
            f16,
            "{dt}: under 99 KiB bf16's one row a block fits and f16's does not, {:?} KiB",
            kib(&c89)
        );
        // A few ulps of the value, or of the tensor's largest where a sum cancels.
        let ulps = if f16 { 2f32.powi(-8) } else { 2f32.powi(-6) };
        for (name, other) in [("sm_80", &g80), ("99 KiB", &g89)] {
            for (t, (x, y)) in g90.iter().zip(other.iter()).enumerate() {
                assert_eq!(x.len(), y.len());
                let scale = x.iter().fold(0f32, |m, a| m.max(a.abs()));
                for (k, (a, b)) in x.iter().zip(y).enumerate() {
                    assert!(
                        a.is_finite()
                            && (a - b).abs() <= ulps * a.abs().max(b.abs()) + 1e-4 * scale,
                        "{dt}: gradient {t} value {k}: {a} under sm_90's limit, {b} under {name}'s"
                    );
                }
            }
        }
    }
}

/// The backward's columns side at T5-base `wi`'s factor sizes (O x I = 3072 x 768 as 48 x 64 |
/// 24 x 32; bf16, R = 2) runs the register kernel at 24 rows a block under both sm_90's and
/// sm_80's limits, and takes the cp.async pipeline (a second P buffer, the next rank's P rows
/// copied while this rank's are multiplied) where that buffer fits: under sm_90's limit (218 KiB),
/// not under sm_80's (158 KiB without it). Same rows per block, so the same sums in the same order:
/// the pipelined and plain kernels give every gradient bit for bit alike.
#[test]
fn the_columns_side_backward_pipelines_where_it_fits() {
    let _g = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    if !emulated("the_columns_side_backward_pipelines_where_it_fits") {
        return;
    }
    let dims = [1, 3072, 768, 2, 48, 64, 24, 32];
    let (c90, g90) = backward_under(false, dims, "kron_cols_bwd_reg_kernel", SM90);
    let (c80, g80) = backward_under(false, dims, "kron_cols_bwd_reg_kernel", SM80);
    assert!(
        !c90.is_empty() && !c80.is_empty(),
        "the register kernel under both limits, {:?} and {:?} KiB",
        kib(&c90),
        kib(&c80)
    );
    assert!(
        c90.iter().all(|&b| b > SM80) && c80.iter().all(|&b| b < 160 * 1024),
        "the second P buffer under sm_90's limit only, {:?} KiB against {:?}",
        kib(&c90),
        kib(&c80)
    );
    for (t, (x, y)) in g90.iter().zip(&g80).enumerate() {
        assert_eq!(x.len(), y.len());
        for (k, (a, b)) in x.iter().zip(y).enumerate() {
            assert!(
                a.is_finite() && a.to_bits() == b.to_bits(),
                "gradient {t} value {k}: {a} pipelined, {b} plain"
            );
        }
    }
}

/// `CAMEX_TC_SMEM_LIMIT` (bytes, read once per process) caps the shared memory the tensor-core
/// launchers plan for, below the device's: `scripts/gpu-check.sh` runs the tensor-core GPU test
/// with sm_80's on the H200. This test runs itself again in a child process with the variable at
/// sm_80's 163 KiB, where the `wo`-like backward's columns side, under the emulated sm_90's
/// limit, takes sm_80's rows per block (and every launch fits 163 KiB).
#[test]
fn the_tensor_core_limit_follows_the_environment() {
    const TEST: &str = "the_tensor_core_limit_follows_the_environment";
    let _g = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    if !emulated(TEST) {
        return;
    }
    if std::env::var_os("CAMEX_TC_SMEM_LIMIT").is_none() {
        let (c90, _) = wo_like_backward(false, SM90);
        assert!(c90.iter().all(|&b| b > SM80), "{:?} KiB", kib(&c90));
        let exe = std::env::current_exe().expect("the test binary's path");
        let out = std::process::Command::new(exe)
            .args(["--exact", TEST, "--test-threads=1", "--nocapture"])
            .env("CAMEX_TC_SMEM_LIMIT", SM80.to_string())
            .output()
            .expect("the test binary runs again");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "the child run: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let (capped, _) = wo_like_backward(false, SM90);
    assert!(
        !capped.is_empty() && capped.iter().all(|&b| b <= SM80),
        "the columns side within CAMEX_TC_SMEM_LIMIT's 163 KiB, {:?} KiB",
        kib(&capped)
    );
}

const SM90: i64 = 227 * 1024;
const SM80: i64 = 163 * 1024;
const SM89: i64 = 99 * 1024;

fn kib(c: &[i64]) -> Vec<i64> {
    c.iter().map(|b| b / 1024).collect()
}

/// A curvature forward and backward in bf16 or f16 (`f16`) at a `wo`-like shape (N = 2, O = 8 as
/// 2 x 4, I = 3072 as 48 x 64 like T5-base `wo`, R = 2), counting every block, under the emulated
/// device's opt-in shared memory `limit`: the columns-side backward's shared memory per launch
/// (every launch checked within `limit`), and every gradient as f32 values (base, experts, the
/// four factors').
fn wo_like_backward(f16: bool, limit: i64) -> (Vec<i64>, Vec<Vec<f32>>) {
    backward_under(
        f16,
        [2, 8, 3072, 2, 2, 4, 48, 64],
        "kron_cols_bwd_kernel",
        limit,
    )
}

/// A curvature forward and backward at `dims` ([n, o, i, r, o1, o2, i1, i2]), counting every
/// block, under the emulated device's opt-in shared memory `limit`: the shared memory of each
/// launch of the kernel whose name starts with `kernel` (every launch checked within `limit`), and
/// every gradient as f32 values (base, experts, the four factors').
fn backward_under(
    f16: bool,
    dims: [usize; 8],
    kernel: &str,
    limit: i64,
) -> (Vec<i64>, Vec<Vec<f32>>) {
    let [n, o, i, r, o1, o2, i1, i2] = dims;
    let v = |k: usize, seed: u64| varied(k, seed, f16);
    let factor = |d: usize| r * n * d * d;
    let sizes = [o * i, n * o * i, factor(o1), factor(o2), factor(i1)];
    let sizes = [sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], factor(i2)];
    let (base, experts) = (v(sizes[0], 1), v(sizes[1], 2));
    let (fa, fb, fc, fd) = (
        v(sizes[2], 3),
        v(sizes[3], 4),
        v(sizes[4], 5),
        v(sizes[5], 6),
    );
    let gc = v(sizes[1], 7);
    let (curved, gb, ge) = (v(sizes[1], 0), v(sizes[0], 0), v(sizes[1], 0));
    let grads = [
        v(sizes[2], 0),
        v(sizes[3], 0),
        v(sizes[4], 0),
        v(sizes[5], 0),
    ];
    let recs = counted(1, || {
        run_curvature_under(
            f16,
            dims,
            [
                &base, &experts, &fa, &fb, &fc, &fd, &curved, &gc, &gb, &ge, &grads[0], &grads[1],
                &grads[2], &grads[3],
            ],
            limit,
            true,
        )
    });
    assert!(
        recs.iter().all(|l| l.dyn_smem_bytes <= limit),
        "every launch within {limit} bytes"
    );
    let launches = recs
        .iter()
        // A launch through a macro names its kernel in parentheses.
        .filter(|l| kernel_name(l).trim_start_matches('(').starts_with(kernel))
        .map(|l| l.dyn_smem_bytes)
        .collect();
    let mut vals = vec![halves(&gb, sizes[0], f16), halves(&ge, sizes[1], f16)];
    for (g, &k) in grads.iter().zip(&sizes[2..]) {
        vals.push(halves(g, k, f16));
    }
    (launches, vals)
}

/// The first `k` 16-bit values of `v` (bf16, or f16 with `f16`) as f32.
fn halves(v: &[Chunk], k: usize, f16: bool) -> Vec<f32> {
    let mut bits = vec![0u16; k];
    // SAFETY: v holds at least k 16-bit values.
    unsafe { std::ptr::copy_nonoverlapping(v.as_ptr().cast::<u16>(), bits.as_mut_ptr(), k) };
    bits.into_iter()
        .map(|b| {
            if f16 {
                half::f16::from_bits(b).to_f32()
            } else {
                half::bf16::from_bits(b).to_f32()
            }
        })
        .collect()
}

/// The merge op's backward reads the upstream gradient once where `h_dots_kernel` takes it (bf16,
/// no DARE or DARE per expert: the dots of grad_scores and grad_alpha in H's pass, with or without
/// a mask tensor, tensor cores on), and twice otherwise: `dots_kernel` (or `dots_dare_kernel`) and
/// then `h_kernel` (f16, DARE per element, or the tensor cores off). `emu.rs` checks the values.
#[test]
fn the_dots_ride_on_the_h_pass_where_they_can() {
    let _g = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    if !emulated("the_dots_ride_on_the_h_pass_where_they_can") {
        return;
    }
    let (g, n, o, i) = (3usize, 4usize, 8usize, 24usize);
    let element = ffi::camex_dare {
        kind: ffi::camex_dare_kind_CAMEX_DARE_ELEMENT as i32,
        threshold: 1 << 30,
        seed: 7,
        scale: 4.0 / 3.0,
    };
    let expert = ffi::camex_dare {
        kind: ffi::camex_dare_kind_CAMEX_DARE_EXPERT as i32,
        ..element
    };
    // (f16, mask, DARE, tensor cores on, the kernel that computes the dots, the one after it)
    let none = ffi::camex_dare::default();
    let cases = [
        (
            false,
            false,
            none,
            true,
            "h_dots_kernel<T>",
            "dots_kernel<T>",
        ),
        (
            false,
            true,
            none,
            true,
            "h_dots_kernel<T>",
            "dots_kernel<T>",
        ),
        (true, false, none, true, "dots_kernel<T>", "h_kernel<T>"),
        (
            false,
            false,
            element,
            true,
            "dots_dare_kernel<T>",
            "h_kernel<T>",
        ),
        (
            false,
            true,
            expert,
            true,
            "h_dots_kernel<T>",
            "dots_dare_kernel<T>",
        ),
        // h_dots_kernel is a tensor-core kernel: opt-in like the others until a GPU has run it.
        (false, false, none, false, "dots_kernel<T>", "h_kernel<T>"),
    ];
    for (f16, with_mask, dare, tc, first, second) in cases {
        let v = |k: usize, seed: u64| varied(k, seed, f16);
        let (base, curved, scores, mask) =
            (v(o * i, 1), v(n * o * i, 2), v(g * n, 3), v(n * o * i, 4));
        let gm = v(g * o * i, 5);
        let (gb, gc, gs, ga) = (v(o * i, 0), v(n * o * i, 0), v(g * n, 0), v(1, 0));
        let dtype = if f16 {
            ffi::camex_dtype_CAMEX_F16
        } else {
            ffi::camex_dtype_CAMEX_BF16
        };
        let pt = |c: &Vec<Chunk>| c.as_ptr() as u64;
        let mut p = ffi::camex_merge_params {
            dtype: dtype as i32,
            g: g as i64,
            n: n as i64,
            o: o as i64,
            i: i as i64,
            base: pt(&base),
            curved: pt(&curved),
            scores: pt(&scores),
            mask: if with_mask { pt(&mask) } else { 0 },
            alpha: 0.75,
            dare,
            grad_merged: pt(&gm),
            grad_base: pt(&gb),
            grad_curved: pt(&gc),
            grad_scores: pt(&gs),
            grad_alpha: pt(&ga),
            ..Default::default()
        };
        // SAFETY: a size query, then 256-byte aligned host buffers of the implied sizes.
        let ws = aligned(
            (unsafe { ffi::camex_merge_workspace(&p, 1) } as usize).div_ceil(4),
            0.0,
        );
        p.workspace = pt(&ws);
        p.workspace_bytes = (ws.len() * 256) as i64;
        let recs = counted(1, || {
            // SAFETY: this thread's tensor-core mode, restored after; then as above (emulation:
            // host pointers).
            unsafe { ffi::camex_set_tensor_cores(tc as i32) };
            let rc = unsafe { ffi::camex_merge_backward(&p, std::ptr::null_mut()) };
            unsafe { ffi::camex_set_tensor_cores(-1) };
            assert_eq!(rc, 0);
        });
        let names: Vec<String> = recs.iter().map(kernel_name).collect();
        let what = format!(
            "f16 {f16}, mask {with_mask}, dare {}, tensor cores {tc}: {names:?}",
            dare.kind
        );
        let at = |k: &str| names.iter().position(|x| x == k);
        assert_eq!(
            names.iter().filter(|x| x.as_str() == first).count(),
            1,
            "{what}"
        );
        if first == "h_dots_kernel<T>" {
            assert!(
                at(second).is_none() && at("h_kernel<T>").is_none(),
                "{what}"
            );
            assert!(
                at("dots_kernel<T>").is_none() && at("dots_dare_kernel<T>").is_none(),
                "{what}"
            );
        } else {
            assert!(at(first) < at(second), "{what}");
        }
        // finalize_kernel sums the dots after whichever kernel wrote them.
        assert!(at(first) < at("finalize_kernel<T>"), "{what}");
    }
}

/// What a GPU faults on fails the emulated launch as it would there (cudaErrorMisalignedAddress):
/// a load off its alignment, an ldmatrix row or a cp.async off 16 bytes, more than 48 KiB of
/// dynamic shared memory without the kernel's opt-in, one warp's lanes at two different warp
/// collectives (cudaErrorLaunchFailure; undefined on a GPU), a load past the end of its
/// allocation or a store past the launch's dynamic shared memory (cudaErrorIllegalAddress). And a
/// block's
/// threads take their turns in either order (the default alternates launch by launch), so that a
/// kernel with a race (a missing barrier) gives different results in the tests.
#[test]
fn gpu_faults_fail_the_launch_and_races_show() {
    // Counting (another test's, process-wide) would count these launches and run threads in order.
    let _g = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    if !emulated("gpu_faults_fail_the_launch_and_races_show") {
        return;
    }
    const MISALIGNED: i32 = 716; // cudaErrorMisalignedAddress
    let src = aligned(64, 1.0);
    let probe = |kind: i32, offset: i32| -> (i32, f32) {
        let dst = aligned(32, f32::NAN);
        // SAFETY: src holds 256 bytes (offset + 16 at most 80), dst 32 floats (emulation: host memory).
        let rc = unsafe {
            ffi::camex_fault_probe(
                kind,
                offset,
                src.as_ptr() as u64,
                dst.as_ptr() as u64,
                std::ptr::null_mut(),
            )
        };
        (rc, dst[0].0[0])
    };
    // A float load at offsets 0, 4 (aligned) and 2; ldmatrix rows and a 16-byte cp.async at
    // offset 0 (aligned) and 2, 4, 8.
    let cases: [(i32, &[i32], &[i32]); 3] = [
        (0, &[0, 4], &[2]),
        (1, &[0], &[2, 4, 8]),
        (2, &[0], &[2, 4, 8]),
    ];
    for (kind, fine, bad) in cases {
        for &off in fine {
            let (rc, v) = probe(kind, off);
            assert_eq!(rc, 0, "kind {kind}, offset {off}");
            assert!(kind != 0 || v == 1.0, "the float at offset {off}: {v}");
        }
        for &off in bad {
            assert_eq!(probe(kind, off).0, MISALIGNED, "kind {kind}, offset {off}");
        }
    }
    // More than 48 KiB of dynamic shared memory: refused (cudaErrorInvalidValue) without the
    // kernel's opt-in, run with it.
    assert_eq!(probe(4, 0).0, 1, "64 KiB without an opt-in");
    assert_eq!(probe(5, 0).0, 0, "64 KiB after the opt-in");
    // Half a warp at __syncwarp, half at an ldmatrix: the shared warp barrier would pair them up.
    const LAUNCH_FAILURE: i32 = 719; // cudaErrorLaunchFailure
    assert_eq!(
        probe(6, 0).0,
        LAUNCH_FAILURE,
        "lanes at different warp collectives"
    );
    // src is one allocation of 256 bytes (tests/emu_alloc reports it): its last float is read, the
    // word past its end fails the launch as memcheck would flag it on a GPU.
    const ILLEGAL_ADDRESS: i32 = 700; // cudaErrorIllegalAddress
    assert_eq!(probe(0, 252), (0, 1.0), "src's last float");
    assert_eq!(probe(0, 256).0, ILLEGAL_ADDRESS, "the float past src's end");
    // 1 KiB of dynamic shared memory: its last int, then the one past it.
    assert_eq!(
        probe(7, 1020),
        (0, 1.0),
        "the last int of the dynamic shared memory"
    );
    assert_eq!(
        probe(7, 1024).0,
        ILLEGAL_ADDRESS,
        "the int past the dynamic shared memory"
    );
    // The race: thread 0 reads a word thread 63 stores, with no barrier between them.
    // SAFETY: settings of this thread's emulated launches, restored after.
    let prev = unsafe { ffi::camex_emu_thread_order(0) };
    let forward = probe(3, 0);
    unsafe { ffi::camex_emu_thread_order(1) };
    let reverse = probe(3, 0);
    unsafe { ffi::camex_emu_thread_order(2) };
    let mut alternate = [probe(3, 0).1, probe(3, 0).1];
    unsafe { ffi::camex_emu_thread_order(prev) };
    assert_eq!((forward, reverse), ((0, 0.0), (0, 1.0)));
    alternate.sort_by(f32::total_cmp);
    assert_eq!(
        alternate,
        [0.0, 1.0],
        "two launches in turn, one in each order"
    );
}
