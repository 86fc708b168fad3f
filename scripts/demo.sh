#!/usr/bin/env bash
# The demo job (run by `make demo` after the build and the demo model are ready): chat with the
# demo target, tokenise the demo conversations, train Medusa heads on the demo target, export
# them for vLLM, measure them with speculative decoding, and print where everything is.
set -euo pipefail
cd "$(dirname "$0")/.."
FORGE=target/release/forge
MODEL=.forge/models/SmolLM2-135M-Instruct
RECIPE=recipes/medusa-smollm2.yaml
RUN=runs/medusa-smollm2
echo "== forge generate (demo target: SmolLM2-135M-Instruct, greedy, KV cache)"
"$FORGE" generate --target "$MODEL" --chat --prompt "What is the capital of France?" --max-new-tokens 32
echo
echo "== forge check on every recipe"
for r in recipes/*.yaml; do "$FORGE" check "$r"; done
echo
echo "== forge prepare-data $RECIPE (token cache)"
"$FORGE" prepare-data "$RECIPE"
echo
echo "== forge train $RECIPE (Medusa, 4 heads; resumes if interrupted)"
"$FORGE" train "$RECIPE" --resume auto
echo
echo "== forge export $RUN --format vllm"
"$FORGE" export "$RUN" --format vllm --out "$RUN/export-vllm"
echo
echo "== forge eval: speculative decoding with the trained heads vs plain decoding (held-out prompts)"
"$FORGE" eval --draft "$RUN" --prompts recipes/data/demo_eval_prompts.jsonl --limit 4 \
  --max-new-tokens 64 --verify --json "$RUN/eval.json"
echo
echo "demo: done."
echo "  checkpoints:   $RUN/step_*/"
echo "  metrics:       $RUN/metrics.jsonl, TensorBoard: tensorboard --logdir $RUN/tb"
echo "  vLLM export:   $RUN/export-vllm/ (config.json + model.safetensors)"
echo "  eval report:   $RUN/eval.json (tau, acceptance per position, speedup)"
