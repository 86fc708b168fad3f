#!/usr/bin/env python3
"""The figures of a device check (scripts/device-check.sh device) as Markdown: the CUDA
generate line, the CUDA-marked tests, the collectives, `forge bench train`, and the
draft-quality table. Every figure that is missing is named as missing.

Usage: summarize.py LOGS_DIR HAVE_DEMO(0|1)
"""
import json
import os
import re
import sys


def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def jsonl(path):
    text = read(path)
    if text is None:
        return None
    rows = []
    for line in text.splitlines():
        line = re.sub(r"^\[rank \d+\] ", "", line.strip())
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def missing(what):
    print(f"- **missing:** {what}")


def main():
    logs, have_demo = sys.argv[1], sys.argv[2] == "1"
    p = lambda n: os.path.join(logs, n)

    print("## generate (demo target)")
    gen = read(p("generate.log"))
    if gen is None:
        missing("no generate run (no demo target in the bundle)" if not have_demo else "generate did not run")
    else:
        stats = [l for l in gen.splitlines() if re.search(r"tok/s|tokens/s", l)]
        print("```\n" + "\n".join((stats or gen.splitlines())[-3:]) + "\n```")

    print("\n## CUDA-marked tests")
    tests = read(p("tests.log"))
    if tests is None:
        missing("the tests did not run")
    else:
        res = [l for l in tests.splitlines() if l.startswith("test result:") or l.startswith("test cuda::")]
        print("```\n" + "\n".join(res) + "\n```")

    print("\n## collectives, world size 1")
    sel = read(p("nccl-selftest.log"))
    if sel is None:
        missing("the c10d self-test did not run")
    else:
        rows = jsonl(p("nccl-selftest.log")) or []
        if rows:
            r = rows[-1]
            want = {"all_reduce_sum": [1, 10, 0], "all_reduce_bf16": [0.5, 1], "all_reduce_int64": [0, 1],
                    "broadcast": [100, 0], "all_gather": [0, 0.5], "reduce_scatter": [0, 1]}
            bad = [k for k, v in want.items() if r.get(k) != v]
            verdict = "every collective gave the expected numbers" if not bad and r.get("world") == 1 else f"WRONG: {bad}"
            print(f"- self-test (world {r.get('world')}): {verdict}")
        else:
            missing("the self-test printed no result (see logs/nccl-selftest.log)")
    ar = jsonl(p("nccl-allreduce.log"))
    if ar:
        print("\n| MiB | ms | algbw GB/s |\n|---|---|---|")
        for r in ar:
            print(f"| {r['bytes'] / 2**20:.0f} | {1e3 * r['seconds']:.3f} | {r['algbw_gb_s']:.1f} |")
    else:
        missing("the all-reduce benchmark gave no rows")

    print("\n## forge bench train")
    any_bench = False
    for name in ("bench_shape.json", "bench_demo.json"):
        rows = jsonl(p(name))
        if not rows:
            continue
        any_bench = True
        print(f"\n{rows[0]['target']} on {rows[0]['device']}, target {rows[0]['target_dtype']}, drafter compute {rows[0]['compute_dtype']}, batch {rows[0]['batch']} x {rows[0]['seq_len']} tokens, median of {rows[0]['steps']} steps\n")
        print("| drafter | step ms | target fwd ms | drafter ms | tokens/s | target TFLOP/s | MFU | peak MiB | trainable |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            mfu = f"{100 * r['target_mfu']:.1f}%" if r.get("target_mfu") is not None else "-"
            print(f"| {r['drafter']} | {r['step_ms']:.1f} | {r['target_ms']:.1f} | {r['drafter_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['target_tflops_per_s']:.1f} | {mfu} | {r['peak_mem_mb']:.0f} ({r['peak_mem_kind']}) | {r['trainable_params'] / 1e6:.1f}M |")
        if all("backward_ms" in r for r in rows):
            # the phases of the median step (forge bench train since issue 28)
            print("\n| drafter | target | draft fwd | backward | comm | clip | optimizer | draft GFLOP/token | step TFLOP/s | util | optim MiB |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['drafter']} | {r['target_ms']:.1f} | {r['draft_forward_ms']:.1f} | {r['backward_ms']:.1f} | {r['comm_ms']:.1f} | {r['clip_ms']:.1f} | {r['optimizer_ms']:.1f} | {r['draft_flops_per_token'] / 1e9:.3f} | {r['step_tflops_per_s']:.1f} | {100 * r['step_utilisation']:.1f}% | {r['optimizer_state_mb']:.0f} |")
    if not any_bench:
        missing("no benchmark rows (see logs/bench-*.log)")

    print("\n## draft quality (EAGLE-3, self-distilled on the device, held-out questions, greedy)")
    if not have_demo:
        missing("no demo target in the bundle: no quality run")
        return
    rows = jsonl(p("metrics.jsonl")) or []
    losses = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    evals = [(r["step"], r.get("eval/sim_tau"), r.get("eval/acc/step0", r.get("eval/acc_0"))) for r in rows if "eval/loss" in r]
    if losses:
        tps = [r["train/tokens_per_second"] for r in rows if "train/tokens_per_second" in r]
        print(f"- training: {losses[-1][0]} steps, train loss {losses[0][1]:.3f} (step {losses[0][0]}) -> {losses[-1][1]:.3f}; {tps[-1]:.0f} tokens/s at the end")
    else:
        missing("no training metrics (see logs/quality-train.log)")
    if evals:
        print(f"- held-out simulated tau (eval/sim_tau): {evals[0][1]} at step {evals[0][0]} -> {evals[-1][1]} at step {evals[-1][0]}")
    regen = read(p("quality-regenerate.log")) or ""
    done = [l for l in regen.splitlines() if "conversations" in l][-1:]
    if done:
        print(f"- self-distilled data: {done[0].strip()}")
    g5 = read(p("eval_g5.json"))
    g7 = read(p("eval_g7.json"))
    if g5 is None and g7 is None:
        missing("no eval report (see logs/quality-*.log)")
        return
    base_tps = None
    print("\n| gamma | tau | tokens/s | plain tokens/s | speedup | greedy mismatches |\n|---|---|---|---|---|---|")
    for g, text in ((5, g5), (7, g7)):
        if text is None:
            print(f"| {g} | missing | | | | |")
            continue
        s = json.loads(text)["summary"]
        b = s.get("baseline")
        if b:
            base_tps = b["tokens_per_second"]
        speed = s.get("speedup")
        if speed is None and base_tps:
            speed = s["tokens_per_second"] / base_tps
        mism = s.get("greedy_mismatches", "-")
        print(f"| {g} | {s['tau']:.3f} | {s['tokens_per_second']:.1f} | {base_tps if base_tps else '-'} | {f'{speed:.3f}x' if speed else '-'} | {mism} |")
    if g7 is not None and base_tps:
        print("\n(gamma 7 ran without its own plain decoding: its speedup is against gamma 5's plain run, same prompts.)")


if __name__ == "__main__":
    main()
