//! The `_into` variants (`merge_into`, `ties_mask_into`): into a reused, poisoned output they give
//! the allocating operators' bits for every option, for any thread count; a wrong-sized or
//! missing output is an `Err` naming the tensor with the expected and actual shapes.

use camex::cpu::{self, MergeInputs};
use camex::{Dare, Error, HostTensor, Mask};

fn rnd(seed: u64, shape: &[usize], scale: f32) -> HostTensor<f32> {
    let mut s = seed;
    HostTensor::from_fn(shape, |_| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        scale * (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
    })
}

fn bits(t: &HostTensor<f32>) -> Vec<u32> {
    t.data().iter().map(|v| v.to_bits()).collect()
}

struct Case {
    base: HostTensor<f32>,
    curved: HostTensor<f32>,
    experts: HostTensor<f32>,
    scores: HostTensor<f32>,
    mask: HostTensor<f32>,
    base_bias: HostTensor<f32>,
    expert_bias: HostTensor<f32>,
}

/// G = 3, N = 4, O = 33, I = 70: O*I is not a multiple of any block width.
fn case() -> Case {
    let (g, n, o, i) = (3, 4, 33, 70);
    let base = rnd(1, &[o, i], 0.05);
    let experts = HostTensor::from_fn(&[n, o, i], {
        let noise = rnd(2, &[n, o, i], 0.01);
        let b = base.clone();
        move |k| b.data()[k % (o * i)] + noise.data()[k]
    });
    let mask = cpu::ties_mask(&base, &experts, Mask::TiesSign).unwrap();
    Case {
        curved: rnd(3, &[n, o, i], 0.01),
        scores: rnd(4, &[g, n], 1.0),
        base_bias: rnd(5, &[o], 0.1),
        expert_bias: rnd(6, &[n, o], 0.1),
        base,
        experts,
        mask,
    }
}

fn inputs(c: &Case, mask: bool, bias: bool) -> MergeInputs<'_, f32> {
    MergeInputs {
        base: &c.base,
        curved: &c.curved,
        scores: &c.scores,
        mask: mask.then_some(&c.mask),
        base_bias: bias.then_some(&c.base_bias),
        expert_bias: bias.then_some(&c.expert_bias),
    }
}

fn dares() -> [Dare; 3] {
    [
        Dare::None,
        Dare::Expert { p: 0.25, seed: 3 },
        Dare::Element { p: 0.25, seed: 3 },
    ]
}

#[test]
fn merge_into_equals_merge_bit_for_bit() {
    let c = case();
    let (g, o, i) = (3, 33, 70);
    // One output reused across every case, NaN-poisoned before each: every element is written.
    let mut merged = HostTensor::full(&[g, o, i], f32::NAN);
    let mut merged_bias = HostTensor::full(&[g, o], f32::NAN);
    for dare in dares() {
        for mask in [false, true] {
            for bias in [false, true] {
                let inp = inputs(&c, mask, bias);
                let want = cpu::merge(&inp, 0.8, &dare).unwrap();
                merged.data_mut().fill(f32::NAN);
                merged_bias.data_mut().fill(f32::NAN);
                cpu::merge_into(
                    &inp,
                    0.8,
                    &dare,
                    &mut merged,
                    bias.then_some(&mut merged_bias),
                )
                .unwrap();
                let what = format!("{dare:?} mask={mask} bias={bias}");
                assert_eq!(bits(&merged), bits(&want.merged), "{what}");
                assert!(merged.data().iter().all(|v| v.is_finite()), "{what}");
                if bias {
                    assert_eq!(
                        bits(&merged_bias),
                        bits(want.merged_bias.as_ref().unwrap()),
                        "{what}"
                    );
                }
            }
        }
    }
}

#[test]
fn ties_mask_into_equals_ties_mask_bit_for_bit() {
    let c = case();
    let mut out = HostTensor::full(&[4, 33, 70], f32::NAN);
    for mask in [Mask::None, Mask::TiesSign, Mask::TiesTrim(0.3)] {
        let want = cpu::ties_mask(&c.base, &c.experts, mask).unwrap();
        out.data_mut().fill(f32::NAN);
        cpu::ties_mask_into(&c.base, &c.experts, mask, &mut out).unwrap();
        assert_eq!(bits(&out), bits(&want), "{mask:?}");
        // A mask holds only 0 and 1, and TIES keeps some and drops some here.
        assert!(out.data().iter().all(|&v| v == 0.0 || v == 1.0));
        if mask != Mask::None {
            let kept = out.data().iter().filter(|&&v| v == 1.0).count();
            assert!(kept > 0 && kept < out.len(), "{mask:?} kept {kept}");
        }
    }
}

#[test]
fn into_variants_do_not_depend_on_thread_count() {
    let c = case();
    let run = || {
        let mut merged = HostTensor::zeros(&[3, 33, 70]);
        let mut mb = HostTensor::zeros(&[3, 33]);
        cpu::merge_into(
            &inputs(&c, true, true),
            0.8,
            &Dare::Expert { p: 0.25, seed: 3 },
            &mut merged,
            Some(&mut mb),
        )
        .unwrap();
        let mut m = HostTensor::zeros(&[4, 33, 70]);
        cpu::ties_mask_into(&c.base, &c.experts, Mask::TiesTrim(0.3), &mut m).unwrap();
        [bits(&merged), bits(&mb), bits(&m)]
    };
    let first = run();
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        assert_eq!(first, pool.install(run), "{threads} threads");
    }
}

/// The error names `tensor`, and its message the expected and the actual shape.
fn assert_shape_err(r: camex::Result<()>, tensor: &str, expected: &str, actual: &[usize]) {
    match r {
        Err(Error::Shape {
            tensor: t,
            expected: e,
            actual: a,
        }) => {
            assert_eq!(t, tensor);
            assert_eq!(e, expected);
            assert_eq!(a, actual);
            let msg = Error::Shape {
                tensor: t,
                expected: e,
                actual: a,
            }
            .to_string();
            assert!(msg.contains(tensor) && msg.contains(expected), "{msg}");
        }
        other => panic!("expected a shape error for `{tensor}`, got {other:?}"),
    }
}

#[test]
fn wrong_outputs_are_errors_naming_them() {
    let c = case();
    let inp = inputs(&c, false, false);
    let mut short = HostTensor::zeros(&[3, 33, 69]);
    assert_shape_err(
        cpu::merge_into(&inp, 1.0, &Dare::None, &mut short, None),
        "merged",
        "[3, 33, 70]",
        &[3, 33, 69],
    );
    let mut flat = HostTensor::zeros(&[3 * 33 * 70]);
    assert_shape_err(
        cpu::merge_into(&inp, 1.0, &Dare::None, &mut flat, None),
        "merged",
        "[3, 33, 70]",
        &[3 * 33 * 70],
    );
    // merged_bias: wrong size, missing with biases, given without them.
    let mut merged = HostTensor::zeros(&[3, 33, 70]);
    let mut mb = HostTensor::zeros(&[3, 34]);
    assert_shape_err(
        cpu::merge_into(
            &inputs(&c, false, true),
            1.0,
            &Dare::None,
            &mut merged,
            Some(&mut mb),
        ),
        "merged_bias",
        "[3, 33]",
        &[3, 34],
    );
    let missing = cpu::merge_into(
        &inputs(&c, false, true),
        1.0,
        &Dare::None,
        &mut merged,
        None,
    );
    assert!(
        matches!(&missing, Err(Error::Option { name, message }) if name == "merged_bias" && message.contains("[3, 33]")),
        "{missing:?}"
    );
    let mut mb = HostTensor::zeros(&[3, 33]);
    let extra = cpu::merge_into(&inp, 1.0, &Dare::None, &mut merged, Some(&mut mb));
    assert!(
        matches!(&extra, Err(Error::Option { name, .. }) if name == "merged_bias"),
        "{extra:?}"
    );
    // Bad inputs are still reported before the output is looked at, and nothing is written.
    merged.data_mut().fill(7.0);
    let bad_scores = HostTensor::zeros(&[3, 5]);
    let mut bad = inputs(&c, false, false);
    bad.scores = &bad_scores;
    assert_shape_err(
        cpu::merge_into(&bad, 1.0, &Dare::None, &mut merged, None),
        "scores",
        "[3, 4]",
        &[3, 5],
    );
    assert!(merged.data().iter().all(|&v| v == 7.0));

    let mut m = HostTensor::zeros(&[4, 70, 33]);
    assert_shape_err(
        cpu::ties_mask_into(&c.base, &c.experts, Mask::TiesSign, &mut m),
        "mask",
        "[4, 33, 70]",
        &[4, 70, 33],
    );
    let mut m = HostTensor::zeros(&[3, 33, 70]);
    assert_shape_err(
        cpu::ties_mask_into(&c.base, &c.experts, Mask::None, &mut m),
        "mask",
        "[4, 33, 70]",
        &[3, 33, 70],
    );
}
