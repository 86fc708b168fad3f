//! Batched generation (`generate_batch`) and `forge regenerate`.

use forge_data::conversation::{parse_prompts, read_prompts, PromptConversation};
use forge_data::{ChatTemplate, Message, Role, TextTokenizer};
use forge_models::generate::{generate, generate_batch, sample_rows, GenerateOptions, Generation, RowRng, Sampling};
use forge_models::{DType, TargetModel};
use forge_tests::{demo_model, forge, random_target, tmp_dir};
use forge_trainer::regenerate::Regenerator;
use std::path::Path;
use tch::{Device, Tensor};

/// Random prompts from a local generator (the torch global one is shared by parallel tests).
fn random_prompts(lens: &[i64], seed: u64) -> Vec<Vec<i64>> {
    let mut rng = RowRng::new(seed);
    lens.iter()
        .map(|&l| (0..l).map(|_| 3 + (rng.next_u64() % 93) as i64).collect())
        .collect()
}

fn singles(model: &TargetModel, prompts: &[Vec<i64>], opts: &GenerateOptions) -> Vec<Generation> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let o = GenerateOptions {
                seed: opts.seed + i as u64,
                ..opts.clone()
            };
            generate(model, p, &o, |_| {}).expect("generate")
        })
        .collect()
}

fn assert_rows_equal(batch: &[Generation], single: &[Generation], what: &str) {
    assert_eq!(batch.len(), single.len());
    for (i, (b, s)) in batch.iter().zip(single).enumerate() {
        assert_eq!(
            b.tokens, s.tokens,
            "{what}: row {i} differs from single-sequence decoding"
        );
        assert_eq!(b.stopped, s.stopped, "{what}: row {i} stop flag");
    }
}

#[test]
fn batched_equals_single_on_tiny_targets() {
    let lens = [3, 9, 5, 12, 1];
    for fam in ["llama", "qwen2", "qwen3"] {
        let model = random_target(fam, 21);
        let prompts = random_prompts(&lens, 22);
        let mut opts = GenerateOptions {
            max_new_tokens: 10,
            ..Default::default()
        };
        let single = singles(&model, &prompts, &opts);
        assert!(single.iter().all(|g| g.tokens.len() == 10 && !g.stopped));
        let batch = generate_batch(&model, &prompts, &opts).expect("batch");
        assert_rows_equal(&batch, &single, &format!("{fam} greedy"));

        // Per-row stops: row 1 stops at its 4th token (or earlier if that id came up before);
        // the others run on, or stop where the same id comes up in them.
        let stop = single[1].tokens[3];
        let stop_at = single[1].tokens.iter().position(|&t| t == stop).unwrap_or(3);
        opts.stop_ids = vec![stop];
        let single = singles(&model, &prompts, &opts);
        assert!(single[1].stopped && single[1].tokens.len() == stop_at + 1);
        let batch = generate_batch(&model, &prompts, &opts).expect("batch");
        assert_rows_equal(&batch, &single, &format!("{fam} greedy with a stop id"));

        // Sampling: row i of the batch draws like a single run with seed + i.
        let opts = GenerateOptions {
            max_new_tokens: 10,
            sampling: Sampling {
                temperature: 0.9,
                top_p: 0.8,
                top_k: 0,
            },
            seed: 7,
            stop_ids: Vec::new(),
        };
        let single = singles(&model, &prompts, &opts);
        let batch = generate_batch(&model, &prompts, &opts).expect("batch");
        assert_rows_equal(&batch, &single, &format!("{fam} sampled"));
        let again = generate_batch(&model, &prompts, &opts).expect("batch");
        assert_rows_equal(&again, &batch, &format!("{fam} sampled twice"));
        let greedy = generate_batch(
            &model,
            &prompts,
            &GenerateOptions {
                max_new_tokens: 10,
                ..Default::default()
            },
        )
        .expect("batch");
        assert!(
            batch.iter().zip(&greedy).any(|(s, g)| s.tokens != g.tokens),
            "{fam}: sampling at T=0.9 should differ from greedy somewhere"
        );
    }
    // Edge cases: empty batch, empty prompt.
    let model = random_target("llama", 21);
    let none: Vec<Vec<i64>> = Vec::new();
    assert!(generate_batch(&model, &none, &GenerateOptions::default())
        .expect("empty batch")
        .is_empty());
    let err = generate_batch(&model, &[vec![5], vec![]], &GenerateOptions::default()).expect_err("empty prompt");
    assert!(err.to_string().contains("row 1"), "{err}");
}

#[test]
fn sampling_follows_the_distribution_and_nucleus() {
    let n = 20000;
    let row = Tensor::from_slice(&[0.7f32, 0.2, 0.1]).log();
    let logits = row.view([1, 3]).expand([n, 3], false);
    let mut rng = RowRng::new(3);
    let u: Vec<f64> = (0..n).map(|_| rng.next_f64()).collect();
    let freq = |ids: &[i64], k: i64| ids.iter().filter(|&&i| i == k).count() as f64 / n as f64;
    let ids = sample_rows(&logits, &Sampling::at(1.0), &u).expect("sample");
    for (k, p) in [(0, 0.7), (1, 0.2), (2, 0.1)] {
        assert!((freq(&ids, k) - p).abs() < 0.02, "token {k}: {} vs {p}", freq(&ids, k));
    }
    // top_p 0.75 keeps tokens 0 and 1 (mass before them < 0.75), renormalised.
    let nucleus = Sampling {
        temperature: 1.0,
        top_p: 0.75,
        top_k: 0,
    };
    let ids = sample_rows(&logits, &nucleus, &u).expect("sample");
    assert_eq!(freq(&ids, 2), 0.0);
    assert!((freq(&ids, 0) - 0.7 / 0.9).abs() < 0.02);
    // draws at the edges stay inside the nucleus
    let edge = sample_rows(&logits.narrow(0, 0, 2), &nucleus, &[0.0, 0.999_999_999]).expect("sample");
    assert_eq!(edge, [0, 1]);
    // top-k 2 keeps tokens 0 and 1, renormalised to 7/9 and 2/9
    let top2 = Sampling {
        top_k: 2,
        top_p: 1.0,
        ..nucleus
    };
    let ids = sample_rows(&logits, &top2, &u).expect("sample");
    assert_eq!(freq(&ids, 2), 0.0);
    assert!((freq(&ids, 1) - 0.2 / 0.9).abs() < 0.02, "{}", freq(&ids, 1));
    // top-k before top-p (vLLM's and SGLang's order): after top-k 2 the mass before token 1 is
    // 7/9 >= 0.75, so only token 0 is left (top-p first would have kept token 1)
    let both = Sampling { top_k: 2, ..nucleus };
    assert!(sample_rows(&logits, &both, &u).expect("sample").iter().all(|&i| i == 0));
    let p = both.probs(&row.view([1, 3]));
    assert_eq!(Vec::<f32>::try_from(p.view(-1)).expect("probs"), [1.0, 0.0, 0.0]);
    assert_eq!(
        sample_rows(&logits.narrow(0, 0, 2), &Sampling::greedy(), &[]).expect("argmax"),
        [0, 0]
    );
}

fn chat_ids(tok: &TextTokenizer, tpl: &ChatTemplate, msgs: &[Message]) -> Vec<i64> {
    tok.encode(&tpl.render(msgs, true)).expect("encode")
}

fn demo_stop_ids(model: &TargetModel, tok: &TextTokenizer, tpl: &ChatTemplate) -> Vec<i64> {
    let mut stop = model.config.eos_token_ids.clone();
    stop.push(tok.token_id(tpl.end_of_turn()).expect("end of turn id"));
    stop
}

#[test]
fn batched_equals_single_on_demo_target_and_multi_turn_context() {
    let dir = demo_model();
    let model = TargetModel::load(&dir, DType::F32, Device::Cpu).expect("load demo target");
    let tok = TextTokenizer::from_dir(&dir).expect("tokenizer");
    let tpl = ChatTemplate::detect(&dir).expect("template");
    let stop = demo_stop_ids(&model, &tok, &tpl);
    let prompts: Vec<Vec<i64>> = [
        "What is the capital of France?",
        "Name two colours.",
        "In one sentence, explain why the sky looks blue during the day.",
    ]
    .iter()
    .map(|p| chat_ids(&tok, &tpl, &[Message::new(Role::User, *p)]))
    .collect();
    let opts = GenerateOptions {
        max_new_tokens: 12,
        stop_ids: stop.clone(),
        ..Default::default()
    };
    let single = singles(&model, &prompts, &opts);
    let batch = generate_batch(&model, &prompts, &opts).expect("batch");
    assert_rows_equal(&batch, &single, "demo greedy");
    let text = tok.decode(&batch[0].tokens, true).expect("decode");
    assert!(text.contains("Paris"), "{text:?}");

    // regenerate's turn 2 sees the target's own answer to turn 1.
    let conv = PromptConversation {
        id: "mt".into(),
        line: 1,
        messages: vec![
            Message::new(Role::User, "What is the capital of France?"),
            Message::new(Role::User, "And what is the capital of Italy?"),
        ],
        category: None,
    };
    let regen = Regenerator {
        model: &model,
        tokenizer: &tok,
        template: &tpl,
        system: None,
        opts: opts.clone(),
    };
    let mut n = 0;
    let out = regen.run_batch(&[&conv], || n += 1).expect("regenerate");
    let r = &out[0];
    assert_eq!(r.answers.len(), 2);
    assert_eq!(n, r.new_tokens);
    assert!(r.answers[0].contains("Paris"), "{:?}", r.answers);
    let ctx = [
        Message::new(Role::User, "What is the capital of France?"),
        Message::new(Role::Assistant, r.answers[0].clone()),
        Message::new(Role::User, "And what is the capital of Italy?"),
    ];
    let g = generate(&model, &chat_ids(&tok, &tpl, &ctx), &opts, |_| {}).expect("generate");
    let content: Vec<i64> = g.tokens.into_iter().filter(|t| !stop.contains(t)).collect();
    assert_eq!(r.answers[1], tok.decode(&content, true).expect("decode"));
    let roles: Vec<Role> = r.messages.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::User, Role::Assistant, Role::User, Role::Assistant]);
}

const THREE: &str = r#"{"id": "conv-a", "conversations": [{"from": "human", "value": "What is the capital of France?"}, {"from": "gpt", "value": "OLD ANSWER"}, {"from": "human", "value": "And of Germany?"}, {"from": "gpt", "value": "OLD ANSWER"}]}
{"messages": [{"role": "system", "content": "You answer in one short sentence."}, {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "OLD ANSWER"}]}

{"question_id": 7, "turns": ["Name a colour.", "Name another one."]}
"#;

fn regenerate(input: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let model = demo_model();
    let mut args = vec![
        "regenerate",
        "--target",
        model.to_str().expect("utf8"),
        "--in",
        input.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
        "--max-new-tokens",
        "10",
        "--batch-size",
        "2",
    ];
    args.extend_from_slice(extra);
    forge(&args)
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each output line is JSON"))
        .collect()
}

#[test]
fn cli_regenerates_resumes_and_recovers() {
    let dir = tmp_dir("regenerate-cli");
    let input = dir.join("in.jsonl");
    let out = dir.join("out.jsonl");
    std::fs::write(&input, THREE).expect("write input");

    // First run stops after two conversations (--limit), like an interrupted run.
    let o = regenerate(&input, &out, &["--limit", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(records(&out).len(), 2);
    let first = std::fs::read_to_string(&out).expect("out");

    // Second run appends the missing one only.
    let o = regenerate(&input, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("1 conversations to answer") && err.contains("2 already in"),
        "{err}"
    );
    let full = std::fs::read_to_string(&out).expect("out");
    assert!(full.starts_with(&first), "resume must not rewrite finished records");
    let recs = records(&out);
    let ids: Vec<&str> = recs.iter().map(|r| r["id"].as_str().expect("id")).collect();
    assert_eq!(ids, ["conv-a", "regen-1", "7"]);
    let froms = |r: &serde_json::Value| -> Vec<String> {
        r["conversations"]
            .as_array()
            .expect("conversations")
            .iter()
            .map(|t| t["from"].as_str().expect("from").to_string())
            .collect()
    };
    assert_eq!(froms(&recs[0]), ["human", "gpt", "human", "gpt"]);
    assert_eq!(froms(&recs[1]), ["system", "human", "gpt"]);
    assert_eq!(froms(&recs[2]), ["human", "gpt", "human", "gpt"]);
    assert_eq!(
        recs[1]["conversations"][0]["value"],
        "You answer in one short sentence."
    );
    assert_eq!(recs[2]["conversations"][2]["value"], "Name another one.");
    for r in &recs {
        for t in r["conversations"].as_array().expect("turns") {
            let v = t["value"].as_str().expect("value");
            assert!(
                !v.trim().is_empty() && !v.contains("OLD ANSWER") && !v.contains("<|im_end|>"),
                "{r}"
            );
        }
    }
    assert!(
        recs[0]["conversations"][1]["value"]
            .as_str()
            .expect("answer")
            .contains("Paris"),
        "{}",
        recs[0]
    );

    // Nothing left: a third run does nothing and does not load the model.
    let o = regenerate(&input, &out, &[]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to do"));

    // A record cut off by an interrupted write is dropped and regenerated (greedy: same text).
    let cut = full.len() - full.lines().last().expect("line").len() / 2 - 1;
    std::fs::write(&out, &full[..cut]).expect("truncate");
    let o = regenerate(&input, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("incomplete last record"), "{err}");
    assert_eq!(std::fs::read_to_string(&out).expect("out"), full);
}

#[test]
fn bad_input_lines_and_options_are_named() {
    let dir = tmp_dir("regenerate-bad");
    let input = dir.join("bad.jsonl");
    let out = dir.join("out.jsonl");
    let cases = [
        (
            "{\"prompt\": \"ok\"}\n{\"prompt\": \"unterminated\n",
            ":2: invalid JSON",
        ),
        (
            "{\"prompt\": \"ok\"}\n\n{\"conversations\": [{\"from\": \"robot\", \"value\": \"x\"}]}\n",
            ":3: conversations[0]: role 'robot' is not supported",
        ),
        ("{\"text\": \"hello\"}\n", ":1: expected \"conversations\""),
        (
            "{\"id\": 1, \"prompt\": \"a\"}\n{\"id\": \"1\", \"prompt\": \"b\"}\n",
            ":2: id '1' is already used on line 1",
        ),
        (
            "{\"conversations\": [{\"from\": \"gpt\", \"value\": \"hi\"}]}\n",
            ":1: no user turn to answer",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(&input, text).expect("write");
        let o = regenerate(&input, &out, &[]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&format!("bad.jsonl{want}")), "expected '{want}' in: {err}");
    }
    assert!(!out.exists(), "no output for bad input");
    std::fs::write(&input, "{\"prompt\": \"ok\"}\n").expect("write");
    for (flag, value) in [
        ("--top-p", "0"),
        ("--batch-size", "0"),
        ("--temperature", "-1"),
        ("--max-new-tokens", "0"),
    ] {
        let o = regenerate(&input, &out, &[flag, value]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(flag), "{flag}: {err}");
    }
    // --out holding something else is not appended to.
    std::fs::write(&out, "not json\n").expect("write");
    let o = regenerate(&input, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("out.jsonl:1"), "{err}");
}

#[test]
fn input_formats() {
    let text = r#"[
  {"id": "s", "system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"}]},
  {"messages": [{"role": "user", "content": [{"type": "text", "text": "Parts"}, {"type": "text", "text": " joined"}]}]},
  {"prompt": "Just a prompt", "system": "Sys"},
  {"question_id": 81, "category": "writing", "turns": ["One", "Two"]}
]"#;
    let convs = parse_prompts(text, Path::new("x.json")).expect("parse");
    let ids: Vec<&str> = convs.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["s", "regen-1", "regen-2", "81"]);
    let lines: Vec<usize> = convs.iter().map(|c| c.line).collect();
    assert_eq!(lines, [2, 3, 4, 5]);
    let shape = |c: &PromptConversation| -> Vec<(Role, String)> {
        c.messages.iter().map(|m| (m.role, m.content.clone())).collect()
    };
    assert_eq!(
        shape(&convs[0]),
        [
            (Role::System, "Be brief.".to_string()),
            (Role::User, "Hi".to_string()),
            (Role::User, "Bye".to_string())
        ]
    );
    assert_eq!(shape(&convs[1]), [(Role::User, "Parts joined".to_string())]);
    assert_eq!(convs[2].messages[0].role, Role::System);
    assert_eq!(convs[3].user_turns(), 2);
    // Context of turn 1 interleaves earlier answers; --system only where none is given.
    let ctx = convs[0].context(1, &["A0".to_string()], Some("ignored"));
    let roles: Vec<Role> = ctx.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::System, Role::User, Role::Assistant, Role::User]);
    assert_eq!(ctx[2].content, "A0");
    let ctx = convs[3].context(0, &[], Some("Default"));
    assert_eq!(ctx[0], Message::new(Role::System, "Default"));
    let err = parse_prompts("[{\"prompt\": 1}]", Path::new("y.json")).expect_err("bad prompt");
    assert!(
        err.to_string().starts_with("y.json:1: \"prompt\" must be a string"),
        "{err}"
    );
    // The demo prompt set parses.
    let demo = read_prompts(&forge_tests::root().join("recipes/data/demo_prompts.jsonl")).expect("demo prompts");
    assert!(demo.len() >= 150, "{}", demo.len());
    assert!(demo.iter().filter(|c| c.user_turns() == 2).count() >= 15);
}
