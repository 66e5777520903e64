#!/usr/bin/env bash
# Deterministic cost counts of the CUDA kernels, from their CPU emulation, and the H200 model's
# predicted time per op, pass and kernel (BENCHMARKS.md, "Cost model"). No GPU needed.
#
#   scripts/cost-model.sh [--shape t5-base|t5-small|gpt2|minilm] [--dtype bf16|f16|f32]
#                         [--ops ca_merge,curvature,merge,merged_linear] [--shrink K] [--exact]
#                         [--no-recompute] [--check FILE] [--write FILE]
#
# Prints one `model op=... pass=fwd|fwd+bwd impl=scalar|tc ...` line per op, pass and path, then one
# `kernel ...` line per kernel of each. --check FILE fails (exit 1) when a count grew by more than 5%
# over the baseline FILE; --write FILE writes one. Needs the pinned nvcc (scripts/setup-cuda.sh):
# its headers for the emulation build, ptxas for the registers and shared memory of each kernel.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CUDA_HOME="${CUDA_HOME:-$(bash scripts/setup-cuda.sh | tail -1)}"
export CUDA_HOME
PTXAS_LOG="$ROOT/target/ptxas-sm_90.log"
# ptxas' per-kernel registers and static shared memory (sm_90), rebuilt when a kernel changed.
if [ ! -s "$PTXAS_LOG" ] || [ -n "$(find kernels -newer "$PTXAS_LOG" -print -quit)" ]; then
  bash scripts/check-ptxas.sh sm_90 >/dev/null
fi
# The emulation build's own target dir (a real CUDA build and an emulated one rebuild each other's
# crate); CI points it at the real build's, whose release dependencies it then reuses, and sets
# CAMEX_EMU_FEATURES to that build's features (a different set would rebuild the dependencies whose
# features Cargo unifies differently).
EMU_TARGET="${CAMEX_EMU_TARGET_DIR:-$ROOT/target-emu}"
CARGO_TARGET_DIR="$EMU_TARGET" CAMEX_KERNEL_EMU=1 cargo build --quiet --release \
  --features "${CAMEX_EMU_FEATURES:-cuda}" --example cost_model
CAMEX_KERNEL_EMU=1 "$EMU_TARGET/release/examples/cost_model" --ptxas "$PTXAS_LOG" "$@"
