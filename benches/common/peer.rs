//! The peer: the official formulation, unfused, from candle ops, on the CPU and (with `cuda`,
//! which turns on candle's CUDA backend) on the GPU (`gpu::measure_peer`).

use super::*;
use candle_core::{DType as CDType, Device as CDevice, Tensor as CT, Var};

fn err(e: candle_core::Error) -> Error {
    Error::option("peer (candle)", e.to_string())
}

/// A camex tensor as a candle tensor of `dtype` on the CPU.
pub fn to_candle(t: &HostTensor<f32>, dtype: CDType) -> candle_core::Result<CT> {
    CT::from_slice(t.data(), t.shape(), &CDevice::Cpu)?.to_dtype(dtype)
}

/// y = x x_axis F on the 6-D view [R, N, o1, o2, i1, i2] with per-(r, i) factors F [R, N, k, k]:
/// the mode moved last (a materialised copy, as einsum does), one batched matmul, moved back.
fn mode(x: &CT, f: &CT, axis: usize) -> candle_core::Result<CT> {
    let dims = x.dims().to_vec();
    let (r, n, k) = (dims[0], dims[1], dims[axis]);
    let rest = dims[2..].iter().product::<usize>() / k;
    if axis == 2 {
        return f.matmul(&x.reshape((r, n, k, rest))?)?.reshape(dims);
    }
    let xt = x.transpose(axis, 5)?;
    let tdims = xt.dims().to_vec();
    let y = xt.contiguous()?.reshape((r, n, rest, k))?.matmul(&f.t()?)?;
    y.reshape(tdims)?.transpose(axis, 5)
}

/// U [N, O, I] = sum_r tau x1 A x2 B x3 C x4 D, through a materialised [R, N, O, I].
pub fn curvature(base: &CT, experts: &CT, f: [&CT; 4], s: &BenchShape) -> candle_core::Result<CT> {
    let sp = s.split();
    let (r, n, o, i) = (s.r, s.n, s.o, s.i);
    let tau = experts.broadcast_sub(&base.unsqueeze(0)?)?;
    let mut x = tau
        .unsqueeze(0)?
        .broadcast_as((r, n, o, i))?
        .contiguous()?
        .reshape(vec![r, n, sp.o1, sp.o2, sp.i1, sp.i2])?;
    for (axis, fac) in f.iter().enumerate() {
        x = mode(&x, fac, axis + 2)?;
    }
    x.sum(0)?.reshape((n, o, i))
}

/// merged [G, O, I] = base + alpha * sum_i (scores [G, N, 1, 1] * P [1, N, O, I]), through a
/// materialised [G, N, O, I].
pub fn merge(base: &CT, p: &CT, scores: &CT, alpha: f64) -> candle_core::Result<CT> {
    let (g, n) = scores.dims2()?;
    let gated = scores
        .reshape((g, n, 1, 1))?
        .broadcast_mul(&p.unsqueeze(0)?)?;
    gated.sum(1)?.affine(alpha, 0.0)?.broadcast_add(base)
}

struct Inputs {
    tensors: Vec<CT>,
    vars: Vec<Var>,
}

impl Inputs {
    fn new(list: Vec<CT>, bwd: bool) -> candle_core::Result<Self> {
        let vars = if bwd {
            list.iter()
                .map(Var::from_tensor)
                .collect::<candle_core::Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(Inputs {
            tensors: list,
            vars,
        })
    }
    /// The inputs as seen by the graph: variables (tracked) for fwd+bwd, plain tensors for fwd.
    fn get(&self) -> Vec<CT> {
        if self.vars.is_empty() {
            self.tensors.clone()
        } else {
            self.vars.iter().map(|v| v.as_tensor().clone()).collect()
        }
    }
}

pub(super) fn prepare(case: &Case) -> Result<Runner> {
    prepare_on(case, &CDevice::Cpu)
}

/// The peer's iteration for `case` on `dev`: f32 or f64 on the CPU (f16/bf16 storage is
/// computed in f32 there, as the crate's CPU path does), the case's dtype on CUDA.
pub fn prepare_on(case: &Case, dev: &CDevice) -> Result<Runner> {
    prepare_inner(case, dev).map_err(err)
}

fn prepare_inner(case: &Case, dev: &CDevice) -> candle_core::Result<Runner> {
    let s = case.shape.dims();
    let dt = match (dev.is_cpu(), case.dtype) {
        (_, DType::F64) => CDType::F64,
        (false, DType::BF16) => CDType::BF16,
        (false, DType::F16) => CDType::F16,
        _ => CDType::F32,
    };
    let bwd = case.pass == Pass::FwdBwd;
    let mut rng = Rng(0xBE4C_0001);
    let (n, o, i, g, t) = (s.n, s.o, s.i, s.g, s.t);
    let cv = |x: &HostTensor<f32>| to_candle(x, dt)?.to_device(dev);
    // Each arm: the graph's inputs, the upstream gradient, and the forward as a function.
    type Fwd = Box<dyn Fn(&[CT]) -> candle_core::Result<CT>>;
    let (inputs, grad, fwd): (Vec<CT>, CT, Fwd) = match case.op {
        Op::CaMerge | Op::Curvature => {
            let d = data::<f32>(&s);
            let mut list = vec![cv(&d.base)?, cv(&d.experts)?, cv(&d.scores)?];
            for f in &d.factors {
                list.push(cv(f)?);
            }
            let grad_shape: &[usize] = if case.op == Op::CaMerge {
                &[g, o, i]
            } else {
                &[n, o, i]
            };
            let grad = cv(&rng.tensor(grad_shape, 1.0))?;
            let ca = case.op == Op::CaMerge;
            let f: Fwd = Box::new(move |x: &[CT]| {
                let u = curvature(&x[0], &x[1], [&x[3], &x[4], &x[5], &x[6]], &s)?;
                if ca {
                    merge(&x[0], &u, &x[2], 1.0)
                } else {
                    Ok(u)
                }
            });
            (list, grad, f)
        }
        Op::TiesMask => {
            let d = data::<f32>(&s);
            let list = vec![cv(&d.base)?, cv(&d.experts)?];
            let f: Fwd = Box::new(|x: &[CT]| {
                let tau = x[1].broadcast_sub(&x[0].unsqueeze(0)?)?;
                let elect = tau.sum_keepdim(0)?.sign()?;
                tau.sign()?.broadcast_eq(&elect)?.to_dtype(x[0].dtype())
            });
            (list, cv(&HostTensor::zeros(&[1]))?, f)
        }
        Op::Merge => {
            let d = data::<f32>(&s);
            let curved = rng.tensor(&[n, o, i], 0.01);
            let list = vec![cv(&d.base)?, cv(&curved)?, cv(&d.scores)?];
            let grad = cv(&rng.tensor(&[g, o, i], 1.0))?;
            let f: Fwd = Box::new(|x: &[CT]| merge(&x[0], &x[1], &x[2], 1.0));
            (list, grad, f)
        }
        Op::MergedLinear => {
            let x = rng.tensor(&[g, t, i], 1.0);
            let merged = rng.tensor(&[g, o, i], 0.05);
            let grad = cv(&rng.tensor(&[g, t, o], 1.0))?;
            let f: Fwd = Box::new(|x: &[CT]| x[0].matmul(&x[1].t()?));
            (vec![cv(&x)?, cv(&merged)?], grad, f)
        }
        Op::DynamicMerge => {
            let base = rng.tensor(&[o, i], 0.05);
            let curved = rng.tensor(&[n, o, i], 0.01);
            let grad = cv(&rng.tensor(&[o, i], 1.0))?;
            let c = 0.5 / n as f64;
            let f: Fwd = Box::new(move |x: &[CT]| x[0].add(&x[1].sum(0)?.affine(c, 0.0)?));
            (vec![cv(&base)?, cv(&curved)?], grad, f)
        }
        Op::SegmentScores => {
            let (b, j) = s.segments;
            let router = rng.tensor(&[b, j, n], 1.0);
            let grad = cv(&rng.tensor(&[b, j, n], 1.0))?;
            let f: Fwd = Box::new(move |x: &[CT]| {
                let first = x[0].narrow(1, 0, 1)?.detach();
                if j == 1 {
                    return Ok(first);
                }
                CT::cat(&[&first, &x[0].narrow(1, 0, j - 1)?], 1)
            });
            (vec![cv(&router)?], grad, f)
        }
    };
    let inputs = Inputs::new(inputs, bwd)?;
    Ok(Box::new(move || {
        let run = || -> candle_core::Result<()> {
            let x = inputs.get();
            let out = fwd(&x)?;
            if bwd {
                let loss = out.mul(&grad)?.sum_all()?;
                let grads = loss.backward()?;
                std::hint::black_box(&grads);
            } else {
                std::hint::black_box(&out);
            }
            Ok(())
        };
        run().map_err(err)
    }))
}
