#!/usr/bin/env bash
# The test command of the README: everything that runs without a GPU (GPU tests skip and say why).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --all-targets
cargo test --doc
