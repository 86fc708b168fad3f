//! Data: readers, loss masks, token cache, batching/sharding, vocabulary mapping, hidden-state
//! shards, and the prepare-data / prepare-hidden commands.

use forge_data::batch::{global_plan, global_plan_grouped, rank_plan, shard_plan, PlanOptions};
use forge_data::conversation::{parse_conversations, read_conversations};
use forge_data::dataset::{load_dataset, tokenize_conversation, CacheStatus, DropReason, TokenizeOptions};
use forge_data::hidden::{
    bf16_bytes_to_f32, f32_to_bf16_bytes, HiddenDataset, HiddenManifest, HiddenSettings, HiddenWriter, SampleRows,
    HIDDEN_FORMAT,
};
use forge_data::{ChatTemplate, Conversation, Message, Role, TextTokenizer, TokenDataset, VocabMapping};
use forge_tests::{demo_model, forge, tmp_dir};
use std::collections::HashSet;
use std::path::Path;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write test file");
}

fn roles(c: &Conversation) -> Vec<Role> {
    c.messages.iter().map(|m| m.role).collect()
}

#[test]
fn readers_accept_every_format() {
    let dir = tmp_dir("data-readers");
    let jsonl = dir.join("mixed.jsonl");
    write(
        &jsonl,
        r#"{"id": "a", "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}

{"id": 7, "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}
{"messages": [{"role": "user", "content": [{"type": "text", "text": "part1 "}, {"type": "text", "text": "part2"}]}, {"role": "assistant", "content": "ok"}]}
{"system": "be brief", "conversations": [{"from": "human", "value": "call"}, {"from": "function_call", "value": "{\"name\": \"f\"}"}, {"from": "observation", "value": "42"}, {"from": "gpt", "value": "It is 42."}]}
"#,
    );
    let r = read_conversations(&jsonl, false).expect("read jsonl");
    assert!(r.skipped.is_empty());
    let c = &r.conversations;
    assert_eq!(c.len(), 4);
    assert_eq!(c[0].id, "a");
    assert_eq!(roles(&c[0]), [Role::System, Role::User, Role::Assistant]);
    assert_eq!(c[0].trainable, [false, false, true]);
    assert_eq!(c[1].id, "7");
    assert_eq!(c[1].messages[1], Message::new(Role::Assistant, "r"));
    // default id: file stem and line (line 3 is blank, so the third record is on line 4)
    assert_eq!(c[2].id, "mixed:4");
    assert_eq!(c[2].messages[0].content, "part1 part2");
    assert_eq!(
        roles(&c[3]),
        [Role::System, Role::User, Role::Assistant, Role::Tool, Role::Assistant]
    );
    // function_call and observation turns are never trained on
    assert_eq!(c[3].trainable, [false, false, false, false, true]);

    let json = dir.join("array.json");
    write(
        &json,
        "[\n  {\"conversations\": [{\"from\": \"human\", \"value\": \"x\"}, {\"from\": \"gpt\", \"value\": \"y\"}]},\n  {\"messages\": [{\"role\": \"user\", \"content\": \"u\"}, {\"role\": \"assistant\", \"content\": \"v\"}]}\n]\n",
    );
    let r = read_conversations(&json, false).expect("read json array");
    assert_eq!(r.conversations.len(), 2);
    assert_eq!(r.conversations[0].id, "array:2");
    assert_eq!(r.conversations[1].id, "array:3");
    assert_eq!(r.conversations[1].messages[1].content, "v");
}

#[test]
fn malformed_records_name_file_and_line() {
    let p = Path::new("dir/data.jsonl");
    let good = r#"{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}"#;
    let cases = [
        ("{not json", "invalid JSON"),
        (r#"{"turns": []}"#, "no \"conversations\" or \"messages\""),
        (
            r#"{"conversations": [{"from": "robot", "value": "x"}]}"#,
            "unknown role \"robot\"",
        ),
        (
            r#"{"conversations": [{"from": "human"}]}"#,
            "conversations[0]: missing \"value\"",
        ),
        (
            r#"{"messages": [{"role": "user", "content": null}]}"#,
            "content is null",
        ),
        (r#"{"conversations": "x"}"#, "must be a list"),
        ("[1, 2]", "expected a JSON object"),
    ];
    for (bad, want) in cases {
        let text = format!("{good}\n{good}\n{bad}\n{good}\n");
        let err = parse_conversations(&text, p, false).expect_err(bad).to_string();
        assert!(err.contains("dir/data.jsonl:3:"), "{bad}: {err}");
        assert!(err.contains(want), "{bad}: {err}");
        assert!(err.contains("skip_invalid"), "the error says how to skip: {err}");
        // skip_invalid: skipped and counted, never silent
        let r = parse_conversations(&text, p, true).expect("skip");
        assert_eq!(r.conversations.len(), 3);
        assert_eq!(r.skipped.len(), 1);
        assert_eq!(r.skipped[0].line, 3);
        assert!(r.skipped[0].to_string().starts_with("dir/data.jsonl:3: "));
    }
    // JSON arrays: syntax errors carry line:col, bad elements the line they start on
    let err = parse_conversations("[\n{\"a\": 1,,}\n]", Path::new("x.json"), false)
        .expect_err("syntax")
        .to_string();
    assert!(err.starts_with("x.json:2:"), "{err}");
    let text = format!("[\n  {good},\n  {{\"messages\": 5}}\n]");
    let err = parse_conversations(&text, Path::new("x.json"), false)
        .expect_err("element")
        .to_string();
    assert!(err.starts_with("x.json:3: "), "{err}");
}

fn demo_tok() -> (TextTokenizer, ChatTemplate) {
    let dir = demo_model();
    let tok = TextTokenizer::from_dir(&dir).expect("tokenizer");
    let tpl = ChatTemplate::detect(&dir).expect("template");
    (tok, tpl)
}

fn opts(max_length: usize) -> TokenizeOptions {
    TokenizeOptions {
        max_length,
        train_only_last_turn: false,
        skip_invalid: false,
    }
}

fn conv(turns: &[(Role, &str)]) -> Conversation {
    Conversation {
        id: "t".into(),
        messages: turns.iter().map(|(r, c)| Message::new(*r, *c)).collect(),
        trainable: turns.iter().map(|(r, _)| *r == Role::Assistant).collect(),
    }
}

/// Decodes the masked runs of a sample: one string per contiguous trainable span.
fn masked_runs(tok: &TextTokenizer, ids: &[u32], mask: &[u8]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur: Vec<i64> = Vec::new();
    for (&t, &m) in ids.iter().zip(mask) {
        if m == 1 {
            cur.push(t as i64);
        } else if !cur.is_empty() {
            runs.push(tok.decode(&cur, false).expect("decode"));
            cur.clear();
        }
    }
    if !cur.is_empty() {
        runs.push(tok.decode(&cur, false).expect("decode"));
    }
    runs
}

#[test]
fn loss_mask_covers_exactly_the_assistant_turns() {
    let (tok, tpl) = demo_tok();
    let c = conv(&[
        (Role::System, "You are terse."),
        (Role::User, "Name a colour."),
        (Role::Assistant, "Blue, like the sky."),
        (Role::User, "And a number?"),
        (Role::Assistant, "42 \n(with spaces) "),
    ]);
    let s = tokenize_conversation(&tok, &tpl, &c, &opts(4096))
        .expect("tokenize")
        .expect("kept");
    // the ids are the tokenisation of the rendered text
    let text = tpl.render(&c.messages, false);
    let whole: Vec<u32> = tok.encode(&text).expect("encode").iter().map(|&i| i as u32).collect();
    assert_eq!(s.input_ids, whole);
    assert_eq!(
        masked_runs(&tok, &s.input_ids, &s.loss_mask),
        ["Blue, like the sky.<|im_end|>", "42 \n(with spaces) <|im_end|>"]
    );
    // only the last turn
    let last = TokenizeOptions {
        train_only_last_turn: true,
        ..opts(4096)
    };
    let s2 = tokenize_conversation(&tok, &tpl, &c, &last)
        .expect("tokenize")
        .expect("kept");
    assert_eq!(s2.input_ids, s.input_ids);
    assert_eq!(
        masked_runs(&tok, &s2.input_ids, &s2.loss_mask),
        ["42 \n(with spaces) <|im_end|>"]
    );
    // a leading space merges with the template's "\n" into one token that starts before the
    // content: it is prompt-side (never generated at inference), so it is not trained on
    let lead = conv(&[(Role::User, "q"), (Role::Assistant, " 42")]);
    let s3 = tokenize_conversation(&tok, &tpl, &lead, &opts(4096))
        .expect("tokenize")
        .expect("kept");
    assert_eq!(masked_runs(&tok, &s3.input_ids, &s3.loss_mask), ["42<|im_end|>"]);
    // truncation keeps the prefix; nothing trainable left -> dropped with its reason
    let first_trainable = s.loss_mask.iter().position(|&m| m == 1).expect("some");
    let cut = tokenize_conversation(&tok, &tpl, &c, &opts(first_trainable + 2))
        .expect("tokenize")
        .expect("kept");
    assert!(cut.truncated);
    assert_eq!(cut.input_ids, s.input_ids[..first_trainable + 2]);
    assert_eq!(cut.loss_mask.iter().filter(|&&m| m == 1).count(), 2);
    let gone = tokenize_conversation(&tok, &tpl, &c, &opts(first_trainable)).expect("tokenize");
    assert_eq!(gone, Err(DropReason::TruncatedAway));
    let none = conv(&[(Role::User, "only a question")]);
    assert_eq!(
        tokenize_conversation(&tok, &tpl, &none, &opts(100)).expect("tokenize"),
        Err(DropReason::NoAssistantTurn)
    );
}

#[test]
fn token_cache_hits_on_the_second_run_and_follows_its_key() {
    let (tok, tpl) = demo_tok();
    let dir = tmp_dir("data-cache");
    let data = dir.join("d.jsonl");
    let mut text = String::new();
    for i in 0..40 {
        text.push_str(&format!(
            "{{\"id\": \"c{i}\", \"conversations\": [{{\"from\": \"human\", \"value\": \"Question {i}?\"}}, {{\"from\": \"gpt\", \"value\": \"Answer number {i}, {}\"}}]}}\n",
            "and more words ".repeat(i % 7)
        ));
    }
    text.push_str("{\"conversations\": [{\"from\": \"human\", \"value\": \"no answer\"}]}\n");
    write(&data, &text);
    let cache = dir.join("cache");
    let files = vec![data.clone()];
    let none = |_: u64, _: u64| {};
    let a = load_dataset(&files, &tok, &tpl, &opts(64), Some(&cache), &none).expect("build");
    assert!(matches!(a.statuses[0], CacheStatus::Built(_)), "{:?}", a.statuses);
    assert_eq!(a.dataset.len(), 40);
    assert_eq!(a.dataset.stats.conversations, 41);
    assert_eq!(a.dataset.stats.dropped_no_assistant, 1);
    let calls = std::sync::atomic::AtomicU64::new(0);
    let count = |_: u64, _: u64| {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let b = load_dataset(&files, &tok, &tpl, &opts(64), Some(&cache), &count).expect("hit");
    assert!(matches!(b.statuses[0], CacheStatus::Hit(_)), "{:?}", b.statuses);
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no tokenisation on a hit"
    );
    assert_eq!(a.dataset, b.dataset);
    assert_eq!(a.key, b.key);
    // another max_length, another cache entry
    let c = load_dataset(&files, &tok, &tpl, &opts(16), Some(&cache), &none).expect("other key");
    assert!(matches!(c.statuses[0], CacheStatus::Built(_)));
    assert_ne!(c.key, a.key);
    assert!(c.dataset.stats.truncated + c.dataset.stats.dropped_truncated_away > 0);
    // a changed data file is re-tokenised
    write(&data, &text.replace("Question 3?", "Question three?"));
    let d = load_dataset(&files, &tok, &tpl, &opts(64), Some(&cache), &none).expect("rebuilt");
    assert!(matches!(d.statuses[0], CacheStatus::Built(_)));
    assert_ne!(d.dataset, a.dataset);
    // two files concatenate in order
    let e = load_dataset(
        &[data.clone(), data.clone()],
        &tok,
        &tpl,
        &opts(64),
        Some(&cache),
        &none,
    )
    .expect("two files");
    assert_eq!(e.dataset.len(), 80);
    assert_eq!(e.dataset.input_ids(41), d.dataset.input_ids(1));
}

#[test]
fn epoch_plans_are_deterministic_disjoint_and_complete_per_rank() {
    let lengths: Vec<usize> = (0..103).map(|i| 5 + (i * 37) % 91).collect();
    for mb in [1usize, 2, 4, 7] {
        let o = PlanOptions {
            micro_batch_size: mb,
            seed: 11,
            shuffle: true,
            length_grouping: true,
        };
        let g0 = global_plan(&lengths, 0, &o);
        assert_eq!(g0, global_plan(&lengths, 0, &o), "deterministic");
        assert_ne!(g0, global_plan(&lengths, 1, &o), "epochs differ");
        assert_ne!(
            g0,
            global_plan(&lengths, 0, &PlanOptions { seed: 12, ..o }),
            "seeds differ"
        );
        for world in 1..=4 {
            let plans: Vec<Vec<Vec<usize>>> = (0..world).map(|r| rank_plan(&lengths, 3, &o, r, world)).collect();
            let steps = plans[0].len();
            assert!(plans.iter().all(|p| p.len() == steps), "same number of micro-batches");
            let mut seen = HashSet::new();
            for p in &plans {
                for b in p {
                    assert!(b.len() <= mb);
                    for &i in b {
                        assert!(seen.insert(i), "sample {i} on two ranks (mb {mb}, world {world})");
                    }
                }
            }
            assert_eq!(seen.len(), lengths.len(), "every sample once (mb {mb}, world {world})");
            // rank r at step s holds global micro-batch s*world + r
            let g = global_plan(&lengths, 3, &o);
            for (r, p) in plans.iter().enumerate() {
                for (s, b) in p.iter().enumerate() {
                    assert_eq!(Some(b), g.get(s * world + r).or(Some(&Vec::new())));
                }
            }
        }
    }
    // length grouping pads less than random batching
    let pad = |plan: &[Vec<usize>]| -> usize {
        plan.iter()
            .map(|b| {
                let m = b.iter().map(|&i| lengths[i]).max().unwrap_or(0);
                b.iter().map(|&i| m - lengths[i]).sum::<usize>()
            })
            .sum()
    };
    let o = PlanOptions {
        micro_batch_size: 8,
        seed: 1,
        shuffle: true,
        length_grouping: true,
    };
    let grouped = global_plan(&lengths, 0, &o);
    let random = global_plan(
        &lengths,
        0,
        &PlanOptions {
            length_grouping: false,
            ..o
        },
    );
    assert!(
        pad(&grouped) * 3 < pad(&random),
        "{} vs {}",
        pad(&grouped),
        pad(&random)
    );
    // shard-grouped plans visit one group at a time and still cover everything
    let groups = vec![0..40, 40..80, 80..103];
    let plan = global_plan_grouped(&lengths, &groups, 2, &o);
    let mut all: Vec<usize> = plan.iter().flatten().copied().collect();
    let group_of = |i: usize| groups.iter().position(|g| g.contains(&i)).expect("group");
    let order: Vec<usize> = plan.iter().map(|b| group_of(b[0])).collect();
    let mut changes = order.windows(2).filter(|w| w[0] != w[1]).count();
    changes += 1;
    assert_eq!(changes, 3, "each group visited in one run");
    all.sort();
    assert_eq!(all, (0..103).collect::<Vec<_>>());
    assert_eq!(shard_plan(plan.clone(), 1, 2).len(), plan.len().div_ceil(2));
}

#[test]
fn vocab_mapping_is_consistent_and_keeps_the_most_frequent_tokens() {
    // token t appears t times on trainable positions (plus noise on masked ones)
    let mut ds = TokenDataset {
        offsets: vec![0],
        ..Default::default()
    };
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for t in 0..50u32 {
        for _ in 0..t {
            ids.push(t);
            mask.push(1u8);
        }
        ids.push(49 - t);
        mask.push(0);
        for _ in 0..100 {
            ids.push(3);
            mask.push(0); // frequent but never trainable
        }
    }
    ds.ids.push("all".into());
    ds.tokens = ids;
    ds.loss_mask = mask;
    ds.offsets.push(ds.tokens.len() as u64);
    let m = VocabMapping::build(&ds, 64, 10).expect("build");
    assert_eq!(m.draft_vocab(), 10);
    for i in 0..10 {
        let t = (i as i64 + m.d2t[i]) as usize;
        assert!(m.t2d[t], "t2d[i + d2t[i]] for i = {i}");
        assert_eq!(t, 40 + i, "the 10 most frequent trainable tokens are 40..49, ascending");
    }
    assert_eq!(m.t2d.iter().filter(|&&b| b).count(), 10);
    m.check().expect("consistent");
    let want_cov = (40..50).sum::<u64>() as f64 / (0..50).sum::<u64>() as f64;
    assert!((m.coverage() - want_cov).abs() < 1e-12);
    // fewer distinct tokens than the draft vocabulary: filled with the lowest unused ids
    let big = VocabMapping::build(&ds, 64, 60).expect("fill");
    big.check().expect("consistent");
    assert!(big.t2d[..60].iter().take(50).all(|&b| b));
    assert_eq!(big.t2d.iter().filter(|&&b| b).count(), 60);
    assert!(VocabMapping::build(&ds, 64, 65).is_err());
    // safetensors round trip (d2t int64, t2d bool)
    let dir = tmp_dir("data-vocab");
    let p = dir.join("v.safetensors");
    m.save(&p).expect("save");
    assert_eq!(VocabMapping::load(&p).expect("load"), m);
}

fn settings(n: usize, per_shard: usize, h: usize, aux: Vec<usize>, topk: usize) -> HiddenSettings {
    HiddenSettings {
        format: HIDDEN_FORMAT.into(),
        target: "t".into(),
        target_fingerprint: "f".into(),
        data_key: "k".into(),
        hidden_size: h,
        last_hidden: true,
        aux_layers: aux,
        topk,
        dtype: forge_data::HiddenDtype::Bf16,
        samples_per_shard: per_shard,
        num_samples: n,
    }
}

#[test]
fn hidden_shards_round_trip_bit_exact_and_resume() {
    let dir = tmp_dir("data-hidden");
    let (n, h, a, k) = (7usize, 8usize, 2usize, 3usize);
    let mut rows = Vec::new();
    for s in 0..n {
        let t = 3 + s;
        let f: Vec<f32> = (0..t * h).map(|j| ((s * 131 + j * 17) as f32).sin() * 3.0).collect();
        let g: Vec<f32> = (0..t * h * a).map(|j| ((s + j) as f32 * 0.37).cos()).collect();
        rows.push(SampleRows {
            id: format!("s{s}"),
            input_ids: (0..t as u32).map(|x| x * 3 + s as u32).collect(),
            loss_mask: (0..t).map(|x| (x % 2) as u8).collect(),
            hidden_state: f32_to_bf16_bytes(&f),
            aux_hidden_state: f32_to_bf16_bytes(&g),
            topk_ids: (0..(t * k) as i32).collect(),
            topk_logprobs: f32_to_bf16_bytes(&vec![-0.5; t * k]),
            ..Default::default()
        });
    }
    let st = settings(n, 3, h, vec![1, 4], k);
    let mut w = HiddenWriter::open(&dir, st.clone()).expect("open");
    assert_eq!(w.pending_shards(), [0, 1, 2]);
    // write shards 0 and 2, then "crash"
    w.write_shard(0, &rows[0..3]).expect("shard 0");
    w.write_shard(2, &rows[6..7]).expect("shard 2");
    drop(w);
    assert!(HiddenDataset::open(&dir).is_err(), "incomplete datasets are refused");
    // other settings are refused, naming what differs
    let mut other = st.clone();
    other.aux_layers = vec![2];
    let err = HiddenWriter::open(&dir, other).err().expect("refused").to_string();
    assert!(err.contains("aux_layers"), "{err}");
    // resume: only shard 1 is left
    let mut w = HiddenWriter::open(&dir, st.clone()).expect("reopen");
    assert_eq!(w.pending_shards(), [1]);
    w.write_shard(1, &rows[3..6]).expect("shard 1");
    assert!(w.manifest().complete);
    let m = HiddenManifest::read(&dir).expect("manifest");
    assert_eq!(m.tokens, rows.iter().map(|r| r.input_ids.len() as u64).sum::<u64>());
    let mut ds = HiddenDataset::open(&dir).expect("open complete");
    assert_eq!(ds.len(), n);
    assert_eq!(ds.lengths(), rows.iter().map(|r| r.input_ids.len()).collect::<Vec<_>>());
    for (i, r) in rows.iter().enumerate() {
        let v = ds.sample(i).expect("sample");
        assert_eq!(v.id, r.id);
        assert_eq!(v.input_ids, &r.input_ids[..]);
        assert_eq!(v.loss_mask, &r.loss_mask[..]);
        assert_eq!(v.hidden_state, &r.hidden_state[..], "bit-exact hidden_state");
        assert_eq!(v.aux_hidden_state, &r.aux_hidden_state[..], "bit-exact aux");
        assert_eq!(v.topk_ids, &r.topk_ids[..]);
        assert_eq!(v.topk_logprobs, &r.topk_logprobs[..]);
    }
    // bf16 conversion matches torch's rounding
    let x = [1.0f32, -2.5, 2.71, 1e-3, 65504.0, 1.003_906_2, 1.011_718_8];
    let t = tch::Tensor::from_slice(&x)
        .to_kind(tch::Kind::BFloat16)
        .to_kind(tch::Kind::Float);
    let want: Vec<f32> = Vec::try_from(&t).expect("f32");
    assert_eq!(bf16_bytes_to_f32(&f32_to_bf16_bytes(&x)), want);
}

fn demo_recipe(dir: &Path, kind: &str, data: &Path) -> std::path::PathBuf {
    let drafter = match kind {
        "eagle3" => "kind: eagle3\n  draft_vocab_size: 500",
        _ => "kind: medusa",
    };
    let p = dir.join(format!("{kind}.yaml"));
    write(
        &p,
        &format!(
            "drafter:\n  {drafter}\ntarget:\n  path: {}\ndata:\n  train: [{}]\n  max_length: 64\n  cache_dir: {}\ncheckpoint:\n  dir: {}\nlog:\n  progress: false\n",
            demo_model().display(),
            data.display(),
            dir.join("cache").display(),
            dir.join("run").display()
        ),
    );
    p
}

const CONVS: &str = r#"{"id": "a", "conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "2+2 is 4."}]}
{"id": "b", "conversations": [{"from": "human", "value": "Name three fruits."}, {"from": "gpt", "value": "Apple, banana and cherry."}, {"from": "human", "value": "One more?"}, {"from": "gpt", "value": "Mango."}]}
{"id": "c", "conversations": [{"from": "human", "value": "Say hi"}]}
{"id": "d", "conversations": [{"from": "system", "value": "You answer in French."}, {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Bonjour ! Comment puis-je vous aider ?"}]}
"#;

#[test]
fn prepare_data_command_reports_counts_and_uses_the_cache() {
    let dir = tmp_dir("data-prepare");
    let data = dir.join("convs.jsonl");
    write(&data, CONVS);
    let recipe = demo_recipe(&dir, "eagle3", &data);
    let run = || {
        let out = forge(&["prepare-data", recipe.to_str().expect("utf8"), "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let first = run();
    let d = &first["data"][0];
    assert_eq!(d["conversations"], 4);
    assert_eq!(d["samples"], 3);
    assert_eq!(d["dropped"]["no_assistant_tokens"], 1);
    assert_eq!(d["caches"][0]["cache"], "built");
    assert_eq!(first["vocab_mapping"]["draft_vocab_size"], 500);
    let second = run();
    assert_eq!(second["data"][0]["caches"][0]["cache"], "hit");
    assert_eq!(second["vocab_mapping"]["cache"]["cache"], "hit");
    assert_eq!(second["data"][0]["tokens"], d["tokens"]);
    // a malformed line stops the command with file:line, and skip_invalid counts it
    let bad = dir.join("bad.jsonl");
    write(
        &bad,
        &format!("{CONVS}{{\"conversations\": [{{\"from\": \"gpt\"}}]}}\n"),
    );
    let recipe = demo_recipe(&dir, "medusa", &bad);
    let out = forge(&["prepare-data", recipe.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.jsonl:5:") && err.contains("missing \"value\""),
        "{err}"
    );
    let out = forge(&[
        "prepare-data",
        recipe.to_str().expect("utf8"),
        "--set",
        "data.skip_invalid=true",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 malformed records skipped"), "{text}");
    assert!(text.contains("bad.jsonl:5:"), "{text}");
}

#[test]
fn prepare_hidden_stores_the_target_states_and_resumes() {
    use forge_models::{Capture, DType, LogitsMode, TargetModel};
    let dir = tmp_dir("data-prepare-hidden");
    let data = dir.join("convs.jsonl");
    write(&data, CONVS);
    let recipe = demo_recipe(&dir, "eagle3", &data);
    let out_dir = dir.join("hidden");
    let args = [
        "prepare-hidden",
        recipe.to_str().expect("utf8"),
        "--out",
        out_dir.to_str().expect("utf8"),
        "--samples-per-shard",
        "2",
        "--batch-size",
        "2",
    ];
    let out = forge(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3 samples in 2 shard(s) (2 written now"), "{text}");
    let mut ds = HiddenDataset::open(&out_dir).expect("open");
    let st = ds.settings().clone();
    assert_eq!(
        st.aux_layers,
        [1, 14, 26],
        "EAGLE-3 default layers of a 30-layer target"
    );
    assert_eq!(st.hidden_size, 576);
    // bytes per token: ids (4) + mask (1) + 4 x 576 bf16
    let m = HiddenManifest::read(&out_dir).expect("manifest");
    let payload = 4.0 + 1.0 + 4.0 * 576.0 * 2.0;
    assert!(
        m.bytes_per_token >= payload && m.bytes_per_token < payload * 1.05,
        "{}",
        m.bytes_per_token
    );
    // the stored states are the target's, rounded to bf16, sample by sample
    let model = TargetModel::load(&demo_model(), DType::F32, tch::Device::Cpu).expect("demo target");
    let capture = Capture {
        layers: vec![1, 14, 26],
        logits: LogitsMode::None,
    };
    for i in 0..ds.len() {
        let v = ds.sample(i).expect("sample");
        let ids: Vec<i64> = v.input_ids.iter().map(|&x| x as i64).collect();
        let t = ids.len() as i64;
        let o = tch::no_grad(|| model.forward(&tch::Tensor::from_slice(&ids).view([1, t]), None, None, None, &capture))
            .expect("forward");
        let hid = bf16_bytes_to_f32(v.hidden_state);
        let want: Vec<f32> = Vec::try_from(&o.hidden_normed.view([-1])).expect("f32");
        let aux = bf16_bytes_to_f32(v.aux_hidden_state);
        let want_aux: Vec<f32> = Vec::try_from(&tch::Tensor::cat(&o.layers, -1).view([-1])).expect("f32");
        for (got, want) in [(&hid, &want), (&aux, &want_aux)] {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want.iter()) {
                // bf16 rounding (2^-8 relative) plus batched-vs-single float noise
                assert!((g - w).abs() <= 1e-2 * w.abs().max(1.0), "sample {i}: {g} vs {w}");
            }
        }
    }
    // resume: a lost shard is redone, the other kept untouched
    let keep = std::fs::read(out_dir.join("shard_00000.safetensors")).expect("read");
    std::fs::remove_file(out_dir.join("shard_00001.safetensors")).expect("rm");
    let out = forge(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(1 written now, 1 already there)"), "{text}");
    assert_eq!(
        std::fs::read(out_dir.join("shard_00000.safetensors")).expect("read"),
        keep
    );
    assert!(HiddenDataset::open(&out_dir).is_ok());
    // a finished dataset is not recomputed
    let out = forge(&args);
    assert!(String::from_utf8_lossy(&out.stdout).contains("(0 written now, 2 already there)"));
}
