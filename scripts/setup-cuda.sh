#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (PyPI wheels) into .cuda/ and libclang for bindgen.
# The pin matters: PTX from a newer nvcc does not load on the target's driver 580 (CUDA 13.0).
# Idempotent: a second run only checks. Prints the CUDA_HOME to use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${CAMEX_CUDA_DIR:-$ROOT/.cuda}"
CUDA_HOME_DIR="$DIR/nvidia/cu13"

# bindgen loads libclang.so itself; libclang-cpp (LLVM's C++ library, present on some machines) is
# not it, so the patterns must not match that.
if ! ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9.]+)?\.so' &&
  ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* >/dev/null 2>&1; then
  echo "setup-cuda: installing libclang-dev (bindgen)" >&2
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libclang-dev >/dev/null
  else
    echo "setup-cuda: no apt-get; install libclang yourself" >&2; exit 1
  fi
fi

if [ ! -x "$CUDA_HOME_DIR/bin/nvcc" ]; then
  echo "setup-cuda: installing nvcc 13.0 wheels into $DIR" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$DIR" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
# nvcc looks for lib64 when linking cudart statically.
[ -e "$CUDA_HOME_DIR/lib64" ] || ln -s lib "$CUDA_HOME_DIR/lib64"
"$CUDA_HOME_DIR/bin/nvcc" --version | tail -2 >&2
echo "$CUDA_HOME_DIR"
