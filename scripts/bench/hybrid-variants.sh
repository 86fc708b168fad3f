#!/usr/bin/env bash
# The hybrid drafter against all-MLP and all-transformer variants trained identically on the
# demo target (recipes/hybrid-smollm2.yaml; same data, steps, seed and learning rate), for
# cost_lambda 0.001 / 0.01 / 0.1, and the hard (straight-through) gate: validation top-1 (hard gate) after training, then forge
# eval on held-out prompts (tau, draft ms per drafted token, block histogram).
# Usage: scripts/bench/hybrid-variants.sh [STEPS] [OUT] [PHASE]   (needs `make build demo-model`)
# PHASE: all (default), train (only train the variants) or eval (only evaluate trained ones:
# run it on an otherwise idle machine, the draft times are wall-clock). Prints one line per
# variant and writes OUT/summary.jsonl. Slow on CPU (minutes per variant).
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${1:-200}
OUT=${2:-runs/bench-hybrid}
PHASE=${3:-all}
FORGE=target/release/forge
RECIPE=recipes/hybrid-smollm2.yaml
mkdir -p "$OUT"
[ "$PHASE" = train ] || : > "$OUT/summary.jsonl"
ONLY=${ONLY:-}   # e.g. ONLY="hybrid-lambda-0.01 hybrid-hard": only these variants
run() {
  local name=$1; shift
  [ -z "$ONLY" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  local dir="$OUT/$name"
  if [ "$PHASE" != eval ]; then
    rm -rf "$dir"
    "$FORGE" train "$RECIPE" --set checkpoint.dir="$dir" --set train.max_steps="$STEPS" \
      --set checkpoint.every_steps="$STEPS" --set train.eval_every="$STEPS" \
      --set data.eval=[recipes/data/demo_eval.jsonl] --set log.every_steps=10 --set log.progress=false "$@" \
      > "$dir.train.log" 2>&1
  fi
  [ "$PHASE" != train ] || return 0
  "$FORGE" eval --draft "$dir" --prompts recipes/data/demo_eval_prompts.jsonl --limit 8 \
    --max-new-tokens 64 --gamma 4 --json "$dir/eval.json" > "$dir.eval.log" 2>&1
  python3 - "$name" "$dir" >> "$OUT/summary.jsonl" <<'PY'
import json, sys
name, d = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
ev = [r for r in rows if "eval/acc/top1" in r][-1]
tr = [r for r in rows if "train/loss" in r][-1]
e = json.load(open(f"{d}/eval.json"))["summary"]
out = {
    "variant": name,
    "eval_top1": round(ev["eval/acc/top1"], 4),
    "eval_top5": round(ev.get("eval/acc/top5", 0.0), 4),
    "eval_ce": round(ev.get("eval/draft/ce", 0.0), 4),
    "eval_mlp_chosen": round(sum(v for k, v in ev.items() if k.startswith("eval/gate/mlp_") and k.endswith("_chosen")), 4),
    "train_loss": round(tr["train/loss"], 4),
    "tau": e["tau"],
    "draft_ms_per_token": e["draft_ms_per_token"],
    "speedup": e.get("speedup"),
    "blocks": e.get("draft_counter_shares", {}),
}
print(json.dumps(out))
PY
  tail -n 1 "$OUT/summary.jsonl"
}
run all-mlp --set drafter.num_mlp_blocks=2 --set drafter.num_transformer_blocks=0
run all-transformer --set drafter.num_mlp_blocks=0 --set drafter.num_transformer_blocks=3
for lam in 0.001 0.01 0.1; do
  run "hybrid-lambda-$lam" --set drafter.cost_lambda="$lam"
done
# training runs the one arg-max block decoding runs (straight-through), against the soft
# mixture of hybrid-lambda-0.01 (docs/methods/hybrid.md, "Training mixes, decoding picks")
run hybrid-hard --set drafter.cost_lambda=0.01 --set drafter.hard=true
