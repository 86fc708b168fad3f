#!/usr/bin/env python3
"""Writes tests/fixtures/rope_transformers.json: the RoPE inverse frequencies and attention
factor that Hugging Face transformers computes (`ROPE_INIT_FUNCTIONS`) for transformers v5
`rope_parameters` configs (yarn with and without mscale / truncate, llama3).
tests/target.rs checks forge's `Rotary` and config reader against it.

Run by hand (not in CI), from the repository root, with a Python that imports transformers
and torch (e.g. the bench venv of scripts/bench/reference/setup.sh):

    .forge/bench-venv/bin/python scripts/make_rope_fixture.py > tests/fixtures/rope_transformers.json

The committed fixture was made with transformers 5.8.1 and torch 2.13.0 (CPU).
"""
import json

import transformers
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

SHAPE = dict(head_dim=16, hidden_size=64, num_attention_heads=4)
CASES = {
    # Qwen2.5 / Qwen3 long-context setting (factor 4 over 32k)
    "yarn_qwen": dict(max_position_embeddings=32768, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
        "original_max_position_embeddings": 32768}),
    # DeepSeek-style mscale / mscale_all_dim
    "yarn_mscale": dict(max_position_embeddings=163840, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
        "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}),
    # gpt-oss: no truncation of the correction range
    "yarn_gptoss": dict(max_position_embeddings=131072, rope_parameters={
        "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
        "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False}),
    # Llama 3.1
    "llama3": dict(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}

out = {"transformers": transformers.__version__, "shape": SHAPE, "cases": {}}
for name, kw in CASES.items():
    params = dict(kw["rope_parameters"])
    cfg = LlamaConfig(**SHAPE, **kw)
    inv, att = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    out["cases"][name] = {
        "max_position_embeddings": kw["max_position_embeddings"],
        "rope_parameters": params,
        "inv_freq": [float(x) for x in inv.double()],
        "attention_factor": float(att),
    }
print(json.dumps(out, indent=1))
