#!/usr/bin/env bash
# Builds the GPU test binary (tests/gpu.rs, feature `cuda`) here, where there is nvcc but maybe no
# GPU, and copies it into ./gpu-bin/ so it can be carried to a GPU machine that has a driver but no
# Rust, where scripts/gpu-check.sh runs it. CUDA runtime is linked statically; the binary only
# needs libcuda (the driver) at run time.
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
# The test binary path is the executable cargo reports for target `gpu`.
json="$(cargo test --release --features cuda --test gpu --no-run --message-format=json 2>/dev/null)"
bin="$(printf '%s\n' "$json" | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "gpu" and m.get("executable"):
        print(m["executable"])
')"
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  echo "build-gpu-bins: could not find the gpu test binary (run: cargo test --release --features cuda --test gpu --no-run)" >&2
  exit 1
fi
cp "$bin" "$OUT/gpu-tests"
# candle's CUDA backend (for the candle tests, the training example and the benchmark's candle peer
# on the GPU): linked here against scripts/cuda-link-stubs.sh's stand-ins, those binaries load the real
# CUDA 13 libraries (driver, cuBLAS, cuRAND, NVRTC) there. CAMEX_GPU_BINS_CANDLE=0 leaves them out.
CANDLE="${CAMEX_GPU_BINS_CANDLE:-1}"
BENCH_FEATURES=cuda
if [ "$CANDLE" = 1 ]; then
  bash "$ROOT/scripts/cuda-link-stubs.sh" "$CUDA_HOME" >/dev/null
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  BENCH_FEATURES=cuda,peer
fi
# Bench binaries with a `cuda` part, when the project has them (benches/*cuda*.rs or gpu*.rs).
for b in benches/*.rs; do
  [ -e "$b" ] || continue
  name="$(basename "$b" .rs)"
  case "$name" in *cuda*|*gpu*) ;; *) continue ;; esac
  bj="$(cargo bench --features "$BENCH_FEATURES" --bench "$name" --no-run --message-format=json 2>/dev/null || true)"
  bb="$(printf '%s\n' "$bj" | python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == name and m.get("executable"):
        print(m["executable"])
' "$name")"
  [ -n "$bb" ] && cp "$bb" "$OUT/bench-$name"
done
# The CLI, for the check's `camex run --device cuda` round trip.
cargo build --release --features cuda --bin camex
cp "$CARGO_TARGET_DIR/release/camex" "$OUT/camex"
# The candle adapter on CUDA (tests/candle_cuda.rs) and the training example.
if [ "$CANDLE" = 1 ]; then
  cj="$(cargo test --release --features candle,cuda --test candle_cuda --no-run --message-format=json 2>/dev/null)"
  cb="$(printf '%s\n' "$cj" | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "candle_cuda" and m.get("executable"):
        print(m["executable"])
')"
  if [ -z "$cb" ]; then
    echo "build-gpu-bins: the candle CUDA test did not build (cargo test --release --features candle,cuda --test candle_cuda --no-run)" >&2
    exit 1
  fi
  cp "$cb" "$OUT/candle-cuda-tests"
  cargo build --release --features candle,cuda --example train
  cp "$CARGO_TARGET_DIR/release/examples/train" "$OUT/train"
fi
# Debug info is not needed there and halves what travels.
command -v strip >/dev/null && strip "$OUT"/*
# candle's kernels make the binaries with its CUDA backend ~55 MB each; xz brings them to ~8 MB, so
# all of gpu-bin/ fits one carry (64 MiB). gpu-check.sh unpacks them.
if [ "$CANDLE" = 1 ]; then
  for f in candle-cuda-tests train bench-cuda; do
    [ -f "$OUT/$f" ] && xz -T0 -6 -f "$OUT/$f"
  done
fi
ls -l "$OUT"
echo "build-gpu-bins: carry gpu-bin/ and run scripts/gpu-check.sh on the GPU machine"
