//! The gated hybrid drafter: Gumbel-Softmax sampling (soft and straight-through), the expected
//! compute cost, the loss against a hand computation, hard-gated decoding against the
//! training forward, a large cost weight driving the gate to the MLP blocks, training,
//! export and reload through the CLI.

use forge_models::drafters::eagle::DraftLayerSpec;
use forge_models::drafters::eagle3::install_vocab_mapping;
use forge_models::drafters::hybrid::{
    expected_cost, gumbel_softmax, one_hot_argmax, CostMode, Hybrid, HybridSpec, LambdaSchedule, TemperatureSchedule,
};
use forge_models::drafters::{Drafter, Features, StepContext, StepRng};
use forge_models::generate::{RowRng, Sampling};
use forge_models::speculative::StepFeatures;
use forge_models::{Capture, LogitsMode, TargetModel};
use forge_tests::{forge, max_abs_diff, metrics_rows, random_target, reinit_trainable, TargetHeads, TinyRun};
use tch::{Device, Kind, Tensor};

pub(crate) fn spec(t: &TargetModel, mlp: i64, transformer: i64) -> HybridSpec {
    HybridSpec {
        num_mlp_blocks: mlp,
        num_transformer_blocks: transformer,
        gate_hidden_size: 16,
        mlp_intermediate_size: 64,
        gumbel_temperature: 2.0,
        gumbel_temperature_end: 0.5,
        anneal_steps: None,
        temperature_schedule: TemperatureSchedule::Geometric,
        hard: false,
        distill: false,
        cost: CostMode::Fixed,
        mlp_cost: 1.0,
        transformer_cost: 5.0,
        cost_lambda: 0.3,
        cost_lambda_schedule: LambdaSchedule::Constant,
        cost_lambda_start: 0.0,
        cost_lambda_steps: None,
        feature_weight: 0.0,
        gate_lr_scale: 1.0,
        draft_vocab_size: None,
        vocab_size: t.config.vocab_size,
        layer: DraftLayerSpec::from_target(&t.config, None, None, None, None).expect("layer"),
    }
}

pub(crate) fn hybrid(t: &TargetModel, s: HybridSpec, seed: u64) -> Hybrid {
    let heads = TargetHeads {
        lm_head: Some(t.lm_head_weight().detach()),
        embed: Some(t.embed_weight().detach()),
    };
    let m = Hybrid::new(s, &heads.access(), Device::Cpu, Kind::Float).expect("hybrid");
    reinit_trainable(m.var_store(), seed);
    m
}

fn features(t: &TargetModel, seq: &[i64], loss_mask: &[i64]) -> Features {
    let n = seq.len() as i64;
    let ids = Tensor::from_slice(seq).view([1, n]);
    let out = tch::no_grad(|| t.forward(&ids, None, None, None, &Capture::logits(LogitsMode::None))).expect("forward");
    Features {
        input_ids: ids.shallow_clone(),
        attention_mask: ids.ones_like(),
        position_ids: Tensor::arange(n, (Kind::Int64, Device::Cpu)).view([1, n]),
        loss_mask: Tensor::from_slice(loss_mask).view([1, n]),
        hidden_normed: Some(out.hidden_normed),
        aux_hidden: None,
        target_topk: None,
    }
}

fn metric(out: &forge_models::drafters::LossOutput, name: &str) -> f64 {
    out.parts
        .iter()
        .chain(&out.metrics)
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("no metric {name}"))
        .value()
}

#[test]
fn gumbel_max_frequencies_are_the_softmax_and_soft_samples_approach_it_as_the_temperature_falls() {
    let logits = Tensor::from_slice(&[1.0f32, 0.0, -1.0, 2.0, 0.5]);
    let p = logits.softmax(-1, Kind::Float);
    let n = 200_000;
    let g = StepRng::new(9, 0, 0).gumbel(&[n, 5], Device::Cpu);
    let big = logits.view([1, 5]).expand([n, 5], false);
    // hard samples (the arg-max of logits + Gumbel noise) are drawn from softmax(logits)
    let freq = one_hot_argmax(&(&big + &g)).mean_dim(0, false, Kind::Float);
    let d = max_abs_diff(&freq, &p);
    assert!(d < 5e-3, "hard-sample frequencies {freq} vs softmax {p}");
    // soft samples average to the softmax as the temperature falls (to the hard samples'
    // frequencies with the same noise, which are the softmax up to sampling error), to
    // uniform as it grows
    let mut last = f64::INFINITY;
    for tau in [8.0, 2.0, 0.5, 0.1, 0.02] {
        let mean = gumbel_softmax(&big, &g, tau, false).mean_dim(0, false, Kind::Float);
        let d = max_abs_diff(&mean, &freq);
        assert!(d < last, "tau {tau}: {d} not below {last}");
        last = d;
    }
    assert!(
        last < 1e-3,
        "tau 0.02: mean differs from the arg-max frequencies by {last}"
    );
    let hot = gumbel_softmax(&big, &g, 1000.0, false).mean_dim(0, false, Kind::Float);
    assert!(max_abs_diff(&hot, &Tensor::full([5], 0.2, (Kind::Float, Device::Cpu))) < 1e-3);
    // every sample is a distribution
    let rows = gumbel_softmax(&big, &g, 0.7, false).sum_dim_intlist(-1, false, Kind::Float);
    assert!(max_abs_diff(&rows, &rows.ones_like()) < 1e-5);
}

#[test]
fn hard_samples_are_one_hot_with_the_straight_through_gradient() {
    let base = Tensor::from_slice(&[0.3f32, -1.2, 0.8, 0.1, 0.5, 0.0, -0.4, 1.1]).view([2, 4]);
    let g = StepRng::new(3, 1, 0).gumbel(&[2, 4], Device::Cpu);
    let costs = Tensor::from_slice(&[1.0f32, 2.0, 5.0, 7.0]);
    let grad = |hard: bool| {
        let l = base.copy().set_requires_grad(true);
        let y = gumbel_softmax(&l, &g, 0.7, hard);
        (&y * &costs).sum(Kind::Float).backward();
        (y.detach(), l.grad())
    };
    let (soft, g_soft) = grad(false);
    let (hard, g_hard) = grad(true);
    // forward: exactly one-hot at the soft sample's arg-max
    assert!(hard.equal(&one_hot_argmax(&soft)), "{hard}");
    assert_eq!(hard.sum(Kind::Float).double_value(&[]), 2.0);
    // backward: the soft sample's gradient
    assert!(max_abs_diff(&g_soft, &g_hard) < 1e-6, "{g_soft} vs {g_hard}");
    assert!(g_hard.abs().sum(Kind::Float).double_value(&[]) > 1e-3);
}

#[test]
fn the_loss_equals_a_hand_computation_of_fused_blocks_cross_entropy_and_expected_cost() {
    let t = random_target("llama", 31);
    let mut s = spec(&t, 2, 2);
    s.feature_weight = 0.5;
    let m = hybrid(&t, s.clone(), 5);
    // a gate that is not uniform
    tch::no_grad(|| {
        for (n, mut v) in m.var_store().variables() {
            if n.starts_with("gate.fc2") {
                v.copy_(&forge_tests::TestRng::for_name(6, &n).normal_tensor(&v.size(), 0.5));
            }
        }
    });
    let seq = [1i64, 30, 4, 77, 12, 9, 50, 61, 8, 3];
    let mask = [0i64, 0, 0, 1, 1, 0, 1, 1, 1, 1];
    let f = features(&t, &seq, &mask);
    let feats = f.hidden_normed.as_ref().expect("hidden").shallow_clone();
    let (step, total) = (30, 60);
    let ctx = StepContext::train(7, step, total, 2);
    let out = m.loss(&f, &ctx).expect("loss");

    // by hand: the same Gumbel noise (the context's first draw), the annealed temperature
    let tau = 2.0 * (0.5f64 / 2.0).powf(30.0 / 60.0);
    assert!((metric(&out, "gate/temperature") - tau).abs() < 1e-9);
    let noise = StepContext::train(7, step, total, 2)
        .rng
        .gumbel(&[1, 10, 4], Device::Cpu);
    let (x, outs) = tch::no_grad(|| m.block_outputs(&f, &feats));
    // MLP block 0 written out: x + down(silu(gate(rms(x))) * up(rms(x))) (norm weights are 1)
    let vars = m.var_store().variables();
    let w = |n: &str| vars.get(n).unwrap_or_else(|| panic!("{n}")).detach();
    let rms = |x: &Tensor| x * (x.square().mean_dim(-1, true, Kind::Float) + 1e-6).rsqrt();
    let xn = rms(&x);
    let mlp0 = &x
        + (xn.matmul(&w("mlp_blocks.0.mlp.gate_proj.weight").tr()).silu()
            * xn.matmul(&w("mlp_blocks.0.mlp.up_proj.weight").tr()))
        .matmul(&w("mlp_blocks.0.mlp.down_proj.weight").tr());
    assert!(max_abs_diff(&mlp0, &outs[0]) < 1e-5);
    // gate: fc2(silu(fc1(x)))
    let gl = (x.matmul(&w("gate.fc1.weight").tr()) + w("gate.fc1.bias"))
        .silu()
        .matmul(&w("gate.fc2.weight").tr())
        + w("gate.fc2.bias");
    let weights = ((&gl + &noise) / tau).softmax(-1, Kind::Float);
    let fused = outs
        .iter()
        .enumerate()
        .map(|(i, y)| y * weights.narrow(-1, i as i64, 1))
        .reduce(|a, b| a + b)
        .expect("blocks");
    let pred = rms(&fused);
    // positions p with a trained token at p + 2
    let rows: Vec<i64> = (0..8).filter(|&p| mask[p as usize + 2] == 1).collect();
    let idx = Tensor::from_slice(&rows);
    let head = t.lm_head_weight().detach();
    let logits = pred.get(0).index_select(0, &idx).matmul(&head.tr());
    let labels = Tensor::from_slice(&rows.iter().map(|&p| seq[p as usize + 2]).collect::<Vec<_>>());
    let ce = logits.cross_entropy_for_logits(&labels).double_value(&[]);
    let probs = gl.get(0).index_select(0, &idx).softmax(-1, Kind::Float);
    let costs = Tensor::from_slice(&[1.0f32, 1.0, 5.0, 5.0]);
    let cost = (&probs * &costs)
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    let target_next = feats.get(0).index_select(0, &(&idx + 1));
    let feat = pred
        .get(0)
        .index_select(0, &idx)
        .smooth_l1_loss(&target_next, tch::Reduction::None, 1.0)
        .mean_dim(-1, false, Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    let want = ce + 0.3 * cost + 0.5 * feat;
    let got = out.loss.double_value(&[]);
    assert!((got - want).abs() < 1e-4, "loss {got} vs hand {want}");
    assert!((metric(&out, "draft/ce") - ce).abs() < 1e-4);
    assert!((metric(&out, "cost/weighted") - 0.3 * cost).abs() < 1e-5);
    assert!((metric(&out, "gate/expected_cost") - cost).abs() < 1e-5);
    // expected cost = sum_i p_i c_i, the helper on its own
    assert!((expected_cost(&probs, &costs).mean(Kind::Float).double_value(&[]) - cost).abs() < 1e-6);
    let mlp_mass = probs.narrow(1, 0, 2).sum(Kind::Float).double_value(&[]) / rows.len() as f64;
    assert!((metric(&out, "gate/mlp_mass") - mlp_mass).abs() < 1e-5);
    assert!((metric(&out, "gate/mlp_mass") + metric(&out, "gate/transformer_mass") - 1.0).abs() < 1e-5);
    // evaluation: the arg-max block alone, no noise
    let ev = m.loss(&f, &StepContext::eval(7, step, total)).expect("eval loss");
    let hard = one_hot_argmax(&gl);
    let fused = outs
        .iter()
        .enumerate()
        .map(|(i, y)| y * hard.narrow(-1, i as i64, 1))
        .reduce(|a, b| a + b)
        .expect("blocks");
    let logits = rms(&fused).get(0).index_select(0, &idx).matmul(&head.tr());
    let ce = logits.cross_entropy_for_logits(&labels).double_value(&[]);
    assert!((metric(&ev, "draft/ce") - ce).abs() < 1e-4);
    // every parameter gets a gradient (the gate through the weights and the cost)
    out.loss.backward();
    for (n, v) in m.var_store().trainable_variables().iter().enumerate() {
        assert!(
            v.grad().defined() && v.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "variable {n} has no gradient"
        );
    }
}

fn step_features(f: &Features, len: i64) -> StepFeatures {
    StepFeatures {
        hidden_normed: f.hidden_normed.as_ref().expect("hidden").get(0).narrow(0, 0, len),
        aux: None,
    }
}

/// A hybrid drafter over the draft vocabulary of the even target ids.
pub(crate) fn with_even_vocab(t: &TargetModel, mut s: HybridSpec, seed: u64) -> Hybrid {
    let v = t.config.vocab_size;
    s.draft_vocab_size = Some(v / 2);
    let m = hybrid(t, s, seed);
    let d2t: Vec<i64> = (0..v / 2).collect(); // draft id i -> target id 2i
    let t2d: Vec<bool> = (0..v).map(|i| i % 2 == 0).collect();
    install_vocab_mapping(m.var_store(), &d2t, &t2d, Some(t.lm_head_weight())).expect("mapping");
    m
}

#[test]
fn a_draft_vocabulary_head_trains_on_the_labels_it_holds_mapped_to_draft_ids() {
    let t = random_target("llama", 35);
    let m = with_even_vocab(&t, spec(&t, 1, 1), 10);
    // the head starts as the target's lm_head rows of the draft vocabulary
    let vars = m.var_store().variables();
    let head = vars.get("lm_head.weight").expect("lm_head").detach();
    let even = Tensor::arange_start_step(0, t.config.vocab_size, 2, (Kind::Int64, Device::Cpu));
    assert!(head.equal(&t.lm_head_weight().index_select(0, &even)));
    let seq = [1i64, 30, 4, 77, 12, 9, 50, 61, 8, 3];
    let f = features(&t, &seq, &[1; 10]);
    let feats = f.hidden_normed.as_ref().expect("hidden").shallow_clone();
    let out = m.loss(&f, &StepContext::eval(0, 0, 1)).expect("loss");
    let fw = tch::no_grad(|| m.forward_with(&f, &feats, one_hot_argmax)).expect("forward");
    // trained: p = 0..7 whose label seq[p+2] is even (4, 12, 50, 8), as draft ids label / 2
    let rows: Vec<i64> = (0..8).filter(|&p| seq[p as usize + 2] % 2 == 0).collect();
    assert_eq!(rows, [0, 2, 4, 6]);
    let idx = Tensor::from_slice(&rows);
    let logits = fw.predicted.get(0).index_select(0, &idx).matmul(&head.tr());
    let labels = Tensor::from_slice(&rows.iter().map(|&p| seq[p as usize + 2] / 2).collect::<Vec<_>>());
    let ce = logits.cross_entropy_for_logits(&labels).double_value(&[]);
    assert!(
        (metric(&out, "draft/ce") - ce).abs() < 1e-4,
        "{} vs {ce}",
        metric(&out, "draft/ce")
    );
    let top1 = logits
        .argmax(-1, false)
        .eq_tensor(&labels)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]);
    assert!((metric(&out, "acc/top1") - top1).abs() < 1e-9);
    assert_eq!(out.parts[0].count, 4.0);
}

#[test]
fn hard_gated_decoding_equals_the_training_forward_with_one_hot_gates() {
    let t = random_target("llama", 33);
    // a random gate, gates forced to one MLP block and to one transformer block, and a random
    // gate with a draft-vocabulary head
    for (force, draft_vocab) in [(None, false), (Some(0i64), false), (Some(3), false), (None, true)] {
        let m = if draft_vocab {
            with_even_vocab(&t, spec(&t, 2, 2), 8)
        } else {
            hybrid(&t, spec(&t, 2, 2), 8)
        };
        if let Some(b) = force {
            tch::no_grad(|| {
                for (n, mut v) in m.var_store().variables() {
                    if n == "gate.fc2.bias" {
                        let bias = Tensor::zeros([4], (Kind::Float, Device::Cpu));
                        let _ = bias.get(b).fill_(100.0);
                        v.copy_(&bias);
                    }
                }
            });
        }
        let seq: Vec<i64> = vec![1, 30, 4, 77, 12, 9, 50, 61, 8];
        let n = 8;
        let f = features(&t, &seq[..n], &[1; 8]);
        let mut s = m.session(&t).expect("session");
        s.commit(0, &step_features(&f, n as i64), &seq[1..=n]).expect("commit");
        let p = tch::no_grad(|| s.propose(3, &Sampling::greedy(), &mut RowRng::new(0))).expect("propose");
        let counts = s.counters();
        // the training forward with arg-max gates on the sequence continued with the proposals
        let full: Vec<i64> = seq.iter().copied().chain(p.tokens[..2].iter().copied()).collect();
        let ff = features(&t, &full, &[1; 11]);
        let feats = ff.hidden_normed.as_ref().expect("hidden").copy();
        for i in 0..3 {
            let pos = n as i64 - 1 + i;
            let fw = tch::no_grad(|| m.forward_with(&ff, &feats, one_hot_argmax)).expect("forward");
            let predicted = fw.predicted.get(0).get(pos);
            let want = tch::no_grad(|| m.proposal_logits(&predicted.view([1, -1]))).view([-1]);
            let got = p.logits.get(i);
            // -inf outside a draft vocabulary, in both
            let finite = want.isfinite();
            assert!(got.isfinite().equal(&finite));
            let d = max_abs_diff(&got.masked_select(&finite), &want.masked_select(&finite));
            assert!(
                d < 1e-4,
                "force {force:?} draft vocabulary {draft_vocab}: proposal {i} differs from the training forward by {d}"
            );
            // the next step reads the predicted feature in place of the target's
            tch::no_grad(|| feats.get(0).get(pos + 1).copy_(&predicted));
        }
        // the commit's block plus two drafted steps ran, each one block
        assert_eq!(counts.iter().map(|(_, c)| c).sum::<u64>(), 3, "{counts:?}");
        if let Some(b) = force {
            assert_eq!(counts[b as usize].1, 3, "{counts:?}");
        }
    }
}

#[test]
fn a_large_cost_weight_drives_the_gate_to_the_mlp_blocks_and_training_exports_and_reloads() {
    let run = TinyRun::new("hybrid-cli", "recipes/hybrid-tiny.yaml", true);
    let mass = |ckpt: &std::path::Path, key: &str| -> Vec<f64> {
        metrics_rows(&ckpt.join("metrics.jsonl"))
            .iter()
            .filter_map(|r| r[key].as_f64())
            .collect()
    };
    // a heavy cost weight: the gate moves its mass onto the (cheap) MLP blocks
    let heavy = run.dir.join("heavy");
    // (the gate's own learning rate is raised so that 20 steps show it)
    run.train(
        &heavy,
        &[
            "--set",
            "train.max_steps=20",
            "--set",
            "drafter.cost_lambda=5.0",
            "--set",
            "drafter.gate_lr_scale=20",
        ],
    );
    let m = mass(&heavy, "train/gate/mlp_mass");
    assert_eq!(m.len(), 20);
    // the gate starts uniform over 2 + 2 blocks
    assert!((m[0] - 0.5).abs() < 0.05, "{m:?}");
    assert!(m[19] > 0.95, "mlp mass after 20 steps with cost_lambda 5: {m:?}");
    // no cost: the gate is free (it does not collapse onto the MLP blocks); distilled from the
    // (sharpened) target's distribution, which the features predict, the loss falls fast
    let free = run.dir.join("free");
    let out = run.train(
        &free,
        &[
            "--set",
            "train.max_steps=20",
            "--set",
            "drafter.cost_lambda=0",
            "--set",
            "drafter.gate_lr_scale=20",
            "--set",
            "drafter.distill=true",
        ],
    );
    let f = mass(&free, "train/gate/mlp_mass");
    assert!(f[19] < m[19] - 0.2, "without a cost weight {f:?}, with {m:?}");
    // the loss falls and the gate has its own parameter group
    let l = forge_tests::losses(&free);
    let (first, last) = (
        l[..3].iter().map(|x| x.1).sum::<f64>(),
        l[17..].iter().map(|x| x.1).sum::<f64>(),
    );
    assert!(last < first * 0.9, "{l:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("parameter group gate: 4 tensors"), "{err}");

    // export: the forge format reloads to the same weights; engine formats are refused with the reason
    let ck = free.join("step_20");
    let exp = run.dir.join("export");
    let a = forge_tests::export_forge_equal_to(&ck, &exp);
    assert!(a.iter().any(|(n, _)| n == "block_costs"));
    let loaded = forge_trainer::engines::load_drafter(&exp, Device::Cpu).expect("reload export");
    assert_eq!(loaded.spec.kind(), "hybrid");

    // forge eval decodes with the export: lossless, with the block histogram and draft time
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
        "3",
        "--verify",
        "--json",
        json.to_str().expect("utf8"),
        "--progress",
        "never",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("json");
    let s = &r["summary"];
    assert_eq!(s["greedy_mismatches"], 0);
    let counts = s["draft_counters"].as_object().expect("draft_counters");
    let names: Vec<&String> = counts.keys().collect();
    assert_eq!(
        names,
        [
            "block/mlp_0",
            "block/mlp_1",
            "block/transformer_0",
            "block/transformer_1"
        ]
    );
    // one block ran per commit and per drafted position after the first of a proposal
    let runs: u64 = counts.values().map(|v| v.as_u64().expect("count")).sum();
    assert!(
        runs > 0
            && runs
                <= s["drafted_tokens"].as_u64().expect("drafted")
                    + s["target_forwards"].as_u64().expect("forwards")
                    + 2
    );
    assert!(s["draft_ms_per_token"].as_f64().expect("ms") > 0.0);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("ms/token") && stdout.contains("block/mlp_0"),
        "{stdout}"
    );
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
        assert!(
            !o.status.success() && err.contains("gated multi-block") && err.contains("--format forge"),
            "{err}"
        );
    }
}

#[test]
fn a_gate_that_holds_one_block_for_three_log_intervals_is_reported() {
    let t = random_target("llama", 34);
    let mut m = hybrid(&t, spec(&t, 2, 1), 9);
    let interval = |p0: f64| -> Vec<(String, f64)> {
        vec![
            ("train/loss".into(), 3.0),
            ("train/gate/mlp_0_prob".into(), p0),
            ("train/gate/mlp_1_prob".into(), (1.0 - p0) / 2.0),
            ("train/gate/transformer_0_prob".into(), (1.0 - p0) / 2.0),
        ]
    };
    assert!(m.watch(&interval(0.97)).is_empty());
    assert!(m.watch(&interval(0.97)).is_empty());
    // a break resets the count
    assert!(m.watch(&interval(0.6)).is_empty());
    assert!(m.watch(&interval(0.96)).is_empty());
    assert!(m.watch(&interval(0.99)).is_empty());
    let w = m.watch(&interval(0.98));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("mlp_0") && w[0].contains("98.0%") && w[0].contains("cost_lambda"),
        "{w:?}"
    );
    // said once per collapse, not at every interval
    assert!(m.watch(&interval(0.98)).is_empty());
}

#[test]
fn measured_costs_are_timed_printed_scaled_to_the_mlp_cost_and_saved() {
    let run = TinyRun::new("hybrid-measured", "recipes/hybrid-tiny.yaml", false);
    let ck = run.dir.join("run");
    // (with a draft-vocabulary head: prepared from the data the same way)
    let out = run.train(
        &ck,
        &[
            "--set",
            "train.max_steps=2",
            "--set",
            "checkpoint.every_steps=2",
            "--set",
            "drafter.cost=measured",
            "--set",
            "drafter.mlp_cost=2.0",
            "--set",
            "drafter.draft_vocab_size=512",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("hybrid: measured block costs on"))
        .unwrap_or_else(|| panic!("{err}"));
    for b in ["mlp_0", "mlp_1", "transformer_0", "transformer_1"] {
        assert!(line.contains(&format!("{b} ")), "{line}");
    }
    let w = forge_tests::step_weights(&ck.join("step_2"));
    let get = |name: &str| {
        w.iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name}"))
            .1
            .shallow_clone()
    };
    assert_eq!(get("lm_head.weight").size(), [512, 64]);
    let d2t = get("d2t");
    let ids = Tensor::arange(512, (Kind::Int64, Device::Cpu)) + &d2t;
    assert!(
        ids.diff::<Tensor>(1, 0, None, None).gt(0).all().int64_value(&[]) == 1,
        "draft ids ascend"
    );
    assert_eq!(get("t2d").to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]), 512);
    let costs = get("block_costs");
    let c: Vec<f64> = Vec::<f64>::try_from(&costs.to_kind(Kind::Double)).expect("costs");
    assert_eq!(c.len(), 4);
    // scaled so that the MLP blocks' mean is mlp_cost; every cost positive and finite
    assert!(((c[0] + c[1]) / 2.0 - 2.0).abs() < 1e-5, "{c:?}");
    assert!(c.iter().all(|x| x.is_finite() && *x > 0.0), "{c:?}");
    // the costs the loss used are the saved ones: the logged expected cost lies within them
    let rows = metrics_rows(&ck.join("metrics.jsonl"));
    let e = rows[0]["train/gate/expected_cost"].as_f64().expect("expected cost");
    let (lo, hi) = c.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    assert!(e >= lo - 1e-6 && e <= hi + 1e-6, "{e} outside {c:?}");
}

/// The temperature schedules and the lambda schedule give the exact values of their formulas
/// at chosen steps (0-based step of a 100-step run; anneal or ramp over 40 steps, then flat),
/// and specs written before the choices existed read as geometric and constant.
#[test]
fn temperature_and_cost_lambda_schedules_give_their_values_at_given_steps() {
    let t = random_target("llama", 3);
    let mut s = spec(&t, 2, 1);
    (s.gumbel_temperature, s.gumbel_temperature_end, s.anneal_steps) = (1.0, 0.2, Some(40));
    let close = |a: f64, b: f64, what: &str| assert!((a - b).abs() < 1e-12, "{what}: {a} != {b}");
    // (step, geometric 1.0 * 0.2^f, linear 1.0 - 0.8 f, cosine 0.2 + 0.8 (1 + cos(pi f)) / 2)
    let cases = [
        (0, 1.0, 1.0, 1.0),
        (
            10,
            0.2f64.powf(0.25),
            0.8,
            0.2 + 0.4 * (1.0 + std::f64::consts::FRAC_1_SQRT_2),
        ),
        (20, 0.2f64.sqrt(), 0.6, 0.6),
        (
            30,
            0.2f64.powf(0.75),
            0.4,
            0.2 + 0.4 * (1.0 - std::f64::consts::FRAC_1_SQRT_2),
        ),
        (40, 0.2, 0.2, 0.2),
        (99, 0.2, 0.2, 0.2),
    ];
    for (step, geometric, linear, cosine) in cases {
        for (kind, want) in [
            (TemperatureSchedule::Geometric, geometric),
            (TemperatureSchedule::Linear, linear),
            (TemperatureSchedule::Cosine, cosine),
        ] {
            s.temperature_schedule = kind;
            close(s.temperature_at(step, 100), want, &format!("{kind:?} at step {step}"));
        }
    }
    // without anneal_steps the anneal spans the run: linear at step 25 of 100 is 1 - 0.8 / 4
    s.anneal_steps = None;
    s.temperature_schedule = TemperatureSchedule::Linear;
    close(s.temperature_at(25, 100), 0.8, "linear over the run");

    // lambda: constant 0.3; linear from 0.01 to 0.3 over 40 steps, then 0.3
    assert_eq!(s.cost_lambda_schedule, LambdaSchedule::Constant);
    for step in [0, 17, 99] {
        close(s.cost_lambda_at(step, 100), 0.3, "constant");
    }
    (s.cost_lambda_schedule, s.cost_lambda_start, s.cost_lambda_steps) = (LambdaSchedule::Linear, 0.01, Some(40));
    for (step, want) in [(0, 0.01), (10, 0.0825), (20, 0.155), (40, 0.3), (70, 0.3)] {
        close(
            s.cost_lambda_at(step, 100),
            want,
            &format!("linear lambda at step {step}"),
        );
    }
    s.cost_lambda_steps = None;
    close(s.cost_lambda_at(50, 100), 0.155, "linear lambda over the run");

    // the loss uses the step's lambda and reports it
    let m = hybrid(&t, s.clone(), 1);
    let seq = [1i64, 30, 4, 77, 12, 9, 50, 61, 8, 3];
    let f = features(&t, &seq, &[0, 0, 0, 1, 1, 0, 1, 1, 1, 1]);
    let out = m.loss(&f, &StepContext::train(7, 50, 100, 2)).expect("loss");
    close(metric(&out, "gate/cost_lambda"), 0.155, "reported lambda");
    let cost = metric(&out, "gate/expected_cost");
    assert!((metric(&out, "cost/weighted") - 0.155 * cost).abs() < 1e-6);

    // an old spec (no schedule fields) reads with the old behaviour and equals a new default
    let mut old = serde_json::to_value(spec(&t, 2, 1)).expect("json");
    for key in [
        "temperature_schedule",
        "cost_lambda_schedule",
        "cost_lambda_start",
        "cost_lambda_steps",
    ] {
        old.as_object_mut().expect("object").remove(key);
    }
    let old: HybridSpec = serde_json::from_value(old).expect("an old spec");
    assert_eq!(old, spec(&t, 2, 1));
}
