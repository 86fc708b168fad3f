#!/usr/bin/env bash
# The Python environment of the reference benchmarks (scripts/bench/compare-reference.sh):
# .forge/bench-venv, a venv that
#  - reuses the torch 2.13.0 wheel `make build` installed in .forge/py (the libtorch forge
#    links against) through a .pth file, so both sides run the same libtorch build;
#  - holds the pinned packages of requirements.txt beside this file (torch's pure-Python
#    dependencies, transformers 5.8.1, safetensors, triton) and SpecForge 0.2.0 from PyPI,
#    installed without its declared dependencies (it pins torch 2.11 and sglang 0.5.14; its
#    EAGLE-3 training modules need neither);
#  - on a machine without the CUDA libraries that Python's torch._C links (the CPU install of
#    scripts/setup.sh leaves them out), gets stand-ins for them (cuda_stubs.py) preloaded at
#    start-up.
# Idempotent: re-running does nothing once the marker for these exact inputs exists.
# Usage: scripts/bench/reference/setup.sh   (after `make build`)
set -euo pipefail
cd "$(dirname "$0")/../../.."
HERE=scripts/bench/reference
VENV=.forge/bench-venv
PY_DIR=.forge/py
SPECFORGE=specforge==0.2.0

die() { echo "bench setup: $*" >&2; exit 1; }

[ -f "$PY_DIR/torch/lib/libtorch_cpu.so" ] && [ -d "$PY_DIR/torch-2.13.0.dist-info" ] \
  || die "no torch 2.13.0 in $PY_DIR: run 'make build' first (it installs the libtorch forge and this venv share)"

stamp=$(cat "$HERE/setup.sh" "$HERE/requirements.txt" "$HERE/cuda_stubs.py" <(echo "$SPECFORGE") | sha256sum | cut -c1-16)
marker=$VENV/.complete-$stamp
if [ -f "$marker" ]; then
  echo "bench setup: $VENV is ready"
  exit 0
fi

PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null 2>&1 || die "python3 not found (SpecForge 0.2.0 needs Python >= 3.11)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$("$PYTHON" --version 2>&1) is too old: SpecForge 0.2.0 needs Python >= 3.11 (set PYTHON=...)"

rm -rf "$VENV"
echo "bench setup: creating $VENV ..."
"$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
VPY=$VENV/bin/python
pip_install() { "$VPY" -m pip install --disable-pip-version-check --progress-bar off --no-deps "$@"; }
pip_install -r "$HERE/requirements.txt" || die "pip install -r $HERE/requirements.txt failed (see above)"
pip_install "$SPECFORGE" || die "pip install $SPECFORGE failed (see above)"

# .forge/py on the venv's path, as a path relative to site-packages (the venv can move with
# the checkout).
site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$VPY" -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$PWD/$PY_DIR" "$site" \
  > "$site/forge-libtorch.pth"

if ! err=$("$VPY" -c 'import torch' 2>&1); then
  echo "$err" | grep -q "cannot open shared object file" || die "import torch failed: $err"
  echo "bench setup: $(echo "$err" | tail -1 | sed 's/^ImportError: //')"
  echo "bench setup: building stand-ins for the CUDA libraries torch._C links (never called on this machine) ..."
  rm -rf "$VENV/cuda-stubs"
  "$PYTHON" "$HERE/cuda_stubs.py" "$PY_DIR/torch/lib" "$VENV/cuda-stubs" || die "building the CUDA stand-ins failed"
  cat > "$site/_forge_cuda_stubs.py" <<'PY'
# Written by scripts/bench/reference/setup.sh: preloads the stand-in CUDA libraries (see
# scripts/bench/reference/cuda_stubs.py) so that torch._C finds them by soname.
import ctypes, os
_d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "cuda-stubs")
if os.path.isdir(_d):
    for _f in sorted(os.listdir(_d)):
        if ".so" in _f:
            ctypes.CDLL(os.path.join(_d, _f), mode=ctypes.RTLD_GLOBAL)
PY
  echo "import _forge_cuda_stubs" > "$site/00-forge-cuda-stubs.pth"
fi

"$VPY" - <<'PY' 2>&1 | grep -v "flash_attn\|warnings.warn" || die "the venv does not import torch / transformers / SpecForge (see above)"
import warnings
warnings.filterwarnings("ignore")
import torch, transformers, specforge
from specforge.algorithms.eagle3.model import OnlineEagle3Model  # noqa: F401
from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3  # noqa: F401
from importlib.metadata import version
print(f"bench setup: torch {torch.__version__} from {torch.__file__.rsplit('/torch/', 1)[0]}, "
      f"transformers {transformers.__version__}, specforge {version('specforge')}")
PY
touch "$marker"
echo "bench setup: ok ($VENV)"
