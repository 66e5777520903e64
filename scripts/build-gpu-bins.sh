#!/usr/bin/env bash
# Builds the GPU binaries here, where there is nvcc but maybe no GPU, into ./gpu-bin/, to be carried
# to a GPU machine that has a driver but no Rust, where scripts/gpu-check.sh runs them:
#   gpu-tests.xz (tests/gpu.rs, feature `cuda`) and camex.xz (the CLI): the CUDA runtime is linked
#     statically, they need only libcuda (the driver) there;
#   bench-cuda.xz, candle-cuda-tests.xz (tests/candle_cuda.rs) and train.xz (the training example):
#     built with candle's CUDA backend (`candle,cuda,peer`), linked here against the stand-ins of
#     scripts/cuda-link-stubs.sh, they load the real CUDA 13 libraries (driver, cuBLAS, cuRAND,
#     NVRTC) there; xz-compressed (~55 MB each unpacked). CAMEX_GPU_BINS_CANDLE=0 builds bench-cuda
#     with `cuda` only and leaves the other two out;
#   burn-cuda-tests.xz (tests/burn_cuda.rs): burn's CubeCL CUDA backend, linked here against the
#     LLVM stand-in of scripts/llvm-standin.sh (CubeCL's LLVM bundle cannot be downloaded here) and
#     built with `cubecl-nvrtc`, so CubeCL compiles its own kernels with NVRTC 13 there.
#     CAMEX_GPU_BINS_BURN=0 leaves it out.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-cuda}"
if [ -z "${CUDA_HOME:-}" ] && [ -x "$ROOT/.cuda/nvidia/cu13/bin/nvcc" ]; then
  export CUDA_HOME="$ROOT/.cuda/nvidia/cu13"
fi
OUT="$ROOT/gpu-bin"
rm -rf "$OUT"
mkdir -p "$OUT"

# artifact NAME: the executable cargo reports (JSON messages on stdin) for target NAME.
artifact() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == sys.argv[1] and m.get("executable"):
        print(m["executable"])
' "$1"
}

# build DEST test|bench NAME CARGO-ARGS...: `cargo test --test NAME` (or bench) without running it;
# copies the executable to gpu-bin/DEST.
build() {
  local dest=$1 kind=$2 name=$3
  shift 3
  local exe
  exe="$(cargo "$kind" --"$kind" "$name" "$@" --no-run --message-format=json 2>/dev/null | artifact "$name")"
  if [ -z "$exe" ] || [ ! -x "$exe" ]; then
    echo "build-gpu-bins: $dest did not build (cargo $kind --$kind $name $* --no-run)" >&2
    exit 1
  fi
  cp "$exe" "$OUT/$dest"
}

CANDLE="${CAMEX_GPU_BINS_CANDLE:-1}"
FEATURES=cuda,cli
if [ "$CANDLE" = 1 ]; then
  bash "$ROOT/scripts/cuda-link-stubs.sh" "$CUDA_HOME" >/dev/null
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  # One feature set for all three, so that candle's kernels (~10 minutes of nvcc) build once.
  FEATURES=candle,cuda,peer,cli
fi

build gpu-tests test gpu --release --features cuda,cli
build bench-cuda bench cuda --features "$FEATURES"
# The CLI, for the check's `camex run --device cuda` round trip.
cargo build --release --features cuda,cli --bin camex
cp "$CARGO_TARGET_DIR/release/camex" "$OUT/camex"
if [ "$CANDLE" = 1 ]; then
  build candle-cuda-tests test candle_cuda --release --features "$FEATURES"
  cargo build --release --features "$FEATURES" --example train
  cp "$CARGO_TARGET_DIR/release/examples/train" "$OUT/train"
fi
if [ "${CAMEX_GPU_BINS_BURN:-1}" = 1 ]; then
  XDG_DATA_HOME="$(bash "$ROOT/scripts/llvm-standin.sh")" build burn-cuda-tests test burn_cuda \
    --release --features burn,cubecl-nvrtc,cuda,cli
fi
# Debug info is not needed there and halves what travels.
command -v strip >/dev/null && strip "$OUT"/*
# Every binary xz-compressed (candle's ~55 MB each unpacked, burn's ~60 MB; ~8-9 MB each with xz), so
# all of gpu-bin/ fits one carry (64 MiB); scripts/gpu-check.sh unpacks them there.
for f in "$OUT"/*; do
  xz -T0 -6 -f "$f"
done
ls -l "$OUT"
echo "build-gpu-bins: carry gpu-bin/ and run scripts/gpu-check.sh on the GPU machine"
