//! Property tests of the CUDA launchers' validation (issue 16), in the CPU emulation of the kernels
//! (build with `CAMEX_KERNEL_EMU=1 cargo test --features cuda --test emu_props`; "device" pointers
//! are then host pointers). With kernels built for a GPU every test skips and says why.
//!
//! - Bad parameters (a dimension zero or negative, a Kronecker split that does not multiply out,
//!   an unknown dtype code) are refused by every launcher with an error code, before anything is
//!   launched: all pointers are null, so a launch would fault.
//! - Valid random shapes run (return 0) and agree with the CPU path.

mod emu_alloc;

use camex::{cpu, ffi, HostTensor};
use proptest::prelude::*;
use proptest::test_runner::Config;

fn on(test: &str) -> bool {
    // SAFETY: a constant query, no CUDA call.
    let e = unsafe { ffi::camex_emulated() } == 1;
    if !e {
        eprintln!(
            "{test}: skipped, kernels built for the GPU (CAMEX_KERNEL_EMU=1 builds the CPU emulation)"
        );
    }
    e
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

const F32: i32 = ffi::camex_dtype_CAMEX_F32 as i32;

fn null() -> ffi::camex_stream_t {
    std::ptr::null_mut()
}

/// Dimensions for one launcher call; `bad` ones have at least one flaw.
fn dim(bad: bool) -> BoxedStrategy<i64> {
    if bad {
        prop_oneof![Just(0i64), Just(-1i64), Just(i64::MIN), -5i64..=0].boxed()
    } else {
        (1i64..5).boxed()
    }
}

/// Eight dimensions, the first `k` of which is bad (k = 8: none is).
fn dims8() -> impl Strategy<Value = ([i64; 8], usize)> {
    (0usize..8).prop_flat_map(|k| {
        let v: Vec<BoxedStrategy<i64>> = (0..8).map(|j| dim(j == k)).collect();
        (v, Just(k)).prop_map(|(v, k)| {
            let mut a = [0i64; 8];
            a.copy_from_slice(&v);
            (a, k)
        })
    })
}

proptest! {
    #![proptest_config(config(300))]

    /// Every launcher refuses a zero or negative dimension without launching (null pointers).
    #[test]
    fn launchers_refuse_bad_dims((d, _k) in dims8(), family in 0usize..14) {
        if !on("launchers_refuse_bad_dims") {
            return Ok(());
        }
        let [a, b, c, e, f, g, h, _] = d;
        // The first few of `d` feed each family's dimensions; the flaw may land on an unused
        // slot, in which case the call is not made.
        let rc: Option<i32> = unsafe {
            match family {
                0 | 1 => {
                    let p = ffi::camex_dynamic_params { dtype: F32, n: a, o: b, i: c, ..Default::default() };
                    (a <= 0 || b <= 0 || c <= 0).then(|| if family == 0 {
                        ffi::camex_dynamic_forward(&p, null())
                    } else {
                        ffi::camex_dynamic_backward(&p, null())
                    })
                }
                2 | 3 => {
                    let p = ffi::camex_segment_params { dtype: F32, b: a, j: b, n: c, ..Default::default() };
                    (a <= 0 || b <= 0 || c <= 0).then(|| if family == 2 {
                        ffi::camex_segment_forward(&p, null())
                    } else {
                        ffi::camex_segment_backward(&p, null())
                    })
                }
                4 | 5 => {
                    let p = ffi::camex_linear_params { dtype: F32, g: a, t: b, o: c, i: e, ..Default::default() };
                    (a <= 0 || b <= 0 || c <= 0 || e <= 0).then(|| if family == 4 {
                        ffi::camex_linear_forward(&p, null())
                    } else {
                        ffi::camex_linear_backward(&p, null())
                    })
                }
                6 | 7 => {
                    let p = ffi::camex_merge_params { dtype: F32, g: a, n: b, o: c, i: e, alpha: 1.0, ..Default::default() };
                    (a <= 0 || b <= 0 || c <= 0 || e <= 0).then(|| if family == 6 {
                        ffi::camex_merge_forward(&p, null())
                    } else {
                        ffi::camex_merge_backward(&p, null())
                    })
                }
                8 => {
                    let p = ffi::camex_mask_params { dtype: F32, n: a, o: b, i: c, ..Default::default() };
                    (a <= 0 || b <= 0 || c <= 0).then(|| ffi::camex_ties_mask(&p, null()))
                }
                9 | 10 => {
                    // Kronecker: o = o1 * o2, i = i1 * i2 unless the flaw is elsewhere.
                    let (o1, o2, i1, i2) = (c, e, f, g);
                    let p = ffi::camex_curvature_params {
                        dtype: F32, n: a, r: b.max(1), o: o1.saturating_mul(o2), i: i1.saturating_mul(i2),
                        o1, o2, i1, i2, ..Default::default()
                    };
                    (a <= 0 || o1 <= 0 || o2 <= 0 || i1 <= 0 || i2 <= 0).then(|| if family == 9 {
                        ffi::camex_curvature_forward(&p, null())
                    } else {
                        ffi::camex_curvature_backward(&p, null())
                    })
                }
                11 | 12 => {
                    let p = ffi::camex_ca_merge_params {
                        dtype: F32, g: h, n: a, r: 1, o: b, i: c, o1: 1, o2: b, i1: 1, i2: c,
                        alpha: 1.0, ..Default::default()
                    };
                    (a <= 0 || b <= 0 || c <= 0 || h <= 0).then(|| if family == 11 {
                        ffi::camex_ca_merge_forward(&p, null())
                    } else {
                        ffi::camex_ca_merge_backward(&p, null())
                    })
                }
                _ => {
                    // A Kronecker split that does not multiply out.
                    let p = ffi::camex_curvature_params {
                        dtype: F32, n: 1, r: 1, o: 6, i: 4, o1: 4, o2: 2, i1: 2, i2: 2,
                        ..Default::default()
                    };
                    Some(ffi::camex_curvature_forward(&p, null()))
                }
            }
        };
        if let Some(rc) = rc {
            prop_assert_eq!(rc, ffi::CAMEX_ERR_DIMS as i32, "family {}: {:?}", family, d);
        }
    }

    /// An unknown dtype code is refused before launching.
    #[test]
    fn launchers_refuse_unknown_dtype(code in prop_oneof![Just(-1i32), 3i32..1000]) {
        if !on("launchers_refuse_unknown_dtype") {
            return Ok(());
        }
        let rc = unsafe {
            let p = ffi::camex_dynamic_params { dtype: code, n: 1, o: 1, i: 1, ..Default::default() };
            ffi::camex_dynamic_forward(&p, null())
        };
        prop_assert_ne!(rc, 0);
        let rc = unsafe {
            let p = ffi::camex_segment_params { dtype: code, b: 1, j: 1, n: 1, ..Default::default() };
            ffi::camex_segment_forward(&p, null())
        };
        prop_assert_ne!(rc, 0);
    }
}

#[path = "rng/mod.rs"]
mod rng;

fn rand_tensor(shape: &[usize], rng: &mut rng::Rng) -> HostTensor<f32> {
    HostTensor::from_fn(shape, |_| rng.uniform() as f32)
}

fn close(got: &[f32], want: &HostTensor<f32>) -> bool {
    got.iter()
        .zip(want.data())
        .all(|(&g, &w)| (g - w).abs() <= 1e-4 * (1.0 + w.abs()))
}

proptest! {
    #![proptest_config(config(60))]

    /// Valid random shapes run and agree with the CPU path (dynamic merge, segment scores,
    /// merged linear).
    #[test]
    fn valid_shapes_run(n in 1usize..4, o in 1usize..6, i in 1usize..6, g in 1usize..4,
                        t in 1usize..5, seed in any::<u64>(), beta in -2.0f64..2.0) {
        if !on("valid_shapes_run") {
            return Ok(());
        }
        let mut s = rng::Rng::new(seed);
        // dynamic_merge
        let base = rand_tensor(&[o, i], &mut s);
        let curved = rand_tensor(&[n, o, i], &mut s);
        let mut out = vec![f32::NAN; o * i];
        let mut p = ffi::camex_dynamic_params {
            dtype: F32, n: n as i64, o: o as i64, i: i as i64,
            base: base.data().as_ptr() as u64, curved: curved.data().as_ptr() as u64,
            beta, next_base: out.as_mut_ptr() as u64, ..Default::default()
        };
        let ws_bytes = unsafe { ffi::camex_dynamic_workspace(&p) };
        let mut ws = vec![0xFFu8; ws_bytes.max(1) as usize]; // uninitialised on a GPU
        p.workspace = ws.as_mut_ptr() as u64;
        p.workspace_bytes = ws_bytes;
        prop_assert_eq!(unsafe { ffi::camex_dynamic_forward(&p, null()) }, 0);
        let want = cpu::dynamic_merge(&base, &curved, beta).unwrap();
        prop_assert!(close(&out, &want), "dynamic_merge {:?} vs {:?}", out, want.data());
        // segment_scores
        let r = rand_tensor(&[g, t, n], &mut s);
        let mut sc = vec![f32::NAN; g * t * n];
        let p = ffi::camex_segment_params {
            dtype: F32, b: g as i64, j: t as i64, n: n as i64,
            router_scores: r.data().as_ptr() as u64, scores: sc.as_mut_ptr() as u64,
            ..Default::default()
        };
        prop_assert_eq!(unsafe { ffi::camex_segment_forward(&p, null()) }, 0);
        prop_assert!(close(&sc, &cpu::segment_scores(&r).unwrap()));
        // merged_linear
        let x = rand_tensor(&[g, t, i], &mut s);
        let w = rand_tensor(&[g, o, i], &mut s);
        let mut y = vec![f32::NAN; g * t * o];
        let p = ffi::camex_linear_params {
            dtype: F32, g: g as i64, t: t as i64, o: o as i64, i: i as i64,
            x: x.data().as_ptr() as u64, merged: w.data().as_ptr() as u64,
            y: y.as_mut_ptr() as u64, ..Default::default()
        };
        prop_assert_eq!(unsafe { ffi::camex_linear_forward(&p, null()) }, 0);
        prop_assert!(close(&y, &cpu::merged_linear(&x, &w, None).unwrap()));
        drop(ws);
    }
}

/// A backward whose reduction grids would cross the hardware's limits (grid y and z at most 65535,
/// x below 2^31) is refused at its entry point, before anything is enqueued (all pointers null: a
/// launch would fault), not after the launches before the reduction; one just inside them is not
/// refused for its grid (it fails on its missing workspace instead).
#[test]
fn backward_refuses_grids_over_the_limits() {
    if !on("backward_refuses_grids_over_the_limits") {
        return;
    }
    let dims = ffi::CAMEX_ERR_DIMS as i32;
    let workspace = ffi::CAMEX_ERR_WORKSPACE as i32;
    // SAFETY: each launcher is expected to refuse before it touches a pointer.
    unsafe {
        // Without DARE the dots take eight rows (groups) per block: 8 * 65535 groups fit, one more
        // does not.
        for (g, want) in [(8 * 65535, workspace), (8 * 65535 + 1, dims)] {
            let p = ffi::camex_merge_params {
                dtype: F32,
                g,
                n: 1,
                o: 1,
                i: 1,
                alpha: 1.0,
                ..Default::default()
            };
            assert_eq!(
                ffi::camex_merge_backward(&p, null()),
                want,
                "merge backward, G = {g}"
            );
        }
        // With DARE one row per block: 65535 groups and the beta row do not fit.
        let p = ffi::camex_ca_merge_params {
            dtype: F32,
            g: 65535,
            n: 1,
            o: 1,
            i: 1,
            r: 1,
            o1: 1,
            o2: 1,
            i1: 1,
            i2: 1,
            alpha: 1.0,
            has_beta: 1,
            beta: 1.0,
            dare: ffi::camex_dare {
                kind: ffi::camex_dare_kind_CAMEX_DARE_EXPERT as i32,
                threshold: 1 << 28,
                seed: 1,
                scale: 1.0 / (1.0 - 1.0 / 16.0),
            },
            ..Default::default()
        };
        assert_eq!(
            ffi::camex_ca_merge_backward(&p, null()),
            dims,
            "CA-merge backward with DARE, G = 65535 + beta"
        );
        // Experts over 8 * 65535 (eight per grid slice).
        let p = ffi::camex_dynamic_params {
            dtype: F32,
            n: 8 * 65535 + 1,
            o: 1,
            i: 1,
            beta: 1.0,
            ..Default::default()
        };
        assert_eq!(
            ffi::camex_dynamic_backward(&p, null()),
            dims,
            "dynamic backward, N = 524281"
        );
    }
}
