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
