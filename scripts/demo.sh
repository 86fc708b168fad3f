#!/usr/bin/env bash
# The demo job (run by `make demo` after the build and the demo model are ready): chat with the
# demo target, tokenise the demo conversations, train an EAGLE-3 draft on the demo target,
# export it in the layout SGLang and vLLM serve (LlamaForCausalLMEagle3; docs/export.md names
# the versions), load that export back and measure it with speculative decoding, and print
# where everything is.
set -euo pipefail
cd "$(dirname "$0")/.."
FORGE=target/release/forge
MODEL=.forge/models/SmolLM2-135M-Instruct
RECIPE=recipes/eagle3-smollm2.yaml
RUN=runs/eagle3-smollm2
EXPORT=$RUN/export-engines
echo "== forge generate (demo target: SmolLM2-135M-Instruct, greedy, KV cache)"
"$FORGE" generate --target "$MODEL" --chat --prompt "What is the capital of France?" --max-new-tokens 32
echo
echo "== forge check on every recipe (the recipe alone: real-scale targets are not here), then $RECIPE with its target"
for r in recipes/*.yaml; do "$FORGE" check "$r" --recipe-only; done
"$FORGE" check "$RECIPE"
echo
echo "== forge prepare-data $RECIPE (token cache)"
"$FORGE" prepare-data "$RECIPE"
echo
echo "== forge train $RECIPE (EAGLE-3, training-time test; resumes if interrupted)"
echo "   each evaluation also decodes 4 held-out prompts as served: a chain of 5 and SGLang's Llama tree"
"$FORGE" train "$RECIPE" --resume auto \
  --set 'train.eval_decode=[chain:5, "tree:steps=5,topk=4,draft_tokens=8"]' --set train.eval_decode_prompts=4
echo
echo "== forge export $RUN --format sglang (the same folder serves vLLM: both engines' keys are in it)"
"$FORGE" export "$RUN" --format sglang --out "$EXPORT"
echo
echo "== forge eval: the exported folder, read back as the engines read it, speculative vs plain decoding (held-out prompts),"
echo "   the speedup that tau predicts on H100 and H200 at batch 1, and a sweep of chains and trees for the serving flags"
echo "   (six settings: the full default sweep, wider trees included, is forge eval --sweep alone)"
"$FORGE" eval --draft "$EXPORT" --target "$MODEL" --prompts recipes/data/demo_eval_prompts.jsonl --limit 4 \
  --max-new-tokens 64 --verify --predict h100,h200 --batch 1 --json "$RUN/eval.json" \
  --sweep --sweep-setting chain:3 --sweep-setting chain:5 --sweep-setting chain:7 \
  --sweep-setting tree:steps=4,topk=2,draft_tokens=8 --sweep-setting tree:steps=5,topk=4,draft_tokens=8 \
  --sweep-setting tree:steps=5,topk=4,draft_tokens=16
echo
echo "demo: done."
echo "  checkpoints:   $RUN/step_*/"
echo "  metrics:       $RUN/metrics.jsonl, TensorBoard: tensorboard --logdir $RUN/tb"
echo "  engine export: $EXPORT/ (config.json + model.safetensors: SGLang 0.5.23, vLLM 0.33/0.34)"
echo "  eval report:   $RUN/eval.json (tau, acceptance per position, speedup)"
