//! Tree drafting (models/src/spec_tree.rs) in speculative decoding: greedy trees give the
//! target's greedy output for every drafter that branches; a tree of topk 1 decodes exactly
//! as the chain; the accepted path's keys and values are what a full forward computes;
//! sampled trees follow the target's distribution.

use crate::eval::{
    chi_square, chi_square_critical, eagle1, eagle3, hybrid, marginals, medusa, plain, prompts, Script, V,
};
use forge_models::drafters::Drafter;
use forge_models::generate::{RowRng, Sampling};
use forge_models::spec_tree::TreeSpec;
use forge_models::speculative::{speculative_generate, DraftSession, Proposal, SpecOptions, StepFeatures};
use forge_models::TargetModel;
use forge_tests::{random_target, random_target_from, tiny_config};
use tch::{Device, Kind, Tensor};

fn tree(s: &str) -> TreeSpec {
    TreeSpec::parse(s).expect("tree spec")
}

/// A 4-layer tiny target (the knowledge drafter samples layers 0 and 3).
fn target4(seed: i64) -> TargetModel {
    let mut cfg = tiny_config("llama");
    cfg["num_hidden_layers"] = 4.into();
    random_target_from(cfg, seed)
}

fn drafters(t: &TargetModel) -> Vec<(&'static str, Box<dyn Drafter>)> {
    vec![
        ("medusa", Box::new(medusa(t))),
        ("eagle1", Box::new(eagle1(t))),
        ("eagle3", Box::new(eagle3(t))),
        ("hybrid", Box::new(hybrid(t, false))),
        ("hybrid-draft-vocab", Box::new(hybrid(t, true))),
        (
            "knowledge",
            Box::new(crate::knowledge::with_random_cache(t, vec![0, 3])),
        ),
    ]
}

fn decode(
    t: &TargetModel,
    d: &dyn Drafter,
    prompt: &[i64],
    opts: &SpecOptions,
) -> forge_models::speculative::SpecOutput {
    let mut s = d.session(t).expect("session");
    speculative_generate(t, s.as_mut(), &d.spec().feature_needs(), prompt, opts).expect("speculative")
}

#[test]
fn greedy_trees_give_the_targets_greedy_output_for_every_drafter_that_branches() {
    let t = target4(21);
    for (name, d) in drafters(&t) {
        // Medusa's 4 heads bound the depth
        for spec in [
            "steps=3,topk=2,draft_tokens=6",
            "steps=4,topk=4,draft_tokens=8",
            "steps=2,topk=5,draft_tokens=16",
        ] {
            let spec = tree(spec);
            for (i, p) in prompts().iter().enumerate() {
                let want = plain(&t, p, 40, &[]);
                let opts = SpecOptions {
                    tree: Some(spec),
                    max_new_tokens: 40,
                    ..Default::default()
                };
                let got = decode(&t, d.as_ref(), p, &opts);
                assert_eq!(got.tokens, want, "{name} tree {spec} prompt {i}");
                let emitted: usize = got.rounds.iter().map(|r| r.emitted).sum();
                assert_eq!(
                    emitted + 1,
                    got.tokens.len(),
                    "{name}: the prefill token plus every round's"
                );
                for r in &got.rounds {
                    assert!(
                        r.accepted <= spec.steps && r.proposed < spec.draft_tokens,
                        "{name} {spec}: {r:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_tree_of_topk_one_decodes_exactly_as_the_chain() {
    let t = target4(22);
    for (name, d) in drafters(&t) {
        for n in [1, 3, 4] {
            for (i, p) in prompts().iter().enumerate() {
                let chain = SpecOptions {
                    gamma: n,
                    max_new_tokens: 30,
                    ..Default::default()
                };
                let as_tree = SpecOptions {
                    tree: Some(TreeSpec::chain(n)),
                    ..chain.clone()
                };
                let (a, b) = (decode(&t, d.as_ref(), p, &chain), decode(&t, d.as_ref(), p, &as_tree));
                assert_eq!(a.tokens, b.tokens, "{name} n {n} prompt {i}");
                let rounds = |o: &forge_models::speculative::SpecOutput| -> Vec<(usize, usize, usize)> {
                    o.rounds.iter().map(|r| (r.proposed, r.accepted, r.emitted)).collect()
                };
                assert_eq!(rounds(&a), rounds(&b), "{name} n {n} prompt {i}: round for round");
            }
        }
    }
}

/// A branching draft that knows the target's greedy answer: after a path that follows the
/// answer it ranks the right next token at a rank that changes from call to call (0, 1, 2:
/// first, second or third child, so accepted paths run through later siblings and the kept
/// keys are not the first rows of the tree), every other token below. Checks the committed
/// features against one full forward of the final sequence.
struct ScriptedTree {
    script: Script,
    calls: usize,
}

impl DraftSession for ScriptedTree {
    fn commit(&mut self, start: i64, f: &StepFeatures, next: &[i64]) -> forge_models::Result<()> {
        self.script.commit(start, f, next);
        Ok(())
    }

    fn propose(&mut self, _g: usize, _s: &Sampling, _rng: &mut RowRng) -> forge_models::Result<Proposal> {
        unreachable!("trees only")
    }

    fn can_branch(&self) -> bool {
        true
    }

    fn path_logits(&mut self, path: &[i64]) -> forge_models::Result<Tensor> {
        self.calls += 1;
        // the committed sequence ends with token `committed` (the root, not yet cached)
        let base = self.script.committed as usize + 1;
        let on_answer = path
            .iter()
            .enumerate()
            .all(|(i, &d)| self.script.token_at(base + i) == Some(d));
        let right = self.script.token_at(base + path.len()).filter(|_| on_answer);
        // a fixed descending ladder over tokens, rotated per call
        let rank_of_right = self.calls % 3;
        let mut logits = vec![0f32; V as usize];
        let mut order: Vec<i64> = (0..V).map(|i| (i * 7 + self.calls as i64) % V).collect();
        if let Some(r) = right {
            order.retain(|&x| x != r);
            order.insert(rank_of_right, r);
        }
        for (rank, &tok) in order.iter().enumerate() {
            logits[tok as usize] = -(rank as f32) * 0.5;
        }
        Ok(Tensor::from_slice(&logits))
    }
}

#[test]
fn accepted_paths_through_later_siblings_keep_the_targets_cache_exact() {
    let t = random_target("llama", 23);
    for spec in [
        "steps=4,topk=3,draft_tokens=12",
        "steps=3,topk=2,draft_tokens=5",
        "steps=5,topk=4,draft_tokens=8",
    ] {
        let spec = tree(spec);
        for p in prompts() {
            let answer = plain(&t, &p, 40, &[]);
            let mut s = ScriptedTree {
                script: Script::new(&t, &p, &answer),
                calls: 0,
            };
            let opts = SpecOptions {
                tree: Some(spec),
                max_new_tokens: 40,
                ..Default::default()
            };
            let got = speculative_generate(&t, &mut s, &Default::default(), &p, &opts).expect("speculative");
            assert_eq!(got.tokens, answer, "tree {spec}");
            assert!(
                s.script.max_feature_diff < 1e-4,
                "tree {spec}: committed features off by {}",
                s.script.max_feature_diff
            );
            // the right token ranks first, second or third: accepted paths, some deep, many
            // through a later sibling (rows of the tree that the cache must move)
            let accepted: usize = got.rounds.iter().map(|r| r.accepted).sum();
            assert!(
                accepted * 2 >= got.rounds.len() && got.rounds.iter().any(|r| r.accepted >= 2),
                "tree {spec}: {:?}",
                got.rounds
            );
        }
    }
}

/// The 2nd and 3rd tokens of sampled tree decoding follow the target's sampled distribution
/// (temperature, top-k, top-p), as the chain test in tests/eval.rs checks for chains.
#[test]
fn sampled_trees_follow_the_target_distribution() {
    let t = random_target("llama", 25);
    let m = eagle1(&t);
    let prompt: Vec<i64> = vec![1, 17, 42, 5];
    let sampling = Sampling {
        temperature: 0.5,
        top_p: 0.8,
        top_k: 24,
    };
    let want = marginals(&t, &prompt, &sampling);
    // wide trees so that their children hold much of the target's mass
    let spec = tree("steps=2,topk=8,draft_tokens=20");
    let samples = 3000;
    let (mut c2, mut c3) = (vec![0.0; V as usize], vec![0.0; V as usize]);
    let (mut accepted, mut rejected) = (0, 0);
    for seed in 0..samples {
        let opts = SpecOptions {
            tree: Some(spec),
            sampling,
            max_new_tokens: 3,
            seed: seed as u64,
            ..Default::default()
        };
        let out = decode(&t, &m, &prompt, &opts);
        assert_eq!(out.tokens.len(), 3);
        c2[out.tokens[1] as usize] += 1.0;
        c3[out.tokens[2] as usize] += 1.0;
        for r in &out.rounds {
            accepted += r.accepted;
            rejected += usize::from(r.accepted < 2);
        }
    }
    assert!(
        accepted > samples / 10 && rejected > samples / 10,
        "both acceptance and resampling happen: {accepted} accepted, {rejected} rounds short of the depth"
    );
    for (what, counts, probs) in [("2nd token", &c2, &want.p2), ("3rd token", &c3, &want.p3)] {
        let (stat, dof) = chi_square(counts, probs);
        assert!(
            stat < chi_square_critical(dof),
            "{what}: chi-square {stat:.1} with {dof} dof exceeds {:.1}",
            chi_square_critical(dof)
        );
    }
    let (stat, dof) = chi_square(&c2, &want.unfiltered);
    assert!(
        stat > 3.0 * chi_square_critical(dof),
        "the unfiltered distribution should be rejected: {stat:.1}"
    );
}

#[test]
fn trees_are_refused_where_they_cannot_be_served() {
    let t = random_target("llama", 26);
    let d = eagle1(&t);
    let p = &prompts()[0];
    let run = |opts: SpecOptions| {
        let mut s = d.session(&t).expect("session");
        speculative_generate(&t, s.as_mut(), &d.spec().feature_needs(), p, &opts)
            .expect_err("refused")
            .to_string()
    };
    let spec = tree("steps=3,topk=2,draft_tokens=6");
    let e = run(SpecOptions {
        tree: Some(spec),
        dynamic_min_gamma: Some(2),
        ..Default::default()
    });
    assert!(e.contains("dynamic gamma"), "{e}");
    let e = run(SpecOptions {
        tree: Some(spec),
        sampling: Sampling::at(0.7),
        acceptance: forge_models::speculative::Acceptance::Exact,
        ..Default::default()
    });
    assert!(e.contains("acceptance engine"), "{e}");
    // Medusa's heads bound the depth
    let m = medusa(&t);
    let mut s = m.session(&t).expect("session");
    let e = speculative_generate(
        &t,
        s.as_mut(),
        &m.spec().feature_needs(),
        p,
        &SpecOptions {
            tree: Some(tree("steps=5,topk=2,draft_tokens=6")),
            ..Default::default()
        },
    )
    .expect_err("too deep")
    .to_string();
    assert!(e.contains("4 heads") && e.contains("steps <= heads"), "{e}");
    let _ = Device::Cpu;
}

/// On the demo target (SmolLM2-135M-Instruct, fp32): a knowledge drafter made of 29 of its
/// 30 layers (untrained: the sampled layers are the target's own, so it is mostly right and
/// sometimes wrong) decodes chat prompts with SGLang's default Llama tree; greedy output
/// equals the target's plain greedy output token for token, with deep paths accepted (their
/// rows are not the tree's first rows: the cache moves them) and some rejected.
#[test]
fn greedy_trees_on_the_demo_target_give_its_greedy_output() {
    use forge_models::drafters::knowledge::Knowledge;
    use forge_models::drafters::TargetAccess;
    use forge_models::DType;
    let t = TargetModel::load(&forge_tests::demo_model(), DType::F32, Device::Cpu).expect("demo target");
    let layers: Vec<i64> = (0..30).filter(|&l| l != 14).collect();
    let d = Knowledge::new(
        crate::knowledge::spec(&t, layers, None),
        &TargetAccess::Model(&t),
        Device::Cpu,
        Kind::Float,
    )
    .expect("knowledge drafter");
    let tok = forge_data::TextTokenizer::from_dir(&forge_tests::demo_model()).expect("tokenizer");
    let prompts: Vec<Vec<i64>> = [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nList three colours.<|im_end|>\n<|im_start|>assistant\n",
    ]
    .iter()
    .map(|p| tok.encode(p).expect("encode"))
    .collect();
    let spec = tree("steps=5,topk=4,draft_tokens=8");
    let (mut deep, mut short) = (0, 0);
    for p in &prompts {
        let want = plain(&t, p, 32, &[]);
        let opts = SpecOptions {
            tree: Some(spec),
            max_new_tokens: 32,
            ..Default::default()
        };
        let got = decode(&t, &d, p, &opts);
        assert_eq!(got.tokens, want, "tree {spec}");
        deep += got.rounds.iter().filter(|r| r.accepted >= 2).count();
        short += got.rounds.iter().filter(|r| r.accepted < r.depth).count();
    }
    assert!(
        deep >= 2 && short >= 1,
        "{deep} rounds accepted two drafts or more, {short} stopped short"
    );
}

/// `forge eval --tree ... --predict ... --sweep` on a trained tiny EAGLE-3: the tree run is
/// verified against plain greedy decoding, every GPU and batch gets a prediction, each sweep
/// setting its tau, and each recommendation is the sweep's best predicted speedup, printed
/// with SGLang's flags for it.
#[test]
fn forge_eval_drafts_trees_predicts_and_recommends_settings() {
    use crate::eval::{read_json, run_eval};
    let run = forge_tests::TinyRun::new("eval-tree-cli", "recipes/eagle3-tiny.yaml", true);
    let ckpt = run.dir.join("run");
    run.train(
        &ckpt,
        &["--set", "train.max_steps=2", "--set", "checkpoint.every_steps=2"],
    );
    let prompts = run.dir.join("questions.jsonl");
    std::fs::write(
        &prompts,
        "{\"question_id\": 1, \"category\": \"writing\", \"turns\": [\"Write a haiku about rain.\"]}\n{\"question_id\": 2, \"category\": \"math\", \"turns\": [\"What is 12 times 7?\"]}\n",
    )
    .expect("write");
    let json = run.dir.join("report.json");
    let target = run.target.display().to_string();
    let out = run_eval(&[
        "--target",
        &target,
        "--draft",
        ckpt.to_str().expect("utf8"),
        "--prompts",
        prompts.to_str().expect("utf8"),
        "--max-new-tokens",
        "12",
        "--tree",
        "steps=3,topk=2,draft_tokens=5",
        "--verify",
        "--predict",
        "h100,h200",
        "--batch",
        "1,64",
        "--sweep",
        "--sweep-setting",
        "chain:2",
        "--sweep-setting",
        "tree:steps=2,topk=2,draft_tokens=4",
        "--json",
        json.to_str().expect("utf8"),
        "--progress",
        "never",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = read_json(&json);
    assert_eq!(r["settings"]["tree"], "steps=3,topk=2,draft_tokens=5");
    assert_eq!(r["summary"]["greedy_mismatches"], 0);
    let predicted = r["predicted"].as_array().expect("predicted");
    assert_eq!(predicted.len(), 4, "2 GPUs x 2 batch sizes: {predicted:?}");
    assert!(predicted.iter().all(|p| p["speedup"].as_f64().is_some_and(|s| s > 0.0)));
    let sweep = r["sweep"].as_array().expect("sweep");
    let names: Vec<&str> = sweep.iter().map(|s| s["setting"].as_str().expect("setting")).collect();
    assert_eq!(names, ["chain:2", "tree:steps=2,topk=2,draft_tokens=4"]);
    for s in sweep {
        let tau = s["summary"]["tau"].as_f64().expect("tau");
        assert!((1.0..=3.0).contains(&tau), "{s}");
    }
    let recs = r["recommended"].as_array().expect("recommended");
    assert_eq!(recs.len(), 4);
    for rec in recs {
        let speedups = rec["speedups"].as_object().expect("speedups");
        let best = speedups.values().filter_map(|v| v.as_f64()).fold(f64::MIN, f64::max);
        assert_eq!(rec["speedup"].as_f64(), Some(best), "{rec}");
        assert_eq!(speedups[rec["setting"].as_str().expect("setting")].as_f64(), Some(best));
    }
    // flags for a setting that beats plain decoding; otherwise the advice to serve the
    // target alone (a 2-step draft accepts little)
    let beats = recs.iter().any(|rec| rec["speedup"].as_f64().is_some_and(|s| s >= 1.0));
    let says = if beats {
        "--speculative-algorithm EAGLE3"
    } else {
        "no setting of the sweep beats plain decoding here"
    };
    assert!(
        stdout.contains("recommended serving settings") && stdout.contains(says),
        "{stdout}"
    );
}
