#!/usr/bin/env bash
# Compiles every kernels/*.cu for sm_90 with `-Xptxas -v`, prints registers / stack / spills per
# kernel, and fails when a kernel spills registers or uses a stack frame (local memory), unless it
# is on the exception list below (kernel name pattern + reason).
# Usage: scripts/check-ptxas.sh [--from-build] [ARCH] (default sm_90). Needs nvcc
# (scripts/setup-cuda.sh), except with --from-build, which compiles nothing: it reads the report the cuda
# build's build.rs kept (ptxas -v of the very objects linked, every arch of the fatbin) from the
# newest `cargo build --features cuda` under $CARGO_TARGET_DIR (default target/), and fails when
# that report is older than a kernel source.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Exceptions: "pattern|reason" (pattern: a substring of the mangled kernel name). None needed now.
EXCEPTIONS=(
)

FROM_BUILD=0
if [ "${1:-}" = "--from-build" ]; then FROM_BUILD=1; shift; fi
ARCH="${1:-sm_90}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
LOG="$TMP/ptxas.log"
: >"$LOG"
if [ "$FROM_BUILD" = 1 ]; then
  TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
  BUILT="$(ls -t "$TARGET"/*/build/camex-*/out/ptxas.log 2>/dev/null | head -1 || true)"
  if [ -z "$BUILT" ]; then
    echo "check-ptxas: no ptxas.log of a cuda build under $TARGET (cargo build --features cuda first)" >&2
    exit 2
  fi
  if [ -n "$(find "$ROOT/kernels" -newer "$BUILT" -print -quit)" ]; then
    echo "check-ptxas: $BUILT is older than kernels/ (rebuild with --features cuda)" >&2
    exit 2
  fi
  # Only this arch's entries: each starts at its "Compiling entry function ... for 'sm_XX'" line.
  awk -v arch="'$ARCH'" '/Compiling entry function/ { keep = index($0, "for " arch) > 0 } keep' \
    "$BUILT" >"$LOG"
  echo "check-ptxas: $ARCH from the build's report $BUILT"
else
  CUDA_HOME="${CUDA_HOME:-$ROOT/.cuda/nvidia/cu13}"
  NVCC="${NVCC:-$CUDA_HOME/bin/nvcc}"
  if [ ! -x "$NVCC" ]; then
    NVCC="$(command -v nvcc || true)"
  fi
  if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
    echo "check-ptxas: nvcc not found; run scripts/setup-cuda.sh or set CUDA_HOME/NVCC" >&2
    exit 2
  fi

  for cu in "$ROOT"/kernels/*.cu; do
    "$NVCC" -std=c++17 -O3 -I"$ROOT/kernels" -gencode "arch=compute_${ARCH#sm_},code=$ARCH" \
      -Xptxas -v -c "$cu" -o "$TMP/$(basename "$cu").o" >>"$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }
  done
fi
mkdir -p "$ROOT/target"
cp "$LOG" "$ROOT/target/ptxas-$ARCH.log" 2>/dev/null || true

DEMANGLE=cat
command -v c++filt >/dev/null && DEMANGLE=c++filt

# One line per kernel: name regs stack spill_st spill_ld static_smem
awk '
  /Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); name = substr($0, RSTART + 1, RLENGTH - 2); next }
  /bytes stack frame/ { stack = $1; sst = $5; sld = $9; next }
  /Used [0-9]+ registers/ && name != "" {
    smem = 0
    for (i = 1; i <= NF; i++) {
      if ($i == "Used") regs = $(i + 1)
      if ($i ~ /^smem/ && i > 2 && $(i - 1) == "bytes") smem = $(i - 2)
    }
    print name, regs, stack, sst, sld, smem; name = ""
  }' "$LOG" >"$TMP/table"

# The kernels whose launchers opt in to the device's whole shared-memory limit for their dynamic
# buffer (CAMEX_SET_MAX_SMEM): static __shared__ bytes would push the sum over it (the runtime then
# refuses the opt-in, and the layouts, which count the dynamic buffer alone, would not fit), so they
# may have none. Matched in the mangled names with their length prefix (20kron_rows_bwd_kernel).
# The probes (kernels/probe.cu) opt in to 64 KiB only, to test the emulation's refusal without one.
OPTIN=()
while read -r k; do
  case "$k" in "" | kernel | *probe*) continue ;; esac
  OPTIN+=("${#k}$k")
done < <(grep -ho 'CAMEX_SET_MAX_SMEM(([a-z_0-9]*\|CAMEX_SET_MAX_SMEM([a-z_0-9]*' "$ROOT"/kernels/*.cu "$ROOT"/kernels/*.cuh \
  | sed 's/.*(//' | sort -u)
if [ "${#OPTIN[@]}" -eq 0 ]; then echo "check-ptxas: found no CAMEX_SET_MAX_SMEM kernels" >&2; exit 1; fi

fail=0
printf "%-6s %-6s %-6s %-6s  %s\n" regs stack spillS spillL kernel
while read -r name regs stack sst sld smem; do
  pretty="$(echo "$name" | $DEMANGLE | cut -c1-110)"
  printf "%-6s %-6s %-6s %-6s  %s\n" "$regs" "$stack" "$sst" "$sld" "$pretty"
  if [ "${smem%,}" != 0 ]; then
    for k in "${OPTIN[@]}"; do
      case "$name" in *"$k"*)
        echo "  FAIL: ${smem%,} bytes of static __shared__ in $pretty, whose launcher opts in to the whole limit for its dynamic buffer" >&2
        fail=1 ;;
      esac
    done
  fi
  if [ "$stack" != 0 ] || [ "$sst" != 0 ] || [ "$sld" != 0 ]; then
    allowed=""
    for ex in "${EXCEPTIONS[@]+"${EXCEPTIONS[@]}"}"; do
      pat="${ex%%|*}"
      case "$name" in *"$pat"*) allowed="${ex#*|}" ;; esac
    done
    if [ -n "$allowed" ]; then
      echo "  allowed: $allowed"
    else
      echo "  FAIL: stack frame or spills in $pretty" >&2
      fail=1
    fi
  fi
done <"$TMP/table"
n="$(wc -l <"$TMP/table")"
if [ "$n" -eq 0 ]; then echo "check-ptxas: no kernels parsed" >&2; exit 1; fi
if [ "$fail" -ne 0 ]; then echo "check-ptxas: FAILED ($n kernels)" >&2; exit 1; fi
echo "check-ptxas: OK, $n kernels for $ARCH, no spills, no stack frames, no static shared memory in the ${#OPTIN[@]} opting in to the whole limit"
