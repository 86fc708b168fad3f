#!/usr/bin/env python3
"""Independent NumPy reference of the Llama / Qwen2 / Qwen3 forward pass (HF semantics),
used by the tests to check forge's tch implementation on tiny random targets.

Usage: reference_forward.py MODEL_DIR IDS_CSV  -> prints logits of the last position and
of position 0 as JSON {"last": [...], "first": [...]}. Needs numpy and safetensors
(the .forge/venv that scripts/get-demo-model.sh creates has both).
"""
import json
import sys

import numpy as np
from safetensors.numpy import load_file


def rms_norm(x, w, eps):
    var = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * w


def rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.outer(pos, inv)
    emb = np.concatenate([ang, ang], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rot = np.concatenate([-x2, x1], axis=-1)
    return x * cos + rot * sin


def main():
    d, ids = sys.argv[1], [int(t) for t in sys.argv[2].split(",")]
    cfg = json.load(open(f"{d}/config.json"))
    w = {k: v.astype(np.float64) for k, v in load_file(f"{d}/model.safetensors").items()}
    mt = cfg.get("model_type", "llama")
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or H // nh
    eps, theta = cfg.get("rms_norm_eps", 1e-6), cfg.get("rope_theta", 10000.0)
    T = len(ids)
    pos = np.arange(T)
    x = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)

    def lin(name, inp):
        y = inp @ w[name + ".weight"].T
        if name + ".bias" in w:
            y = y + w[name + ".bias"]
        return y

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = lin(p + "self_attn.q_proj", h).reshape(T, nh, hd)
        k = lin(p + "self_attn.k_proj", h).reshape(T, nkv, hd)
        v = lin(p + "self_attn.v_proj", h).reshape(T, nkv, hd)
        if mt == "qwen3":
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        out = np.zeros((T, nh, hd))
        for head in range(nh):
            kvh = head // (nh // nkv)
            qh = rope(q[:, head], pos, theta)
            kh = rope(k[:, kvh], pos, theta)
            s = qh @ kh.T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s = s / s.sum(-1, keepdims=True)
            out[:, head] = s @ v[:, kvh]
        x = x + lin(p + "self_attn.o_proj", out.reshape(T, nh * hd))
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = lin(p + "mlp.gate_proj", h)
        x = x + lin(p + "mlp.down_proj", (g / (1 + np.exp(-g))) * lin(p + "mlp.up_proj", h))
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    logits = x @ head.T
    print(json.dumps({"last": logits[-1].tolist(), "first": logits[0].tolist()}))


if __name__ == "__main__":
    main()
