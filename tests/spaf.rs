//! SpAF: adapters inside the frozen target, an alignment head, self-speculative decoding
//! that shares the target's KV cache (models/src/drafters/spaf.rs, docs/methods/spaf.md).

use forge_models::drafters::spaf::{AdapterLoss, AlignmentLoss, Spaf, SpafSpec, SpafTargetLayer};
use forge_models::drafters::{Drafter, Features, TargetAccess};
use forge_models::generate::{RowRng, Sampling};
use forge_models::speculative::{speculative_generate, SpecOptions, StepFeatures};
use forge_models::{Capture, LogitsMode, TargetModel};
use forge_tests::{
    forge, losses, max_abs_diff, metrics_rows, random_target_from, reinit_trainable, tiny_config, TinyRun,
};
use tch::{nn::OptimizerConfig, Device, Kind, Tensor};

/// A tiny random Llama target with 4 layers (hidden 64, vocabulary 96).
fn target4(seed: i64) -> TargetModel {
    let mut cfg = tiny_config("llama");
    cfg["num_hidden_layers"] = 4.into();
    random_target_from(cfg, seed)
}

fn spec(t: &TargetModel, k: i64, exit: i64, weights: Vec<f64>, transition: i64) -> SpafSpec {
    let c = &t.config;
    SpafSpec {
        cutoff_layer: k,
        adapter_dim: 16,
        alignment_num_layers: 2,
        alignment_hidden_size: 128,
        alignment_loss: AlignmentLoss::Mse,
        adapter_loss: AdapterLoss::Ce,
        adapter_weight: 1.0,
        alignment_weight: 0.5,
        layer_weights: weights,
        exit_layer: exit,
        num_draft_tokens: 5,
        serial_parallel_transition: transition,
        hidden_size: c.hidden_size,
        num_layers: c.num_layers,
        vocab_size: c.vocab_size,
        target_layer: Some(SpafTargetLayer::of(c)),
    }
}

fn build(t: &TargetModel, s: SpafSpec) -> Spaf {
    Spaf::new(s, &TargetAccess::Model(t), Device::Cpu, Kind::Float).expect("spaf")
}

fn seq() -> Vec<i64> {
    vec![1, 17, 42, 5, 66, 23, 9, 80, 80, 12, 7, 31, 55, 60, 2, 44]
}

/// Features of one sequence: layer k-1's output, the last hidden state, every token trained.
fn features(t: &TargetModel, seq: &[i64], k: i64) -> Features {
    crate::eval::features(t, seq, &[k - 1])
}

fn ctx(t: &TargetModel) -> forge_models::drafters::StepContext<'_> {
    forge_models::drafters::StepContext::train(0, 0, 1, 0).with_target(Some(t))
}

fn var(m: &Spaf, name: &str) -> Tensor {
    m.var_store()
        .variables()
        .get(name)
        .unwrap_or_else(|| panic!("{name}"))
        .shallow_clone()
}

#[test]
fn only_the_adapters_and_the_alignment_head_train() {
    let t = target4(3);
    let m = build(&t, spec(&t, 2, 2, vec![0.5, 0.5], 2));
    let vars = m.var_store().variables();
    let mut trainable: Vec<(String, Vec<i64>)> = vars
        .iter()
        .filter(|(_, v)| v.requires_grad())
        .map(|(n, v)| (n.clone(), v.size()))
        .collect();
    trainable.sort();
    let mut want = Vec::new();
    for l in [2, 3] {
        want.push((format!("adapters.{l}.down.bias"), vec![16]));
        want.push((format!("adapters.{l}.down.weight"), vec![16, 64]));
        want.push((format!("adapters.{l}.up.bias"), vec![64]));
        want.push((format!("adapters.{l}.up.weight"), vec![64, 16]));
    }
    want.extend([
        ("align.0.bias".to_string(), vec![128]),
        ("align.0.weight".to_string(), vec![128, 64]),
        ("align.1.bias".to_string(), vec![64]),
        ("align.1.weight".to_string(), vec![64, 128]),
    ]);
    want.sort();
    assert_eq!(trainable, want);
    // the probe of the target is saved, not trained; nothing of the target is in the store
    assert!(!vars["target_probe"].requires_grad());
    assert_eq!(vars.len(), want.len() + 1);
    // the adapters start as identities: every exit starts as the target's early exit
    assert_eq!(
        var(&m, "adapters.2.up.weight").abs().sum(Kind::Float).double_value(&[]),
        0.0
    );
}

/// The loss by hand: the draft stream through layers k.. with adapters, each exit's
/// cross-entropy through the target's final norm and lm_head, weighted, plus the alignment
/// head's MSE to layer k-1's output. With only the deeper exit weighted, its loss reaches
/// the first adapter through the frozen layer between them.
#[test]
fn the_loss_is_the_weighted_exit_cross_entropies_plus_the_alignment_loss() {
    let t = target4(4);
    let m = build(&t, spec(&t, 2, 2, vec![0.3, 0.7], 2));
    reinit_trainable(m.var_store(), 9);
    let s = seq();
    let f = features(&t, &s, 2);
    let out = m.loss(&f, &ctx(&t)).expect("loss");

    let n = s.len() as i64;
    let inputs = t.layer_inputs(1, n, 0, None, None).expect("inputs");
    let adapter = |l: i64, x: &Tensor| -> Tensor {
        let w = |p: &str| var(&m, &format!("adapters.{l}.{p}"));
        let d = (x.matmul(&w("down.weight").tr()) + w("down.bias")).silu();
        x + d.matmul(&w("up.weight").tr()) + w("up.bias")
    };
    let labels = Tensor::from_slice(&s[1..]);
    let ce = |x: &Tensor| -> Tensor {
        let logits = t.logits(&t.final_norm(&x.narrow(1, 0, n - 1))).get(0);
        -logits
            .log_softmax(-1, Kind::Float)
            .gather(1, &labels.view([-1, 1]), false)
            .mean(Kind::Float)
    };
    let h1 = f.aux_hidden.as_ref().expect("aux").shallow_clone();
    let x2 = adapter(
        2,
        &t.run_layers(h1.shallow_clone(), 2..3, &inputs, None, None)
            .expect("layer 2"),
    );
    let x3 = adapter(
        3,
        &t.run_layers(x2.shallow_clone(), 3..4, &inputs, None, None)
            .expect("layer 3"),
    );
    let emb = t.embed(&f.input_ids);
    let a0 = (emb.matmul(&var(&m, "align.0.weight").tr()) + var(&m, "align.0.bias")).silu();
    let pseudo = a0.matmul(&var(&m, "align.1.weight").tr()) + var(&m, "align.1.bias");
    let mse = (pseudo - &h1).square().mean(Kind::Float);
    let want = ce(&x2) * 0.3 + ce(&x3) * 0.7 + mse * 0.5;
    let (a, b) = (out.loss.double_value(&[]), want.double_value(&[]));
    assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "loss {a} vs hand {b}");
    let acc = out.metrics.iter().find(|x| x.name == "acc/layer3").expect("acc/layer3");
    assert_eq!(acc.count, (n - 1) as f64);

    // only exit 3 weighted: its gradient reaches adapter 2 through the frozen layer 3
    let m = build(&t, spec(&t, 2, 2, vec![0.0, 1.0], 2));
    reinit_trainable(m.var_store(), 9);
    let out = m.loss(&f, &ctx(&t)).expect("loss");
    out.loss.backward();
    let g = var(&m, "adapters.2.up.weight").grad();
    assert!(
        g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
        "no gradient through the frozen layer"
    );
    for (name, v) in t.vs.variables() {
        assert!(
            !v.requires_grad() && !v.grad().defined(),
            "target {name} got a gradient"
        );
    }
}

#[test]
fn training_lowers_the_losses_and_leaves_the_target_bit_identical() {
    let t = target4(5);
    let before: Vec<(String, Tensor)> = t.vs.variables().into_iter().map(|(n, v)| (n, v.copy())).collect();
    let m = build(&t, spec(&t, 2, 2, vec![0.5, 0.5], 2));
    reinit_trainable(m.var_store(), 10);
    tch::no_grad(|| {
        for l in [2, 3] {
            let _ = var(&m, &format!("adapters.{l}.up.weight")).zero_();
        }
    });
    let mut opt = tch::nn::Adam::default().build(m.var_store(), 3e-3).expect("adam");
    let f = features(&t, &seq(), 2);
    let metric = |o: &forge_models::drafters::LossOutput, name: &str| {
        o.parts
            .iter()
            .chain(&o.metrics)
            .find(|x| x.name == name)
            .expect(name)
            .value()
    };
    let first = m.loss(&f, &ctx(&t)).expect("loss");
    let (l0, a0, c0) = (
        first.loss.double_value(&[]),
        metric(&first, "align/mse"),
        metric(&first, "ce/layer2"),
    );
    for _ in 0..60 {
        let out = m.loss(&f, &ctx(&t)).expect("loss");
        opt.zero_grad();
        out.loss.backward();
        opt.step();
    }
    let last = m.loss(&f, &ctx(&t)).expect("loss");
    let (l1, a1, c1) = (
        last.loss.double_value(&[]),
        metric(&last, "align/mse"),
        metric(&last, "ce/layer2"),
    );
    assert!(l1 < 0.7 * l0, "loss {l0} -> {l1}");
    assert!(a1 < 0.7 * a0, "alignment mse {a0} -> {a1}");
    assert!(c1 < c0, "exit 2 cross-entropy {c0} -> {c1}");
    let after = t.vs.variables();
    assert_eq!(before.len(), after.len());
    for (n, a) in &before {
        assert!(a.equal(&after[n]), "target weight {n} changed");
    }
}

/// Greedy self-speculative decoding gives plain greedy output for both exits, every
/// serial/parallel split and draft length: with fresh adapters (the target's early exit,
/// which agrees with the target often) and random ones (mostly rejected).
#[test]
fn greedy_self_speculative_output_equals_plain_greedy_output_including_after_rejections() {
    let t = target4(6);
    let prompts = [vec![1i64, 17, 42, 5, 66, 23], vec![3, 80, 80, 12]];
    let (mut accepted, mut rejected) = (0usize, 0usize);
    for (exit, random) in [(2i64, false), (2, true), (3, false), (3, true)] {
        for transition in [0i64, 2, 5] {
            let m = build(&t, spec(&t, 2, exit, vec![0.5, 0.5], transition));
            if random {
                reinit_trainable(m.var_store(), 11);
            }
            eprintln!("exit {exit} random {random} transition {transition}");
            let (a, r) = crate::eval::greedy_lossless(&t, &m, &prompts, &[1, 4], 30);
            accepted += a;
            rejected += r;
        }
    }
    assert!(
        accepted > 20 && rejected > 20,
        "accepted {accepted} drafts, {rejected} rounds with a rejection"
    );
}

/// The verification forward through the session (layers 0..k reused from drafting for the
/// serial inputs) equals a full forward of the target over the same tokens.
#[test]
fn verification_reusing_the_drafts_shallow_layers_equals_a_full_forward() {
    let t = target4(7);
    let m = build(&t, spec(&t, 2, 3, vec![0.5, 0.5], 2));
    reinit_trainable(m.var_store(), 12);
    let prompt = [1i64, 17, 42, 5, 66, 23];
    let mut s = m.session(&t).expect("session");
    let cap = Capture {
        layers: vec![1],
        logits: LogitsMode::All,
    };
    let pre = s
        .shared_target()
        .expect("shared")
        .forward(&prompt, &cap)
        .expect("prefill");
    let features = StepFeatures {
        hidden_normed: pre.hidden_normed.get(0),
        aux: Some(pre.layers[0].get(0)),
    };
    let mut next = prompt[1..].to_vec();
    next.push(40);
    s.commit(0, &features, &next).expect("commit");
    let p = s.propose(4, &Sampling::greedy(), &mut RowRng::new(0)).expect("propose");
    let mut input = vec![40];
    input.extend_from_slice(&p.tokens);
    let ver = s
        .shared_target()
        .expect("shared")
        .forward(&input, &cap)
        .expect("verify");
    let full: Vec<i64> = prompt.iter().chain(&input).copied().collect();
    let all =
        tch::no_grad(|| t.forward(&Tensor::from_slice(&full).view([1, -1]), None, None, None, &cap)).expect("full");
    let want = all
        .logits
        .expect("logits")
        .narrow(1, prompt.len() as i64, input.len() as i64);
    let d = max_abs_diff(&ver.logits.expect("logits"), &want);
    assert!(d < 1e-4, "verification logits differ from a full forward by {d}");
    let d = max_abs_diff(
        &ver.layers[0],
        &all.layers[0].narrow(1, prompt.len() as i64, input.len() as i64),
    );
    assert!(d < 1e-4, "captured layer 1 differs by {d}");
    // a rollback keeps the accepted prefix: the next verification is still exact
    s.shared_target().expect("shared").truncate(prompt.len() as i64 + 2);
    let again = s
        .shared_target()
        .expect("shared")
        .forward(&[input[2], 7, 8], &cap)
        .expect("verify");
    let full2: Vec<i64> = prompt
        .iter()
        .chain(&input[..2])
        .chain(&[input[2], 7, 8])
        .copied()
        .collect();
    let all2 =
        tch::no_grad(|| t.forward(&Tensor::from_slice(&full2).view([1, -1]), None, None, None, &cap)).expect("full");
    let want2 = all2.logits.expect("logits").narrow(1, full2.len() as i64 - 3, 3);
    assert!(max_abs_diff(&again.logits.expect("logits"), &want2) < 1e-4);
}

/// The session's proposals are the training stream's exits: for every draft input, the exit
/// logits equal a no-cache computation over the whole sequence, serial inputs through the
/// target's layers 0..k, parallel ones from the alignment head's pseudo states (all of them
/// as layer k's inputs at their positions), then the adapters and layers k+1..e. A long
/// prompt makes the target's cache and the fork outgrow their first buffers.
#[test]
fn proposals_equal_the_training_stream_computed_without_a_cache() {
    let t = target4(13);
    let prompt: Vec<i64> = (0..61).map(|i| (i * 37 + 5) % 96).collect();
    for (exit, transition) in [(2i64, 9i64), (3, 9), (2, 0), (3, 2)] {
        let m = build(&t, spec(&t, 2, exit, vec![0.5, 0.5], transition));
        reinit_trainable(m.var_store(), 14);
        let mut s = m.session(&t).expect("session");
        let cap = Capture {
            layers: vec![1],
            logits: LogitsMode::All,
        };
        let pre = s
            .shared_target()
            .expect("shared")
            .forward(&prompt, &cap)
            .expect("prefill");
        let features = StepFeatures {
            hidden_normed: pre.hidden_normed.get(0),
            aux: Some(pre.layers[0].get(0)),
        };
        let last = 40i64;
        let mut next = prompt[1..].to_vec();
        next.push(last);
        s.commit(0, &features, &next).expect("commit");
        let g = 6;
        let p = s.propose(g, &Sampling::greedy(), &mut RowRng::new(0)).expect("propose");
        // by hand: inputs = prompt, last, d_1..d_{g-1}; layer k's inputs are the real h_1 for
        // the prompt and the serial inputs, the pseudo ones for the parallel inputs
        let inputs: Vec<i64> = prompt
            .iter()
            .copied()
            .chain(std::iter::once(last))
            .chain(p.tokens[..g - 1].iter().copied())
            .collect();
        let n = inputs.len() as i64;
        let ids = Tensor::from_slice(&inputs).view([1, n]);
        let cap1 = Capture {
            layers: vec![1],
            logits: LogitsMode::None,
        };
        let real = tch::no_grad(|| t.forward(&ids, None, None, None, &cap1))
            .expect("forward")
            .layers[0]
            .shallow_clone();
        let first_parallel = prompt.len() as i64 + transition.min(g as i64);
        let h1 = if first_parallel < n {
            let pseudo = m.align(&t.embed(&ids)).to_kind(Kind::Float);
            Tensor::cat(
                &[
                    real.narrow(1, 0, first_parallel),
                    pseudo.narrow(1, first_parallel, n - first_parallel),
                ],
                1,
            )
        } else {
            real
        };
        let li = t.layer_inputs(1, n, 0, None, None).expect("inputs");
        let w = |l: i64, p: &str| var(&m, &format!("adapters.{l}.{p}"));
        let adapter = |l: i64, x: &Tensor| {
            x + (x.matmul(&w(l, "down.weight").tr()) + w(l, "down.bias"))
                .silu()
                .matmul(&w(l, "up.weight").tr())
                + w(l, "up.bias")
        };
        let mut x = adapter(2, &t.run_layers(h1, 2..3, &li, None, None).expect("layer 2"));
        if exit == 3 {
            x = adapter(3, &t.run_layers(x, 3..4, &li, None, None).expect("layer 3"));
        }
        let want = t
            .logits(&t.final_norm(&x.narrow(1, prompt.len() as i64, g as i64)))
            .get(0);
        let d = max_abs_diff(&p.logits, &want);
        assert!(
            d < 1e-4,
            "exit {exit} transition {transition}: proposal logits differ from the stream by {d}"
        );
    }
}

/// Sampled self-speculative decoding runs to the end with tokens of the vocabulary and
/// acceptance counts that add up.
#[test]
fn sampled_self_speculative_decoding_runs() {
    let t = target4(15);
    let m = build(&t, spec(&t, 2, 3, vec![0.5, 0.5], 1));
    let mut s = m.session(&t).expect("session");
    let opts = SpecOptions {
        gamma: 4,
        max_new_tokens: 40,
        sampling: Sampling::at(0.8),
        seed: 3,
        ..Default::default()
    };
    let got = speculative_generate(&t, s.as_mut(), &m.spec().feature_needs(), &[1, 17, 42, 5], &opts).expect("sampled");
    assert_eq!(got.tokens.len(), 40);
    assert!(got.tokens.iter().all(|&x| (0..96).contains(&x)));
    let emitted: usize = got.rounds.iter().map(|r| r.emitted).sum();
    assert_eq!(emitted + 1, got.tokens.len());
    // one session decodes one sequence
    let again = speculative_generate(&t, s.as_mut(), &m.spec().feature_needs(), &[1, 2], &opts);
    assert!(again.err().is_some_and(|e| e.to_string().contains("one sequence")));
}

#[test]
fn a_spaf_draft_refuses_a_target_it_was_not_trained_in() {
    let t = target4(8);
    let m = build(&t, spec(&t, 2, 2, vec![0.5, 0.5], 2));
    assert!(m.session(&t).is_ok());
    let other = target4(9);
    let err = m.session(&other).err().expect("refused").to_string();
    assert!(err.contains("trained inside another target"), "{err}");
    // the same weights in bf16 are the same target
    let dir = forge_tests::tmp_dir("spaf-bf16-target");
    t.save_hf(&dir).expect("save");
    let bf16 = TargetModel::load(&dir, forge_models::DType::BF16, Device::Cpu).expect("bf16");
    assert!(m.session(&bf16).is_ok());
    let small = forge_tests::random_target("llama", 1);
    let err = m.session(&small).err().expect("refused").to_string();
    assert!(err.contains("4 layers") && err.contains("2 layers"), "{err}");
    assert!(m.session(&t).is_ok());
}

/// `forge train` with the tiny recipe: the loss falls; the checkpoint exports to the forge
/// format alone (the adapters, the alignment head and the probe: nothing of the target),
/// reloads to the same weights, decodes losslessly in `forge eval`, and a resumed run
/// reproduces the uninterrupted one.
#[test]
fn spaf_trains_exports_reloads_evaluates_and_resumes_exactly() {
    let run = TinyRun::with_layers("spaf-cli", "recipes/spaf-tiny.yaml", true, 4);
    let full = run.dir.join("full");
    let out = run.train(
        &full,
        &[
            "--set",
            "train.max_steps=12",
            "--set",
            "checkpoint.every_steps=6",
            "--set",
            "train.lr=1e-2",
        ],
    );
    let l = losses(&full);
    assert_eq!(l.len(), 12);
    let (first, last) = (
        l[..3].iter().map(|x| x.1).sum::<f64>(),
        l[9..].iter().map(|x| x.1).sum::<f64>(),
    );
    assert!(last < first * 0.9, "{l:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("parameter group all: 12 tensors"), "{err}");
    let rows = metrics_rows(&full.join("metrics.jsonl"));
    assert!(rows
        .iter()
        .any(|r| r.get("train/align/mse").is_some() && r.get("train/acc/layer2").is_some()));

    let ck = full.join("step_12");
    let exp = run.dir.join("export");
    let b = forge_tests::export_forge_equal_to(&ck, &exp);
    for (n, _) in &b {
        assert!(
            n.starts_with("adapters.") || n.starts_with("align.") || n == "target_probe",
            "{n} is not a SpAF part"
        );
    }
    for fmt in ["vllm", "sglang"] {
        let o = forge(&[
            "export",
            ck.to_str().expect("utf8"),
            "--format",
            fmt,
            "--out",
            run.dir.join(fmt).to_str().expect("utf8"),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("inside the target itself"), "{err}");
    }

    let prompts = forge_tests::two_turn_questions(&run.dir);
    let json = run.dir.join("report.json");
    let target = run.target.display().to_string();
    let o = forge(&[
        "eval",
        "--target",
        &target,
        "--draft",
        exp.to_str().expect("utf8"),
        "--prompts",
        prompts.to_str().expect("utf8"),
        "--max-new-tokens",
        "12",
        "--gamma",
        "4",
        "--verify",
        "--json",
        json.to_str().expect("utf8"),
        "--progress",
        "never",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("json");
    assert_eq!(r["summary"]["greedy_mismatches"], 0);
    // what the draft adds to the target's memory: its weights (its KV cache is the target's)
    let numel: i64 = b.iter().map(|(_, t)| t.numel() as i64).sum();
    assert_eq!(r["draft"]["weights"].as_i64(), Some(numel));
    assert_eq!(r["draft"]["weight_bytes"].as_i64(), Some(4 * numel));
    // serial draft inputs (two per round) and parallel ones (the rest of each proposal of 4)
    let c = &r["summary"]["draft_counters"];
    let (serial, parallel) = (
        c["spaf/serial"].as_u64().expect("serial"),
        c["spaf/parallel"].as_u64().expect("parallel"),
    );
    assert!(serial > 0 && parallel > 0 && serial >= parallel, "{c}");

    // another target: refused with the reason
    let other = forge_tests::tiny_target_with_demo_tokenizer_layers(&run.dir.join("other"), 99, 4);
    let o = forge(&[
        "eval",
        "--target",
        other.to_str().expect("utf8"),
        "--draft",
        exp.to_str().expect("utf8"),
        "--prompts",
        prompts.to_str().expect("utf8"),
        "--max-new-tokens",
        "4",
        "--progress",
        "never",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("trained inside another target"),
        "{err}"
    );

    // resume: 6 steps, then 6 more from step_6, equal the 12 in one go
    let cut = run.dir.join("cut");
    run.train(
        &cut,
        &[
            "--set",
            "train.max_steps=6",
            "--set",
            "checkpoint.every_steps=6",
            "--set",
            "train.lr=1e-2",
        ],
    );
    run.train(
        &cut,
        &[
            "--set",
            "train.max_steps=12",
            "--set",
            "checkpoint.every_steps=6",
            "--set",
            "train.lr=1e-2",
            "--resume",
            "auto",
        ],
    );
    let (x, y) = (losses(&full), losses(&cut));
    assert_eq!(x.len(), y.len());
    for ((s, a), (_, b)) in x.iter().zip(&y) {
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "step {s}: {a} vs {b}");
    }
    let (wa, wb) = (
        forge_tests::step_weights(&ck),
        forge_tests::step_weights(&cut.join("step_12")),
    );
    for ((n, a), (_, b)) in wa.iter().zip(&wb) {
        assert!(a.equal(b), "{n} differs after resume");
    }
}
