//! Every operator by name over named tensors (SPEC section 7). Filled in by the CLI work.
