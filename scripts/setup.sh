#!/usr/bin/env bash
# Installs what forge builds against, into the project-local folder .forge/ (idempotent):
#  - libtorch 2.13.0 from the PyPI torch wheel (tch 0.26 expects exactly this version):
#    CPU machines get the small no-deps install (torch + the two CUDA runtime libraries
#    libtorch_cpu.so links against); machines with nvidia-smi (or FORGE_CUDA=cuda) get the
#    full CUDA install, plus the CUDA headers the c10d shim's NCCL backend compiles against
#    that the torch wheel does not bring (nvidia-cuda-crt, nvidia-cuda-cccl: headers only).
#  - gloo headers (Debian's libgloo-dev, unpacked locally) for the c10d shim.
# Re-running does nothing once .forge/py/.complete-<variant> exists.
set -euo pipefail
cd "$(dirname "$0")/.."
FORGE=.forge
PY_TARGET=$FORGE/py
TORCH_VERSION=2.13.0

die() { echo "setup: $*" >&2; exit 1; }

PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null 2>&1 || die "python3 not found: install Python 3 (Debian: apt-get install python3 python3-pip) and re-run 'make build'"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "pip for $PYTHON not found: install it (Debian: apt-get install python3-pip) and re-run 'make build'"

if [ -n "${FORGE_CUDA:-}" ]; then variant=$FORGE_CUDA
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then variant=cuda
else variant=cpu; fi

marker=$PY_TARGET/.complete-$variant
if [ -f "$marker" ]; then
  echo "setup: libtorch $TORCH_VERSION ($variant) already installed in $PY_TARGET"
else
  rm -rf "$PY_TARGET"
  mkdir -p "$PY_TARGET"
  echo "setup: installing libtorch $TORCH_VERSION ($variant) from the PyPI torch wheel into $PY_TARGET ..."
  if [ "$variant" = cuda ]; then
    "$PYTHON" -m pip install --disable-pip-version-check --target "$PY_TARGET" "torch==$TORCH_VERSION" \
      || die "pip install torch==$TORCH_VERSION failed (see above)"
  else
    # libtorch_cpu.so needs libcudart.so.13 and libcupti.so.13 even on CPU.
    "$PYTHON" -m pip install --disable-pip-version-check --no-deps --target "$PY_TARGET" \
      "torch==$TORCH_VERSION" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 \
      || die "pip install torch==$TORCH_VERSION failed (see above)"
  fi
  [ -f "$PY_TARGET/torch/lib/libtorch_cpu.so" ] || die "libtorch_cpu.so missing after install in $PY_TARGET/torch/lib"
  touch "$marker"
fi

# NCCL in the c10d shim: trainer/build.rs compiles it in only when it finds every header it
# needs under nvidia/*/include. The full torch install has NCCL's, the CUDA runtime's, cuBLAS',
# cuSPARSE's and cuSOLVER's, but not crt/host_config.h (nvidia-cuda-crt) nor nv/target
# (nvidia-cuda-cccl): those two wheels (the versions the torch wheel's CUDA 13.0 pins) are
# unpacked aside and their headers copied in, also into an install made before this step.
if [ "$variant" = cuda ]; then
  inc=$PY_TARGET/nvidia/cu13/include
  if [ ! -f "$inc/crt/host_config.h" ] || [ ! -e "$inc/nv/target" ]; then
    echo "setup: adding the CUDA headers the NCCL backend of the c10d shim compiles against ..."
    tmp=$(mktemp -d)
    "$PYTHON" -m pip install --disable-pip-version-check --no-deps --target "$tmp" \
      nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 \
      || die "pip install nvidia-cuda-crt nvidia-cuda-cccl failed (see above)"
    mkdir -p "$inc"
    cp -r "$tmp/nvidia/cu13/include/." "$inc/"
    rm -rf "$tmp"
    [ -f "$inc/crt/host_config.h" ] && [ -e "$inc/nv/target" ] || die "CUDA headers missing in $inc after install"
  fi
fi

# gloo headers: the torch wheel ships c10d's headers but not gloo's own.
GLOO=$FORGE/gloo
if [ ! -f "$GLOO/usr/include/gloo/config.h" ]; then
  echo "setup: fetching gloo headers (Debian libgloo-dev) into $GLOO ..."
  tmp=$(mktemp -d)
  ( cd "$tmp" && apt-get download libgloo-dev >/dev/null 2>&1 ) \
    || { [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && ( cd "$tmp" && apt-get download libgloo-dev >/dev/null 2>&1 ); } \
    || die "could not download Debian's libgloo-dev (needed for the distributed shim); run 'apt-get update' as root and retry"
  mkdir -p "$GLOO"
  dpkg -x "$tmp"/libgloo-dev_*.deb "$GLOO"
  rm -rf "$tmp"
  [ -f "$GLOO/usr/include/gloo/config.h" ] || die "gloo headers not found after unpacking libgloo-dev"
fi
echo "setup: ok (LIBTORCH=$PWD/$PY_TARGET/torch)"
