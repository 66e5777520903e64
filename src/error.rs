//! One error type for every operator, CPU and CUDA.
//!
//! Messages name the tensor and give both the expected and the actual shape or dtype, so that a
//! caller (or the `camex` CLI) can print them as they are. [`Error::Io`] and [`Error::Cuda`] also
//! carry the underlying error (the `std::io::Error`, the `safetensors` error, cudarc's
//! `DriverError`) as their [`source`](std::error::Error::source), for callers that walk the chain;
//! their messages already include its text, so printing the top error alone loses nothing.

/// The underlying error of an [`Error::Io`] or an [`Error::Cuda`]: thread-safe, so that it can be
/// wrapped by candle's and burn's error types.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in `camex`. No operator panics on bad input: it returns one of these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor's shape differs from what the other inputs imply.
    #[error("tensor `{tensor}`: expected shape {expected}, got {actual:?}")]
    Shape {
        tensor: String,
        expected: String,
        actual: Vec<usize>,
    },
    /// A tensor has the wrong element type.
    #[error("tensor `{tensor}`: expected dtype {expected}, got {actual}")]
    DType {
        tensor: String,
        expected: String,
        actual: String,
    },
    /// A tensor's values are outside what the operator accepts (a mask that is not 0/1).
    #[error("tensor `{tensor}`: {message}")]
    Value { tensor: String, message: String },
    /// A required tensor is absent: `tensor` is its name, `op` the operator's, `note` why it is
    /// needed when that is not obvious (empty otherwise).
    #[error(
        "operator `{op}` needs tensor `{tensor}`, which is missing{}",
        parenthesised(note)
    )]
    Missing {
        tensor: String,
        op: String,
        note: String,
    },
    /// An option or scalar is out of range (alpha NaN, p outside [0, 1), k outside (0, 1], ...).
    #[error("option `{name}`: {message}")]
    Option { name: String, message: String },
    /// A tensor the operator does not read (a misspelt name would otherwise be silently ignored).
    #[error(
        "tensor `{tensor}`: operator `{op}` does not read a tensor of this name (it reads: {}){}",
        reads.join(", "),
        did_you_mean(tensor, reads)
    )]
    Unexpected {
        tensor: String,
        op: String,
        /// The names the operator reads.
        reads: Vec<String>,
    },
    /// An output or workspace that does not fit: its size overflows, or it is over the memory
    /// limit ([`crate::memory`]). Nothing was allocated.
    #[error("{}", memory_message(tensor, shape, *bytes, *total, limit))]
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
    #[error("unknown operator `{0}`")]
    UnknownOp(String),
    /// A CUDA driver, runtime or launch error, or no CUDA driver on this machine.
    #[error("cuda: {message}")]
    Cuda {
        message: String,
        /// The driver's error (cudarc's `DriverError`), where the failure came from a driver call.
        #[source]
        source: Option<Source>,
    },
    /// Reading or writing a safetensors file.
    #[error("io: {message}")]
    Io {
        message: String,
        /// The `std::io::Error` or `safetensors` error behind it, where there is one.
        #[source]
        source: Option<Source>,
    },
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
    /// An [`Error::Io`] with no underlying error (a refusal of camex's own).
    pub fn io(message: impl Into<String>) -> Self {
        Error::Io {
            message: message.into(),
            source: None,
        }
    }
    /// An [`Error::Io`] caused by `source`.
    pub fn io_source(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Io {
            message: message.into(),
            source: Some(source.into()),
        }
    }
    /// An [`Error::Cuda`] with no underlying driver error (a launcher's code, no driver at all).
    pub fn cuda(message: impl Into<String>) -> Self {
        Error::Cuda {
            message: message.into(),
            source: None,
        }
    }
    /// An [`Error::Cuda`] caused by `source` (a driver error).
    pub fn cuda_source(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Cuda {
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

fn parenthesised(note: &str) -> String {
    if note.is_empty() {
        String::new()
    } else {
        format!(" ({note})")
    }
}

fn did_you_mean(tensor: &str, reads: &[String]) -> String {
    match reads.iter().find(|r| r.eq_ignore_ascii_case(tensor)) {
        Some(r) => format!("; did you mean `{r}`?"),
        None => String::new(),
    }
}

fn memory_message(
    tensor: &str,
    shape: &[usize],
    bytes: Option<u64>,
    total: Option<u64>,
    limit: &str,
) -> String {
    use crate::memory::human;
    let need = match bytes {
        Some(b) => format!("{b} bytes ({})", human(b as u128)),
        None => "more than 2^64 bytes".to_string(),
    };
    let with_others = match total.filter(|t| Some(*t) != bytes) {
        Some(t) => format!(
            ", {t} bytes ({}) with the call's other buffers",
            human(t as u128)
        ),
        None => String::new(),
    };
    format!("tensor `{tensor}` of shape {shape:?} needs {need}{with_others}: {limit}")
}

pub type Result<T> = std::result::Result<T, Error>;
