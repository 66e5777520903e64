//! The CAMEx operators as candle custom ops (forward and backward on [`crate::cpu`]).
//!
//! candle's custom ops take at most three tensors. The fused `ca_merge` needs seven (base, experts,
//! scores, four factors), so the op takes (base, experts, packed) where `packed` is
//! `cat([scores, factor_a, factor_b, factor_c, factor_d] flattened)`. The op's backward returns the
//! packed gradient in the same order and candle's own `cat`/`flatten` backward hands each piece to
//! its tensor, so autograd reaches every input exactly. `curvature` packs the four factors the same
//! way. Masks and DARE draws are constants (SPEC section 3) and live in the op.

use super::cerr;
#[cfg(feature = "cuda")]
use super::cuda as on_cuda;
use crate::backend::{Backend, CaMergeInputs, Cpu, Curvature, FactorGrads, MergeInputs};
use crate::options::{Dare, MergeOptions};
use crate::HostTensor;
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType,
};

/// The four Kronecker factors `factor_a` [R, N, o1, o1], `factor_b` [R, N, o2, o2],
/// `factor_c` [R, N, i1, i1], `factor_d` [R, N, i2, i2] as candle tensors.
#[derive(Debug, Clone)]
pub struct Factors {
    pub a: Tensor,
    pub b: Tensor,
    pub c: Tensor,
    pub d: Tensor,
}

impl Factors {
    fn all(&self) -> [(&'static str, &Tensor); 4] {
        [
            ("factor_a", &self.a),
            ("factor_b", &self.b),
            ("factor_c", &self.c),
            ("factor_d", &self.d),
        ]
    }
}

/// Host compute types: f32 (also for f16/bf16 storage) and f64.
pub(crate) trait Elem: crate::Float + WithDType {}
impl Elem for f32 {}
impl Elem for f64 {}

/// One operator's computation, written once for every [`Backend`]: on the host ([`Cpu`]) and, with
/// feature `cuda`, on candle's CUDA stream. `inputs` are the op's inputs in order, contiguous; the
/// packed one is 1-d.
pub(crate) trait Kernel {
    const NAME: &'static str;
    /// The output of the forward.
    fn forward<E, B: Backend<E>>(&self, b: &B, inputs: Vec<B::Tensor>) -> crate::Result<B::Tensor>;
    /// The gradient of every input, in input order (packed inputs packed again).
    fn backward<E, B: Backend<E>>(
        &self,
        b: &B,
        inputs: Vec<B::Tensor>,
        grad: B::Tensor,
    ) -> crate::Result<Vec<B::Tensor>>;
}

/// Copies the elements a layout addresses, in row-major order (contiguous inputs are a slice copy).
fn gather<T: Copy>(v: &[T], l: &Layout) -> Vec<T> {
    if let Some((a, b)) = l.contiguous_offsets() {
        return v[a..b].to_vec();
    }
    let dims = l.dims();
    let stride = l.stride();
    let n: usize = dims.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..n {
        let off: usize =
            l.start_offset() + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(v[off]);
        for k in (0..dims.len()).rev() {
            idx[k] += 1;
            if idx[k] < dims[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

pub(crate) fn dtype_error(
    op: &str,
    name: &str,
    expected: &str,
    actual: DType,
) -> candle_core::Error {
    cerr(
        op,
        crate::Error::DType {
            tensor: name.into(),
            expected: expected.into(),
            actual: format!("{actual:?}"),
        },
    )
}

/// The common storage dtype of all inputs: one of f32, f64, f16, bf16, the same for all.
pub(crate) fn common_dtype(op: &str, inputs: &[(&str, DType)]) -> Result<DType> {
    let dt = inputs[0].1;
    if !matches!(dt, DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
        return Err(dtype_error(op, inputs[0].0, "f32|f64|f16|bf16", dt));
    }
    for &(name, d) in &inputs[1..] {
        if d != dt {
            return Err(dtype_error(
                op,
                name,
                &format!("{dt:?} (as the first input)"),
                d,
            ));
        }
    }
    Ok(dt)
}

fn read_f32(s: &CpuStorage, l: &Layout) -> Vec<f32> {
    match s {
        CpuStorage::F32(v) => gather(v, l),
        CpuStorage::F16(v) => gather(v, l).into_iter().map(|x| x.to_f32()).collect(),
        CpuStorage::BF16(v) => gather(v, l).into_iter().map(|x| x.to_f32()).collect(),
        // common_dtype admitted only the types above.
        _ => Vec::new(),
    }
}

fn write_f32(v: Vec<f32>, dt: DType) -> CpuStorage {
    match dt {
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        _ => CpuStorage::F32(v),
    }
}

/// The elements a layout addresses as a host tensor of its shape.
fn host<F: Copy>(op: &str, v: Vec<F>, l: &Layout) -> Result<HostTensor<F>> {
    HostTensor::new(l.dims(), v).map_err(|e| cerr(op, e))
}

fn cpu_dispatch<K: Kernel>(
    k: &K,
    inputs: &[(&str, &CpuStorage, &Layout)],
) -> Result<(CpuStorage, Shape)> {
    let dts: Vec<(&str, DType)> = inputs.iter().map(|(n, s, _)| (*n, s.dtype())).collect();
    let dt = common_dtype(K::NAME, &dts)?;
    if dt == DType::F64 {
        let bufs = inputs
            .iter()
            .map(|(_, s, l)| match s {
                CpuStorage::F64(v) => host(K::NAME, gather(v, l), l),
                _ => host(K::NAME, Vec::new(), l),
            })
            .collect::<Result<Vec<_>>>()?;
        let out = k
            .forward::<f64, Cpu>(&Cpu, bufs)
            .map_err(|e| cerr(K::NAME, e))?;
        let shape = Shape::from(out.shape().to_vec());
        Ok((CpuStorage::F64(out.into_data()), shape))
    } else {
        let bufs = inputs
            .iter()
            .map(|(_, s, l)| host(K::NAME, read_f32(s, l), l))
            .collect::<Result<Vec<_>>>()?;
        let out = k
            .forward::<f32, Cpu>(&Cpu, bufs)
            .map_err(|e| cerr(K::NAME, e))?;
        let shape = Shape::from(out.shape().to_vec());
        Ok((write_f32(out.into_data(), dt), shape))
    }
}

fn to_host<F: Elem>(t: &Tensor) -> Result<HostTensor<F>> {
    let v = t
        .to_device(&Device::Cpu)?
        .to_dtype(<F as WithDType>::DTYPE)?
        .flatten_all()?
        .to_vec1::<F>()?;
    HostTensor::new(t.dims(), v).map_err(|e| cerr("input", e))
}

fn bwd_typed<K: Kernel, F: Elem>(k: &K, args: &[&Tensor], grad: &Tensor) -> Result<Vec<Tensor>> {
    let bufs = args
        .iter()
        .map(|a| to_host::<F>(a))
        .collect::<Result<Vec<_>>>()?;
    let grads = k
        .backward::<F, Cpu>(&Cpu, bufs, to_host::<F>(grad)?)
        .map_err(|e| cerr(K::NAME, e))?;
    args.iter()
        .zip(grads)
        .map(|(a, g)| {
            Tensor::from_vec(g.into_data(), a.shape(), &Device::Cpu)?
                .to_dtype(a.dtype())?
                .to_device(a.device())
        })
        .collect()
}

/// The backward: on the device for CUDA tensors (feature `cuda`), else on the host; gradients in
/// the dtype and on the device of each argument.
fn bwd_dispatch<K: Kernel>(k: &K, args: &[&Tensor], grad: &Tensor) -> Result<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    if args[0].device().is_cuda() {
        return on_cuda::backward(k, args, grad);
    }
    match args[0].dtype() {
        DType::F64 => bwd_typed::<K, f64>(k, args, grad),
        DType::F32 | DType::F16 | DType::BF16 => bwd_typed::<K, f32>(k, args, grad),
        d => Err(dtype_error(K::NAME, "base", "f32|f64|f16|bf16", d)),
    }
}

/// The `N` inputs of an op, by position.
fn take<X, const N: usize>(inputs: Vec<X>) -> crate::Result<[X; N]> {
    let got = inputs.len();
    inputs
        .try_into()
        .map_err(|_| crate::Error::option("inputs", format!("{N} tensors, got {got}")))
}

/// `[g_a, g_b, g_c, g_d]`, or nothing for the identity curvature.
fn factor_grads<X>(g: Option<FactorGrads<X>>) -> Vec<X> {
    g.map(FactorGrads::into_array)
        .into_iter()
        .flatten()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// ca_merge: (base, experts, packed[scores, factors]) -> merged [G, O, I]

#[derive(Debug, Clone)]
struct CaMergeKernel {
    /// scores, then the four factors (Kronecker) or nothing (identity).
    packed: Vec<Vec<usize>>,
    opts: MergeOptions,
}

impl CaMergeKernel {
    /// Runs `f` on the op's inputs, the packed one split (into views on a device).
    fn with_inputs<E, B: Backend<E>, R>(
        &self,
        b: &B,
        inputs: Vec<B::Tensor>,
        f: impl FnOnce(&CaMergeInputs<B::Tensor>) -> crate::Result<R>,
    ) -> crate::Result<R> {
        let [base, experts, packed] = take(inputs)?;
        b.with_packed_ca_inputs(&base, &experts, &packed, &self.packed, f)
    }
}

impl Kernel for CaMergeKernel {
    const NAME: &'static str = "ca_merge";
    fn forward<E, B: Backend<E>>(&self, b: &B, inputs: Vec<B::Tensor>) -> crate::Result<B::Tensor> {
        self.with_inputs(b, inputs, |x| Ok(b.ca_merge(x, &self.opts)?.merged))
    }
    fn backward<E, B: Backend<E>>(
        &self,
        b: &B,
        inputs: Vec<B::Tensor>,
        grad: B::Tensor,
    ) -> crate::Result<Vec<B::Tensor>> {
        self.with_inputs(b, inputs, |x| {
            let g = b.ca_merge_backward(x, &self.opts, &grad, None, None)?;
            let mut grad_packed = vec![g.grad_scores];
            grad_packed.extend(factor_grads(g.factors));
            Ok(vec![g.grad_base, g.grad_experts, b.pack(grad_packed)?])
        })
    }
}

#[derive(Debug, Clone)]
struct Op3<K>(K);

impl<K: Kernel> CustomOp3 for Op3<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_dispatch(
            &self.0,
            &[
                ("input 1", s1, l1),
                ("input 2", s2, l2),
                ("input 3", s3, l3),
            ],
        )
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        on_cuda::forward(
            &self.0,
            &[
                ("input 1", s1, l1),
                ("input 2", s2, l2),
                ("input 3", s3, l3),
            ],
        )
    }
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = bwd_dispatch(&self.0, &[a1, a2, a3], grad)?.into_iter();
        Ok((g.next(), g.next(), g.next()))
    }
}

#[derive(Debug, Clone)]
struct Op1<K>(K);

impl<K: Kernel> CustomOp1 for Op1<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_dispatch(&self.0, &[("input", s, l)])
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        on_cuda::forward(&self.0, &[("input", s, l)])
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(bwd_dispatch(&self.0, &[arg], grad)?.into_iter().next())
    }
}

/// Errors unless every tensor has the dtype and device of the first one.
fn same_kind(op: &str, ts: &[(&str, &Tensor)]) -> Result<()> {
    let (_, first) = ts[0];
    for &(name, t) in &ts[1..] {
        if t.dtype() != first.dtype() {
            return Err(dtype_error(
                op,
                name,
                &format!("{:?} (as {})", first.dtype(), ts[0].0),
                t.dtype(),
            ));
        }
        if !t.device().same_device(first.device()) {
            return Err(candle_core::Error::Msg(format!(
                "camex {op}: tensor `{name}` is on {:?}, `{}` on {:?}",
                t.device().location(),
                ts[0].0,
                first.device().location()
            )));
        }
    }
    Ok(())
}

fn check_rank(op: &str, name: &str, t: &Tensor, rank: usize, what: &str) -> Result<()> {
    crate::shape::expect_rank(name, t.dims(), rank, what).map_err(|e| cerr(op, e))
}

/// The fused CA-merge (SPEC section 3): `merged[g] = base + alpha * sum_i scores[g,i] * zeta[g,i] *
/// (m_i (.) U_i)` with U_i the Kronecker curvature of `experts[i] - base` (`factors`), or the
/// identity (domain-specific merging) when `factors` is `None`. Differentiable in `base`, `experts`,
/// `scores` and every factor; mask (`opts.mask`) and DARE (`opts.dare`) are constants.
/// `opts.beta` and `opts.want_curved` are refused: use [`curvature`] for U.
pub fn ca_merge(
    base: &Tensor,
    experts: &Tensor,
    scores: &Tensor,
    factors: Option<&Factors>,
    opts: &MergeOptions,
) -> Result<Tensor> {
    const OP: &str = "ca_merge";
    opts.validate().map_err(|e| cerr(OP, e))?;
    if opts.beta.is_some() || opts.want_curved {
        return Err(cerr(
            OP,
            crate::Error::option(
                "beta/want_curved",
                "the candle ca_merge writes `merged` only; compose `curvature` for U",
            ),
        ));
    }
    check_rank(OP, "base", base, 2, "[O, I]")?;
    check_rank(OP, "experts", experts, 3, "[N, O, I]")?;
    check_rank(OP, "scores", scores, 2, "[G, N]")?;
    let mut kinds = vec![("base", base), ("experts", experts), ("scores", scores)];
    let mut packed_shapes = vec![scores.dims().to_vec()];
    let mut pieces = vec![scores.flatten_all()?];
    if let Some(f) = factors {
        for (name, t) in f.all() {
            check_rank(OP, name, t, 4, "[R, N, k, k]")?;
            kinds.push((name, t));
            packed_shapes.push(t.dims().to_vec());
            pieces.push(t.flatten_all()?);
        }
    }
    same_kind(OP, &kinds)?;
    let packed = Tensor::cat(&pieces, 0)?;
    let k = CaMergeKernel {
        packed: packed_shapes,
        opts: *opts,
    };
    // The CUDA forward reads contiguous buffers (a no-op for tensors that already are).
    base.contiguous()?
        .apply_op3(&experts.contiguous()?, &packed, Op3(k))
}

// ---------------------------------------------------------------------------------------------
// curvature: (base, experts, packed[factors]) -> curved [N, O, I]

#[derive(Debug, Clone)]
struct CurvatureKernel {
    factors: Vec<Vec<usize>>,
}

impl Kernel for CurvatureKernel {
    const NAME: &'static str = "curvature";
    fn forward<E, B: Backend<E>>(&self, b: &B, inputs: Vec<B::Tensor>) -> crate::Result<B::Tensor> {
        let [base, experts, packed] = take(inputs)?;
        // SAFETY: the views are read by the call below, within `packed`'s scope.
        let factors = unsafe { b.unpack(&packed, &self.factors) }?;
        b.curvature(&base, &experts, &Curvature::from_slice(&factors)?)
    }
    fn backward<E, B: Backend<E>>(
        &self,
        b: &B,
        inputs: Vec<B::Tensor>,
        grad: B::Tensor,
    ) -> crate::Result<Vec<B::Tensor>> {
        let [base, experts, packed] = take(inputs)?;
        // SAFETY: the views are read by the call below, within `packed`'s scope.
        let factors = unsafe { b.unpack(&packed, &self.factors) }?;
        let g = b.curvature_backward(&base, &experts, &Curvature::from_slice(&factors)?, &grad)?;
        Ok(vec![
            g.grad_base,
            g.grad_experts,
            b.pack(factor_grads(g.factors))?,
        ])
    }
}

/// The curvature `U_i = M_i(experts[i] - base)` (SPEC section 3), `curved` [N, O, I]. Identity when
/// `factors` is `None` (then it is candle's own `experts - base`).
pub fn curvature(base: &Tensor, experts: &Tensor, factors: Option<&Factors>) -> Result<Tensor> {
    const OP: &str = "curvature";
    check_rank(OP, "base", base, 2, "[O, I]")?;
    check_rank(OP, "experts", experts, 3, "[N, O, I]")?;
    let Some(f) = factors else {
        same_kind(OP, &[("base", base), ("experts", experts)])?;
        if experts.dims()[1..] != *base.dims() {
            return Err(cerr(
                OP,
                crate::Error::shape(
                    "experts",
                    format!("[N, {}, {}]", base.dims()[0], base.dims()[1]),
                    experts.dims(),
                ),
            ));
        }
        return experts.broadcast_sub(&base.unsqueeze(0)?);
    };
    let mut kinds = vec![("base", base), ("experts", experts)];
    let mut shapes = Vec::new();
    let mut pieces = Vec::new();
    for (name, t) in f.all() {
        check_rank(OP, name, t, 4, "[R, N, k, k]")?;
        kinds.push((name, t));
        shapes.push(t.dims().to_vec());
        pieces.push(t.flatten_all()?);
    }
    same_kind(OP, &kinds)?;
    let packed = Tensor::cat(&pieces, 0)?;
    let k = CurvatureKernel { factors: shapes };
    // The CUDA forward reads contiguous buffers (a no-op for tensors that already are).
    base.contiguous()?
        .apply_op3(&experts.contiguous()?, &packed, Op3(k))
}

// ---------------------------------------------------------------------------------------------
// merge: (base, curved, scores) -> merged [G, O, I], with a constant mask

#[derive(Debug, Clone)]
struct MergeKernel {
    /// The 0/1 mask, kept in f64 (exact for 0 and 1) and narrowed per call.
    mask: Option<HostTensor<f64>>,
    alpha: f64,
    dare: Dare,
}

impl MergeKernel {
    /// Runs `f` on the op's inputs, with the mask in the element type (exact: 0 or 1).
    fn with_inputs<E, B: Backend<E>, R>(
        &self,
        b: &B,
        inputs: Vec<B::Tensor>,
        f: impl FnOnce(&MergeInputs<B::Tensor>) -> crate::Result<R>,
    ) -> crate::Result<R> {
        let [base, curved, scores] = take(inputs)?;
        let mask = self.mask.as_ref().map(|m| b.host_f64(m)).transpose()?;
        f(&MergeInputs {
            base: &base,
            curved: &curved,
            scores: &scores,
            mask: mask.as_ref(),
            base_bias: None,
            expert_bias: None,
        })
    }
}

impl Kernel for MergeKernel {
    const NAME: &'static str = "merge";
    fn forward<E, B: Backend<E>>(&self, b: &B, inputs: Vec<B::Tensor>) -> crate::Result<B::Tensor> {
        self.with_inputs(b, inputs, |x| {
            Ok(b.merge(x, self.alpha, &self.dare)?.merged)
        })
    }
    fn backward<E, B: Backend<E>>(
        &self,
        b: &B,
        inputs: Vec<B::Tensor>,
        grad: B::Tensor,
    ) -> crate::Result<Vec<B::Tensor>> {
        self.with_inputs(b, inputs, |x| {
            let g = b.merge_backward(x, self.alpha, &self.dare, &grad, None)?;
            Ok(vec![g.grad_base, g.grad_curved, g.grad_scores])
        })
    }
}

/// The merge (SPEC section 3) of already-curved domain vectors: `merged[g] = base + alpha *
/// sum_i scores[g,i] * zeta[g,i] * (mask_i (.) curved_i)`. Differentiable in `base`, `curved` and
/// `scores`; `mask` ([N, O, I] of 0/1, e.g. from [`crate::cpu::ties_mask`]) is a constant.
pub fn merge(
    base: &Tensor,
    curved: &Tensor,
    scores: &Tensor,
    mask: Option<&Tensor>,
    alpha: f64,
    dare: &Dare,
) -> Result<Tensor> {
    const OP: &str = "merge";
    dare.validate().map_err(|e| cerr(OP, e))?;
    check_rank(OP, "base", base, 2, "[O, I]")?;
    check_rank(OP, "curved", curved, 3, "[N, O, I]")?;
    check_rank(OP, "scores", scores, 2, "[G, N]")?;
    same_kind(
        OP,
        &[("base", base), ("curved", curved), ("scores", scores)],
    )?;
    let mask = match mask {
        Some(m) => {
            if m.dims() != curved.dims() {
                return Err(cerr(
                    OP,
                    crate::Error::shape("mask", format!("{:?}", curved.dims()), m.dims()),
                ));
            }
            Some(to_host::<f64>(m)?)
        }
        None => None,
    };
    let k = MergeKernel {
        mask,
        alpha,
        dare: *dare,
    };
    base.contiguous()?
        .apply_op3(&curved.contiguous()?, &scores.contiguous()?, Op3(k))
}

// ---------------------------------------------------------------------------------------------
// segment_scores: router_scores [B, J, N] -> scores [B, J, N]

#[derive(Debug, Clone)]
struct SegmentKernel;

impl Kernel for SegmentKernel {
    const NAME: &'static str = "segment_scores";
    fn forward<E, B: Backend<E>>(&self, b: &B, inputs: Vec<B::Tensor>) -> crate::Result<B::Tensor> {
        let [router_scores] = take(inputs)?;
        b.segment_scores(&router_scores)
    }
    fn backward<E, B: Backend<E>>(
        &self,
        b: &B,
        _inputs: Vec<B::Tensor>,
        grad: B::Tensor,
    ) -> crate::Result<Vec<B::Tensor>> {
        Ok(vec![b.segment_scores_backward(&grad)?])
    }
}

/// Causal segment scores (SPEC section 3): `scores[b, j] = router_scores[b, j-1]` for j >= 1 and
/// `scores[b, 0] = stop_gradient(router_scores[b, 0])`.
pub fn segment_scores(router_scores: &Tensor) -> Result<Tensor> {
    check_rank(
        "segment_scores",
        "router_scores",
        router_scores,
        3,
        "[B, J, N]",
    )?;
    router_scores.contiguous()?.apply_op1(Op1(SegmentKernel))
}
