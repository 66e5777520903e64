#!/usr/bin/env bash
# The one prepared check for a GPU machine with a driver and no Rust. It runs what
# scripts/build-gpu-bins.sh built here into ./gpu-bin/, in the order of what the GPU-session issue
# needs most (a step that would start past the deadline is skipped):
#   1. gpu-bin/gpu-tests (tests/gpu.rs) with CAMEX_REQUIRE_GPU=1, one test at a time; then its
#      tensor-core test under compute-sanitizer (memcheck, racecheck, synccheck; small shapes);
#   2. a CLI round trip: gpu-bin/camex run ca_merge on the CPU and on CUDA over one random input
#      file (made with python3 + numpy + safetensors when those are there), compared element-wise;
#   3. Nsight Compute's per-kernel times, DRAM bytes and L2 hit rates of one CA-merge forward and
#      backward at T5-base in bf16 on the tensor cores, when ncu is there (the cost model's
#      calibration, and whether Z's round trips stay in L2); then scripts/l2_reuse.py, how much of
#      a buffer one launch writes the next reads from L2, by size, when torch is there;
#   4. gpu-bin/bench-cuda (benches/cuda.rs: criterion with CUDA events, one roofline line per case;
#      the bf16 Kronecker cases on the scalar default and on the opt-in tensor cores, impl=camex-tc;
#      with the candle peer on the GPU next to each, impl=candle-unfused, when built with `peer`);
#   5. scripts/torch_baseline.py, the PyTorch peer (eager and torch.compile), when torch is there;
#   6. gpu-bin/candle-cuda-tests (tests/candle_cuda.rs) and a short `train --device cuda`;
#   7. gpu-bin/burn-cuda-tests (tests/burn_cuda.rs);
#   8. the tensor-core test again with the shared memory capped at sm_80's (CAMEX_TC_SMEM_LIMIT);
# and prints a short table last: per-test time, op/dtype/shape/max relative error, the roofline
# lines of the crate and of the peer.
#
# Everything runs under one deadline (CAMEX_CHECK_BUDGET seconds, default 420) so the whole check
# fits one call of a lent machine; a step that would start past it is skipped and says so. Full
# logs go to $OUT (the device tool's return folder) when it is set, else to ./gpu-check-logs/.
# Usage: scripts/gpu-check.sh [TEST_BINARY]. Env: CAMEX_SKIP_T5=1 skips the T5-base test shapes;
# CAMEX_CHECK_TORCH=0 skips the PyTorch peer and the L2 probe (CAMEX_CHECK_TORCH_COMPILE=0: eager
# only);
# CAMEX_CHECK_BENCH=0 skips the crate's benchmarks; CAMEX_CHECK_PROFILE=0 skips the ncu kernel times;
# CAMEX_CHECK_SANITIZER=0 skips compute-sanitizer.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$(date +%s)
BUDGET="${CAMEX_CHECK_BUDGET:-420}"
LOGS="${OUT:-$ROOT/gpu-check-logs}"
mkdir -p "$LOGS"
BIN="${1:-$ROOT/gpu-bin/gpu-tests}"
BINDIR="$(dirname "$BIN")"
# Every binary may travel xz-compressed (all of gpu-bin/ must fit one 64 MiB carry): unpacked here
# into CBIN. Those with candle's CUDA backend (~55 MB each unpacked) and burn's load the CUDA 13
# libraries (cuBLAS, cuRAND, NVRTC) from the toolkit or the pip wheels next to PyTorch.
CBIN="$(mktemp -d)"
for f in "$BINDIR"/*.xz; do
  [ -f "$f" ] || continue
  u="$CBIN/$(basename "$f" .xz)"
  xz -dc "$f" >"$u" 2>/dev/null ||
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$u"
  chmod +x "$u"
done
# unpacked PATH: PATH where it is an executable, else its unpacked copy in CBIN.
unpacked() { if [ -x "$1" ]; then echo "$1"; else echo "$CBIN/$(basename "$1")"; fi; }
BIN="$(unpacked "$BIN")"
CAMEX="$(unpacked "$BINDIR/camex")"
if [ ! -x "$BIN" ]; then
  echo "gpu-check: no test binary at $BIN (build it with scripts/build-gpu-bins.sh and carry gpu-bin/)" >&2
  exit 2
fi

left() { echo $((BUDGET - ($(date +%s) - START))); }
# Runs "$@" under a timeout of min($1, time left); returns 124 on timeout, 125 when no time is left.
within() {
  local want=$1
  shift
  local l
  l=$(left)
  [ "$l" -le 5 ] && return 125
  [ "$want" -gt "$l" ] && want=$l
  timeout --kill-after=5 "$want" "$@"
}

SMI="$(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader)"
echo "gpu: $SMI"
export CAMEX_REQUIRE_GPU=1
status=0

LIBS="$(python3 - 2>/dev/null <<'EOF'
import glob, os
dirs = []
roots = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
try:
    import nvidia
    roots += list(nvidia.__path__)
except ImportError:
    pass
for lib in ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13", "libcudart.so.13"]:
    for r in roots:
        hits = glob.glob(os.path.join(r, lib)) + glob.glob(os.path.join(r, "**", lib), recursive=True)
        if hits:
            d = os.path.dirname(hits[0])
            if d not in dirs:
                dirs.append(d)
            break
print(":".join(dirs))
EOF
)"
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# 1. Tests, one at a time so each gets its own time and a hang costs one timeout, not the call.
TLOG="$LOGS/tests.log"
: >"$TLOG"
TIMES=""
tests="$("$BIN" --list 2>/dev/null | sed -n 's/: test$//p' | grep -v '^emu::')"
for t in $tests; do
  s=$(date +%s.%N)
  echo "=== $t" >>"$TLOG"
  within 150 "$BIN" --exact "$t" --nocapture --test-threads=1 >>"$TLOG" 2>&1
  rc=$?
  case $rc in 0) r=ok ;; 124 | 137) r=TIMEOUT; status=1 ;; 125) r=SKIPPED-no-time; status=1 ;; *) r=FAILED; status=1 ;; esac
  e=$(date +%s.%N)
  TIMES+="$(printf "%-42s %8.2f %s" "$t" "$(awk "BEGIN { print $e - $s }")" "$r")"$'\n'
done
echo "== test failures (first lines; full log: $TLOG)"
grep -E "panicked|FAILED|error|mismatch" "$TLOG" | head -30

# 1a. compute-sanitizer's memcheck, racecheck and synccheck on the tensor-core test at small shapes
#     (CAMEX_SKIP_T5=1; every kernel it launches is checked, the scalar ones it compares with too).
#     Some runtimes refuse the tool (the device tool's KINDS.md: "Device not supported" on gVisor):
#     the stage says so, and the check goes on. CAMEX_CHECK_SANITIZER=0 skips it.
SLOG="$LOGS/sanitizer.log"
: >"$SLOG"
SAN="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1 || true)"
SANITIZER="sanitizer: not run (no compute-sanitizer here)"
if [ "${CAMEX_CHECK_SANITIZER:-1}" != 1 ]; then
  SANITIZER="sanitizer: skipped (CAMEX_CHECK_SANITIZER=0)"
elif [ -n "$SAN" ]; then
  SANITIZER="sanitizer (tensor_core_path_matches_cpu, small shapes):"
  for tool in memcheck racecheck synccheck; do
    echo "=== $tool" >>"$SLOG"
    CAMEX_SKIP_T5=1 within 60 "$SAN" --tool "$tool" --error-exitcode 86 --print-limit 20 \
      "$BIN" --exact tensor_core_path_matches_cpu --nocapture --test-threads=1 >>"$SLOG" 2>&1
    rc=$?
    case $rc in
      0) r="clean" ;;
      86) r="ERRORS"; status=1 ;;
      124 | 137) r="timed out (no error reported before)" ;;
      125) r="not run (no time left)" ;;
      *) if grep -q "Device not supported" "$SLOG"; then r="refused by this runtime (Device not supported)"
         else r="test failed under it (rc=$rc)"; status=1; fi ;;
    esac
    echo "=== $tool: $r" >>"$SLOG"
    SANITIZER+=" $tool $r;"
  done
fi

# 2. CLI round trip: same file, CPU and CUDA, compared here.
CLOG="$LOGS/cli.log"
if [ -x "$CAMEX" ] && python3 -c "import numpy, safetensors" 2>/dev/null; then
  D="$(mktemp -d)"
  python3 - "$D" >"$CLOG" 2>&1 <<'EOF'
import sys, numpy as np
from safetensors.numpy import save_file
d = sys.argv[1]; rng = np.random.default_rng(7)
n, o, i, r, g = 7, 130, 200, 8, 5  # no dimension a multiple of a tile
def pair(x):
    a = int(x ** 0.5)
    while x % a: a -= 1
    return a, x // a
(o1, o2), (i1, i2) = pair(o), pair(i)
eye = lambda k: (np.eye(k)[None, None] + 0.05 * rng.standard_normal((r, n, k, k))).astype(np.float32)
base = rng.standard_normal((o, i)).astype(np.float32)
save_file({"base": base, "experts": (base + 0.1 * rng.standard_normal((n, o, i))).astype(np.float32),
           "scores": rng.random((g, n)).astype(np.float32), "factor_a": eye(o1), "factor_b": eye(o2),
           "factor_c": eye(i1), "factor_d": eye(i2)}, f"{d}/in.safetensors")
EOF
  ok=1
  for dev in cpu cuda; do
    within 60 "$CAMEX" run ca_merge --inputs "$D/in.safetensors" --outputs "$D/$dev.safetensors" \
      --device $dev --mask ties_trim:0.3 --dare element:0.2:99 --beta 0.5 >>"$CLOG" 2>&1 || ok=0
  done
  if [ $ok = 1 ]; then
    CLI="$(python3 - "$D" 2>&1 <<'EOF'
import sys, numpy as np
from safetensors.numpy import load_file
d = sys.argv[1]; a = load_file(f"{d}/cpu.safetensors"); b = load_file(f"{d}/cuda.safetensors")
out = []
for k in sorted(a):
    x, y = a[k].astype(np.float64), b[k].astype(np.float64)
    e = np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-300)
    out.append(f"{k}={e:.2e}" + ("" if np.isfinite(y).all() else "(NaN!)"))
print("cli ca_merge f32 [7,130,200] cpu vs cuda rel err: " + " ".join(out))
EOF
)"
  else
    CLI="cli ca_merge: FAILED (see $CLOG)"
    status=1
  fi
  echo "$CLI" >>"$CLOG"
  rm -rf "$D"
else
  CLI="cli: skipped (no gpu-bin/camex, or python3 lacks numpy/safetensors)"
fi

# 3. Per-kernel times of one CA-merge forward, then one backward, at T5-base `wi` in bf16 on the
#    tensor-core path (Nsight Compute, clocks as found), in the configuration the cost model counts
#    (no mask, no DARE: scripts/cost-model.sh --shape t5-base --dtype bf16 --ops ca_merge; the CLI's
#    backward recomputes U, so its kernels compare with the model's impl=tc-recompute lines).
KLOG="$LOGS/kernels.log"
: >"$KLOG"
NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
if [ "${CAMEX_CHECK_PROFILE:-1}" = 1 ] && [ -n "$NCU" ] && [ -x "$CAMEX" ] && [ "$(left)" -gt 60 ] &&
  python3 -c "import torch, safetensors" 2>/dev/null; then
  D="$(mktemp -d)"
  python3 - "$D" >>"$KLOG" 2>&1 <<'PY'
import sys, torch
from safetensors.torch import save_file
d = sys.argv[1]; g = torch.Generator().manual_seed(3)
n, o, i, r, grp = 7, 3072, 768, 8, 16
def eye(k): return (torch.eye(k).expand(r, n, k, k) / 2 + 0.01 * torch.randn(r, n, k, k, generator=g)).bfloat16()
base = (0.05 * torch.randn(o, i, generator=g))
t = {"base": base.bfloat16(), "experts": (base + 0.01 * torch.randn(n, o, i, generator=g)).bfloat16(),
     "scores": torch.softmax(torch.randn(grp, n, generator=g), -1).bfloat16(),
     "factor_a": eye(48), "factor_b": eye(64), "factor_c": eye(24), "factor_d": eye(32)}
save_file(t, f"{d}/in.safetensors")
t["grad_merged"] = (0.01 * torch.randn(grp, o, i, generator=g)).bfloat16()  # the backward reads it too
save_file(t, f"{d}/bwd.safetensors")
PY
  # The forward also measures how much of the stage-1 intermediate Z the L2 serves to stage 2 (the
  # 24 MB rounds are sized for that; the cost model counts every launch's bytes as DRAM traffic,
  # BENCHMARKS.md "seventh round"): DRAM bytes and L2 hit rate per kernel, caches not flushed
  # between kernels (--cache-control none), as a real run sees them. Application replay: where the
  # metrics take several passes, each pass reruns the program, so that no kernel's later pass sees
  # the L2 its own earlier pass left (kernel replay would).
  CAMEX_TENSOR_CORES=1 within 120 "$NCU" --clock-control none --cache-control none --replay-mode application \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct \
    --print-summary per-kernel "$CAMEX" run ca_merge --inputs "$D/in.safetensors" --outputs "$D/out.safetensors" --device cuda \
    >>"$KLOG" 2>&1 || echo "ncu: rc=$?" >>"$KLOG"
  # The same for the backward (the fused tensor-core reverse of kernels/kron_tc_bwd.cuh), with the
  # same metrics: the model counts each launch's distinct sectors as DRAM traffic, which credits the
  # fused rows-side launch (kron_rows_bwd_split_kernel) with the tau and Z sectors both its halves
  # touch (BENCHMARKS.md "eighth round"); DRAM bytes per kernel show how much of that is real.
  if [ "$(left)" -gt 60 ]; then
    echo "== ca_merge_backward" >>"$KLOG"
    CAMEX_TENSOR_CORES=1 within 100 "$NCU" --clock-control none --cache-control none --replay-mode application \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct \
      --print-summary per-kernel \
      "$CAMEX" run ca_merge_backward --inputs "$D/bwd.safetensors" --outputs "$D/grads.safetensors" --device cuda \
      >>"$KLOG" 2>&1 || echo "ncu backward: rc=$?" >>"$KLOG"
  fi
  rm -rf "$D"
fi

# Steps 3b and 5 run PyTorch: whether they may, decided once (importing torch takes seconds).
USE_TORCH=0
[ "${CAMEX_CHECK_TORCH:-1}" = 1 ] && python3 -c "import torch" 2>/dev/null && USE_TORCH=1

# 3b. Whether the next launch finds in L2 what the last one wrote, by size (scripts/l2_reuse.py,
#     PyTorch kernels, a few seconds): the rule the cost model lacks for Z's round trips.
LLOG="$LOGS/l2-reuse.log"
: >"$LLOG"
if [ "$USE_TORCH" = 1 ]; then
  PYTHONUNBUFFERED=1 within 60 python3 "$ROOT/scripts/l2_reuse.py" >>"$LLOG" 2>&1 || echo "l2_reuse: rc=$?" >>"$LLOG"
fi

# 4. The crate's GPU benchmarks.
BLOG="$LOGS/bench.log"
: >"$BLOG"
if [ "${CAMEX_CHECK_BENCH:-1}" = 1 ]; then
  for b in "$BINDIR"/bench-* "$CBIN"/bench-*; do
    case "$b" in *.xz) continue ;; esac
    [ -x "$b" ] && [ -f "$b" ] || continue
    within 200 "$b" --bench >>"$BLOG" 2>&1 || { echo "bench $(basename "$b"): rc=$?" >>"$BLOG"; status=1; }
  done
fi

# 5. The PyTorch peer at the same shape.
PLOG="$LOGS/torch.log"
: >"$PLOG"
if [ "$USE_TORCH" = 1 ]; then
  compile_flag=""
  [ "${CAMEX_CHECK_TORCH_COMPILE:-1}" = 1 ] || compile_flag="--no-compile"
  PYTHONUNBUFFERED=1 within 240 python3 "$ROOT/scripts/torch_baseline.py" --shape t5-base --dtype bf16 \
    --op ca_merge $compile_flag >>"$PLOG" 2>&1 || echo "torch_baseline: rc=$?" >>"$PLOG"
fi

# 6. The candle ops on CUDA (tests/candle_cuda.rs) and a short GPU training run, when built. They
#    link candle's CUDA backend, so they need cuBLAS, cuRAND and NVRTC 13: from the CUDA toolkit
#    or, failing that, from the pip wheels next to PyTorch.
CCLOG="$LOGS/candle-cuda.log"
: >"$CCLOG"
CANDLE="candle on CUDA: not built (gpu-bin/candle-cuda-tests.xz missing)"
if [ -x "$CBIN/candle-cuda-tests" ]; then
  echo "library path: $LIBS" >>"$CCLOG"
  # One process per test, as in step 1: a fault spoils its process's context, and with it every
  # test after it in the same process, which would hide which ops work.
  cfail=""
  cn=0
  for t in $("$CBIN/candle-cuda-tests" --list 2>>"$CCLOG" | sed -n 's/: test$//p'); do
    cn=$((cn + 1))
    echo "=== $t" >>"$CCLOG"
    within 90 "$CBIN/candle-cuda-tests" --exact "$t" --nocapture --test-threads=1 >>"$CCLOG" 2>&1
    rc=$?
    case $rc in
      0) ;;
      124 | 137) cfail+=" $t(TIMEOUT)" ;;
      125) cfail+=" $t(SKIPPED-no-time)" ;;
      *) cfail+=" $t(rc=$rc)" ;;
    esac
  done
  if [ "$cn" = 0 ]; then
    CANDLE="candle on CUDA: no tests listed (see $CCLOG)"
    status=1
  elif [ -z "$cfail" ]; then
    CANDLE="candle on CUDA: $cn tests passed"
  else
    CANDLE="candle on CUDA: FAILED:$cfail (of $cn; see $CCLOG)"
    status=1
  fi
  if [ -x "$CBIN/train" ]; then
    echo "=== train (GPU, short)" >>"$CCLOG"
    within 120 "$CBIN/train" --device cuda --steps 150 --eval-every 50 --plot "$LOGS/train-loss.png" \
      --data "$ROOT/data/kjv-genesis-ruth.txt.gz" >>"$CCLOG" 2>&1 || { echo "train: rc=$?" >>"$CCLOG"; status=1; }
  fi
fi

# 7. burn's CUDA backend (tests/burn_cuda.rs), when built: CubeCL compiles its kernels with NVRTC 13
#    (the binary links an LLVM stand-in, scripts/llvm-standin.sh, that aborts if anything calls it).
BULOG="$LOGS/burn-cuda.log"
: >"$BULOG"
BURN="burn on CUDA: not built (gpu-bin/burn-cuda-tests.xz missing)"
if [ -x "$CBIN/burn-cuda-tests" ]; then
  if within 150 "$CBIN/burn-cuda-tests" --nocapture --test-threads=1 >>"$BULOG" 2>&1; then
    BURN="burn on CUDA: tests passed"
  else
    BURN="burn on CUDA: tests FAILED (rc=$?; see $BULOG)"
    status=1
  fi
fi

# 8. The tensor-core test again under sm_80's shared memory (CAMEX_TC_SMEM_LIMIT=166912: the layouts
#    and rows per block an A100 takes, run on this GPU; its T5-base `wo` shapes are the ones whose
#    columns-side backward changes), where time is left. Its RESULT lines go to its own log.
S8LOG="$LOGS/sm80-limit.log"
s=$(date +%s.%N)
CAMEX_TC_SMEM_LIMIT=166912 within 150 "$BIN" --exact tensor_core_path_matches_cpu --nocapture --test-threads=1 \
  >"$S8LOG" 2>&1
rc=$?
case $rc in 0) r=ok ;; 124 | 137) r=TIMEOUT; status=1 ;; 125) r=SKIPPED-no-time ;; *) r=FAILED; status=1 ;; esac
e=$(date +%s.%N)
TIMES+="$(printf "%-42s %8.2f %s" "tensor_core_path_matches_cpu (sm_80 limit)" "$(awk "BEGIN { print $e - $s }")" "$r")"$'\n'
grep -E "panicked|FAILED" "$S8LOG" | head -5

echo
echo "== gpu: $SMI"
echo "== per-test time (s)"
printf "%s" "$TIMES"
echo "== op, dtype, shape, max relative error (vs the f64 CPU path)"
grep '^RESULT ' "$TLOG" | awk '
  {
    op = ""; dt = ""; sh = ""; e = 0
    line = substr($0, 8)
    if (match(line, /op=.* dtype=/)) op = substr(line, RSTART + 3, RLENGTH - 10)
    if (match(line, /dtype=[a-z0-9]+/)) dt = substr(line, RSTART + 6, RLENGTH - 6)
    if (match(line, /shape=\[[^]]*\]/)) sh = substr(line, RSTART + 6, RLENGTH - 6)
    if (match(line, /rel_err=[^ ]+/)) e = substr(line, RSTART + 8, RLENGTH - 8) + 0
    gsub(/ /, "", sh)
    k = op "|" dt "|" sh
    if (!(k in m) || e > m[k]) m[k] = e
  }
  END { for (k in m) { split(k, p, "|"); printf "%-44s %-5s %-18s %.2e\n", substr(p[1], 1, 44), p[2], p[3], m[k] } }' | sort | head -60
echo "== $SANITIZER"
grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$SLOG" | head -6
echo "== $CANDLE"
echo "== $BURN"
grep -E "^burn_cuda|skipped|panicked" "$BULOG" | head -12
grep -E "^RESULT op=candle:" "$CCLOG" | awk '{ k = $0; sub(/ rel_err=.*/, "", k); e = $NF; sub(/rel_err=/, "", e);
  if (!(k in m) || e + 0 > m[k] + 0) m[k] = e } END { for (k in m) print substr(k, 8), m[k] }' | sort | head -40
grep -E "panicked|FAIL" "$CCLOG" | head -10
sed -n '/^=== train/,$p' "$CCLOG" | grep -vE "^  \[" | tail -9
echo "== $CLI"
echo "== camex (bench-cuda roofline lines)"
grep '^op=' "$BLOG" | sort -u | sed 's/ device=cuda//'
grep -E "panicked|rc=" "$BLOG" | head -5
echo "== PyTorch peer"
grep -E '^(op=|machine)' "$PLOG" | sed 's/ device=cuda//'
grep -E "Error|rc=" "$PLOG" | tail -3
echo "== L2 reuse between launches (write, then read in the next kernel; cold: evicted first)"
grep -E '^(l2_reuse|machine)|rc=|Error' "$LLOG" | head -12
echo "== kernels of one CA-merge forward, then its backward, T5-base bf16: time, DRAM bytes, L2 hit rate (ncu per-kernel; full: $KLOG)"
grep -E "^== ca_merge_backward|\)x\(|gpu__time_duration|dram__bytes|lts__t_sector_hit" "$KLOG" |
  sed 's/^ *//; s/<[^>]*>//g; s/(const [^)]*)//' | cut -c1-120 | head -120
grep -E "ncu: rc|==ERROR==" "$KLOG" | head -3
echo "== elapsed $(($(date +%s) - START)) s"
if [ "$status" -ne 0 ]; then echo "gpu-check: FAILED" >&2; else echo "gpu-check: all GPU tests passed"; fi
exit "$status"
