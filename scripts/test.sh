#!/usr/bin/env bash
# The README's test command: every test that runs without a GPU, with the candle and burn adapters.
# GPU and emulation tests (tests/gpu.rs, tests/emu.rs, feature `cuda`) are not built here; see README "CUDA" for them.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --all-targets --features candle,burn,cli
cargo test --doc --features candle,burn,cli
