#!/usr/bin/env bash
# Builds recipes/data/demo_conversations.jsonl, the conversations `make demo` trains on:
# the demo target (SmolLM2-135M-Instruct) answers every user turn of the prompts written for
# forge in recipes/data/demo_prompts.jsonl (greedy, so the result is reproducible). The
# held-out set recipes/data/demo_eval.jsonl (data.eval of the demo recipes) is made the same
# way from recipes/data/demo_eval_prompts.jsonl (other prompts, none shared with training).
#
#   scripts/make-demo-data.sh            # continue / no-op when the file is complete
#   scripts/make-demo-data.sh --fresh    # regenerate from scratch
#
# Environment: FORGE (binary, default target/release/forge), TARGET (model folder),
# OUT (output file), BATCH (conversations per batch, default 16: on 2 CPU cores, batch 16
# decodes ~5x faster than one at a time), MAX_NEW (tokens per answer, default 256).
set -euo pipefail
cd "$(dirname "$0")/.."
FORGE=${FORGE:-target/release/forge}
TARGET=${TARGET:-.forge/models/SmolLM2-135M-Instruct}
IN=recipes/data/demo_prompts.jsonl
OUT=${OUT:-recipes/data/demo_conversations.jsonl}
BATCH=${BATCH:-16}
MAX_NEW=${MAX_NEW:-256}

[ -x "$FORGE" ] || { echo "make-demo-data: $FORGE not found: run make build" >&2; exit 1; }
[ -f "$TARGET/model.safetensors" ] || { echo "make-demo-data: demo target missing at $TARGET: run make demo-model" >&2; exit 1; }
EVAL_IN=recipes/data/demo_eval_prompts.jsonl
EVAL_OUT=${EVAL_OUT:-recipes/data/demo_eval.jsonl}
if [ "${1:-}" = "--fresh" ]; then
    rm -f "$OUT" "$EVAL_OUT"
fi
start=$(date +%s)
"$FORGE" regenerate --target "$TARGET" --in "$IN" --out "$OUT" \
    --batch-size "$BATCH" --max-new-tokens "$MAX_NEW" --temperature 0 \
    --device cpu --dtype fp32
echo "make-demo-data: $OUT: $(wc -l < "$OUT") conversations, $(du -h "$OUT" | cut -f1), $(( $(date +%s) - start ))s" >&2
"$FORGE" regenerate --target "$TARGET" --in "$EVAL_IN" --out "$EVAL_OUT" \
    --batch-size "$BATCH" --max-new-tokens "$MAX_NEW" --temperature 0 \
    --device cpu --dtype fp32
echo "make-demo-data: $EVAL_OUT: $(wc -l < "$EVAL_OUT") conversations" >&2
