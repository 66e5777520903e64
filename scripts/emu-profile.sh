#!/usr/bin/env bash
# Where the kernels' shared-memory wavefronts, mma and global (L2) bytes come from, per source
# line: runs the cost model's emulation (examples/cost_model.rs, with scripts/cost-model.sh's
# arguments) with CAMEX_EMU_PROFILE set and the kernels built with debug info, then names each
# instruction's line with addr2line and prints the lines with the most wavefronts (--by gmem: the
# most global bytes, the sectors between L2 and the SMs), each with its kernel (the outermost
# function of the inlined chain). The counts are those of every launch the arguments run, weighted
# as the cost model weighs sampled blocks. No GPU needed.
#
#   scripts/emu-profile.sh [--top N] [--kernel SUBSTRING] [--by wf|gmem] [--again] -- [cost-model arguments]
#   scripts/emu-profile.sh --top 30 --kernel kron_cols_bwd -- --shape t5-base --dtype bf16 --ops ca_merge --no-recompute
# A line is the first frame of the inlined chain outside the fragment, mma and load/store helpers
# (mma.cuh, ldst.cuh, common.cuh, and frag_* wherever defined), with the helper it went through. A
# function the host compiler did not inline (a lambda, rows_bwd_body) shows under its own name
# instead of its kernel's: a --kernel filter on the kernel's name leaves it out. --again re-reads
# the last run's profile (target-prof/profile.txt) with another --kernel or --top, without running
# anything.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOP=25
KERNEL=""
AGAIN=0
BY=wf
while [ $# -gt 0 ]; do
  case "$1" in
    --top) TOP="$2"; shift 2 ;;
    --kernel) KERNEL="$2"; shift 2 ;;
    --by) BY="$2"; shift 2 ;;
    --again) AGAIN=1; shift ;;
    --) shift; break ;;
    *) echo "emu-profile: unknown argument $1 (cost-model arguments go after --)" >&2; exit 2 ;;
  esac
done
# Its own target dir: debug info in the kernels (CXXFLAGS reaches the cc crate) would otherwise
# rebuild the emulation build of scripts/cost-model.sh and the tests.
TARGET="$ROOT/target-prof"
PROF="$TARGET/profile.txt"
if [ "$AGAIN" = 0 ]; then
CUDA_HOME="${CUDA_HOME:-$(bash scripts/setup-cuda.sh | tail -1)}"
export CUDA_HOME
# Release binaries are stripped of debug info unless the profile says otherwise.
CARGO_PROFILE_RELEASE_STRIP=none CXXFLAGS="-g" CARGO_TARGET_DIR="$TARGET" CAMEX_KERNEL_EMU=1 cargo build --quiet --release --features cuda --example cost_model
CAMEX_EMU_PROFILE="$PROF" CAMEX_KERNEL_EMU=1 "$TARGET/release/examples/cost_model" "$@" >/dev/null
fi
case "$BY" in wf|gmem) ;; *) echo "emu-profile: --by takes wf or gmem, got $BY" >&2; exit 2 ;; esac
python3 - "$PROF" "$TOP" "$KERNEL" "$BY" <<'PY'
import collections, subprocess, sys
prof, top, kernel, by = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
by_mod = collections.defaultdict(list)
for line in open(prof):
    f = line.split()
    if len(f) != 5:
        sys.exit(f"emu-profile: {prof} is from an older build (no global bytes); run without --again")
    mod, off, wf, mma, gmem = f
    by_mod[mod].append((off, int(wf), int(mma), int(gmem)))
rows = collections.defaultdict(lambda: [0, 0, 0])
HELPERS = {"mma.cuh", "ldst.cuh", "common.cuh"}
HELPER_FUNCS = ("frag_", "ld_pair", "ldmatrix", "store_data", "split_store", "mma_")
for mod, entries in by_mod.items():
    out = subprocess.run(["addr2line", "-a", "-f", "-i", "-C", "-e", mod] + [e[0] for e in entries],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    frames, i = {}, 0
    while i < len(out):
        addr, i, chain = out[i], i + 1, []
        while i < len(out) and not out[i].startswith("0x"):
            chain.append((out[i], out[i + 1]))
            i += 2
        frames[int(addr, 16)] = chain
    for off, wf, mma, gmem in entries:
        chain = frames.get(int(off, 16)) or [("?", "?")]
        func = chain[-1][0].split("(")[0]
        files = [c[1].rsplit("/", 1)[-1].split(" ")[0] for c in chain]
        names = [c[0].split("(")[0].split("<")[0].split("::")[-1] for c in chain]
        k = next((j for j, (f, n) in enumerate(zip(files, names))
                  if f.split(":")[0] not in HELPERS and not n.startswith(HELPER_FUNCS)), 0)
        where = files[k] + (" via " + names[k - 1] if k > 0 else "")
        if kernel and kernel not in func:
            continue
        r = rows[(func, where)]
        r[0] += wf
        r[1] += mma
        r[2] += gmem
key = 2 if by == "gmem" else 0
total = [sum(r[j] for r in rows.values()) for j in range(3)]
print(f"{'wavefronts':>14} {'mma':>12} {'global MB':>10} {'share':>6}  line  (kernel)")
for (func, where), r in sorted(rows.items(), key=lambda kv: -kv[1][key])[:top]:
    share = 100 * r[key] / (total[key] or 1)
    print(f"{r[0]:>14} {r[1]:>12} {r[2] / 1e6:>10.2f} {share:>5.1f}%  {where}  ({func})")
print(f"{total[0]:>14} {total[1]:>12} {total[2] / 1e6:>10.2f} 100.0%  total{' of ' + kernel if kernel else ''}")
PY
