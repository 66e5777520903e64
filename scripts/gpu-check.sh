#!/usr/bin/env bash
# Runs on a GPU machine with a driver and no Rust: the prebuilt GPU test binary (made here by
# scripts/build-gpu-bins.sh into ./gpu-bin/), with CAMEX_REQUIRE_GPU=1 so a missing GPU fails,
# then any GPU bench binaries found next to it; prints a short table last:
# op, dtype, shape, max relative error (over the cases of that op/dtype/shape), time.
# Usage: scripts/gpu-check.sh [TEST_BINARY] (default: gpu-bin/gpu-tests). Env CAMEX_SKIP_T5=1 to
# skip the T5-base shapes.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${1:-}"
if [ -z "$BIN" ]; then
  for c in "$ROOT/gpu-bin/gpu-tests" ./gpu-bin/gpu-tests; do
    [ -x "$c" ] && { BIN="$c"; break; }
  done
fi
if [ -z "$BIN" ] || [ ! -x "$BIN" ]; then
  echo "gpu-check: no test binary (build it with scripts/build-gpu-bins.sh and carry gpu-bin/)" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
export CAMEX_REQUIRE_GPU=1
status=0
# One test at a time so each gets its own timing line.
tests="$("$BIN" --list 2>/dev/null | sed -n 's/: test$//p')"
printf "%-40s %8s %s\n" test seconds result >"$LOG.times"
for t in $tests; do
  start=$(date +%s.%N)
  if "$BIN" --exact "$t" --nocapture --test-threads=1 >>"$LOG" 2>&1; then r=ok; else r=FAILED; status=1; fi
  end=$(date +%s.%N)
  printf "%-40s %8.2f %s\n" "$t" "$(awk "BEGIN { print $end - $start }")" "$r" >>"$LOG.times"
done
grep -E "panicked|FAILED|error" "$LOG" | head -40
for b in "$(dirname "$BIN")"/bench-*; do
  [ -x "$b" ] || continue
  echo "== bench $(basename "$b")"
  "$b" --bench 2>&1 | grep -E "time:|^[a-z_]+/" | head -60
done
echo
echo "== per-test time"
cat "$LOG.times"
echo
echo "== op, dtype, shape, max relative error"
grep '^RESULT ' "$LOG" | awk '
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
  END { for (k in m) { split(k, p, "|"); printf "%-60s %-5s %-18s %.3e\n", substr(p[1], 1, 60), p[2], p[3], m[k] } }' | sort
rm -f "$LOG.times"
if [ "$status" -ne 0 ]; then echo "gpu-check: FAILED" >&2; else echo "gpu-check: all GPU tests passed"; fi
exit "$status"
