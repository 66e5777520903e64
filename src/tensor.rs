//! A minimal dense, row-major, contiguous tensor (SPEC section 2) and the element traits.
//!
//! The CPU operators compute in [`Float`] (f32 or f64). f16 and bf16 storage is converted to f32 at the
//! boundary ([`AnyTensor`]), so every reduction accumulates in at least f32, as SPEC section 5 asks.

use crate::error::{Error, Result};
use half::{bf16, f16};

/// Storage dtypes of SPEC section 5, plus f64 for the oracle and for users who want it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses `f32`, `f64`, `f16` or `bf16`.
impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(DType::F32),
            "f64" => Ok(DType::F64),
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            _ => Err(Error::option(
                "dtype",
                format!("expected f32|f64|f16|bf16, got `{s}`"),
            )),
        }
    }
}

/// A dense row-major tensor that owns its data.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor<T> {
    shape: Vec<usize>,
    data: Vec<T>,
}

impl<T> HostTensor<T> {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn data(&self) -> &[T] {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }
    pub fn into_data(self) -> Vec<T> {
        self.data
    }
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl<T: Copy> HostTensor<T> {
    /// Wraps `data` with `shape`; errors when the element count differs.
    pub fn new(shape: &[usize], data: Vec<T>) -> Result<Self> {
        // Checked: a shape whose product wraps around could otherwise pass with a short buffer.
        let Some(n) = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
            return Err(Error::option(
                "data",
                format!("shape {shape:?} holds more elements than fit in memory"),
            ));
        };
        if n != data.len() {
            return Err(Error::option(
                "data",
                format!(
                    "shape {shape:?} holds {n} elements, data has {}",
                    data.len()
                ),
            ));
        }
        Ok(HostTensor {
            shape: shape.to_vec(),
            data,
        })
    }
    pub fn full(shape: &[usize], v: T) -> Self {
        let n: usize = shape.iter().product();
        let data = vec![v; n];
        crate::memory::huge_pages(&data);
        HostTensor {
            shape: shape.to_vec(),
            data,
        }
    }
    pub fn from_fn(shape: &[usize], f: impl FnMut(usize) -> T) -> Self {
        let n: usize = shape.iter().product();
        HostTensor {
            shape: shape.to_vec(),
            data: (0..n).map(f).collect(),
        }
    }
    /// Same data, new shape (same element count).
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        HostTensor::new(shape, self.data)
    }
    pub fn map<U: Copy>(&self, f: impl Fn(T) -> U) -> HostTensor<U> {
        HostTensor {
            shape: self.shape.clone(),
            data: self.data.iter().map(|&x| f(x)).collect(),
        }
    }
}

impl<F: Float> HostTensor<F> {
    pub fn zeros(shape: &[usize]) -> Self {
        HostTensor::full(shape, F::ZERO)
    }
    /// A 0-d tensor (scalar gradients such as `grad_alpha`).
    pub fn scalar(v: F) -> Self {
        HostTensor {
            shape: vec![],
            data: vec![v],
        }
    }
}

/// The compute types of the CPU path: f32 and f64. Everything the operators need, and a GEMM.
pub trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::fmt::Debug
    + std::fmt::Display
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::iter::Sum
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const DTYPE: DType;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn abs(self) -> Self;
    fn is_nan(self) -> bool;
    /// sgn with sgn(0) = 0 and sgn(NaN) = NaN (SPEC section 3, `ties_sign`).
    fn sgn(self) -> Self {
        if self.is_nan() {
            self
        } else if self > Self::ZERO {
            Self::ONE
        } else if self < Self::ZERO {
            -Self::ONE
        } else {
            Self::ZERO
        }
    }
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const DTYPE: DType = DType::F32;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn abs(self) -> Self {
        f32::abs(self)
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const DTYPE: DType = DType::F64;
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn abs(self) -> Self {
        f64::abs(self)
    }
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

/// A tensor of any storage dtype: what the named-tensor interface (CLI, safetensors) moves around.
#[derive(Debug, Clone, PartialEq)]
pub enum AnyTensor {
    F32(HostTensor<f32>),
    F64(HostTensor<f64>),
    F16(HostTensor<f16>),
    BF16(HostTensor<bf16>),
}

impl AnyTensor {
    pub fn dtype(&self) -> DType {
        match self {
            AnyTensor::F32(_) => DType::F32,
            AnyTensor::F64(_) => DType::F64,
            AnyTensor::F16(_) => DType::F16,
            AnyTensor::BF16(_) => DType::BF16,
        }
    }
    pub fn shape(&self) -> &[usize] {
        match self {
            AnyTensor::F32(t) => t.shape(),
            AnyTensor::F64(t) => t.shape(),
            AnyTensor::F16(t) => t.shape(),
            AnyTensor::BF16(t) => t.shape(),
        }
    }
    /// Widens to f32 (f64 narrows: use [`AnyTensor::to_f64`] to keep it).
    pub fn to_f32(&self) -> HostTensor<f32> {
        match self {
            AnyTensor::F32(t) => t.clone(),
            AnyTensor::F64(t) => t.map(|x| x as f32),
            AnyTensor::F16(t) => t.map(|x| x.to_f32()),
            AnyTensor::BF16(t) => t.map(|x| x.to_f32()),
        }
    }
    pub fn to_f64(&self) -> HostTensor<f64> {
        match self {
            AnyTensor::F32(t) => t.map(|x| x as f64),
            AnyTensor::F64(t) => t.clone(),
            AnyTensor::F16(t) => t.map(|x| x.to_f64()),
            AnyTensor::BF16(t) => t.map(|x| x.to_f64()),
        }
    }
    /// Rounds an f32 result to `dtype` storage.
    pub fn from_f32(t: &HostTensor<f32>, dtype: DType) -> AnyTensor {
        match dtype {
            DType::F32 => AnyTensor::F32(t.clone()),
            DType::F64 => AnyTensor::F64(t.map(|x| x as f64)),
            DType::F16 => AnyTensor::F16(t.map(f16::from_f32)),
            DType::BF16 => AnyTensor::BF16(t.map(bf16::from_f32)),
        }
    }
    pub fn from_f64(t: &HostTensor<f64>, dtype: DType) -> AnyTensor {
        match dtype {
            DType::F32 => AnyTensor::F32(t.map(|x| x as f32)),
            DType::F64 => AnyTensor::F64(t.clone()),
            DType::F16 => AnyTensor::F16(t.map(f16::from_f64)),
            DType::BF16 => AnyTensor::BF16(t.map(bf16::from_f64)),
        }
    }
}
