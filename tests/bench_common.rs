//! Tests of the benchmark harness (`benches/common`, shared by the benches, `examples/cost_model.rs`
//! and `camex bench`): the cost floors, the `camex bench` arguments and the candle peer.

#[path = "../benches/common/mod.rs"]
mod bench;

use bench::*;
use camex::{DType, Error};

#[test]
fn floors_match_spec_section_8() {
    // SPEC: the Kronecker transform at T5-base `wi` is 44.4 GFLOP.
    let s = ShapeName::T5Base.dims();
    let c = cost(Op::Curvature, &s, Pass::Fwd, 4);
    assert!((c.flop / 1e9 - 44.4).abs() < 0.1, "{}", c.flop);
    let m = cost(Op::Merge, &s, Pass::Fwd, 4);
    assert_eq!(m.flop, 2.0 * 16.0 * 7.0 * 3072.0 * 768.0);
    let l = cost(Op::MergedLinear, &s, Pass::FwdBwd, 4);
    assert_eq!(l.flop, 3.0 * 2.0 * 16.0 * 128.0 * 3072.0 * 768.0);
}

#[cfg(feature = "cli")]
#[test]
fn args_parse_and_reject() {
    use bench::cli::BenchArgs;
    use clap::Parser;
    #[derive(Parser)]
    struct Bench {
        #[command(flatten)]
        a: BenchArgs,
    }
    let parse = |s: &str| {
        Bench::try_parse_from(std::iter::once("bench").chain(s.split_whitespace())).map(|b| b.a)
    };
    let a = parse("--op ca_merge --shape t5-base --pass fwd").unwrap();
    assert_eq!(a.ops(), vec![Op::CaMerge]);
    assert_eq!(a.shape, ShapeName::T5Base);
    assert_eq!(a.passes.0, vec![Pass::Fwd]);
    assert_eq!(a.dtype(), DType::F32);
    assert!(parse("--shape t5-huge").is_err());
    assert!(parse("--op").is_err());
    assert!(parse("--pass both").is_err());
    assert!(!a.xla);
    assert!(parse("--xla --pass fwd").unwrap().xla);
    let c = parse("--device cuda").unwrap();
    assert_eq!(c.dtype(), DType::BF16);
    assert_eq!(c.ops(), Op::ALL.to_vec());
    assert_eq!(c.passes.0, vec![Pass::Fwd, Pass::FwdBwd]);
}

/// Every spelling reads back as what it prints.
#[test]
fn spellings_round_trip() {
    for s in ShapeName::ALL {
        assert_eq!(s.to_string().parse::<ShapeName>().unwrap(), s);
    }
    for o in Op::ALL {
        assert_eq!(o.to_string().parse::<Op>().unwrap(), o);
    }
    for p in [Pass::Fwd, Pass::FwdBwd] {
        assert_eq!(p.to_string().parse::<Pass>().unwrap(), p);
    }
    assert!("t5-huge".parse::<ShapeName>().is_err());
    assert!("t5-small ".parse::<ShapeName>().is_err());
}

#[test]
fn bf16_on_cpu_is_an_error_not_a_panic() {
    let case = Case {
        op: Op::Merge,
        shape: ShapeName::MiniLm,
        imp: Impl::Camex,
        device: Device::Cpu,
        dtype: DType::BF16,
        pass: Pass::Fwd,
    };
    assert!(matches!(prepare(&case), Err(Error::DType { .. })));
}

/// The peer computes what the fused path computes (small shape, f64).
#[cfg(feature = "peer")]
#[test]
fn peer_matches_fused_ca_merge() {
    use camex::cpu::{self, CaMergeInputs, Curvature, Factors};
    use camex::{HostTensor, MergeOptions};
    use candle_core::DType as CDType;
    let s = BenchShape {
        o: 12,
        i: 10,
        n: 3,
        r: 2,
        g: 4,
        t: 2,
        segments: (4, 1),
    };
    let d = data::<f32>(&s);
    let [a, b, c, dd] = &d.factors;
    let inputs = CaMergeInputs {
        base: &d.base,
        experts: &d.experts,
        scores: &d.scores,
        curvature: Curvature::Kronecker(Factors { a, b, c, d: dd }),
        base_bias: None,
        expert_bias: None,
    };
    let want = cpu::ca_merge(&inputs, &MergeOptions::default())
        .unwrap()
        .merged;
    let cv = |t: &HostTensor<f32>| peer::to_candle(t, CDType::F32).unwrap();
    let u = peer::curvature(
        &cv(&d.base),
        &cv(&d.experts),
        [&cv(a), &cv(b), &cv(c), &cv(dd)],
        &s,
    )
    .unwrap();
    let got = peer::merge(&cv(&d.base), &u, &cv(&d.scores), 1.0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let num: f64 = got
        .iter()
        .zip(want.data())
        .map(|(&x, &y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = want.data().iter().map(|&y| (y as f64).powi(2)).sum();
    assert!((num / den).sqrt() < 1e-5, "rel err {}", (num / den).sqrt());
}
