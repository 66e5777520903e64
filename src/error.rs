//! One error type for every operator, CPU and CUDA.
//!
//! Messages name the tensor and give both the expected and the actual shape or dtype, so that a
//! caller (or the `camex` CLI) can print them as they are.

use std::fmt;

/// Everything that can go wrong in `camex`. No operator panics on bad input: it returns one of these.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A tensor's shape differs from what the other inputs imply.
    Shape {
        tensor: String,
        expected: String,
        actual: Vec<usize>,
    },
    /// A tensor has the wrong element type.
    DType {
        tensor: String,
        expected: String,
        actual: String,
    },
    /// A required tensor is absent (named-tensor interface).
    Missing { tensor: String, op: String },
    /// An option or scalar is out of range (alpha NaN, p outside [0, 1), k outside (0, 1], ...).
    Option { name: String, message: String },
    /// The operator name is not one of SPEC section 7.
    UnknownOp(String),
    /// A CUDA driver, runtime or launch error, or no CUDA driver on this machine.
    Cuda(String),
    /// Reading or writing a safetensors file.
    Io(String),
}

impl Error {
    pub fn shape(tensor: impl Into<String>, expected: impl Into<String>, actual: &[usize]) -> Self {
        Error::Shape {
            tensor: tensor.into(),
            expected: expected.into(),
            actual: actual.to_vec(),
        }
    }
    pub fn option(name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Option {
            name: name.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape {
                tensor,
                expected,
                actual,
            } => write!(
                f,
                "tensor `{tensor}`: expected shape {expected}, got {actual:?}"
            ),
            Error::DType {
                tensor,
                expected,
                actual,
            } => write!(
                f,
                "tensor `{tensor}`: expected dtype {expected}, got {actual}"
            ),
            Error::Missing { tensor, op } => {
                write!(
                    f,
                    "operator `{op}` needs tensor `{tensor}`, which is missing"
                )
            }
            Error::Option { name, message } => write!(f, "option `{name}`: {message}"),
            Error::UnknownOp(op) => write!(f, "unknown operator `{op}`"),
            Error::Cuda(m) => write!(f, "cuda: {m}"),
            Error::Io(m) => write!(f, "io: {m}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
