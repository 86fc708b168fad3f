#!/usr/bin/env bash
# FP8 against bf16 hidden-state shards (issue 25, item 4): for recipes/eagle3-smollm2.yaml
# (EAGLE-3 on the demo target), `forge prepare-hidden` writes the same data twice, with
# --dtype bf16 and --dtype fp8; an EAGLE-3 draft is trained offline on each (same recipe,
# steps and seed; only data.hidden_dir differs), and `forge eval` measures both on 8 held-out
# prompts. Prints bytes per token of the shard files, the final train loss, eval/sim_tau and
# the acceptance length tau of each, and the tau difference; writes OUT/summary.json.
#
# Usage: scripts/bench/fp8-shards.sh [STEPS] [OUT]   (defaults 200, runs/bench-fp8-shards)
# Needs `make build demo-model`. On a 2-core CPU: about 2 x (3 min of shards + 8 min of
# training + 2 min of eval). Shards already there are kept (prepare-hidden resumes); the
# training runs are redone.
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${1:-200}
OUT=${2:-runs/bench-fp8-shards}
FORGE=${FORGE:-target/release/forge}
RECIPE=recipes/eagle3-smollm2.yaml
die() { echo "fp8-shards: $*" >&2; exit 1; }
[ -x "$FORGE" ] || die "no forge binary at $FORGE: run 'make build' (or set FORGE=...)"
[ -f .forge/models/SmolLM2-135M-Instruct/config.json ] || die "no demo target: run 'make demo-model'"
mkdir -p "$OUT"
for dtype in bf16 fp8; do
  hidden="$OUT/hidden-$dtype" run="$OUT/run-$dtype"
  echo "== $dtype: prepare-hidden -> $hidden"
  "$FORGE" prepare-hidden "$RECIPE" --out "$hidden" --dtype "$dtype" | tee "$OUT/prepare-$dtype.log"
  echo "== $dtype: train $STEPS steps offline -> $run"
  rm -rf "$run"
  "$FORGE" train "$RECIPE" --set data.mode=offline --set data.hidden_dir="$hidden" \
    --set checkpoint.dir="$run" --set train.max_steps="$STEPS" --set checkpoint.every_steps="$STEPS" \
    --set train.eval_every="$STEPS" --set log.progress=false > "$OUT/train-$dtype.log" 2>&1 \
    || { tail -n 20 "$OUT/train-$dtype.log"; die "training on $dtype shards failed"; }
  echo "== $dtype: eval"
  "$FORGE" eval --draft "$run" --prompts recipes/data/demo_eval_prompts.jsonl --limit 8 \
    --max-new-tokens 64 --json "$OUT/eval-$dtype.json" > "$OUT/eval-$dtype.log" 2>&1 \
    || { tail -n 20 "$OUT/eval-$dtype.log"; die "eval of the $dtype draft failed"; }
done
python3 - "$OUT" "$STEPS" <<'PY'
import json, sys
out, steps = sys.argv[1], int(sys.argv[2])
rows = {}
for d in ("bf16", "fp8"):
    m = json.load(open(f"{out}/hidden-{d}/manifest.json"))
    metrics = [json.loads(l) for l in open(f"{out}/run-{d}/metrics.jsonl")]
    train = [r for r in metrics if "train/loss" in r][-1]
    ev = [r for r in metrics if "eval/sim_tau" in r]
    e = json.load(open(f"{out}/eval-{d}.json"))["summary"]
    rows[d] = {
        "bytes_per_token": round(m["bytes_per_token"], 1),
        "shard_bytes": m["bytes"],
        "tokens": m["tokens"],
        "train_loss": round(train["train/loss"], 4),
        "eval_sim_tau": round(ev[-1]["eval/sim_tau"], 4) if ev else None,
        "tau": e["tau"],
    }
    r = rows[d]
    print(f"{d:5} {r['bytes_per_token']:8.1f} bytes/token  train/loss {r['train_loss']:.4f}  "
          f"eval/sim_tau {r['eval_sim_tau']}  tau {r['tau']:.3f}")
ratio = rows["fp8"]["bytes_per_token"] / rows["bf16"]["bytes_per_token"]
diff = rows["fp8"]["tau"] - rows["bf16"]["tau"]
print(f"fp8 / bf16 bytes per token: {ratio:.3f}; tau fp8 - bf16: {diff:+.3f} after {steps} steps")
json.dump({"steps": steps, "runs": rows, "bytes_ratio": ratio, "tau_diff": diff},
          open(f"{out}/summary.json", "w"), indent=2)
PY
