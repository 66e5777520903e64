#!/usr/bin/env bash
# A link-time stand-in for the LLVM bundle that burn's CUDA backend links. cubecl-cuda always depends
# on cubecl-llvm (its LLVM-to-PTX compiler), whose build script downloads an LLVM bundle from GitHub
# (tracel-llvm-bundler), which this machine and CI cannot reach. Without it `--features burn,cuda`
# type-checks but does not link.
#
# The stand-in is a prefix that looks like the bundle to the bundler and to cubecl-llvm's build
# script: the bundler's "installed" sentinel, an `llvm-config` that answers what they ask, headers
# that declare just what cubecl-llvm's three C/C++ shims use (every body aborts), and one static
# library defining every LLVM C API function llvm-sys declares, each aborting with a message.
#
# It is sound only where LLVM is never called: the crate builds burn's CUDA runtime with cubecl's
# `cuda-cpp` (the `cubecl-nvrtc` feature), so CubeCL compiles its kernels with NVRTC, as the crate's
# own kernels need nothing of LLVM either. A binary linked against it aborts with a message if
# anything reaches LLVM. With network access, build without it: the real bundle is downloaded.
#
# Usage: bash scripts/llvm-standin.sh  -> prints the directory to export as XDG_DATA_HOME for the
# cargo build (the bundler looks for $XDG_DATA_HOME/tracel/tracel-llvm-<version>): target/llvm-standin,
# or $CAMEX_LLVM_STANDIN_DIR. Idempotent; it checks itself (a call must abort, naming the function).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${CAMEX_LLVM_STANDIN_DIR:-$ROOT/target/llvm-standin}"
# The bundler's version (tracel-llvm-bundler 23.1.0-4, pinned by Cargo.lock).
PREFIX="$DATA/tracel/tracel-llvm-23.1.0-4"
[ -f "$PREFIX/.tracel-llvm-installed" ] && { echo "$DATA"; exit 0; }
rm -rf "$PREFIX"
mkdir -p "$PREFIX/bin" "$PREFIX/lib" "$PREFIX/include/llvm-c" "$PREFIX/include/llvm/Bitcode" \
  "$PREFIX/include/llvm/IR" "$PREFIX/include/llvm/Linker" "$PREFIX/include/llvm/Support"

cat > "$PREFIX/bin/llvm-config" <<'SH'
#!/bin/sh
# llvm-config of the stand-in (scripts/llvm-standin.sh): what the bundler and cubecl-llvm ask.
prefix="$(cd "$(dirname "$0")/.." && pwd)"
for arg in "$@"; do
  case "$arg" in
    --link-static) ;;
    --libs) echo "-lcamex_llvm_standin" ;;
    --libnames) echo "libcamex_llvm_standin.a" ;;
    --libdir) echo "$prefix/lib" ;;
    --includedir) echo "$prefix/include" ;;
    --system-libs) echo "" ;;
    --cxxflags) echo "-I$prefix/include -std=c++17" ;;
    --cflags) echo "-I$prefix/include" ;;
    --version) echo "23.1.0" ;;
    *) echo "llvm-config (stand-in): $arg not supported" >&2; exit 1 ;;
  esac
done
SH
chmod +x "$PREFIX/bin/llvm-config"

# The C API types the shims name, and the target initialisers the bundler's wrappers call (empty:
# nothing is initialised, and the native ones report failure).
cat > "$PREFIX/include/llvm-c/Core.h" <<'H'
/* Stand-in (scripts/llvm-standin.sh): the C API types cubecl-llvm's shims name. */
#ifndef CAMEX_LLVM_STANDIN_CORE_H
#define CAMEX_LLVM_STANDIN_CORE_H
typedef int LLVMBool;
typedef struct LLVMOpaqueModule *LLVMModuleRef;
typedef struct LLVMOpaqueValue *LLVMValueRef;
#endif
H
{
  echo '/* Stand-in (scripts/llvm-standin.sh): no target is initialised. */'
  echo '#include "Core.h"'
  for f in AllTargetInfos AllTargets AllTargetMCs AllAsmPrinters AllAsmParsers AllDisassemblers; do
    echo "static inline void LLVMInitialize$f(void) {}"
  done
  for f in NativeTarget NativeAsmParser NativeAsmPrinter NativeDisassembler; do
    echo "static inline LLVMBool LLVMInitialize$f(void) { return 1; }"
  done
} > "$PREFIX/include/llvm-c/Target.h"

# One header holds the few C++ declarations the shims use; the others include it. Inline bodies that
# abort, so that nothing else needs defining.
cat > "$PREFIX/include/llvm/standin.h" <<'H'
// Stand-in (scripts/llvm-standin.sh): what cubecl-llvm's C++ shims use of LLVM. Never called.
#pragma once
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include "llvm-c/Core.h"
namespace llvm {
[[noreturn]] inline void standin_abort() {
  std::fputs("camex: LLVM was called, but this binary links scripts/llvm-standin.sh's stand-in\n",
             stderr);
  std::abort();
}
struct StringRef {
  StringRef(const char *, std::size_t) {}
  StringRef(const char *) {}
};
struct LLVMContext {};
struct Module {
  LLVMContext &getContext() { standin_abort(); }
};
inline Module *unwrap(LLVMModuleRef) { standin_abort(); }
struct MemoryBufferRef {};
struct MemoryBuffer {
  static std::unique_ptr<MemoryBuffer> getMemBuffer(StringRef, StringRef, bool) { standin_abort(); }
  MemoryBufferRef getMemBufferRef() const { standin_abort(); }
};
struct Error {};
inline std::string toString(Error) { standin_abort(); }
template <class T> struct Expected {
  explicit operator bool() const { standin_abort(); }
  T &operator*() { standin_abort(); }
  Error takeError() { standin_abort(); }
};
inline Expected<std::unique_ptr<Module>> parseBitcodeFile(MemoryBufferRef, LLVMContext &) {
  standin_abort();
}
struct Linker {
  enum Flags { None = 0, OverrideFromSrc = 1, LinkOnlyNeeded = 2 };
  static bool linkModules(Module &, std::unique_ptr<Module>, unsigned = None) { standin_abort(); }
};
namespace cl {
struct Option {
  bool addOccurrence(unsigned, StringRef, StringRef) { standin_abort(); }
};
inline std::map<std::string, Option *> &getRegisteredOptions() { standin_abort(); }
} // namespace cl
} // namespace llvm
H
for h in Bitcode/BitcodeReader IR/Module Linker/Linker Support/Error Support/MemoryBuffer \
  Support/CommandLine; do
  printf '#pragma once\n#include "llvm/standin.h"\n' > "$PREFIX/include/llvm/$h.h"
done

# Every LLVM C API function llvm-sys declares (as Cargo.lock pins it), defined to abort. Weak, so
# that a real definition elsewhere (the bundler's `LLVM_*` wrappers) wins.
LLVM_SYS="$(cd "$ROOT" && cargo metadata --format-version 1 --features burn,cuda 2>/dev/null |
  python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="llvm-sys"))')"
python3 - "$LLVM_SYS/src" "$PREFIX/lib" <<'PY'
import os, re, subprocess, sys
src, out = sys.argv[1], sys.argv[2]
names = set()
for d, _, files in os.walk(src):
    for f in files:
        if f.endswith(".rs"):
            names |= set(re.findall(r"\bpub fn (LLVM\w*)\s*\(", open(os.path.join(d, f)).read()))
if len(names) < 1000:
    sys.exit(f"llvm-standin: only {len(names)} functions found in llvm-sys ({src})")
c = os.path.join(out, "standin.c")
with open(c, "w") as f:
    f.write("/* Generated by scripts/llvm-standin.sh: LLVM's C API, every function aborting. */\n")
    f.write("#include <stdio.h>\n#include <stdlib.h>\n")
    f.write("static void standin(const char *name) {\n"
            "  fprintf(stderr, \"camex: %s called, but this binary links scripts/llvm-standin.sh's "
            "LLVM stand-in\\n\", name);\n  abort();\n}\n")
    for n in sorted(names):
        f.write(f"__attribute__((weak)) void {n}(void) {{ standin(\"{n}\"); }}\n")
obj = os.path.join(out, "standin.o")
subprocess.run(["gcc", "-c", "-O1", "-fPIC", "-ffunction-sections", "-o", obj, c], check=True)
subprocess.run(["ar", "rcs", os.path.join(out, "libcamex_llvm_standin.a"), obj], check=True)
os.remove(c)
os.remove(obj)
print(f"llvm-standin: {len(names)} LLVM C API functions", file=sys.stderr)
PY
# Self-test: a call into the stand-in must abort and name the function, never return.
PROBE="$(mktemp -d)"
printf 'void LLVMContextCreate(void);\nint main(void) { LLVMContextCreate(); return 0; }\n' > "$PROBE/p.c"
gcc -o "$PROBE/p" "$PROBE/p.c" -L"$PREFIX/lib" -lcamex_llvm_standin
# (Through sh, whose "Aborted" report goes to /dev/null with its stderr.)
if sh -c '"$1" 2>"$2"' _ "$PROBE/p" "$PROBE/err" 2>/dev/null ||
  ! grep -q "LLVMContextCreate called" "$PROBE/err"; then
  echo "llvm-standin: the stand-in's LLVMContextCreate did not abort with its name" >&2
  exit 1
fi
rm -rf "$PROBE"
touch "$PREFIX/.tracel-llvm-installed"
echo "$DATA"
