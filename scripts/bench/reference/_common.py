"""What the two reference benchmarks share: flags, threads, the synthetic batch, timing and
the JSON line (scripts/bench/compare-reference.sh reads it beside forge's TrainBenchRow)."""

import argparse
import json
import os
import resource
import statistics
import sys
import time


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--target", default=".forge/models/SmolLM2-135M-Instruct",
                   help="Hugging Face Llama folder (default: the demo target)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads (and OMP/MKL_NUM_THREADS when unset)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the result as one JSON line to FILE")
    return p


def check_args(a):
    if a.batch < 1 or a.seq_len < 2 or a.steps < 1 or a.warmup < 0 or a.threads < 1:
        sys.exit("--batch and --steps must be >= 1, --seq-len >= 2, --warmup >= 0, --threads >= 1")
    if not os.path.isfile(os.path.join(a.target, "config.json")):
        sys.exit(f"--target {a.target}: no config.json there (the demo target comes from `make demo-model`)")


def set_threads(n):
    """Before torch is imported: the OpenMP/MKL pools follow these variables, as forge's do."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("MKL_NUM_THREADS", str(n))


def setup_torch(a):
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here")
    return torch, device


def synthetic_batch(torch, vocab, a, device):
    """forge bench train's batch: `batch` rows of `seq_len` random token ids, all trained."""
    ids = torch.randint(vocab, (a.batch, a.seq_len), dtype=torch.long, device=device)
    ones = torch.ones((a.batch, a.seq_len), dtype=torch.long, device=device)
    return ids, ones


class Clock:
    """Phase timer: `lap(name)` closes the phase that started at the previous lap (after a
    device synchronisation on CUDA, as forge synchronises around its timed region)."""

    def __init__(self, torch, device):
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.phases = {}

    def start(self):
        self.sync()
        self.t = self.t0 = time.perf_counter()
        self.phases = {}

    def lap(self, name):
        self.sync()
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + (now - self.t) * 1e3
        self.t = now

    def total(self):
        return (self.t - self.t0) * 1e3


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def summarise(a, drafter, impl, totals, phases, target_key, extra):
    """The result row: medians over the timed steps (and each phase's median)."""
    med = statistics.median
    names = list(phases[0].keys()) if phases else []
    row = {
        "impl": impl,
        "drafter": drafter,
        "target": a.target,
        "device": a.device,
        "batch": a.batch,
        "seq_len": a.seq_len,
        "steps": a.steps,
        "warmup": a.warmup,
        "threads": a.threads,
        "step_ms": med(totals),
        "step_ms_min": min(totals),
        "step_ms_max": max(totals),
        "target_ms": med([p[target_key] for p in phases]),
        "drafter_ms": med([t - p[target_key] for t, p in zip(totals, phases)]),
        "phases_ms": {n: med([p[n] for p in phases]) for n in names},
        "tokens_per_s": a.batch * a.seq_len / (med(totals) / 1e3),
        "peak_mem_mb": peak_rss_mb() if a.device == "cpu" else None,
    }
    row.update(extra)
    return row


def report(a, row):
    ph = ", ".join(f"{k} {v:.1f}" for k, v in row["phases_ms"].items())
    print(f"{row['impl']} {row['drafter']}: step {row['step_ms']:.1f} ms (min {row['step_ms_min']:.1f}, "
          f"max {row['step_ms_max']:.1f}), target {row['target_ms']:.1f} ms, "
          f"{row['tokens_per_s']:.0f} tokens/s over {a.steps} steps")
    print(f"  phases (median ms): {ph}")
    if a.json:
        with open(a.json, "w") as f:
            f.write(json.dumps(row) + "\n")
