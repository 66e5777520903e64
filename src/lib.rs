//! # camex: curvature-aware merging of experts, fused
//!
//! Operators of CAMEx (Nguyen et al., ICLR 2025) as specified in `SPEC.md` (shared with the project):
//! the curvature transform of the domain vectors `tau_i = experts[i] - base`, the TIES masks, DARE
//! dropout, the weighted merge over experts for every group, the merged linear layer, the
//! dynamic merge and causal segment scores, each forward and backward.
//!
//! - [`cpu`]: the exact reference path, parallel (rayon) on a real GEMM micro-kernel (`gemm`).
//! - `cuda` (feature `cuda`): the fused CUDA kernels over cudarc streams.
//! - `named` (feature `cli`): every operator by name over safetensors-style named tensors (the
//!   `camex` CLI).
//!
//! Layout everywhere: dense, row-major, contiguous; shapes as SPEC section 2.
//!
//! # Example
//!
//! The README's example (`tests/readme.rs` keeps the two the same):
//!
//! ```rust
//! use camex::cpu::{self, CaMergeInputs, Curvature, Factors};
//! use camex::{MergeOptions, Split, HostTensor};
//!
//! let (n, o, i, g, r) = (3, 6, 10, 4, 2);
//! let base = HostTensor::<f32>::zeros(&[o, i]);
//! let experts = HostTensor::<f32>::full(&[n, o, i], 0.5);
//! let scores = HostTensor::<f32>::full(&[g, n], 1.0 / n as f32);
//! let [a, b, c, d] = cpu::identity_factors::<f32>(r, n, Split::default_for(o, i), true);
//! let inputs = CaMergeInputs {
//!     base: &base,
//!     experts: &experts,
//!     scores: &scores,
//!     curvature: Curvature::Kronecker(Factors { a: &a, b: &b, c: &c, d: &d }),
//!     base_bias: None,
//!     expert_bias: None,
//! };
//! let out = cpu::ca_merge(&inputs, &MergeOptions::default())?;
//! assert_eq!(out.merged.shape(), &[g, o, i]);
//! // Gradients of every input from the gradient of `merged`:
//! let grads = cpu::ca_merge_backward(&inputs, &MergeOptions::default(), &out.merged, None, None)?;
//! assert!(grads.factors.is_some());
//! # Ok::<(), camex::Error>(())
//! ```

// docs.rs (nightly rustdoc) marks the feature-gated items with the feature they need.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
pub mod cpu;
pub mod error;
pub mod memory;
pub mod options;
pub mod philox;
pub mod shape;
pub mod tensor;

#[cfg(feature = "burn")]
#[cfg_attr(docsrs, doc(cfg(feature = "burn")))]
pub mod burn;
#[cfg(feature = "candle")]
#[cfg_attr(docsrs, doc(cfg(feature = "candle")))]
pub mod candle;
#[cfg(feature = "cuda")]
#[cfg_attr(docsrs, doc(cfg(feature = "cuda")))]
pub mod cuda;
#[cfg(feature = "cuda")]
#[cfg_attr(docsrs, doc(cfg(feature = "cuda")))]
pub mod ffi;
#[cfg(feature = "cli")]
#[cfg_attr(docsrs, doc(cfg(feature = "cli")))]
pub mod named;

pub use error::{Error, Result};
pub use memory::MemoryLimit;
pub use options::{Dare, Device, Mask, MergeOptions};
pub use shape::Split;
pub use tensor::{AnyTensor, DType, Float, HostTensor};
