//! Speculative decoding (`forge_models::speculative`, `forge eval`): greedy output equals plain
//! greedy output for every drafter kind (with rollback across rejections), the verification
//! forward's features after rollback equal a full forward's, each drafter's decoding session
//! computes what its training forward computes, speculative sampling follows the target's
//! distribution (chi-square), dynamic gamma follows its rule, and the CLI report.

use forge_models::drafters::eagle::DraftLayerSpec;
use forge_models::drafters::eagle1::{Eagle1, Eagle1Spec};
use forge_models::drafters::eagle3::{install_vocab_mapping, Eagle3, Eagle3Spec};
use forge_models::drafters::hybrid::Hybrid;
use forge_models::drafters::medusa::{Medusa, MedusaSpec};
use forge_models::drafters::{Drafter, FeatureNeeds, Features};
use forge_models::generate::{generate, sample_rows, GenerateOptions, RowRng, Sampling};
use forge_models::speculative::{
    accept_sampled, greedy_divergence, next_gamma, speculative_generate, Acceptance, DraftSession, Proposal,
    SpecOptions, StepFeatures,
};
use forge_models::{Capture, LogitsMode, TargetModel};
use forge_tests::TargetHeads;
use forge_tests::{export_fp32, forge, max_abs_diff, random_target, reinit_trainable, TestRng, TinyRun};
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub(crate) const V: i64 = 96;

fn tensors(t: &TargetModel) -> TargetHeads {
    TargetHeads {
        lm_head: Some(t.lm_head_weight().detach()),
        embed: Some(t.embed_weight().detach()),
    }
}

pub(crate) fn medusa(t: &TargetModel) -> Medusa {
    let m = Medusa::new(
        MedusaSpec {
            num_heads: 4,
            num_layers: 1,
            original_lm_head: false,
            loss_decay: 0.8,
            top_k: 3,
            hidden_size: 64,
            vocab_size: V,
        },
        &tensors(t).access(),
        Device::Cpu,
        Kind::Float,
    )
    .expect("medusa");
    // non-zero residual blocks so that heads differ from the target's head
    tch::no_grad(|| {
        for (n, mut v) in m.var_store().variables() {
            if n.starts_with("blocks") {
                v.copy_(&TestRng::for_name(11, &n).normal_tensor(&v.size(), 0.2));
            }
        }
    });
    m
}

pub(crate) fn eagle1(t: &TargetModel) -> Eagle1 {
    let m = Eagle1::new(
        Eagle1Spec {
            feature_weight: 1.0,
            token_weight: 0.1,
            feature_noise: 0.0,
            fc_bias: true,
            vocab_size: V,
            layer: DraftLayerSpec::from_target(&t.config, None, None, None, None).expect("layer"),
        },
        &tensors(t).access(),
        Device::Cpu,
        Kind::Float,
    )
    .expect("eagle1");
    reinit_trainable(m.var_store(), 12);
    m
}

/// EAGLE-3 over the two tiny layers with a draft vocabulary of the even target ids.
pub(crate) fn eagle3(t: &TargetModel) -> Eagle3 {
    eagle3_on(t, Device::Cpu)
}

/// [`eagle3`] on `dev` (tests/cuda.rs builds it on the GPU).
pub(crate) fn eagle3_on(t: &TargetModel, dev: Device) -> Eagle3 {
    let v = t.config.vocab_size;
    let m = Eagle3::new(
        Eagle3Spec {
            ttt_length: 3,
            step_decay: 0.8,
            aux_layers: vec![0, 1],
            draft_vocab_size: v / 2,
            target_hidden_size: t.config.hidden_size,
            vocab_size: v,
            layer: DraftLayerSpec::from_target(&t.config, None, None, None, None).expect("layer"),
        },
        &tensors(t).access(),
        dev,
        Kind::Float,
    )
    .expect("eagle3");
    reinit_trainable(m.var_store(), 13);
    let d2t: Vec<i64> = (0..v / 2).collect(); // draft id i -> target id 2i
    let t2d: Vec<bool> = (0..v).map(|i| i % 2 == 0).collect();
    install_vocab_mapping(m.var_store(), &d2t, &t2d, Some(t.lm_head_weight())).expect("mapping");
    m
}

/// The hybrid drafter of tests/hybrid.rs (2 MLP and 2 transformer blocks) with a random
/// (non-uniform) gate; with `draft_vocab`, its head over the even target ids.
pub(crate) fn hybrid(t: &TargetModel, draft_vocab: bool) -> Hybrid {
    let s = crate::hybrid::spec(t, 2, 2);
    let m = if draft_vocab {
        crate::hybrid::with_even_vocab(t, s, 14)
    } else {
        crate::hybrid::hybrid(t, s, 14)
    };
    tch::no_grad(|| {
        for (n, mut v) in m.var_store().variables() {
            if n.starts_with("gate.fc2") {
                v.copy_(&TestRng::for_name(15, &n).normal_tensor(&v.size(), 1.0));
            }
        }
    });
    m
}

pub(crate) fn plain(t: &TargetModel, prompt: &[i64], n: usize, stop: &[i64]) -> Vec<i64> {
    let opts = GenerateOptions {
        max_new_tokens: n,
        stop_ids: stop.to_vec(),
        ..Default::default()
    };
    generate(t, prompt, &opts, |_| {}).expect("generate").tokens
}

pub(crate) fn prompts() -> Vec<Vec<i64>> {
    vec![
        vec![1, 17, 42, 5, 66, 23],
        vec![1, 9],
        vec![3, 80, 80, 12, 7, 7, 31, 55, 60, 2, 44],
    ]
}

#[test]
fn greedy_speculative_output_equals_plain_greedy_output_for_every_drafter() {
    let t = random_target("llama", 21);
    let drafters: Vec<(&str, Box<dyn Drafter>)> = vec![
        ("medusa", Box::new(medusa(&t))),
        ("eagle1", Box::new(eagle1(&t))),
        ("eagle3", Box::new(eagle3(&t))),
        ("hybrid", Box::new(hybrid(&t, false))),
        ("hybrid-draft-vocab", Box::new(hybrid(&t, true))),
    ];
    for (name, d) in &drafters {
        for (gamma, dynamic) in [(1, None), (5, None), (3, Some(2))] {
            for (i, p) in prompts().iter().enumerate() {
                let want = plain(&t, p, 40, &[]);
                let mut s = d.session(&t).expect("session");
                let opts = SpecOptions {
                    gamma,
                    dynamic_min_gamma: dynamic,
                    max_new_tokens: 40,
                    ..Default::default()
                };
                let got =
                    speculative_generate(&t, s.as_mut(), &d.spec().feature_needs(), p, &opts).expect("speculative");
                assert_eq!(got.tokens, want, "{name} gamma {gamma} dynamic {dynamic:?} prompt {i}");
                let emitted: usize = got.rounds.iter().map(|r| r.emitted).sum();
                assert_eq!(
                    emitted + 1,
                    got.tokens.len(),
                    "{name}: the prefill token plus every round's tokens"
                );
                for r in &got.rounds {
                    assert!(r.accepted <= r.proposed && r.proposed <= r.gamma);
                }
            }
        }
    }
}

/// The known greedy answer of a scripted draft session and its checks of what the engine
/// commits against a full forward of the final sequence (tests/tree.rs scripts trees with it).
pub(crate) struct Script {
    pub prompt: Vec<i64>,
    pub answer: Vec<i64>,
    /// The target's normed hidden states over prompt + answer `[T, H]` (one full forward).
    pub reference: Tensor,
    /// Committed positions; the committed sequence ends with token `committed` (not yet cached).
    pub committed: i64,
    pub max_feature_diff: f64,
}

impl Script {
    pub fn new(t: &TargetModel, prompt: &[i64], answer: &[i64]) -> Script {
        let seq: Vec<i64> = prompt.iter().chain(answer).copied().collect();
        Script {
            reference: reference_hidden(t, &seq),
            prompt: prompt.to_vec(),
            answer: answer.to_vec(),
            committed: 0,
            max_feature_diff: 0.0,
        }
    }

    pub fn token_at(&self, pos: usize) -> Option<i64> {
        if pos < self.prompt.len() {
            Some(self.prompt[pos])
        } else {
            self.answer.get(pos - self.prompt.len()).copied()
        }
    }

    /// `DraftSession::commit`'s checks: consecutive commits, the right next tokens, features
    /// as the full forward computes them.
    pub fn commit(&mut self, start: i64, f: &StepFeatures, next: &[i64]) {
        assert_eq!(start, self.committed, "commits are consecutive");
        for (i, &n) in next.iter().enumerate() {
            assert_eq!(
                Some(n),
                self.token_at(start as usize + i + 1),
                "next token of position {}",
                start as usize + i
            );
        }
        let k = next.len() as i64;
        let want = self.reference.narrow(0, start, k);
        self.max_feature_diff = self.max_feature_diff.max(max_abs_diff(&f.hidden_normed, &want));
        self.committed = start + k;
    }
}

/// A draft that proposes the known greedy continuation with one wrong token at a position
/// chosen per round (or none), and checks everything the engine commits ([`Script`]).
struct Scripted {
    script: Script,
    round: usize,
    /// Per round, the index of the wrong proposal (>= gamma: all right).
    errors: Vec<usize>,
}

impl Scripted {
    fn new(t: &TargetModel, prompt: &[i64], answer: &[i64], errors: Vec<usize>) -> Scripted {
        Scripted {
            script: Script::new(t, prompt, answer),
            round: 0,
            errors,
        }
    }
}

impl DraftSession for Scripted {
    fn commit(&mut self, start: i64, f: &StepFeatures, next: &[i64]) -> forge_models::Result<()> {
        self.script.commit(start, f, next);
        Ok(())
    }

    fn propose(&mut self, gamma: usize, _s: &Sampling, _rng: &mut RowRng) -> forge_models::Result<Proposal> {
        let wrong = self.errors[self.round % self.errors.len()];
        self.round += 1;
        // the committed sequence ends with token `committed` (not yet in the cache)
        let tokens: Vec<i64> = (0..gamma)
            .map(|i| {
                let right = self
                    .script
                    .token_at(self.script.committed as usize + 1 + i)
                    .unwrap_or(0);
                if i == wrong {
                    (right + 1) % V
                } else {
                    right
                }
            })
            .collect();
        let logits = Tensor::zeros([gamma as i64, V], (Kind::Float, Device::Cpu));
        Ok(Proposal { tokens, logits })
    }
}

pub(crate) fn reference_hidden(t: &TargetModel, seq: &[i64]) -> Tensor {
    let ids = Tensor::from_slice(seq).view([1, -1]);
    let out = tch::no_grad(|| t.forward(&ids, None, None, None, &Capture::logits(LogitsMode::None))).expect("forward");
    out.hidden_normed.get(0)
}

#[test]
fn acceptance_rollback_and_bonus_tokens_follow_the_script_and_keep_the_cache_exact() {
    let t = random_target("llama", 22);
    let prompt = prompts()[0].clone();
    let answer = plain(&t, &prompt, 60, &[]);
    let errors = vec![0, 2, 9, 1, 4, 9, 3];
    let mut s = Scripted::new(&t, &prompt, &answer, errors.clone());
    let opts = SpecOptions {
        gamma: 4,
        max_new_tokens: 60,
        ..Default::default()
    };
    let got = speculative_generate(&t, &mut s, &FeatureNeeds::default(), &prompt, &opts).expect("speculative");
    assert_eq!(got.tokens, answer);
    // every round accepts exactly up to the scripted error (all 4 and a bonus when none)
    let mut made = 1; // the prefill's token
    for (r, round) in got.rounds.iter().enumerate() {
        // gamma 4 unless fewer tokens are left (the round's bonus token needs one)
        assert_eq!(round.proposed, 4.min(60 - made - 1), "round {r}: {round:?}");
        made += round.emitted;
        let want = errors[r % errors.len()].min(round.proposed);
        assert_eq!(round.accepted, want, "round {r}: {round:?}");
        if r + 1 < got.rounds.len() {
            assert_eq!(round.emitted, want + 1, "round {r}");
        }
    }
    assert!(
        got.rounds.iter().any(|r| r.accepted == 4),
        "some rounds accept everything (bonus token)"
    );
    assert!(
        s.script.max_feature_diff < 1e-4,
        "features after rollback differ from a full forward by {}",
        s.script.max_feature_diff
    );
    // tau = tokens per verification forward
    let emitted: usize = got.rounds.iter().map(|r| r.emitted).sum();
    assert!((got.tau() - emitted as f64 / got.rounds.len() as f64).abs() < 1e-12);

    // a stop id inside an accepted chain ends the output right after it
    let stop = answer[17];
    let want = plain(&t, &prompt, 60, &[stop]);
    let mut s2 = Scripted::new(&t, &prompt, &answer, vec![9]);
    let got = speculative_generate(
        &t,
        &mut s2,
        &FeatureNeeds::default(),
        &prompt,
        &SpecOptions {
            stop_ids: vec![stop],
            ..opts.clone()
        },
    )
    .expect("speculative");
    assert_eq!(got.tokens, want);
    assert!(got.stopped);
    // the drafts accepted after the stop do not count as proposed or accepted
    let (last, rest) = got.rounds.split_last().expect("rounds");
    assert!(
        last.accepted <= last.emitted && last.proposed <= last.emitted,
        "{last:?}"
    );
    assert!(rest.iter().all(|r| r.proposed == 4 && r.accepted == 4), "{rest:?}");

    // no new tokens asked, none given (as plain decoding)
    let mut s3 = Scripted::new(&t, &prompt, &answer, vec![9]);
    let none = speculative_generate(
        &t,
        &mut s3,
        &FeatureNeeds::default(),
        &prompt,
        &SpecOptions {
            max_new_tokens: 0,
            ..opts
        },
    )
    .expect("speculative");
    assert!(none.tokens.is_empty() && none.rounds.is_empty());
}

#[test]
fn dynamic_gamma_follows_its_rule() {
    assert_eq!(next_gamma(5, true, 4), 6);
    assert_eq!(next_gamma(9, false, 4), 4);
    assert_eq!(next_gamma(12, false, 4), 6);
    assert_eq!(next_gamma(4, false, 4), 4);
    assert_eq!(next_gamma(3, false, 1), 1);

    let t = random_target("llama", 22);
    let prompt = prompts()[0].clone();
    let answer = plain(&t, &prompt, 80, &[]);
    let mut s = Scripted::new(&t, &prompt, &answer, vec![99, 99, 99, 1, 99, 0, 99, 99, 2]);
    let opts = SpecOptions {
        gamma: 3,
        dynamic_min_gamma: Some(2),
        max_gamma: 6,
        max_new_tokens: 80,
        ..Default::default()
    };
    let got = speculative_generate(&t, &mut s, &FeatureNeeds::default(), &prompt, &opts).expect("speculative");
    assert_eq!(got.tokens, answer);
    assert_eq!(got.rounds[0].gamma, 3);
    let mut grew = false;
    for w in got.rounds.windows(2) {
        let (a, b) = (w[0], w[1]);
        let want = next_gamma(a.gamma, a.accepted == a.proposed, 2).min(6);
        assert_eq!(b.gamma, want, "{a:?} -> {b:?}");
        grew |= b.gamma > a.gamma;
    }
    assert!(
        grew && got.rounds.iter().any(|r| r.gamma == 6),
        "gamma grows to its ceiling: {:?}",
        got.rounds
    );

    // a starting gamma below the minimum starts at the minimum (a rejection never raises it)
    let mut s = Scripted::new(&t, &prompt, &answer, vec![0]);
    let low = SpecOptions {
        gamma: 1,
        max_new_tokens: 12,
        ..opts
    };
    let got = speculative_generate(&t, &mut s, &FeatureNeeds::default(), &prompt, &low).expect("speculative");
    assert_eq!(got.tokens, answer[..12]);
    assert!(got.rounds.iter().all(|r| r.gamma == 2), "{:?}", got.rounds);
}

pub(crate) fn features(t: &TargetModel, seq: &[i64], aux: &[i64]) -> Features {
    let n = seq.len() as i64;
    let ids = Tensor::from_slice(seq).view([1, n]);
    let cap = Capture {
        layers: aux.to_vec(),
        logits: LogitsMode::None,
    };
    let out = tch::no_grad(|| t.forward(&ids, None, None, None, &cap)).expect("forward");
    Features {
        input_ids: ids.shallow_clone(),
        attention_mask: ids.ones_like(),
        position_ids: Tensor::arange(n, (Kind::Int64, Device::Cpu)).view([1, n]),
        loss_mask: ids.ones_like(),
        hidden_normed: Some(out.hidden_normed),
        aux_hidden: (!aux.is_empty()).then(|| Tensor::cat(&out.layers, -1)),
        target_topk: None,
    }
}

pub(crate) fn step_features(f: &Features, len: i64) -> StepFeatures {
    StepFeatures {
        hidden_normed: f.hidden_normed.as_ref().expect("hidden").get(0).narrow(0, 0, len),
        aux: f.aux_hidden.as_ref().map(|a| a.get(0).narrow(0, 0, len)),
    }
}

#[test]
fn eagle3_decoding_session_computes_what_training_time_test_computes() {
    let t = random_target("llama", 23);
    let m = eagle3(&t);
    let seq: Vec<i64> = vec![1, 30, 4, 77, 12, 9, 50, 61, 8];
    let n = 8; // committed positions 0..8; seq[8] is the last token (not yet verified)
    let f = features(&t, &seq[..n], &[0, 1]);
    let mut s = m.session(&t).expect("session");
    s.commit(0, &step_features(&f, n as i64), &seq[1..=n]).expect("commit");
    let p = tch::no_grad(|| s.propose(3, &Sampling::greedy(), &mut RowRng::new(0))).expect("propose");
    // the training unroll over the sequence continued with the proposals
    let full: Vec<i64> = seq.iter().copied().chain(p.tokens[..2].iter().copied()).collect();
    let ff = features(&t, &full, &[0, 1]);
    let steps = tch::no_grad(|| m.step_hidden(&ff)).expect("steps");
    let ids = m.draft_ids();
    #[allow(clippy::needless_range_loop)]
    for i in 0..3 {
        let h = steps[i].get(0).narrow(0, n as i64 - 1, 1);
        let want = tch::no_grad(|| m.logits(&h)).view([-1]);
        let got = p.logits.get(i as i64).index_select(0, &ids);
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "step {i}: decoding logits differ from the TTT unroll by {d}");
        let best = ids.int64_value(&[want.argmax(0, false).int64_value(&[])]);
        assert_eq!(p.tokens[i], best, "step {i} proposes the arg-max mapped through d2t");
        assert_eq!(p.tokens[i] % 2, 0, "only draft-vocabulary (even) ids");
    }
    // outside the draft vocabulary the proposal has no mass
    assert_eq!(p.logits.get(0).double_value(&[1]), f64::NEG_INFINITY);

    // a second commit (after a partial acceptance) drops the proposal's cache entries
    s.commit(
        n as i64,
        &step_features(&ff, n as i64 + 2).narrowed(n as i64, 2),
        &full[n + 1..n + 3],
    )
    .expect("commit");
    let p2 = tch::no_grad(|| s.propose(1, &Sampling::greedy(), &mut RowRng::new(0))).expect("propose");
    let mut fresh = m.session(&t).expect("session");
    let all = step_features(&ff, n as i64 + 2);
    fresh.commit(0, &all, &full[1..n + 3]).expect("commit");
    let p3 = tch::no_grad(|| fresh.propose(1, &Sampling::greedy(), &mut RowRng::new(0))).expect("propose");
    let d = max_abs_diff(&p2.logits.index_select(1, &ids), &p3.logits.index_select(1, &ids));
    assert!(d < 1e-4, "incremental commits equal one commit: {d}");
}

trait Narrow {
    fn narrowed(&self, start: i64, len: i64) -> StepFeatures;
}

impl Narrow for StepFeatures {
    fn narrowed(&self, start: i64, len: i64) -> StepFeatures {
        StepFeatures {
            hidden_normed: self.hidden_normed.narrow(0, start, len),
            aux: self.aux.as_ref().map(|a| a.narrow(0, start, len)),
        }
    }
}

#[test]
fn eagle1_decoding_session_computes_what_the_training_forward_computes() {
    let t = random_target("llama", 24);
    let m = eagle1(&t);
    let seq: Vec<i64> = vec![1, 30, 4, 77, 12, 9, 50, 61, 8];
    let n = 8;
    let f = features(&t, &seq[..n], &[]);
    let mut s = m.session(&t).expect("session");
    s.commit(0, &step_features(&f, n as i64), &seq[1..=n]).expect("commit");
    let p = tch::no_grad(|| s.propose(2, &Sampling::greedy(), &mut RowRng::new(0))).expect("propose");
    let head = t.lm_head_weight();
    // proposal 1: the predicted feature at the last committed position, read out
    let full: Vec<i64> = seq.iter().copied().chain([p.tokens[0]]).collect();
    let ff = features(&t, &full, &[]);
    let true_feats = ff.hidden_normed.as_ref().expect("hidden").shallow_clone();
    let pred = tch::no_grad(|| m.predict(&ff, &true_feats)).expect("predict");
    let f_hat = pred.get(0).get(n as i64 - 1);
    let want0 = f_hat.matmul(&head.tr());
    assert!(max_abs_diff(&p.logits.get(0), &want0) < 1e-4);
    // proposal 2: the same layer at position n reading the predicted feature and proposal 1
    let feats2 = true_feats.copy();
    tch::no_grad(|| feats2.get(0).get(n as i64).copy_(&f_hat));
    let pred2 = tch::no_grad(|| m.predict(&ff, &feats2)).expect("predict");
    let want1 = pred2.get(0).get(n as i64).matmul(&head.tr());
    let d = max_abs_diff(&p.logits.get(1), &want1);
    assert!(
        d < 1e-4,
        "second proposal differs from the training forward on predicted features by {d}"
    );
}

/// Pearson's chi-square of counts against probabilities, bins with expectation < 5 pooled;
/// returns (statistic, degrees of freedom).
pub(crate) fn chi_square(counts: &[f64], probs: &[f64]) -> (f64, usize) {
    let n: f64 = counts.iter().sum();
    let (mut stat, mut bins) = (0.0, 0);
    let (mut pool_o, mut pool_e) = (0.0, 0.0);
    for (&o, &p) in counts.iter().zip(probs) {
        let e = n * p;
        if e < 5.0 {
            pool_o += o;
            pool_e += e;
        } else {
            stat += (o - e).powi(2) / e;
            bins += 1;
        }
    }
    if pool_e > 0.0 {
        stat += (pool_o - pool_e).powi(2) / pool_e.max(1e-9);
        bins += 1;
    }
    (stat, bins - 1)
}

/// The chi-square quantile at 1 - 1e-4 (Wilson-Hilferty).
pub(crate) fn chi_square_critical(dof: usize) -> f64 {
    let k = dof as f64;
    let z = 3.719;
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

pub(crate) fn softmax_rows(t: &TargetModel, seqs: &[Vec<i64>]) -> Tensor {
    let ids = Tensor::from_slice(&seqs.concat()).view([seqs.len() as i64, -1]);
    let out = tch::no_grad(|| t.forward(&ids, None, None, None, &Capture::logits(LogitsMode::Last))).expect("forward");
    out.logits.expect("logits").squeeze_dim(1).softmax(-1, Kind::Double)
}

/// An independent reference of the engines' sampling filters, on probabilities at
/// temperature 1 `[N, V]`: softmax(logits / T) is p^(1/T) renormalised; then the top-k tokens
/// (with ties at the k-th); then the most likely tokens whose preceding mass is below top-p;
/// each step renormalised.
pub(crate) fn filtered(p: &Tensor, s: &Sampling) -> Tensor {
    let (n, v) = p.size2().expect("[N, V]");
    let rows: Vec<f64> = Vec::try_from(p.to_kind(Kind::Double).view(-1)).expect("probs");
    let norm = |w: &mut [f64]| {
        let z: f64 = w.iter().sum();
        w.iter_mut().for_each(|x| *x /= z);
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in rows.chunks(v as usize) {
        let mut w: Vec<f64> = row.iter().map(|x| x.powf(1.0 / s.temperature)).collect();
        norm(&mut w);
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.sort_by(|&i, &j| w[j].total_cmp(&w[i]));
        if s.top_k > 0 && s.top_k < w.len() {
            let kth = w[order[s.top_k - 1]];
            w.iter_mut().filter(|x| **x < kth).for_each(|x| *x = 0.0);
            norm(&mut w);
        }
        if s.top_p < 1.0 {
            let mut before = 0.0;
            let mut keep = vec![false; w.len()];
            for &i in &order {
                keep[i] = before < s.top_p;
                before += w[i];
            }
            w.iter_mut()
                .zip(&keep)
                .filter(|(_, k)| !**k)
                .for_each(|(x, _)| *x = 0.0);
            norm(&mut w);
        }
        out.extend(w);
    }
    Tensor::from_slice(&out).view([n, v])
}

/// The exact marginals of the 1st, 2nd and 3rd tokens sampled from `t` after `prompt` with
/// `sampling` (the engines' filters, [`filtered`]), and of the 2nd without the filters (what
/// a broken verifier would follow).
pub(crate) struct Marginals {
    pub p1: Tensor,
    pub p2: Vec<f64>,
    pub p3: Vec<f64>,
    pub unfiltered: Vec<f64>,
}

pub(crate) fn marginals(t: &TargetModel, prompt: &[i64], sampling: &Sampling) -> Marginals {
    let p1_raw = softmax_rows(t, &[prompt.to_vec()]);
    let ctx1: Vec<Vec<i64>> = (0..V).map(|a| prompt.iter().copied().chain([a]).collect()).collect();
    let p2_raw = softmax_rows(t, &ctx1); // [V, V]
    let ctx2: Vec<Vec<i64>> = (0..V * V)
        .map(|i| prompt.iter().copied().chain([i / V, i % V]).collect())
        .collect();
    let p3_raw = softmax_rows(t, &ctx2); // [V*V, V]
    let p1 = filtered(&p1_raw, sampling).get(0);
    let p2_given = filtered(&p2_raw, sampling);
    let p2 = p1.unsqueeze(0).matmul(&p2_given).squeeze_dim(0);
    let p3_given = filtered(&p3_raw, sampling).view([V, V, V]);
    let p12 = p1.unsqueeze(1) * &p2_given; // [V, V]
    let p3 = (p12.unsqueeze(2) * p3_given).sum_dim_intlist([0, 1].as_slice(), false, Kind::Double);
    let kept = p2_given.gt(0.0).sum(Kind::Int64).double_value(&[]) / V as f64;
    assert!(
        kept > 4.0 && kept < sampling.top_k as f64,
        "{sampling:?} keeps {kept:.1} tokens per row: the filters must both act"
    );
    let unfiltered = p1_raw.get(0).unsqueeze(0).matmul(&p2_raw).squeeze_dim(0);
    Marginals {
        p1,
        p2: Vec::<f64>::try_from(&p2).expect("p2"),
        p3: Vec::<f64>::try_from(&p3).expect("p3"),
        unfiltered: Vec::<f64>::try_from(&unfiltered).expect("unfiltered"),
    }
}

/// The 2nd and 3rd tokens of speculative sampling (gamma 2, so both pass verification)
/// follow the target's sampled distribution with the engines' temperature, top-k and top-p:
/// chi-square against the exact marginals, for both acceptance rules.
#[test]
fn speculative_sampling_follows_the_target_distribution() {
    let t = random_target("llama", 25);
    let m = eagle1(&t);
    let prompt: Vec<i64> = vec![1, 17, 42, 5];
    // the nearly flat random target at T 0.5: top-k 24, then top-p 0.8 cuts a few more (T 1
    // without filters is the same code with the filters off, and sample_rows' own test)
    let sampling = Sampling {
        temperature: 0.5,
        top_p: 0.8,
        top_k: 24,
    };
    let Marginals {
        p1,
        p2: p2v,
        p3: p3v,
        unfiltered,
    } = marginals(&t, &prompt, &sampling);
    // what a broken verifier would emit: the draft's own marginal of its first proposal
    // (as exact acceptance samples it: temperature, no filters), or the target's
    // distribution without the filters
    let draft_marginal: Vec<f64> = {
        let mut q = Tensor::zeros([V], (Kind::Double, Device::Cpu));
        for a in 0..V {
            let mut s = m.session(&t).expect("session");
            let seq: Vec<i64> = prompt.iter().copied().chain([a]).collect();
            let f = features(&t, &prompt, &[]);
            s.commit(0, &step_features(&f, prompt.len() as i64), &seq[1..])
                .expect("commit");
            let at_t = Sampling::at(sampling.temperature);
            let pr = tch::no_grad(|| s.propose(1, &at_t, &mut RowRng::new(0))).expect("propose");
            q += at_t.probs(&pr.logits.get(0)).to_kind(Kind::Double) * p1.double_value(&[a]);
        }
        Vec::<f64>::try_from(&q).expect("q")
    };

    let samples = 3000;
    for acceptance in [Acceptance::Exact, Acceptance::Engine] {
        let (mut c2, mut c3) = (vec![0.0; V as usize], vec![0.0; V as usize]);
        let (mut accepted, mut rejected) = (0, 0);
        for seed in 0..samples {
            let mut s = m.session(&t).expect("session");
            let opts = SpecOptions {
                gamma: 2,
                sampling,
                max_new_tokens: 3,
                seed: seed as u64,
                acceptance,
                ..Default::default()
            };
            let out =
                speculative_generate(&t, s.as_mut(), &m.spec().feature_needs(), &prompt, &opts).expect("speculative");
            assert_eq!(out.tokens.len(), 3);
            c2[out.tokens[1] as usize] += 1.0;
            c3[out.tokens[2] as usize] += 1.0;
            for r in &out.rounds {
                accepted += r.accepted;
                rejected += (r.accepted < r.proposed) as usize;
            }
        }
        // (the random target is nearly flat: its probability of the greedy draft is ~2%)
        let min_accepted = if acceptance == Acceptance::Engine {
            20
        } else {
            samples / 20
        };
        assert!(
            accepted > min_accepted && rejected > samples / 10,
            "{sampling:?} {acceptance:?}: both acceptance and resampling happen: {accepted} accepted, {rejected} rejections"
        );
        for (what, counts, probs) in [("2nd token", &c2, &p2v), ("3rd token", &c3, &p3v)] {
            let (stat, dof) = chi_square(counts, probs);
            assert!(
                stat < chi_square_critical(dof),
                "{sampling:?} {acceptance:?} {what}: chi-square {stat:.1} with {dof} dof exceeds {:.1}",
                chi_square_critical(dof)
            );
        }
        // the test has power: the wrong distributions are far from the samples
        for (what, wrong) in [
            ("the draft's", &draft_marginal),
            ("the unfiltered target's", &unfiltered),
        ] {
            let (stat, dof) = chi_square(&c2, wrong);
            assert!(
                stat > 3.0 * chi_square_critical(dof),
                "{acceptance:?}: {what} distribution should be rejected: {stat:.1} ({dof} dof)"
            );
        }
    }
}

/// The acceptance rule on a known pair of distributions: the share of first drafts accepted
/// estimates sum_x min(p(x), q(x)) (exact) or p(d) for the greedy draft d (engine) without
/// bias, and the emitted token follows p, for filtered p and q as `Sampling::probs` gives them.
#[test]
fn acceptance_of_a_known_pair_of_distributions_is_unbiased() {
    let target = Tensor::from_slice(&[2.0f32, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0, 0.8]);
    let draft = Tensor::from_slice(&[1.0f32, 2.2, 0.1, 0.9, -0.2, -2.0, 0.4, -1.0]);
    let sampling = Sampling {
        temperature: 0.8,
        top_p: 0.9,
        top_k: 6,
    };
    let v = 8;
    // p: the target's filtered distribution after the prefix (row 0) and after the draft (row 1)
    let p = sampling.probs(&Tensor::stack(&[&target, &target.flip([0])], 0));
    let q = sampling.probs(&draft.view([1, v]));
    let (pv, qv) = (
        Vec::<f32>::try_from(p.get(0)).expect("p"),
        Vec::<f32>::try_from(q.get(0)).expect("q"),
    );
    // the filters act: some tokens are cut from both
    assert!(pv.iter().filter(|&&x| x == 0.0).count() >= 2 && qv.iter().filter(|&&x| x == 0.0).count() >= 2);
    let ref_p = filtered(&target.view([1, v]).softmax(-1, Kind::Double), &sampling);
    let ref_q = filtered(&draft.view([1, v]).softmax(-1, Kind::Double), &sampling);
    assert!(max_abs_diff(&p.get(0).to_kind(Kind::Double), &ref_p.get(0)) < 1e-6);
    assert!(max_abs_diff(&q.get(0).to_kind(Kind::Double), &ref_q.get(0)) < 1e-6);

    let n = 20000;
    let greedy = draft.argmax(0, false).int64_value(&[]);
    for (name, rate) in [
        ("exact", pv.iter().zip(&qv).map(|(a, b)| a.min(*b) as f64).sum::<f64>()),
        ("engine", pv[greedy as usize] as f64),
    ] {
        let mut rng = RowRng::new(11);
        let (mut accepted, mut counts) = (0usize, vec![0.0; v as usize]);
        for _ in 0..n {
            let (d, qrow) = if name == "exact" {
                let d = sample_rows(&draft.view([1, v]), &sampling, &[rng.next_f64()]).expect("q")[0];
                (d, q.shallow_clone())
            } else {
                (
                    greedy,
                    Tensor::zeros([1, v], (Kind::Float, Device::Cpu)).index_fill(
                        1,
                        &Tensor::from_slice(&[greedy]),
                        1.0,
                    ),
                )
            };
            let (a, next) = accept_sampled(&p, &qrow, &[d], &mut rng).expect("accept");
            accepted += a;
            // the first emitted token: the draft when accepted, else the resampled one
            let first = if a == 1 { d } else { next };
            counts[first as usize] += 1.0;
        }
        let got = accepted as f64 / n as f64;
        let sd = (rate * (1.0 - rate) / n as f64).sqrt();
        assert!(
            (got - rate).abs() < 4.0 * sd,
            "{name}: accepted {got:.4}, expected {rate:.4} (sd {sd:.4})"
        );
        let probs: Vec<f64> = pv.iter().map(|&x| x as f64).collect();
        let (stat, dof) = chi_square(&counts, &probs);
        assert!(
            stat < chi_square_critical(dof),
            "{name}: emitted tokens: chi-square {stat:.1} ({dof} dof)"
        );
    }
}

pub(crate) fn run_eval(args: &[&str]) -> std::process::Output {
    let mut all = vec!["eval"];
    all.extend_from_slice(args);
    forge(&all)
}

pub(crate) fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("json")
}

#[test]
fn forge_eval_reports_tau_acceptance_speedup_and_verifies_greedy_output() {
    let run = TinyRun::new("eval-cli", "recipes/medusa-tiny.yaml", true);
    let ckpt = run.dir.join("run");
    run.train(
        &ckpt,
        &["--set", "train.max_steps=2", "--set", "checkpoint.every_steps=2"],
    );
    let prompts = run.dir.join("questions.jsonl");
    std::fs::write(
        &prompts,
        concat!(
            "{\"question_id\": 1, \"category\": \"writing\", \"turns\": [\"Write a haiku about rain.\", \"Now one about snow.\"]}\n",
            "{\"question_id\": 2, \"category\": \"math\", \"turns\": [\"What is 12 times 7?\"]}\n",
        ),
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
        "--gamma",
        "2",
        "--verify",
        "--json",
        json.to_str().expect("utf8"),
        "--progress",
        "never",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = read_json(&json);
    let s = &r["summary"];
    assert_eq!(s["turns"], 3);
    assert_eq!(s["greedy_compared"], 3);
    assert_eq!(s["greedy_mismatches"], 0);
    assert_eq!(
        s["new_tokens"], s["baseline"]["new_tokens"],
        "greedy: same tokens as plain decoding"
    );
    let tau = s["tau"].as_f64().expect("tau");
    let forwards = s["target_forwards"].as_f64().expect("forwards");
    let tokens = s["new_tokens"].as_f64().expect("tokens");
    // each turn's first token comes from the prefill, the rest from verification forwards
    assert!(
        (tau - (tokens - 3.0) / forwards).abs() < 1e-3,
        "tau {tau} = (tokens - prefill tokens) / forwards"
    );
    assert!((1.0..=3.0).contains(&tau));
    let rates = s["accept_rate_per_position"].as_array().expect("rates");
    assert_eq!(rates.len(), 2);
    assert!(rates.iter().all(|x| (0.0..=1.0).contains(&x.as_f64().expect("rate"))));
    assert!(s["speedup"].as_f64().expect("speedup") > 0.0);
    let share = s["draft_time_share"].as_f64().expect("share");
    assert!(share > 0.0 && share < 1.0);
    let cats = r["files"][0]["categories"].as_object().expect("categories");
    assert_eq!(cats.keys().collect::<Vec<_>>(), ["math", "writing"]);
    assert_eq!(cats["writing"]["turns"], 2);
    let recs = r["files"][0]["prompts"].as_array().expect("prompts");
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[1]["turn"], 2, "the second turn of question 1");
    assert!(String::from_utf8_lossy(&out.stdout).contains("tau"));

    // dynamic gamma and sampling run too (Medusa caps gamma at its 2 heads)
    let json2 = run.dir.join("report2.json");
    let out = run_eval(&[
        "--target",
        &target,
        "--draft",
        ckpt.to_str().expect("utf8"),
        "--prompts",
        prompts.to_str().expect("utf8"),
        "--max-new-tokens",
        "8",
        "--dynamic-gamma",
        "--min-gamma",
        "1",
        "--temperature",
        "0.8",
        "--json",
        json2.to_str().expect("utf8"),
        "--no-baseline",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = read_json(&json2);
    let hist = r["summary"]["gamma_histogram"].as_object().expect("histogram");
    assert!(hist.keys().all(|g| g.parse::<usize>().expect("gamma") <= 2), "{hist:?}");
    assert!(r["summary"].get("speedup").is_none());

    // bad input: the line is named; a draft for another target is refused
    let bad = run.dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"question_id\": 1, \"turns\": [\"hi\"]}\n{\"question_id\": 2, \"turns\": 5}\n",
    )
    .expect("write");
    let out = run_eval(&[
        "--target",
        &target,
        "--draft",
        ckpt.to_str().expect("utf8"),
        "--prompts",
        bad.to_str().expect("utf8"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.jsonl:2"), "{err}");
    let other = forge_tests::saved_tiny_target("qwen3", 3, &run.dir.join("other"));
    let out = run_eval(&[
        "--target",
        other.to_str().expect("utf8"),
        "--draft",
        ckpt.to_str().expect("utf8"),
        "--prompts",
        prompts.to_str().expect("utf8"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("different target"), "{err}");
    let out = run_eval(&[
        "--draft",
        ckpt.to_str().expect("utf8"),
        "--prompts",
        prompts.to_str().expect("utf8"),
        "--verify",
        "--temperature",
        "1",
    ]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--verify"));
}

/// The tiny EAGLE-3 recipe with its drafter section replaced by `drafter` (YAML lines).
fn tiny_recipe_with(dir: &Path, name: &str, drafter: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(forge_tests::root().join("recipes/eagle3-tiny.yaml")).expect("recipe");
    let (a, b) = (
        text.find("drafter:").expect("drafter"),
        text.find("target:").expect("target"),
    );
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, format!("{}drafter:\n{drafter}{}", &text[..a], &text[b..])).expect("write");
    p
}

#[test]
fn engine_format_drafts_load_back_to_the_same_drafter() {
    use forge_trainer::engines::{load_drafter, load_drafter_with_target};
    let mut run = TinyRun::with_layers("eval-import", "recipes/eagle3-tiny.yaml", true, 4);
    let target = TargetModel::load(&run.target, forge_models::DType::F32, Device::Cpu).expect("target");
    let seq: Vec<i64> = vec![1, 300, 4000, 77, 12, 9, 50, 610, 8, 31, 7, 2];
    let cases: [(&str, &str, &[&str]); 5] = [
        ("medusa", "  kind: medusa\n  num_heads: 3\n", &["vllm", "medusa"]),
        (
            "medusa-shared",
            "  kind: medusa\n  num_heads: 2\n  original_lm_head: true\n",
            &["vllm"],
        ),
        ("eagle1-bias", "  kind: eagle1\n", &["sglang"]),
        (
            "eagle1-nobias",
            "  kind: eagle1\n  fc_bias: false\n",
            &["vllm", "sglang"],
        ),
        (
            "eagle3",
            "  kind: eagle3\n  ttt_length: 2\n  draft_vocab_size: 1000\n  aux_layers: [0, 1, 2]\n",
            &["sglang", "vllm", "speculators"],
        ),
    ];
    for (name, drafter, formats) in cases {
        run.recipe = tiny_recipe_with(&run.dir, name, drafter);
        let ckpt = run.dir.join(name);
        run.train(
            &ckpt,
            &["--set", "train.max_steps=2", "--set", "checkpoint.every_steps=2"],
        );
        let trained = load_drafter(&ckpt, Device::Cpu).expect("checkpoint");
        let f = features(&target, &seq, &trained.spec.feature_needs().aux_layers);
        let ctx = forge_tests::eval_ctx();
        let want = tch::no_grad(|| trained.drafter.loss(&f, &ctx)).expect("loss");
        for fmt in formats {
            let dir = run.dir.join(format!("{name}-{fmt}"));
            let out = export_fp32(&ckpt, fmt, &dir);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let loaded = load_drafter_with_target(&dir, Device::Cpu, Kind::Float, Some(&run.target))
                .unwrap_or_else(|e| panic!("{name} {fmt}: {e}"));
            assert_eq!(loaded.spec.kind(), trained.spec.kind());
            assert_eq!(
                loaded.spec.feature_needs(),
                trained.spec.feature_needs(),
                "{name} {fmt}: the same target features (EAGLE-3's layers)"
            );
            // the same numbers: every loss part and metric both report (an engine config
            // does not record training-only settings such as EAGLE-3's ttt_length)
            let got = tch::no_grad(|| loaded.drafter.loss(&f, &ctx)).expect("loss");
            let mut common = 0;
            for a in got
                .parts
                .iter()
                .chain(&got.metrics)
                .filter(|m| !m.name.starts_with("chain/"))
            {
                if let Some(b) = want.parts.iter().chain(&want.metrics).find(|b| b.name == a.name) {
                    // equal to rounding: EAGLE-3 runs its lm_head once over the rows of all
                    // its steps, so a step's rows are rounded within a product whose size
                    // depends on ttt_length (which an engine config does not record)
                    assert_eq!(a.count, b.count, "{name} {fmt}: {}", a.name);
                    let tol = 1e-6 * b.sum.abs().max(1.0);
                    assert!(
                        (a.sum - b.sum).abs() <= tol,
                        "{name} {fmt}: {} {} vs {}",
                        a.name,
                        a.sum,
                        b.sum
                    );
                    common += 1;
                }
            }
            assert!(common >= 2, "{name} {fmt}");
            // the same proposals in decoding
            let mut s1 = trained.drafter.session(&target).expect("session");
            let mut s2 = loaded.drafter.session(&target).expect("session");
            let opts = SpecOptions {
                gamma: 3,
                max_new_tokens: 12,
                ..Default::default()
            };
            let needs = trained.spec.feature_needs();
            let a = speculative_generate(&target, s1.as_mut(), &needs, &seq[..6], &opts).expect("spec");
            let b = speculative_generate(&target, s2.as_mut(), &needs, &seq[..6], &opts).expect("spec");
            assert_eq!(a.tokens, b.tokens);
            assert_eq!(a.rounds, b.rounds, "{name} {fmt}: the same acceptance");
        }
    }
    // a warm start from an engine folder: one step at lr 1e-12 keeps those weights
    let warm = run.dir.join("warm");
    let init = format!("train.init_from={}", run.dir.join("eagle3-vllm").display());
    let out = run.train(
        &warm,
        &[
            "--set",
            "train.max_steps=1",
            "--set",
            "checkpoint.every_steps=1",
            "--set",
            "train.lr=1e-12",
            "--set",
            &init,
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("train.init_from: 15 weights"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = forge_tests::step_weights(&warm.join("step_1"));
    let b = forge_tests::step_weights(&run.dir.join("eagle3").join("step_2"));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(max_abs_diff(ta, tb) < 1e-9, "{na}");
    }
    // another kind is refused with both named
    let init = format!("train.init_from={}", run.dir.join("medusa-vllm").display());
    let args: Vec<String> = ["train", run.recipe.to_str().expect("utf8")]
        .iter()
        .map(|s| s.to_string())
        .chain(
            run.sets()
                .into_iter()
                .chain([format!("checkpoint.dir={}", run.dir.join("warm2").display()), init])
                .flat_map(|s| ["--set".to_string(), s]),
        )
        .collect();
    let out = forge(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("a medusa draft") && err.contains("eagle3"),
        "{err}"
    );
    // a speculators folder that leaves norm_before_residual to its default (true) is another
    // architecture: refused
    let sp = run.dir.join("eagle3-speculators");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sp.join("config.json")).expect("cfg")).expect("json");
    cfg.as_object_mut().expect("obj").remove("norm_before_residual");
    std::fs::write(sp.join("config.json"), cfg.to_string()).expect("write");
    let err = load_drafter_with_target(&sp, Device::Cpu, Kind::Float, Some(&run.target))
        .err()
        .expect("norm_before_residual")
        .to_string();
    assert!(
        err.contains("norm_before_residual") && err.contains("config.json"),
        "{err}"
    );
    // a draft's own embedding must be the target's
    let e1 = run.dir.join("eagle1-bias-sglang");
    let file = e1.join("model.safetensors");
    let mut w = forge_models::safetensors_io::SafetensorsFile::open(&file)
        .expect("open")
        .tensors()
        .expect("tensors");
    w.push(("embed_tokens.weight".into(), target.embed_weight().detach().copy()));
    forge_models::safetensors_io::write_safetensors(&file, &w, &std::collections::HashMap::new()).expect("write");
    assert!(
        load_drafter_with_target(&e1, Device::Cpu, Kind::Float, Some(&run.target)).is_ok(),
        "the target's own embedding is accepted"
    );
    let last = w.len() - 1;
    w[last].1 = target.embed_weight().detach() * 2.0;
    forge_models::safetensors_io::write_safetensors(&file, &w, &std::collections::HashMap::new()).expect("write");
    let err = load_drafter_with_target(&e1, Device::Cpu, Kind::Float, Some(&run.target))
        .err()
        .expect("own embedding")
        .to_string();
    assert!(err.contains("its own embedding"), "{err}");
    // a vocabulary mapping that is not one is named with its file
    let broken = run.dir.join("eagle3-vllm");
    let file = broken.join("model.safetensors");
    let mut w = forge_models::safetensors_io::SafetensorsFile::open(&file)
        .expect("open")
        .tensors()
        .expect("tensors");
    for (n, t) in w.iter_mut() {
        if n == "d2t" {
            *t = t.flip([0]);
        }
    }
    forge_models::safetensors_io::write_safetensors(&file, &w, &std::collections::HashMap::new()).expect("write");
    let err = load_drafter_with_target(&broken, Device::Cpu, Kind::Float, Some(&run.target))
        .err()
        .expect("broken mapping")
        .to_string();
    assert!(err.contains("model.safetensors") && err.contains("d2t"), "{err}");
    // a folder that is no engine draft for this target is named with what is wrong
    let bad = run.dir.join("eagle3-sglang");
    std::fs::remove_file(bad.join("model.safetensors")).expect("rm");
    let err = load_drafter_with_target(&bad, Device::Cpu, Kind::Float, Some(&run.target))
        .err()
        .expect("no weights")
        .to_string();
    assert!(err.contains("model.safetensors") && err.contains("EAGLE-3"), "{err}");
    let err = load_drafter_with_target(&run.dir.join("medusa-vllm"), Device::Cpu, Kind::Float, None)
        .err()
        .expect("no target")
        .to_string();
    assert!(err.contains("--target"), "{err}");
}

/// A greedy mismatch is classified by the target's logits at the first differing token: a
/// tie within 4 units in the last place of the target's dtype, or an error. In bf16 the
/// speculative decoder does meet exact ties (several positions verified in one forward round
/// differently from one at a time); `forge eval --verify` accepts those and nothing else.
#[test]
fn greedy_mismatches_are_classified_as_ties_or_errors() {
    use forge_models::speculative::tie_tolerance;
    assert_eq!(tie_tolerance(Kind::BFloat16, 2.77), 4.0 * 2f64.powi(1 - 7));
    assert_eq!(tie_tolerance(Kind::BFloat16, -20.0), 4.0 * 2f64.powi(4 - 7));
    assert_eq!(tie_tolerance(Kind::Half, 1.0), 4.0 * 2f64.powi(-10));
    assert_eq!(tie_tolerance(Kind::Float, 3.0), 4.0 * 2f64.powi(1 - 23));

    let dir = forge_tests::tmp_dir("eval-ties");
    random_target("llama", 34).save_hf(&dir).expect("save");
    let t = TargetModel::load(&dir, forge_models::DType::BF16, Device::Cpu).expect("bf16");
    let prompt = vec![1i64, 17, 42, 5, 66, 23];
    let plain = plain(&t, &prompt, 32, &[]);
    assert!(greedy_divergence(&t, &prompt, &plain, &plain).expect("same").is_none());
    // the runner-up at position 3 instead of the greedy token: an error unless it ties
    let seq: Vec<i64> = prompt.iter().chain(&plain[..3]).copied().collect();
    let out = tch::no_grad(|| {
        t.forward(
            &Tensor::from_slice(&seq).view([1, -1]),
            None,
            None,
            None,
            &Capture::logits(LogitsMode::Last),
        )
    })
    .expect("forward");
    let l = out.logits.expect("logits").to_kind(Kind::Double).view(-1);
    let (vals, ids) = l.topk(2, -1, true, true);
    assert_eq!(ids.int64_value(&[0]), plain[3]);
    let mut wrong = plain.clone();
    wrong[3] = ids.int64_value(&[1]);
    let d = greedy_divergence(&t, &prompt, &plain, &wrong)
        .expect("classify")
        .expect("differs");
    let gap = vals.double_value(&[0]) - vals.double_value(&[1]);
    assert_eq!((d.index, d.plain_token, d.spec_token), (3, plain[3], wrong[3]));
    assert!((d.gap - gap).abs() < 1e-9, "{d:?} vs {gap}");
    let largest = l.abs().max().double_value(&[]);
    assert_eq!(d.tolerance, tie_tolerance(Kind::BFloat16, largest), "{d:?}");
    // the least likely token instead: far from a tie, an error
    let mut wrong = plain.clone();
    wrong[3] = l.argmin(-1, false).int64_value(&[]);
    let d = greedy_divergence(&t, &prompt, &plain, &wrong)
        .expect("classify")
        .expect("differs");
    assert!(!d.tie && d.gap > 10.0 * d.tolerance, "{d:?}");
    // a shorter output is never a tie
    let d = greedy_divergence(&t, &prompt, &plain, &plain[..10])
        .expect("classify")
        .expect("differs");
    assert!(!d.tie && d.index == 10);
    // EAGLE-3 on this bf16 target: every departure from plain greedy decoding is a tie
    let e = eagle3(&t);
    let mut departures = 0;
    for gamma in [5usize, 7] {
        let mut s = e.session(&t).expect("session");
        let opts = SpecOptions {
            gamma,
            max_new_tokens: 32,
            ..Default::default()
        };
        let got = speculative_generate(&t, s.as_mut(), &e.spec().feature_needs(), &prompt, &opts).expect("speculative");
        if let Some(d) = greedy_divergence(&t, &prompt, &plain, &got.tokens).expect("classify") {
            assert!(d.tie, "gamma {gamma}: {d:?}");
            departures += 1;
        }
    }
    eprintln!("bf16 departures at ties: {departures}");
}

/// Greedy speculative decoding of each prompt with `m` for each gamma equals plain greedy
/// decoding of `max_new` tokens; returns (drafts accepted, rounds with a rejection) so that a
/// caller can show both paths ran.
pub(crate) fn greedy_lossless(
    t: &TargetModel,
    m: &dyn Drafter,
    prompts: &[Vec<i64>],
    gammas: &[usize],
    max_new: usize,
) -> (usize, usize) {
    let (mut accepted, mut rejected) = (0usize, 0usize);
    let needs = m.spec().feature_needs();
    for &gamma in gammas {
        for p in prompts {
            let opts = GenerateOptions {
                max_new_tokens: max_new,
                ..Default::default()
            };
            let want = generate(t, p, &opts, |_| {}).expect("generate").tokens;
            let mut s = m.session(t).expect("session");
            let opts = SpecOptions {
                gamma,
                max_new_tokens: max_new,
                ..Default::default()
            };
            let got = speculative_generate(t, s.as_mut(), &needs, p, &opts).expect("speculative");
            assert_eq!(
                got.tokens,
                want,
                "{} draft, gamma {gamma}, prompt {p:?}",
                m.spec().kind()
            );
            for r in &got.rounds {
                accepted += r.accepted;
                rejected += usize::from(r.accepted < r.proposed);
            }
        }
    }
    (accepted, rejected)
}

/// `forge eval`'s checks are library code: options that cannot work fail with typed errors
/// naming the flag, before anything is loaded and without printing.
#[test]
fn eval_options_are_checked_by_the_library() {
    use forge_trainer::eval::{self, EvalOptions};
    use forge_trainer::progress::NoProgress;
    let ok = EvalOptions {
        target: None,
        draft: "no-such-draft".into(),
        prompts: vec!["no-such-prompts.jsonl".into()],
        max_new_tokens: 8,
        gamma: 4,
        dynamic_gamma: false,
        min_gamma: 4,
        max_gamma: 32,
        sampling: Sampling::greedy(),
        acceptance: Default::default(),
        tree: None,
        predict: None,
        sweep: false,
        sweep_settings: vec![],
        seed: 0,
        verify: true,
        no_baseline: false,
        draft_options: vec![],
        ablate: vec![],
        limit: None,
        system: None,
        chat_template: "auto".into(),
        dtype: "auto".into(),
        device: "cpu".into(),
        tensor_parallel: None,
    };
    eval::check_options(&ok).expect("valid options");
    let hot = EvalOptions {
        sampling: Sampling::at(0.7),
        ..ok.clone()
    };
    let e = eval::check_options(&hot).unwrap_err().to_string();
    assert!(e.contains("--verify") && e.contains("--temperature 0"), "{e}");
    let tree = forge_models::spec_tree::TreeSpec::parse("steps=5,topk=4,draft_tokens=8").expect("tree");
    eval::check_options(&EvalOptions {
        tree: Some(tree),
        ..ok.clone()
    })
    .expect("a tree with greedy verification");
    let e = eval::check_options(&EvalOptions {
        tree: Some(tree),
        dynamic_gamma: true,
        ..ok.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("--dynamic-gamma") && e.contains("--tree"), "{e}");
    let mut events = 0;
    let e = eval::run(&ok, &mut NoProgress, |_| events += 1)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--prompts no-such-prompts.jsonl"), "{e}");
    assert_eq!(events, 0);
}
