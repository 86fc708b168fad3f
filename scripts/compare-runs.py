#!/usr/bin/env python3
"""Compares two forge training runs (checkpoint.dir folders) for equality to the last digit:
every logged metric row (timing and memory columns ignored) and the weights of the newest
checkpoint, byte for byte. Used to check that a refactor leaves training unchanged:

    scripts/compare-runs.py runs/before runs/after

Exits 0 when everything is identical, 1 otherwise (printing the differences)."""
import json
import struct
import sys
from pathlib import Path

IGNORED = {"time", "train/tokens_per_second", "train/peak_rss_mb"}


def rows(run: Path):
    out = []
    with open(run / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            out.append({k: v for k, v in r.items() if k not in IGNORED})
    return out


def newest_checkpoint(run: Path) -> Path:
    steps = [p for p in run.glob("step_*") if (p / "model.safetensors").is_file()]
    if not steps:
        sys.exit(f"{run}: no step_*/model.safetensors")
    return max(steps, key=lambda p: int(p.name.split("_")[1]))


def tensors(path: Path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        out[name] = (meta["dtype"], meta["shape"], body[a:b])
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    ok = True
    ra, rb = rows(a), rows(b)
    if len(ra) != len(rb):
        print(f"metric rows: {len(ra)} vs {len(rb)}")
        ok = False
    for x, y in zip(ra, rb):
        for k in sorted(set(x) | set(y)):
            if x.get(k) != y.get(k):
                print(f"step {x.get('step')}: {k}: {x.get(k)!r} vs {y.get(k)!r}")
                ok = False
    ca, cb = newest_checkpoint(a), newest_checkpoint(b)
    ta, tb = tensors(ca / "model.safetensors"), tensors(cb / "model.safetensors")
    if set(ta) != set(tb):
        print(f"weights: names differ: {sorted(set(ta) ^ set(tb))}")
        ok = False
    same = sum(1 for k in ta if k in tb and ta[k] == tb[k])
    for k in sorted(ta):
        if k in tb and ta[k] != tb[k]:
            print(f"weights: {k} differs")
            ok = False
    last = ra[-1] if ra else {}
    losses = [r["train/loss"] for r in ra if "train/loss" in r]
    print(f"{len(ra)} metric rows, {sum(len(r) - 1 for r in ra)} values compared; "
          f"train/loss first {losses[0] if losses else None} last {losses[-1] if losses else None}; "
          f"eval/loss at step {last.get('step')}: {last.get('eval/loss')}; "
          f"{same}/{len(ta)} weight tensors of {ca.name} identical")
    print("identical" if ok else "DIFFERENT")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
