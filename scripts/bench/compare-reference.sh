#!/usr/bin/env bash
# forge's online training step beside a Python reference of the same step, on the same
# libtorch build and thread count (issue 28):
#  - medusa: `forge bench train --drafter medusa` vs plain PyTorch eager
#    (scripts/bench/reference/medusa_eager.py);
#  - eagle3: `forge bench train --drafter eagle3` vs SpecForge 0.2.0's own EAGLE-3 step
#    (scripts/bench/reference/eagle3_specforge.py).
# Both sides: the demo target (fp32), batch 1 x 256 random tokens, every position trained,
# 2 warm-up + 8 timed steps, median step time. Prints a table (ratio = reference / forge,
# > 1: forge is faster) and how the two sides were matched. Run it on an otherwise idle
# machine: the times are wall-clock.
#
# Usage: scripts/bench/compare-reference.sh [OUT_DIR]   (default runs/bench-reference)
# Needs `make build demo-model`; sets up .forge/bench-venv on first use
# (scripts/bench/reference/setup.sh, a few minutes, about 1.2 GB).
# Environment: FORGE (target/release/forge), THREADS (2), BATCH (1), SEQ_LEN (256), STEPS (8),
# WARMUP (2), DRAFTERS ("medusa eagle3"), DEVICE (cpu), TARGET (.forge/models/SmolLM2-135M-Instruct),
# REF_ARGS_MEDUSA / REF_ARGS_EAGLE3 (extra flags for the references, e.g. "--fused").
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/bench-reference}
FORGE=${FORGE:-target/release/forge}
THREADS=${THREADS:-2}
BATCH=${BATCH:-1}
SEQ_LEN=${SEQ_LEN:-256}
STEPS=${STEPS:-8}
WARMUP=${WARMUP:-2}
DRAFTERS=${DRAFTERS:-medusa eagle3}
DEVICE=${DEVICE:-cpu}
TARGET=${TARGET:-.forge/models/SmolLM2-135M-Instruct}
VPY=.forge/bench-venv/bin/python

die() { echo "compare-reference: $*" >&2; exit 1; }
[ -x "$FORGE" ] || die "no forge binary at $FORGE: run 'make build' (or set FORGE=...)"
[ -f "$TARGET/config.json" ] || die "no target at $TARGET: run 'make demo-model'"
bash scripts/bench/reference/setup.sh | grep -v "is ready$" || true
[ -x "$VPY" ] || die "$VPY missing after scripts/bench/reference/setup.sh"

# the same thread pools on both sides
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
mkdir -p "$OUT"
common=(--target "$TARGET" --batch "$BATCH" --seq-len "$SEQ_LEN" --steps "$STEPS" --warmup "$WARMUP")
for d in $DRAFTERS; do
  case $d in
    medusa) ref=scripts/bench/reference/medusa_eager.py; extra=${REF_ARGS_MEDUSA:-} ;;
    eagle3) ref=scripts/bench/reference/eagle3_specforge.py; extra=${REF_ARGS_EAGLE3:-} ;;
    *) die "no reference for drafter '$d' (medusa, eagle3)" ;;
  esac
  rm -f "$OUT/forge-$d.json" "$OUT/ref-$d.json"
  echo "compare-reference: $d: forge ..." >&2
  "$FORGE" bench train "${common[@]}" --drafter "$d" --device "$DEVICE" --dtype fp32 --compute fp32 \
    --json "$OUT/forge-$d.json" > "$OUT/forge-$d.log" 2>&1 \
    || echo "compare-reference: forge bench train --drafter $d failed: see $OUT/forge-$d.log" >&2
  echo "compare-reference: $d: reference ($ref) ..." >&2
  # shellcheck disable=SC2086
  "$VPY" "$ref" "${common[@]}" --threads "$THREADS" --device "$DEVICE" $extra \
    --json "$OUT/ref-$d.json" > "$OUT/ref-$d.log" 2>&1 \
    || echo "compare-reference: $ref failed: see $OUT/ref-$d.log" >&2
done

python3 - "$OUT" $DRAFTERS <<'PY'
import json, os, sys

out, drafters = sys.argv[1], sys.argv[2:]


def load(path):
    try:
        with open(path) as f:
            return json.loads(f.readline())
    except (OSError, ValueError):
        return None


rows = []
sides = {}
for d in drafters:
    f, r = load(f"{out}/forge-{d}.json"), load(f"{out}/ref-{d}.json")
    sides[d] = (f, r)
    ref_name = {"medusa": "PyTorch eager", "eagle3": "SpecForge 0.2.0"}[d]
    pick = lambda row, key: None if row is None else row.get(key)
    rows.append((f"{d} step ({ref_name})", pick(f, "step_ms"), pick(r, "step_ms")))
    rows.append(("  target forward", pick(f, "target_ms"), pick(r, "target_ms")))
    if f is not None and r is not None:
        rows.append(("  drafter: fwd, loss, bwd, optim",
                     f["step_ms"] - f["target_ms"], r["step_ms"] - r["target_ms"]))

fmt = lambda v: "failed" if v is None else f"{v:10.1f}"
print()
print(f"{'step':34} {'forge ms':>10} {'reference ms':>13} {'ratio':>7}")
for name, fv, rv in rows:
    ratio = f"{rv / fv:7.2f}" if fv and rv else "      -"
    print(f"{name:34} {fmt(fv):>10} {fmt(rv):>13} {ratio}")
print("(ratio = reference / forge: > 1 means forge is faster; medians over the timed steps)")
for d, (f, r) in sides.items():
    if f is None or r is None:
        continue
    if f.get("trainable_params") != r.get("trainable_params"):
        print(f"note: {d}: trainable parameters differ: forge {f.get('trainable_params')}, "
              f"reference {r.get('trainable_params')}")
    fp = {k[:-3]: v for k, v in f.items() if k.endswith("_ms") and k not in ("step_ms", "step_ms_min", "step_ms_max", "drafter_ms")}
    if len(fp) > 1:
        print(f"{d} phases, forge: " + ", ".join(f"{k} {v:.1f}" for k, v in fp.items()))
    print(f"{d} phases, reference: " + ", ".join(f"{k} {v:.1f}" for k, v in r["phases_ms"].items()))

s = {d: (r or {}).get("settings", {}) for d, (f, r) in sides.items()}
f0 = next((f for f, r in sides.values() if f), {})
print()
print("How matched: the same libtorch build (the torch 2.13.0 wheel in .forge/py: forge links it, "
      "the references import it) and the same thread count "
      f"(OMP_NUM_THREADS=MKL_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, forge reports "
      f"{f0.get('threads', '?')} threads, the references call torch.set_num_threads); the same "
      "target (the demo Llama, fp32 weights and compute on both sides, forge's own Llama vs "
      "transformers' with sdpa attention, no KV cache, frozen, no gradients); the same synthetic "
      "batch (batch x seq_len random ids, every position trained; the ids themselves differ); "
      "the same trainable parameter count.")
if "medusa" in s:
    m = s["medusa"]
    print(f"Medusa: 4 heads, each one zero-initialised ResBlock with bias and its own trainable "
          f"copy of the target's lm_head (vocabulary {m.get('vocab', 49152)}, all of it), on the "
          "target's last normed hidden state; head k at position t predicts token t+k+2, "
          "positions 0..T-k-3, loss sum_k 0.8^(k+1) CE_k, per-head top-1/top-3 counts read back "
          f"as forge does; reference optimizer {m.get('optimizer', 'torch.optim.AdamW')}, "
          f"{m.get('clip', 'clip_grad_norm_')}, zero_grad {m.get('zero_grad', 'set_to_none=True')}, "
          "vs forge's own AdamW, clipping and zero_grad (trainer/src/optim: same formula and "
          "defaults; REF_ARGS_MEDUSA=--fused picks torch's fused AdamW kernel, the one forge "
          "calls when it runs _fused_adamw_).")
if "eagle3" in s:
    e = s["eagle3"]
    print(f"EAGLE-3: SpecForge's own step ({', '.join(x.rsplit('.', 1)[-1] for x in e.get('modules', []))}), "
          f"its draft config derived from the target (one decoder layer {e.get('draft_layer', {})}), "
          f"draft vocabulary {e.get('draft_vocab', 32000)} = the first ids (as forge's bench), "
          f"aux layers {e.get('aux_layers', [1, 14, 26])} (forge's default too), TTT length "
          f"{e.get('ttt_length', 7)}, step decay 0.8 (both), fp32, draft attention "
          f"'{e.get('draft_attention_backend', 'sdpa')}' (SpecForge's eager TTT attention, the same "
          f"algorithm as forge's); torch.compile {'on' if e.get('torch_compile', True) else 'off'} "
          f"for SpecForge's compiled functions; loss: {e.get('loss', '?')}; optimizer: "
          f"{e.get('optimizer', '?')} vs forge's AdamW (betas 0.9/0.95, in place, no master "
          "copies; REF_ARGS_EAGLE3='--optimizer torch' uses torch.optim.AdamW with forge's "
          "settings instead). The target "
          "features come from transformers, as SpecForge's capture contract names them (SpecForge "
          "0.2.0 gets them from an SGLang server or from disk).")
print("Not removable differences: see scripts/bench/reference/README.md.")
PY
