#!/usr/bin/env bash
# A stand-in for nvcc in builds that only type-check (cargo clippy / cargo check), never link or
# run: candle-kernels' build script compiles candle's own CUDA kernels (about ten minutes of nvcc
# on two cores, .ci/run measured) into PTX and a static library that a type-check never reads.
# This writes each file such a call would produce, empty (an archive with no members for
# --lib), and passes queries (--version, --list-gpu-code, ...) to the real nvcc ($CUDA_HOME/bin).
# Used as NVCC=scripts/nvcc-typecheck.sh together with DOCS_RS=1 (camex's build.rs then compiles
# nothing and generates its bindings only); scripts/build-gpu-bins.sh builds candle for real.
set -euo pipefail
args=("$@")
out=""
outdir=""
lib=0
srcs=()
while [ $# -gt 0 ]; do
  case "$1" in
    -o | --output-file) out="$2"; shift 2 ;;
    -odir | --output-directory) outdir="$2"; shift 2 ;;
    -lib | --lib) lib=1; shift ;;
    --version | -V | --list-gpu-code | --list-gpu-arch | -h | --help)
      exec "${CUDA_HOME:?nvcc-typecheck: CUDA_HOME must name the real toolkit}/bin/nvcc" "${args[@]}" ;;
    *.cu) srcs+=("$1"); shift ;;
    *) shift ;;
  esac
done
if [ -n "$out" ]; then
  if [ "$lib" = 1 ]; then printf '!<arch>\n' >"$out"; else : >"$out"; fi
else
  for s in "${srcs[@]}"; do
    b="$(basename "$s" .cu)"
    : >"${outdir:-.}/$b.ptx"
  done
fi
