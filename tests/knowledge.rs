//! The knowledge drafter: layers sampled from the target, knowledge-cache cross-attention,
//! KL + acceptance loss, an independent draft with its own KV cache
//! (models/src/drafters/knowledge.rs, docs/methods/knowledge.md).

use forge_models::drafters::knowledge::{
    kl_and_rejection, kl_and_rejection_topk, uniform_layers, CacheSpec, Knowledge, KnowledgeSpec,
};
use forge_models::drafters::{Drafter, TargetAccess};
use forge_models::generate::{RowRng, Sampling};
use forge_models::speculative::StepFeatures;
use forge_models::{Capture, LogitsMode, TargetModel};
use forge_tests::{forge, losses, max_abs_diff, random_target_from, reinit_trainable, tiny_config, TestRng, TinyRun};
use tch::{Device, Kind, Tensor};

fn target(model_type: &str, layers: i64, seed: i64) -> TargetModel {
    let mut cfg = tiny_config(model_type);
    cfg["num_hidden_layers"] = layers.into();
    random_target_from(cfg, seed)
}

pub(crate) fn spec(t: &TargetModel, layers: Vec<i64>, cache: Option<(i64, i64)>) -> KnowledgeSpec {
    KnowledgeSpec {
        layers,
        transition: true,
        kl_weight: 0.8,
        acceptance_weight: 0.3,
        ce_weight: 0.0,
        temperature: 1.0,
        target_topk: 0,
        cache: cache.map(|(tokens, dim)| CacheSpec {
            path: "unused".into(),
            tokens,
            dim,
            entries: 1,
            target_fingerprint: String::new(),
            data_hash: String::new(),
            questions: Vec::new(),
        }),
        num_draft_tokens: 5,
        new_lr_scale: 10.0,
        target: t.config.raw.clone(),
    }
}

fn build(t: &TargetModel, s: KnowledgeSpec) -> Knowledge {
    Knowledge::new(s, &TargetAccess::Model(t), Device::Cpu, Kind::Float).expect("knowledge")
}

/// A draft with a random knowledge cache in its buffers and random weights everywhere,
/// the knowledge blocks' and transitions' zero-initialised ones included (so that they act).
pub(crate) fn with_random_cache(t: &TargetModel, layers: Vec<i64>) -> Knowledge {
    let m = build(t, spec(t, layers, Some((12, 16))));
    randomize(&m);
    m
}

pub(crate) fn randomize(m: &Knowledge) {
    reinit_trainable(m.var_store(), 4);
    tch::no_grad(|| {
        for (n, mut v) in m.var_store().variables() {
            let zero = v.abs().max().double_value(&[]) == 0.0;
            if n.starts_with("knowledge.") || zero {
                let scale = if n.starts_with("knowledge.") { 1.0 } else { 0.1 };
                v.copy_(&TestRng::for_name(9, &n).normal_tensor(&v.size(), scale));
            }
        }
    });
}

fn logits_of(t: &TargetModel, seq: &[i64]) -> Tensor {
    let ids = Tensor::from_slice(seq).view([1, -1]);
    let out = tch::no_grad(|| t.forward(&ids, None, None, None, &Capture::logits(LogitsMode::All))).expect("forward");
    out.logits.expect("logits")
}

fn seq() -> Vec<i64> {
    vec![1, 17, 42, 5, 66, 23, 9, 80, 80, 12, 7, 31, 55, 60, 2, 44]
}

#[test]
fn uniform_sampling_spreads_the_layers_from_the_first_to_the_last() {
    assert_eq!(uniform_layers(6, 28), vec![0, 5, 11, 16, 22, 27]);
    assert_eq!(uniform_layers(6, 30), vec![0, 6, 12, 17, 23, 29]);
    assert_eq!(uniform_layers(2, 4), vec![0, 3]);
    assert_eq!(uniform_layers(4, 4), vec![0, 1, 2, 3]);
    assert_eq!(uniform_layers(1, 28), vec![0]);
}

/// Every layer sampled and no knowledge blocks: the draft is the target (its layers, norm,
/// embedding and lm_head copied or shared; transitions start at zero). Llama, Qwen2 (biases)
/// and Qwen3 (q/k norms).
#[test]
fn every_layer_sampled_without_knowledge_reproduces_the_target_logits() {
    for (mt, seed) in [("llama", 3), ("qwen2", 4), ("qwen3", 5)] {
        let t = target(mt, 3, seed);
        let m = build(&t, spec(&t, vec![0, 1, 2], None));
        let got = tch::no_grad(|| m.logits(&Tensor::from_slice(&seq()).view([1, -1]))).expect("draft");
        let want = logits_of(&t, &seq());
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{mt}: draft logits differ from the target's by {d}");
    }
    // a subset: the target's layers 0 and 2 alone, in order
    let t = target("llama", 3, 6);
    let m = build(&t, spec(&t, vec![0, 2], None));
    let ids = Tensor::from_slice(&seq()).view([1, -1]);
    let got = tch::no_grad(|| m.logits(&ids)).expect("draft");
    let want = tch::no_grad(|| {
        let inputs = t.layer_inputs(1, seq().len() as i64, 0, None, None).expect("inputs");
        let x = t.run_layers(t.embed(&ids), 0..1, &inputs, None, None).expect("layer 0");
        let x = t.run_layers(x, 2..3, &inputs, None, None).expect("layer 2");
        t.logits(&t.final_norm(&x))
    });
    assert!(max_abs_diff(&got, &want) < 1e-5);
    // and with knowledge blocks, fresh ones add nothing (o_proj starts at zero)
    let m = build(&t, spec(&t, vec![0, 2], Some((12, 16))));
    let got_k = tch::no_grad(|| m.logits(&ids)).expect("draft");
    assert!(max_abs_diff(&got_k, &want) < 1e-5);
}

#[test]
fn kl_is_zero_for_identical_distributions_and_the_acceptance_loss_is_one_minus_the_overlap() {
    let mut rng = TestRng::new(1);
    let (z, y) = (rng.normal_tensor(&[5, 11], 2.0), rng.normal_tensor(&[5, 11], 2.0));
    let (kl, rej) = kl_and_rejection(&z, &z, 1.0);
    assert!(kl.double_value(&[]).abs() < 1e-6 && rej.double_value(&[]).abs() < 1e-6);
    for temp in [1.0, 2.0] {
        let (kl, rej) = kl_and_rejection(&z, &y, temp);
        // by hand, in f64: p the target's, q the draft's
        let (zd, yd) = (z.to_kind(Kind::Double) / temp, y.to_kind(Kind::Double) / temp);
        let (p, q) = (yd.softmax(-1, Kind::Double), zd.softmax(-1, Kind::Double));
        let kl_hand = (&p * (p.log() - q.log()))
            .sum_dim_intlist(-1, false, Kind::Double)
            .mean(Kind::Double)
            .double_value(&[])
            * temp
            * temp;
        let overlap = p
            .minimum(&q)
            .sum_dim_intlist(-1, false, Kind::Double)
            .mean(Kind::Double)
            .double_value(&[]);
        assert!(
            (kl.double_value(&[]) - kl_hand).abs() < 1e-5,
            "T {temp}: {} vs {kl_hand}",
            kl.double_value(&[])
        );
        assert!((rej.double_value(&[]) - (1.0 - overlap)).abs() < 1e-6, "T {temp}");
        assert!(kl_hand > 0.1 && overlap < 0.9);
    }
    // top-k with every token listed is the full version; with k < V it is over k + 1 bins
    let logp = y.log_softmax(-1, Kind::Float);
    let (vals, ids) = logp.topk(11, -1, true, true);
    let (a, b) = (kl_and_rejection(&z, &y, 1.0), kl_and_rejection_topk(&z, &vals, &ids));
    assert!(max_abs_diff(&a.0, &b.0) < 1e-5 && max_abs_diff(&a.1, &b.1) < 1e-6);
    let (vals, ids) = logp.topk(3, -1, true, true);
    let (kl3, rej3) = kl_and_rejection_topk(&z, &vals, &ids);
    let q = z
        .to_kind(Kind::Double)
        .softmax(-1, Kind::Double)
        .gather(-1, &ids, false);
    let p = vals.to_kind(Kind::Double).exp();
    let (pr, qr) = (
        p.sum_dim_intlist(-1, false, Kind::Double).neg() + 1.0,
        q.sum_dim_intlist(-1, false, Kind::Double).neg() + 1.0,
    );
    let kl_hand = ((&p * (p.log() - q.log())).sum_dim_intlist(-1, false, Kind::Double) + &pr * (pr.log() - qr.log()))
        .mean(Kind::Double);
    let ov = (p.minimum(&q).sum_dim_intlist(-1, false, Kind::Double) + pr.minimum(&qr)).mean(Kind::Double);
    assert!((kl3.double_value(&[]) - kl_hand.double_value(&[])).abs() < 1e-5);
    assert!((rej3.double_value(&[]) - (1.0 - ov.double_value(&[]))).abs() < 1e-6);
    // coarser bins: a smaller KL and a larger overlap than the full distributions'
    assert!(
        kl3.double_value(&[]) <= a.0.double_value(&[]) + 1e-6 && rej3.double_value(&[]) <= a.1.double_value(&[]) + 1e-6
    );
}

/// The gradient of 1 - sum min(p, q) with respect to the draft's logits, against central
/// finite differences in f64 (random logits: no ties between p and q).
#[test]
fn the_acceptance_loss_gradient_matches_finite_differences() {
    let mut rng = TestRng::new(2);
    let z = rng
        .normal_tensor(&[3, 7], 1.5)
        .to_kind(Kind::Double)
        .set_requires_grad(true);
    let y = rng.normal_tensor(&[3, 7], 1.5).to_kind(Kind::Double);
    let (kl, rej) = kl_and_rejection(&z, &y, 1.0);
    let grads = Tensor::run_backward(&[&rej], &[&z], true, false);
    let g = &grads[0];
    let kl_grads = Tensor::run_backward(&[&kl], &[&z], false, false);
    let eps = 1e-6;
    let zd = z.detach();
    let (mut worst, mut worst_kl) = (0.0f64, 0.0f64);
    for i in 0..3 {
        for j in 0..7 {
            let bump = |d: f64| {
                let zz = zd.copy();
                let _ = zz.get(i).get(j).fill_(zd.double_value(&[i, j]) + d);
                let (k, r) = kl_and_rejection(&zz, &y, 1.0);
                (k.double_value(&[]), r.double_value(&[]))
            };
            let ((k1, r1), (k0, r0)) = (bump(eps), bump(-eps));
            worst = worst.max(((r1 - r0) / (2.0 * eps) - g.double_value(&[i, j])).abs());
            worst_kl = worst_kl.max(((k1 - k0) / (2.0 * eps) - kl_grads[0].double_value(&[i, j])).abs());
        }
    }
    assert!(g.abs().sum(Kind::Double).double_value(&[]) > 1e-2, "no gradient");
    assert!(worst < 1e-7 && worst_kl < 1e-7, "acceptance {worst}, kl {worst_kl}");
}

/// Greedy speculative output equals plain greedy output: a fresh draft (the target's
/// layers, often right), random drafts (mostly wrong), with and without knowledge.
#[test]
fn greedy_speculative_output_equals_plain_greedy_output() {
    let t = target("llama", 4, 7);
    let prompts = [vec![1i64, 17, 42, 5, 66, 23], vec![3, 80, 80, 12]];
    let (mut accepted, mut rejected) = (0usize, 0usize);
    let drafts = [
        build(&t, spec(&t, vec![0, 2, 3], None)),
        with_random_cache(&t, vec![0, 3]),
        {
            let m = build(&t, spec(&t, vec![1, 3], None));
            reinit_trainable(m.var_store(), 5);
            m
        },
    ];
    for m in &drafts {
        let (a, r) = crate::eval::greedy_lossless(&t, m, &prompts, &[1, 4], 30);
        accepted += a;
        rejected += r;
    }
    assert!(
        accepted > 20 && rejected > 20,
        "accepted {accepted} drafts, {rejected} rounds with a rejection"
    );
}

/// The session's proposals (its own KV cache, kept across rounds for accepted drafts) equal
/// the draft's forward over the whole sequence without a cache, with and without knowledge.
#[test]
fn proposals_equal_the_draft_forward_without_a_cache() {
    let t = target("llama", 4, 8);
    let mut m = with_random_cache(&t, vec![0, 2]);
    // the blocks act: the logits with and without them differ
    let ids = Tensor::from_slice(&seq()).view([1, -1]);
    let with = tch::no_grad(|| m.logits(&ids)).expect("on");
    m.set_option("knowledge", "off").expect("off");
    let without = tch::no_grad(|| m.logits(&ids)).expect("off");
    assert!(
        max_abs_diff(&with, &without) > 1e-2,
        "the knowledge blocks change nothing"
    );
    for knowledge in ["on", "off"] {
        m.set_option("knowledge", knowledge).expect("option");
        let prompt = vec![1i64, 17, 42, 5, 66];
        let mut s = m.session(&t).expect("session");
        let none = StepFeatures {
            hidden_normed: Tensor::zeros([1, 64], (Kind::Float, Device::Cpu)),
            aux: None,
        };
        s.begin(&prompt).expect("begin");
        let mut next: Vec<i64> = prompt[1..].to_vec();
        next.push(9);
        s.commit(0, &none, &next).expect("commit");
        let mut seq = prompt.clone();
        seq.push(9);
        let mut rng = RowRng::new(0);
        for (round, accept) in [(0, 2usize), (1, 0), (2, 3)] {
            let p = tch::no_grad(|| s.propose(3, &Sampling::greedy(), &mut rng)).expect("propose");
            for i in 0..3 {
                let mut ctx = seq.clone();
                ctx.extend_from_slice(&p.tokens[..i]);
                let full = tch::no_grad(|| m.logits(&Tensor::from_slice(&ctx).view([1, -1]))).expect("logits");
                let want = full.get(0).get(ctx.len() as i64 - 1);
                let d = max_abs_diff(&p.logits.get(i as i64), &want);
                assert!(d < 1e-4, "knowledge {knowledge}, round {round}, proposal {i}: {d}");
            }
            // the target accepts `accept` drafts and corrects the next token
            let start = seq.len() as i64 - 1;
            let mut next: Vec<i64> = p.tokens[..accept].to_vec();
            next.push(40 + round);
            s.commit(start, &none, &next).expect("commit");
            seq.extend_from_slice(&next);
        }
    }
    // without a cache, knowledge=on is refused
    let mut plain_draft = build(&t, spec(&t, vec![0, 2], None));
    assert!(plain_draft.set_option("knowledge", "on").is_err());
    assert!(plain_draft.set_option("gate", "off").is_err());
}

/// The trainable parts: the copied layers and norm, blocks and transitions; the cache is a
/// buffer; the embedding and lm_head are the target's (not in the draft's weights).
#[test]
fn the_cache_is_a_buffer_and_the_embedding_and_lm_head_are_shared() {
    let t = target("llama", 4, 9);
    let m = build(&t, spec(&t, vec![0, 3], Some((12, 16))));
    let vars = m.var_store().variables();
    let buffers: Vec<&String> = vars
        .iter()
        .filter(|(_, v)| !v.requires_grad())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(buffers.len(), 2, "{buffers:?}");
    assert_eq!(vars["knowledge.0"].size(), vec![12, 16]);
    assert!(!vars.keys().any(|n| n.contains("embed") || n.contains("lm_head")));
    for n in [
        "layers.1.self_attn.q_proj.weight",
        "norm.weight",
        "blocks.1.o_proj.weight",
        "blocks.0.gate.bias",
        "transitions.1.weight",
    ] {
        assert!(vars.get(n).is_some_and(|v| v.requires_grad()), "{n}");
    }
    // layers.1 is the target's layer 3
    let tv = t.vs.variables();
    assert!(vars["layers.1.mlp.down_proj.weight"].equal(&tv["model.layers.3.mlp.down_proj.weight"]));
    let groups: Vec<String> = m
        .param_groups()
        .into_iter()
        .map(|g| format!("{}:{}", g.prefix, g.lr_scale))
        .collect();
    assert_eq!(groups, vec![":1", "blocks.:10", "transitions.:10"]);
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("utf8")
}

/// The first `n` held-out demo questions (recipes/data/demo_eval_prompts.jsonl: none of them
/// is a demo training conversation) written to `path`.
fn held_out_questions(path: &std::path::Path, n: usize) -> std::path::PathBuf {
    let src = forge_tests::root().join("recipes/data/demo_eval_prompts.jsonl");
    let text = std::fs::read_to_string(&src).expect("demo_eval_prompts.jsonl");
    let lines: Vec<&str> = text.lines().take(n).collect();
    assert_eq!(lines.len(), n);
    std::fs::write(path, lines.join("\n") + "\n").expect("write questions");
    path.to_path_buf()
}

/// Lines `lines` (0-based) of a JSONL file written to `path`.
fn pick_lines(src: &std::path::Path, lines: &[usize], path: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(src).expect("read");
    let all: Vec<&str> = text.lines().collect();
    let picked: Vec<&str> = lines.iter().map(|&i| all[i]).collect();
    std::fs::write(path, picked.join("\n") + "\n").expect("write");
    path.to_path_buf()
}

/// The CLI end to end on a tiny target: build the cache from the target's answers to held-out
/// questions (manifest), train (loss falls), export and reload (the cache travels in the
/// weights), evaluate with and without the cache (greedy lossless, the draft/target time
/// ratio, prompts in and out of the cache reported apart), refuse a cache built for another
/// target, name the command when the cache is missing, and train offline from top-k shards.
#[test]
fn knowledge_builds_its_cache_trains_exports_reloads_and_evaluates_with_and_without_it() {
    let run = TinyRun::with_layers("knowledge-cli", "recipes/knowledge-tiny.yaml", true, 4);
    let questions = held_out_questions(&run.dir.join("questions.jsonl"), 6);
    let cache = run.dir.join("cache.safetensors");
    let o = forge(&[
        "build-knowledge",
        "--target",
        s(&run.target),
        "--in",
        s(&questions),
        "--entries",
        "4",
        "--max-answer-tokens",
        "16",
        "--cache-dim",
        "32",
        "--out",
        s(&cache),
        "--progress",
        "never",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.dir.join("cache.manifest.json")).expect("manifest"))
            .expect("json");
    assert_eq!(manifest["entries"], 4);
    assert_eq!(manifest["answers"], "target");
    assert_eq!(manifest["max_answer_tokens"], 16);
    assert_eq!(manifest["questions"].as_array().map(Vec::len), Some(4));
    assert_eq!(manifest["cache_dim"], 32);
    assert_eq!(manifest["projection"], "pca");
    assert_eq!(manifest["layers"], serde_json::json!([0, 1, 2, 3]));
    let tokens = manifest["tokens"].as_i64().expect("tokens");
    assert!(tokens > 20 && tokens <= 4 * 16, "{manifest}");
    // the PCA keeps the states' top directions: the stored states' variance falls along them
    let stored = forge_models::drafters::knowledge_cache::KnowledgeCache::read(&cache).expect("read");
    let l3 = &stored.layers[&3];
    assert_eq!(l3.size(), vec![tokens, 32]);
    let var = l3.var_dim(0, true, false);
    assert!(var.double_value(&[0]) >= var.double_value(&[31]), "{var}");

    let sets = |extra: &[String]| -> Vec<String> {
        let mut v = vec![
            "--set".to_string(),
            format!("drafter.knowledge_cache={}", cache.display()),
            "--set".into(),
            format!("drafter.knowledge_data={}", questions.display()),
            "--set".into(),
            "drafter.max_answer_tokens=16".into(),
        ];
        v.extend_from_slice(extra);
        v
    };
    let full = run.dir.join("full");
    let a = sets(&[
        "--set".into(),
        "train.max_steps=12".into(),
        "--set".into(),
        "checkpoint.every_steps=6".into(),
        "--set".into(),
        "train.lr=3e-3".into(),
    ]);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = run.train(&full, &refs);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("knowledge: cache") && err.contains("parameter group blocks"),
        "{err}"
    );
    let l = losses(&full);
    assert_eq!(l.len(), 12);
    let (first, last) = (
        l[..3].iter().map(|x| x.1).sum::<f64>(),
        l[9..].iter().map(|x| x.1).sum::<f64>(),
    );
    assert!(last < first * 0.9, "{l:?}");
    let ck = full.join("step_12");
    let exp = run.dir.join("export");
    let b = forge_tests::export_forge_equal_to(&ck, &exp);
    let k0 = b
        .iter()
        .find(|(n, _)| n == "knowledge.0")
        .expect("the cache travels with the export");
    assert!(k0.1.equal(&stored.layers[&0]), "the exported cache is the built one");
    let o = forge(&["export", s(&ck), "--format", "vllm", "--out", s(&run.dir.join("vllm"))]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("knowledge drafter cannot be exported as vllm"),
        "{e}"
    );

    // two questions in the cache (entries 0 and 2) and two the cache does not hold (4 and 5)
    let prompts = pick_lines(&questions, &[0, 4, 2, 5], &run.dir.join("mixed.jsonl"));
    // one run reports tau with the cache and, decoding again with knowledge=off, without it
    let json = run.dir.join("report.json");
    let o = forge(&[
        "eval",
        "--target",
        s(&run.target),
        "--draft",
        s(&exp),
        "--prompts",
        s(&prompts),
        "--max-new-tokens",
        "12",
        "--gamma",
        "4",
        "--verify",
        "--ablate",
        "knowledge=off",
        "--json",
        s(&json),
        "--progress",
        "never",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    // the header line (stdout, once) names the draft's cache
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("knowledge cache on (4 entries"), "{out}");
    assert!(out.contains("with knowledge=off (all files):"), "{out}");
    // the in-cache and out-of-cache lines, each over its two prompts (one turn each), under the
    // file's line and under the ablation's
    for group in ["in cache", "not in cache"] {
        let lines: Vec<&str> = out.lines().filter(|l| l.trim_start().starts_with(group)).collect();
        assert_eq!(lines.len(), 2, "{group}: {out}");
        for l in lines {
            assert!(l.contains("turns   2 "), "{l}");
        }
    }
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("json");
    let groups = &r["groups"];
    for (g, n) in [("in cache", 2), ("not in cache", 2)] {
        assert_eq!(groups[g]["turns"], n, "{groups}");
        assert_eq!(r["files"][0]["groups"][g]["turns"], n);
        assert_eq!(r["ablations"]["knowledge=off"]["groups"][g]["turns"], n);
    }
    let sum = |k: &str| groups["in cache"][k].as_u64().unwrap_or(0) + groups["not in cache"][k].as_u64().unwrap_or(0);
    assert_eq!(
        sum("new_tokens"),
        r["summary"]["new_tokens"].as_u64().unwrap_or(u64::MAX),
        "{groups}"
    );
    assert_eq!(r["summary"]["greedy_mismatches"], 0);
    assert!(
        r["summary"]["draft_time_ratio"].as_f64().is_some_and(|x| x > 0.0),
        "{}",
        r["summary"]
    );
    let off = &r["ablations"]["knowledge=off"];
    assert!(
        off["tau"].as_f64().is_some_and(|t| t >= 1.0) && off["speedup"].as_f64().is_some(),
        "{off}"
    );
    assert_eq!(off["new_tokens"], r["summary"]["new_tokens"]);
    for (flag, opt, want) in [
        ("--draft-option", "knowledge=maybe", "knowledge=on or knowledge=off"),
        ("--ablate", "gate=off", "no option gate"),
    ] {
        let o = forge(&[
            "eval",
            "--target",
            s(&run.target),
            "--draft",
            s(&exp),
            "--prompts",
            s(&prompts),
            flag,
            opt,
            "--progress",
            "never",
        ]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(want) && e.contains(flag), "{e}");
    }

    // a cache built for another target (same shapes, other weights) is refused
    let other = forge_tests::tiny_target_with_demo_tokenizer_layers(&run.dir.join("other"), 99, 4);
    let other_cache = run.dir.join("other-cache.safetensors");
    let o = forge(&[
        "build-knowledge",
        "--target",
        s(&other),
        "--in",
        s(&questions),
        "--entries",
        "4",
        "--max-answer-tokens",
        "16",
        "--cache-dim",
        "32",
        "--out",
        s(&other_cache),
        "--progress",
        "never",
    ]);
    assert!(o.status.success());
    let mut args = vec!["check".to_string(), run.recipe.display().to_string()];
    for x in run.sets() {
        args.extend(["--set".to_string(), x]);
    }
    let bad = [
        args.clone(),
        vec![
            "--set".into(),
            format!("drafter.knowledge_cache={}", other_cache.display()),
        ],
    ]
    .concat();
    let o = forge(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("built for another target") && e.contains("forge build-knowledge --target"),
        "{e}"
    );
    // other data than drafter.knowledge_data, and another entry count
    let wrong = [
        args.clone(),
        vec![
            "--set".into(),
            format!("drafter.knowledge_cache={}", cache.display()),
            "--set".into(),
            "drafter.knowledge_data=recipes/data/demo_eval.jsonl".into(),
            "--set".into(),
            "drafter.num_knowledge_entries=5".into(),
        ],
    ]
    .concat();
    let o = forge(&wrong.iter().map(String::as_str).collect::<Vec<_>>());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("built from other data") && e.contains("holds 4 entries"),
        "{e}"
    );
    // a missing cache: forge check notes it, forge train names the command that builds it
    let missing = run.dir.join("nope.safetensors");
    let m = [
        args.clone(),
        vec!["--set".into(), format!("drafter.knowledge_cache={}", missing.display())],
    ]
    .concat();
    let o = forge(&m.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stderr).contains("does not exist (yet)"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut m = m;
    m[0] = "train".into();
    m.extend([
        "--set".into(),
        format!("checkpoint.dir={}", run.dir.join("missing").display()),
    ]);
    let o = forge(&m.iter().map(String::as_str).collect::<Vec<_>>());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("does not exist: build it with `forge build-knowledge"),
        "{e}"
    );

    // without a cache: no blocks, and forge says so
    let plain_run = run.dir.join("plain");
    let out = run.train(&plain_run, &["--set", "train.max_steps=2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no knowledge cache"));

    // offline, from the target's top-k log-probabilities in hidden-state shards
    let hidden = run.dir.join("hidden");
    let mut prep = vec![
        "prepare-hidden".to_string(),
        run.recipe.display().to_string(),
        "--out".into(),
        hidden.display().to_string(),
        "--topk".into(),
        "16".into(),
    ];
    for x in run.sets() {
        prep.extend(["--set".to_string(), x]);
    }
    prep.extend(["--set".into(), "drafter.target_topk=16".into()]);
    let o = forge(&prep.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let off = run.dir.join("offline");
    run.train(
        &off,
        &[
            "--set",
            "drafter.target_topk=16",
            "--set",
            "data.mode=offline",
            "--set",
            &format!("data.hidden_dir={}", hidden.display()),
            "--set",
            "train.max_steps=12",
            "--set",
            "train.lr=3e-3",
        ],
    );
    let l = losses(&off);
    let (first, last) = (
        l[..3].iter().map(|x| x.1).sum::<f64>(),
        l[9..].iter().map(|x| x.1).sum::<f64>(),
    );
    assert!(last < first * 0.9, "offline {l:?}");
}

/// The loss is computed in chunks of rows, each chunk's gradient taken at once and handed to
/// the draft's states through a surrogate: the value and every weight's gradient equal the
/// loss written out in one piece and differentiated by autograd (full distribution and top-k,
/// CE in the loss), whatever the chunk size.
#[test]
fn the_chunked_loss_has_the_value_and_gradients_of_the_whole() {
    let t = target("llama", 4, 10);
    let ids = Tensor::from_slice(&seq()).view([1, -1]);
    let n = seq().len() as i64 - 1;
    for topk in [0usize, 5] {
        let mut sp = spec(&t, vec![0, 3], Some((12, 16)));
        sp.ce_weight = 0.5;
        sp.target_topk = topk;
        let copies: Vec<Knowledge> = (0..3).map(|_| build(&t, sp.clone())).collect();
        randomize(&copies[0]);
        let src = copies[0].var_store().variables();
        for c in &copies[1..] {
            tch::no_grad(|| {
                for (name, mut v) in c.var_store().variables() {
                    v.copy_(&src[&name]);
                }
            });
        }
        let mut f = crate::eval::features(&t, &seq(), &[]);
        let target_logits = logits_of(&t, &seq());
        if topk > 0 {
            f.target_topk = Some(
                target_logits
                    .log_softmax(-1, Kind::Float)
                    .topk(topk as i64, -1, true, true),
            );
        }
        let ctx = forge_tests::train_ctx();
        let mut chunked = copies;
        let whole = chunked.remove(2);
        chunked[1].set_loss_chunk_rows(Some(4));
        let mut values = Vec::new();
        for m in &chunked {
            let out = m.loss(&f, &ctx).expect("loss");
            values.push(out.loss.double_value(&[]));
            out.loss.backward();
        }
        // by hand, in one piece
        let logits = whole.logits(&ids).expect("logits").get(0).narrow(0, 0, n);
        let labels = ids.get(0).narrow(0, 1, n);
        let (kl, rej) = match &f.target_topk {
            Some((lp, tid)) => kl_and_rejection_topk(&logits, &lp.get(0).narrow(0, 0, n), &tid.get(0).narrow(0, 0, n)),
            None => kl_and_rejection(&logits, &target_logits.get(0).narrow(0, 0, n), 1.0),
        };
        let ce = logits.cross_entropy_for_logits(&labels);
        let hand = kl * 0.8 + rej * 0.3 + ce * 0.5;
        hand.backward();
        let hv = hand.double_value(&[]);
        for (i, v) in values.iter().enumerate() {
            assert!(
                (v - hv).abs() < 1e-5 * hv.abs().max(1.0),
                "topk {topk}, copy {i}: {v} vs {hv}"
            );
        }
        let gw = whole.var_store().variables();
        let mut checked = 0;
        for (i, m) in chunked.iter().enumerate() {
            for (name, p) in m.var_store().variables().iter().filter(|(_, p)| p.requires_grad()) {
                let (a, b) = (p.grad(), gw[name].grad());
                let scale = b.abs().max().double_value(&[]).max(1e-8);
                let d = max_abs_diff(&a, &b) / scale;
                assert!(
                    d < 1e-4,
                    "topk {topk}, copy {i}: gradient of {name} differs by {d} (relative)"
                );
                checked += 1;
            }
        }
        assert!(checked > 40, "{checked}");
    }
}

/// The shipped demo recipe's cache questions are held out of its training data, its eval
/// prompts hold questions in the cache and out of it, and the setup it replaced (the first 15
/// training conversations with their data answers) is refused, naming the leak.
#[test]
fn the_demo_recipes_cache_questions_are_held_out_of_training() {
    use forge_models::drafters::knowledge::AnswerSource;
    use forge_models::drafters::knowledge_cache::question_key;
    use forge_trainer::artifacts::knowledge::{cache_questions, check_disjoint, overlap};
    use forge_trainer::recipe::{DrafterSection, Recipe};
    let root = forge_tests::root();
    let text = std::fs::read_to_string(root.join("recipes/knowledge-smollm2.yaml")).expect("recipe");
    let r = Recipe::from_str(&text, &[]).expect("the demo recipe reads");
    let DrafterSection::Knowledge(k) = &r.drafter else {
        panic!("not a knowledge recipe")
    };
    assert_eq!(k.knowledge_answers, AnswerSource::Target);
    assert!(
        k.knowledge_cache.is_none(),
        "train builds the cache under data.cache_dir"
    );
    let data = root.join(k.knowledge_data.as_ref().expect("knowledge_data"));
    let train: Vec<_> = r.data.train.iter().map(|f| root.join(f)).collect();
    let qs = cache_questions(&data, k.num_knowledge_entries as usize, k.knowledge_answers).expect("questions");
    assert_eq!(qs.len(), 15);
    let keys: Vec<String> = qs.iter().map(|(_, q)| question_key(q)).collect();
    let mut distinct = keys.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 15, "15 different questions");
    assert!(overlap(&keys, &train).expect("read").is_empty());
    assert!(check_disjoint(&keys, &train, false).expect("disjoint").is_none());
    // the eval prompts: 15 in the cache, 7 not
    let prompts =
        forge_data::conversation::read_prompts(&root.join("recipes/data/demo_eval_prompts.jsonl")).expect("prompts");
    let inside = prompts
        .iter()
        .filter(|p| {
            keys.contains(&question_key(
                forge_trainer::artifacts::knowledge::first_user_turn(&p.messages).unwrap_or(""),
            ))
        })
        .count();
    assert_eq!((inside, prompts.len() - inside), (15, 7));
    // the old setup: the first 15 training conversations, every one a leak
    let old = cache_questions(
        &root.join("recipes/data/demo_conversations.jsonl"),
        15,
        AnswerSource::Data,
    )
    .expect("old");
    let old_keys: Vec<String> = old.iter().map(|(_, q)| question_key(q)).collect();
    let both = overlap(&old_keys, &train).expect("read");
    assert_eq!(both.len(), 15);
    assert_eq!(both[0].1, old[0].0);
    let e = check_disjoint(&old_keys, &train, false)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("15 of the knowledge cache's 15 questions are also data.train conversations")
            && e.contains(&old[0].0)
            && e.contains("allow_training_overlap"),
        "{e}"
    );
    let w = check_disjoint(&old_keys, &train, true)
        .expect("allowed")
        .expect("warned");
    assert!(w.contains("LOOKUP LEAK"), "{w}");
}

/// `forge train` on a recipe naming questions but no cache builds it under data.cache_dir from
/// the target's own answers (the same states as a cache over `forge regenerate`'s output with
/// the data's answers), reuses it on the next run unchanged, builds another for another
/// `max_answer_tokens`, and refuses questions that are training conversations unless told.
#[test]
fn train_builds_a_missing_cache_from_the_targets_answers_and_reuses_it() {
    let run = TinyRun::with_layers("knowledge-train-builds", "recipes/knowledge-tiny.yaml", true, 4);
    let questions = held_out_questions(&run.dir.join("questions.jsonl"), 4);
    let cache_dir = run.dir.join("cache");
    let caches = || -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(&cache_dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        v.retain(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("knowledge-") && n.ends_with(".safetensors"))
        });
        v.sort();
        v
    };
    let knowledge = format!("drafter.knowledge_data={}", questions.display());
    let o = run.train(
        &run.dir.join("first"),
        &["--set", &knowledge, "--set", "train.max_steps=2"],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("knowledge: built the cache") && e.contains("the target's greedy answers"),
        "{e}"
    );
    let built = caches();
    assert_eq!(built.len(), 1, "{built:?}");
    let bytes = std::fs::read(&built[0]).expect("cache");
    let stamp = std::fs::metadata(&built[0]).and_then(|m| m.modified()).expect("mtime");
    use forge_models::drafters::knowledge_cache::KnowledgeCache;
    let c = KnowledgeCache::read(&built[0]).expect("read");
    assert_eq!(
        (
            c.manifest.entries,
            c.manifest.answers.as_str(),
            c.manifest.max_answer_tokens
        ),
        (4, "target", 16)
    );
    assert_eq!(c.manifest.layers, vec![0, 1, 2, 3]);

    // the same answers written by forge regenerate, cached with the data's answers: the same states
    let regen = run.dir.join("regen.jsonl");
    let o = forge(&[
        "regenerate",
        "--target",
        s(&run.target),
        "--in",
        s(&questions),
        "--out",
        s(&regen),
        "--max-new-tokens",
        "16",
        "--chat-template",
        "chatml",
        "--progress",
        "never",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let by_hand = run.dir.join("by-hand.safetensors");
    let o = forge(&[
        "build-knowledge",
        "--target",
        s(&run.target),
        "--in",
        s(&regen),
        "--answers",
        "data",
        "--entries",
        "4",
        "--max-answer-tokens",
        "16",
        "--max-length",
        "64",
        "--chat-template",
        "chatml",
        "--out",
        s(&by_hand),
        "--progress",
        "never",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && e.contains("WARNING: --answers data"), "{e}");
    let h = KnowledgeCache::read(&by_hand).expect("read");
    assert_eq!(h.manifest.answers, "data");
    assert_eq!(h.manifest.questions, c.manifest.questions, "the same questions");
    assert_eq!(h.manifest.tokens, c.manifest.tokens);
    for (l, t) in &c.layers {
        let d = max_abs_diff(t, &h.layers[l]);
        assert!(d < 1e-4, "layer {l}: the states differ by {d}");
    }

    // a second run reuses it: the file untouched, no other built
    let o = run.train(
        &run.dir.join("second"),
        &["--set", &knowledge, "--set", "train.max_steps=2"],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("knowledge: reusing the cache") && !e.contains("built the cache"),
        "{e}"
    );
    assert_eq!(caches(), built);
    assert_eq!(std::fs::read(&built[0]).expect("cache"), bytes);
    assert_eq!(
        std::fs::metadata(&built[0]).and_then(|m| m.modified()).expect("mtime"),
        stamp
    );
    // another option, another cache
    let o = run.train(
        &run.dir.join("third"),
        &[
            "--set",
            &knowledge,
            "--set",
            "drafter.max_answer_tokens=8",
            "--set",
            "train.max_steps=1",
        ],
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("knowledge: built the cache"));
    assert_eq!(caches().len(), 2);

    // the training conversations as the cache's questions: refused before the target runs,
    // naming them; allowed with a loud warning
    let leak = format!("drafter.knowledge_data={}", run.data.display());
    let mut args = vec!["train".to_string(), run.recipe.display().to_string()];
    for x in run.sets() {
        args.extend(["--set".to_string(), x]);
    }
    args.extend([
        "--set".into(),
        leak.clone(),
        "--set".into(),
        format!("checkpoint.dir={}", run.dir.join("leak").display()),
    ]);
    let o = forge(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && e.contains("4 of the knowledge cache's 4 questions are also data.train conversations")
            && e.contains("demo-001"),
        "{e}"
    );
    assert_eq!(caches().len(), 2, "nothing built");
    let o = run.train(
        &run.dir.join("leak-allowed"),
        &[
            "--set",
            &leak,
            "--set",
            "drafter.allow_training_overlap=true",
            "--set",
            "train.max_steps=1",
        ],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("LOOKUP LEAK") && e.contains("demo-001"), "{e}");
}
