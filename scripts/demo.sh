#!/usr/bin/env bash
# The demo job (run by `make demo` after the build and the demo model are ready):
# greedy chat generation with the demo target, and validation of the demo recipes.
set -euo pipefail
cd "$(dirname "$0")/.."
FORGE=target/release/forge
MODEL=.forge/models/SmolLM2-135M-Instruct
echo "== forge generate (demo target: SmolLM2-135M-Instruct, greedy, KV cache)"
"$FORGE" generate --target "$MODEL" --chat --prompt "What is the capital of France?" --max-new-tokens 32
echo
echo "== forge check on every recipe"
for r in recipes/*.yaml; do "$FORGE" check "$r"; done
echo
echo "demo: done. Training (forge train recipes/medusa-smollm2.yaml) arrives with the training core (issue #4)."
