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
    /// A tensor's values are outside what the operator accepts (a mask that is not 0/1).
    Value { tensor: String, message: String },
    /// A required tensor is absent: `tensor` is its name, `op` the operator's, `note` why it is
    /// needed when that is not obvious (empty otherwise).
    Missing {
        tensor: String,
        op: String,
        note: String,
    },
    /// An option or scalar is out of range (alpha NaN, p outside [0, 1), k outside (0, 1], ...).
    Option { name: String, message: String },
    /// A tensor the operator does not read (a misspelt name would otherwise be silently ignored).
    Unexpected {
        tensor: String,
        op: String,
        /// The names the operator reads.
        reads: Vec<String>,
    },
    /// An output or workspace that does not fit: its size overflows, or it is over the memory
    /// limit ([`crate::memory`]). Nothing was allocated.
    Memory {
        /// The output (or workspace) named, the largest of the call's buffers.
        tensor: String,
        shape: Vec<usize>,
        /// Bytes of that buffer; `None` when the size does not fit in 64 bits.
        bytes: Option<u64>,
        /// Bytes of every buffer of the call together, when known.
        total: Option<u64>,
        /// Which limit it is over, in words.
        limit: String,
    },
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
            Error::Value { tensor, message } => write!(f, "tensor `{tensor}`: {message}"),
            Error::Missing { tensor, op, note } => {
                write!(
                    f,
                    "operator `{op}` needs tensor `{tensor}`, which is missing"
                )?;
                if !note.is_empty() {
                    write!(f, " ({note})")?;
                }
                Ok(())
            }
            Error::Option { name, message } => write!(f, "option `{name}`: {message}"),
            Error::Unexpected { tensor, op, reads } => {
                write!(
                    f,
                    "tensor `{tensor}`: operator `{op}` does not read a tensor of this name (it reads: {})",
                    reads.join(", ")
                )?;
                if let Some(r) = reads.iter().find(|r| r.eq_ignore_ascii_case(tensor)) {
                    write!(f, "; did you mean `{r}`?")?;
                }
                Ok(())
            }
            Error::Memory {
                tensor,
                shape,
                bytes,
                total,
                limit,
            } => {
                write!(f, "tensor `{tensor}` of shape {shape:?} needs ")?;
                match bytes {
                    Some(b) => write!(f, "{b} bytes ({})", crate::memory::human(*b as u128))?,
                    None => write!(f, "more than 2^64 bytes")?,
                }
                if let Some(t) = total.filter(|t| Some(*t) != *bytes) {
                    write!(
                        f,
                        ", {t} bytes ({}) with the call's other buffers",
                        crate::memory::human(t as u128)
                    )?;
                }
                write!(f, ": {limit}")
            }
            Error::UnknownOp(op) => write!(f, "unknown operator `{op}`"),
            Error::Cuda(m) => write!(f, "cuda: {m}"),
            Error::Io(m) => write!(f, "io: {m}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
