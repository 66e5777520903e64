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
# Bench binaries with a `cuda` part, when the project has them (benches/*cuda*.rs or gpu*.rs).
for b in benches/*.rs; do
  [ -e "$b" ] || continue
  name="$(basename "$b" .rs)"
  case "$name" in *cuda*|*gpu*) ;; *) continue ;; esac
  bj="$(cargo bench --features cuda --bench "$name" --no-run --message-format=json 2>/dev/null || true)"
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
# Debug info is not needed there and halves what travels.
command -v strip >/dev/null && strip "$OUT"/*
ls -l "$OUT"
echo "build-gpu-bins: carry gpu-bin/ and run scripts/gpu-check.sh on the GPU machine"
