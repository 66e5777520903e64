//! CAMEx for burn 0.22 (feature `burn`): a backend extension, [`CamexBackend`], implemented for
//! the `Flex` CPU backend on [`crate::cpu`] and for `Autodiff<B>` with a hand-written backward, and
//! the differentiable [`ca_merge`] on burn's `Tensor`.
//!
//! As in the candle adapter, the extension takes three tensors (base, experts, packed) where
//! `packed` is `cat([scores, factor_a, factor_b, factor_c, factor_d] flattened)`; burn's own `cat`
//! and `reshape` backward hand the packed gradient back to each tensor, so autodiff reaches base,
//! experts, scores and every factor.
//!
//! On CUDA (features `burn` and `cuda`): [`CamexBackend`] is implemented for burn's CubeCL
//! backend `Cube` (burn 0.22's `burn::backend::Cuda` is that type) on the crate's CUDA kernels,
//! with two host synchronisations per op (CubeCL does not expose its stream) and one device copy
//! per output; the module `cube` (private) says how, and `tests/burn_cuda.rs` checks it against
//! the Flex path where there is a GPU. **Nothing of it has run on a GPU yet.** Only the backends
//! listed in `#[backend_extension(..)]` (Flex, Cube with `cuda`, Autodiff over them) route to
//! CAMEx; any other panics in burn's generated dispatch ("unlisted backend").
//!
//! Errors: burn's backend operations cannot return errors, so [`ca_merge`] checks every shape and
//! option first and returns a [`crate::Error`]; the backend op only sees validated inputs.

#[cfg(feature = "cuda")]
mod cube;

use crate::cpu;
use crate::options::MergeOptions;
use crate::shape::{expect_nonempty, expect_rank, expect_shape};
use crate::tensor::Float;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, AutodiffBackend, Backend, Flex, TensorMetadata};
use burn::tensor::{DType, Element, Tensor, TensorData};

/// The shapes and options of one `ca_merge` call (ordinary, host-side arguments of the op).
#[derive(Debug, Clone)]
pub struct CaMergeSpec {
    pub base: Vec<usize>,
    pub experts: Vec<usize>,
    /// `scores`, then the four factors (Kronecker) or nothing (identity).
    pub packed: Vec<Vec<usize>>,
    pub opts: MergeOptions,
}

/// The CAMEx operators as a burn backend extension.
#[backend_extension(Flex, Cube: cfg(feature = "cuda"), Autodiff)]
pub trait CamexBackend: Backend {
    /// `merged` [G, O, I] of the fused CA-merge; `packed` as in the module docs.
    fn camex_ca_merge(
        base: FloatTensor<Self>,
        experts: FloatTensor<Self>,
        packed: FloatTensor<Self>,
        spec: CaMergeSpec,
    ) -> FloatTensor<Self>;

    /// (`grad_base`, `grad_experts`, `grad_packed`) for `grad_merged`.
    fn camex_ca_merge_backward(
        base: FloatTensor<Self>,
        experts: FloatTensor<Self>,
        packed: FloatTensor<Self>,
        grad_merged: FloatTensor<Self>,
        spec: CaMergeSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

fn host<F: Float + Element>(t: FlexTensor) -> Vec<F> {
    // `into_data` makes strided views contiguous; `convert` widens f16/bf16.
    t.into_data()
        .convert::<F>()
        .try_into_vec::<F>()
        .unwrap_or_default()
}

fn flex<F: Float + Element>(t: crate::HostTensor<F>, dtype: DType) -> FlexTensor {
    let shape = t.shape().to_vec();
    FlexTensor::from_data(TensorData::new(t.into_data(), shape).convert_dtype(dtype))
}

fn unpack<F: Float>(
    packed: Vec<F>,
    shapes: &[Vec<usize>],
) -> crate::Result<Vec<crate::HostTensor<F>>> {
    let mut out = Vec::with_capacity(shapes.len());
    let mut at = 0;
    for s in shapes {
        let n: usize = s.iter().product();
        let piece = packed.get(at..at + n).ok_or_else(|| {
            crate::Error::shape(
                "packed",
                format!("at least {} elements", at + n),
                &[packed.len()],
            )
        })?;
        out.push(crate::HostTensor::new(s, piece.to_vec())?);
        at += n;
    }
    Ok(out)
}

fn view<F>(f: &[crate::HostTensor<F>]) -> cpu::Curvature<'_, F> {
    match f {
        [a, b, c, d] => cpu::Curvature::Kronecker(cpu::Factors { a, b, c, d }),
        _ => cpu::Curvature::Identity,
    }
}

/// Runs `f` on host copies of (base, experts, scores, factors) in the compute type of `dtype`.
struct Host<F> {
    base: crate::HostTensor<F>,
    experts: crate::HostTensor<F>,
    scores: crate::HostTensor<F>,
    factors: Vec<crate::HostTensor<F>>,
}

impl<F: Float + Element> Host<F> {
    fn new(
        base: FlexTensor,
        experts: FlexTensor,
        packed: FlexTensor,
        spec: &CaMergeSpec,
    ) -> crate::Result<Self> {
        let mut packed = unpack(host::<F>(packed), &spec.packed)?;
        let factors = packed.split_off(1);
        Ok(Host {
            base: crate::HostTensor::new(&spec.base, host::<F>(base))?,
            experts: crate::HostTensor::new(&spec.experts, host::<F>(experts))?,
            scores: packed
                .pop()
                .ok_or_else(|| crate::Error::shape("scores", "[G, N]", &[]))?,
            factors,
        })
    }
    fn inputs(&self) -> cpu::CaMergeInputs<'_, F> {
        cpu::CaMergeInputs {
            base: &self.base,
            experts: &self.experts,
            scores: &self.scores,
            curvature: view(&self.factors),
            base_bias: None,
            expert_bias: None,
        }
    }
}

fn flex_forward<F: Float + Element>(
    base: FlexTensor,
    experts: FlexTensor,
    packed: FlexTensor,
    spec: &CaMergeSpec,
    dtype: DType,
) -> crate::Result<FlexTensor> {
    let h = Host::<F>::new(base, experts, packed, spec)?;
    Ok(flex(cpu::ca_merge(&h.inputs(), &spec.opts)?.merged, dtype))
}

fn flex_backward<F: Float + Element>(
    base: FlexTensor,
    experts: FlexTensor,
    packed: FlexTensor,
    grad: FlexTensor,
    spec: &CaMergeSpec,
    dtype: DType,
) -> crate::Result<(FlexTensor, FlexTensor, FlexTensor)> {
    let gshape = grad.shape().as_slice().to_vec();
    let grad = crate::HostTensor::new(&gshape, host::<F>(grad))?;
    let h = Host::<F>::new(base, experts, packed, spec)?;
    let g = cpu::ca_merge_backward(&h.inputs(), &spec.opts, &grad, None, None)?;
    let mut packed: Vec<F> = g.grad_scores.into_data();
    if let Some(f) = g.factors {
        for t in [
            f.grad_factor_a,
            f.grad_factor_b,
            f.grad_factor_c,
            f.grad_factor_d,
        ] {
            packed.extend(t.into_data());
        }
    }
    let n = packed.len();
    let packed = crate::HostTensor::new(&[n], packed)?;
    Ok((
        flex(g.grad_base, dtype),
        flex(g.grad_experts, dtype),
        flex(packed, dtype),
    ))
}

fn expect_ok<T>(r: crate::Result<T>) -> T {
    // burn's backend ops have no error channel. [`ca_merge`] validated every shape and option
    // before the op was recorded, so any other error than the device's (out of memory, a CUDA
    // failure) is a bug in this adapter.
    r.unwrap_or_else(|e| match e {
        crate::Error::Memory { .. } | crate::Error::Cuda { .. } => {
            panic!("camex burn ca_merge: {e}")
        }
        e => panic!("camex burn ca_merge: {e} (inputs were validated; please report)"),
    })
}

impl CamexBackend for Flex {
    fn camex_ca_merge(
        base: FloatTensor<Self>,
        experts: FloatTensor<Self>,
        packed: FloatTensor<Self>,
        spec: CaMergeSpec,
    ) -> FloatTensor<Self> {
        let dtype = base.dtype();
        expect_ok(match dtype {
            DType::F64 => flex_forward::<f64>(base, experts, packed, &spec, dtype),
            _ => flex_forward::<f32>(base, experts, packed, &spec, dtype),
        })
    }

    fn camex_ca_merge_backward(
        base: FloatTensor<Self>,
        experts: FloatTensor<Self>,
        packed: FloatTensor<Self>,
        grad_merged: FloatTensor<Self>,
        spec: CaMergeSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let dtype = base.dtype();
        expect_ok(match dtype {
            DType::F64 => flex_backward::<f64>(base, experts, packed, grad_merged, &spec, dtype),
            _ => flex_backward::<f32>(base, experts, packed, grad_merged, &spec, dtype),
        })
    }
}

#[derive(Debug)]
struct CaMergeBackward;

impl<B: CamexBackend> Backward<B, 3> for CaMergeBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, CaMergeSpec);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_base, node_experts, node_packed] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (base, experts, packed, spec) = ops.state;
        let (gb, ge, gp) = B::camex_ca_merge_backward(base, experts, packed, grad, spec);
        if let Some(node) = node_base {
            grads.register::<B>(node.id, gb);
        }
        if let Some(node) = node_experts {
            grads.register::<B>(node.id, ge);
        }
        if let Some(node) = node_packed {
            grads.register::<B>(node.id, gp);
        }
    }
}

impl<B: CamexBackend, C: CheckpointStrategy> CamexBackend for Autodiff<B, C> {
    fn camex_ca_merge(
        base: FloatTensor<Self>,
        experts: FloatTensor<Self>,
        packed: FloatTensor<Self>,
        spec: CaMergeSpec,
    ) -> FloatTensor<Self> {
        let prep = CaMergeBackward
            .prepare::<C>([base.node(), experts.node(), packed.node()])
            .compute_bound()
            .stateful();
        match prep {
            OpsKind::Tracked(prep) => {
                let (b, e, p) = (
                    base.into_primitive(),
                    experts.into_primitive(),
                    packed.into_primitive(),
                );
                let out = B::camex_ca_merge(b.clone(), e.clone(), p.clone(), spec.clone());
                prep.finish((b, e, p, spec), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::camex_ca_merge(
                base.into_primitive(),
                experts.into_primitive(),
                packed.into_primitive(),
                spec,
            )),
        }
    }

    fn camex_ca_merge_backward(
        base: FloatTensor<Self>,
        experts: FloatTensor<Self>,
        packed: FloatTensor<Self>,
        grad_merged: FloatTensor<Self>,
        spec: CaMergeSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // Second-order gradients are not supported: the backward runs untracked.
        let (gb, ge, gp) = B::camex_ca_merge_backward(
            base.into_primitive(),
            experts.into_primitive(),
            packed.into_primitive(),
            grad_merged.into_primitive(),
            spec,
        );
        (
            <Self as AutodiffBackend>::from_inner(gb),
            <Self as AutodiffBackend>::from_inner(ge),
            <Self as AutodiffBackend>::from_inner(gp),
        )
    }
}

/// Kronecker factors `factor_a..factor_d` ([R, N, o1, o1], [R, N, o2, o2], [R, N, i1, i1],
/// [R, N, i2, i2]) as burn tensors.
#[derive(Debug, Clone)]
pub struct Factors {
    pub a: Tensor<4>,
    pub b: Tensor<4>,
    pub c: Tensor<4>,
    pub d: Tensor<4>,
}

/// The fused CA-merge on burn tensors (SPEC section 3): `merged` [G, O, I], differentiable in
/// `base`, `experts`, `scores` and every factor under `device.autodiff()`. Identity curvature when
/// `factors` is `None`. Shapes, dtypes and options are checked first: a bad input is an `Err`.
pub fn ca_merge(
    base: Tensor<2>,
    experts: Tensor<3>,
    scores: Tensor<2>,
    factors: Option<Factors>,
    opts: &MergeOptions,
) -> crate::Result<Tensor<3>> {
    opts.validate()?;
    if opts.beta.is_some() || opts.want_curved {
        return Err(crate::Error::option(
            "beta/want_curved",
            "the burn ca_merge writes `merged` only",
        ));
    }
    let bs = base.dims().to_vec();
    let es = experts.dims().to_vec();
    let ss = scores.dims().to_vec();
    expect_nonempty("base", &bs)?;
    let (o, i) = (bs[0], bs[1]);
    let n = es[0];
    expect_nonempty("experts", &es)?;
    expect_shape("experts", &es, &[n, o, i])?;
    expect_nonempty("scores", &ss)?;
    expect_shape("scores", &ss, &[ss[0], n])?;
    let dtype = base.dtype();
    if !matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
        return Err(crate::Error::DType {
            tensor: "base".into(),
            expected: "f32|f64|f16|bf16".into(),
            actual: format!("{dtype:?}"),
        });
    }
    for (name, d) in [("experts", experts.dtype()), ("scores", scores.dtype())] {
        if d != dtype {
            return Err(crate::Error::DType {
                tensor: name.into(),
                expected: format!("{dtype:?} (as base)"),
                actual: format!("{d:?}"),
            });
        }
    }
    let mut packed_shapes = vec![ss.clone()];
    let mut pieces: Vec<Tensor<1>> = vec![scores.reshape([-1])];
    if let Some(f) = factors {
        let dims: Vec<Vec<usize>> = [&f.a, &f.b, &f.c, &f.d]
            .iter()
            .map(|t| t.dims().to_vec())
            .collect();
        // The CPU path's own check of the factor shapes, on small zero tensors of those shapes.
        let z: Vec<crate::HostTensor<f32>> =
            dims.iter().map(|d| crate::HostTensor::zeros(d)).collect();
        let curv = cpu::Curvature::Kronecker(cpu::Factors {
            a: &z[0],
            b: &z[1],
            c: &z[2],
            d: &z[3],
        });
        cpu::curvature::check_curvature(n, o, i, &curv)?;
        for (name, t) in [
            ("factor_a", &f.a),
            ("factor_b", &f.b),
            ("factor_c", &f.c),
            ("factor_d", &f.d),
        ] {
            if t.dtype() != dtype {
                return Err(crate::Error::DType {
                    tensor: name.into(),
                    expected: format!("{dtype:?} (as base)"),
                    actual: format!("{:?}", t.dtype()),
                });
            }
        }
        packed_shapes.extend(dims);
        for t in [f.a, f.b, f.c, f.d] {
            pieces.push(t.reshape([-1]));
        }
    }
    let packed = Tensor::cat(pieces, 0);
    let spec = CaMergeSpec {
        base: bs,
        experts: es,
        packed: packed_shapes,
        opts: *opts,
    };
    let out = burn::backend::Dispatch::camex_ca_merge(
        base.into_dispatch(),
        experts.into_dispatch(),
        packed.into_dispatch(),
        spec,
    );
    Ok(Tensor::from_dispatch(out))
}

/// `y` [G, T, O] = `merged` x + `merged_bias`: the merged linear layer as burn's batched matmul.
pub fn merged_linear(
    x: Tensor<3>,
    merged: Tensor<3>,
    merged_bias: Option<Tensor<2>>,
) -> crate::Result<Tensor<3>> {
    let (xs, ms) = (x.dims(), merged.dims());
    expect_rank("x", &xs, 3, "[G, T, I]")?;
    expect_shape("x", &xs, &[ms[0], xs[1], ms[2]])?;
    let y = x.matmul(merged.swap_dims(1, 2));
    Ok(match merged_bias {
        Some(b) => {
            expect_shape("merged_bias", &b.dims(), &[ms[0], ms[1]])?;
            y + b.unsqueeze_dim::<3>(1)
        }
        None => y,
    })
}
