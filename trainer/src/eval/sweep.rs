//! `forge eval --predict` and `--sweep`: the speedup a measured acceptance predicts on real
//! GPUs (the roofline of [`crate::predict`], docs/eval.md "Predicting the speedup on a GPU"),
//! and, over several serving settings decoded one after another, the setting each GPU and
//! batch size should serve with, as SGLang and vLLM flags.

use super::tally::Tally;
use crate::error::{Result, TrainerError};
use crate::predict::{self, DraftShape, Efficiency, Gpu, ModelShape, Prediction, Serving, Setting};
use forge_models::drafters::ServingShape;
use forge_models::spec_tree::TreeSpec;
use forge_models::TargetConfig;

/// Where to predict: the GPUs (names of [`crate::predict::GPUS`]), batch sizes and the mean
/// context per sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictOptions {
    pub gpus: Vec<String>,
    pub batches: Vec<i64>,
    pub context: i64,
}

/// The draft's shape for the roofline.
pub fn draft_shape(s: &ServingShape) -> DraftShape {
    DraftShape {
        weight_params: s.params_per_forward,
        layers: s.layers,
        kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        hidden: s.q_dim,
        lm_head_rows: 0,
    }
}

/// How a decoding setting (a chain of `n` or a tree) runs on an engine, as the speedup model
/// reads it: Medusa's heads propose the whole chain or tree in one forward (a block of the
/// tokens verified); EAGLE drafts run one forward per step.
pub fn serving_setting(decoded: &Setting, shape: &ServingShape) -> Setting {
    match (decoded, shape.one_forward) {
        (Setting::Chain { n }, true) => Setting::Block { size: n + 1 },
        (Setting::Tree(t), true) => Setting::Block {
            size: t.draft_tokens as u32,
        },
        (s, _) => *s,
    }
}

/// The decoding setting of `forge eval`'s options: the tree, or the chain of `gamma`.
pub fn decoded_setting(tree: Option<TreeSpec>, gamma: usize) -> Setting {
    match tree {
        Some(t) => Setting::Tree(t),
        None => Setting::Chain { n: gamma as u32 },
    }
}

/// The settings `--sweep` decodes by default: chains of 3 to 8 and, for a draft that
/// branches, SGLang trees from narrow to wide (topk 2 to 8, 4 to 64 nodes); none deeper than
/// `max_depth` (Medusa: its heads).
pub fn default_candidates(max_depth: usize, can_branch: bool) -> Vec<Setting> {
    let mut out: Vec<Setting> = (3..=8)
        .filter(|&n| n <= max_depth)
        .map(|n| Setting::Chain { n: n as u32 })
        .collect();
    if out.is_empty() {
        out.push(Setting::Chain {
            n: max_depth.max(1) as u32,
        });
    }
    if can_branch {
        for (steps, topk, draft_tokens) in [
            (3, 2, 4),
            (4, 2, 8),
            (5, 4, 8),
            (5, 4, 16),
            (6, 4, 32),
            (6, 8, 32),
            (8, 8, 64),
        ] {
            if steps <= max_depth {
                out.push(Setting::Tree(TreeSpec {
                    steps,
                    topk,
                    draft_tokens,
                }));
            }
        }
    }
    out
}

/// One GPU and batch size: the predicted speedup of each measured setting (None where the
/// setting cannot be predicted) and the best of them.
#[derive(Debug, Clone)]
pub struct Recommendation {
    pub gpu: &'static Gpu,
    pub batch: i64,
    pub predictions: Vec<Option<Prediction>>,
    /// Index of the setting with the highest predicted speedup.
    pub best: usize,
}

/// Predictions of `tau` under `setting` for every GPU and batch of `opts`.
pub fn predict_all(
    target: &TargetConfig,
    shape: &ServingShape,
    setting: &Setting,
    tau: f64,
    opts: &PredictOptions,
) -> Result<Vec<(&'static Gpu, i64, Prediction)>> {
    let (target, draft) = (ModelShape::target(target), draft_shape(shape));
    let setting = serving_setting(setting, shape);
    let mut out = Vec::new();
    for g in gpus(opts)? {
        for &batch in &opts.batches {
            let p = predict::predict(
                &target,
                &draft,
                &setting,
                tau,
                g,
                &serving(opts, batch),
                &Efficiency::default(),
            )
            .map_err(|e| TrainerError::Config(format!("--predict: {e}")))?;
            out.push((g, batch, p));
        }
    }
    Ok(out)
}

fn gpus(opts: &PredictOptions) -> Result<Vec<&'static Gpu>> {
    opts.gpus
        .iter()
        .map(|g| predict::gpu(g).map_err(|e| TrainerError::Config(format!("--predict: {e}"))))
        .collect()
}

fn serving(opts: &PredictOptions, batch: i64) -> Serving {
    Serving {
        batch,
        context: opts.context,
        tensor_parallel: 1,
    }
}

/// For every GPU and batch of `opts`, the predicted speedup of each `(setting, tally)` the
/// sweep measured and the best one. A setting whose tau the model refuses (no rounds) is left
/// out of the choice.
pub fn recommend(
    target: &TargetConfig,
    shape: &ServingShape,
    rows: &[(Setting, Tally)],
    opts: &PredictOptions,
) -> Result<Vec<Recommendation>> {
    let (target, draft) = (ModelShape::target(target), draft_shape(shape));
    let mut out = Vec::new();
    for g in gpus(opts)? {
        for &batch in &opts.batches {
            let predictions: Vec<Option<Prediction>> = rows
                .iter()
                .map(|(s, t)| {
                    predict::predict(
                        &target,
                        &draft,
                        &serving_setting(s, shape),
                        t.tau(),
                        g,
                        &serving(opts, batch),
                        &Efficiency::default(),
                    )
                    .ok()
                })
                .collect();
            let best = predictions
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.as_ref().map(|p| (i, p.speedup)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(i, _)| i)
                .ok_or_else(|| TrainerError::Config("--sweep: no setting could be predicted".into()))?;
            out.push(Recommendation {
                gpu: g,
                batch,
                predictions,
                best,
            });
        }
    }
    Ok(out)
}

/// The engine flags that serve `setting` with this draft at `draft_dir`: SGLang's (chains and
/// trees) and vLLM's (chains; vLLM drafts no dynamic trees).
pub fn engine_flags(setting: &Setting, shape: &ServingShape, draft_dir: &str) -> (Option<String>, Option<String>) {
    let tree = match setting {
        Setting::Chain { n } => Some(TreeSpec::chain(*n as usize)),
        Setting::Tree(t) => Some(*t),
        Setting::Block { .. } => None,
    };
    let sglang = shape.sglang_algorithm.zip(tree).map(|(alg, t)| {
        format!(
            "SGLang: --speculative-algorithm {alg} --speculative-draft-model-path {draft_dir} {}",
            t.sglang_flags()
        )
    });
    let vllm = match setting {
        Setting::Chain { n } => shape.vllm_method.map(|(method, versions)| {
            format!(
                "{versions}: --speculative-config '{{\"method\": \"{method}\", \"model\": \"{draft_dir}\", \"num_speculative_tokens\": {n}}}'"
            )
        }),
        _ => None,
    };
    (sglang, vllm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama-3.1-8B's shape (its config.json's fields).
    fn llama8b() -> TargetConfig {
        TargetConfig::from_value(serde_json::json!({
            "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128256,
            "tie_word_embeddings": false,
        }))
        .expect("config")
    }

    /// An EAGLE-3 draft on it: fc 3h x h, one layer reading 2h, a 32k-row lm_head.
    fn eagle3_shape() -> ServingShape {
        let h = 4096.0;
        ServingShape {
            params_per_forward: 3.0 * h * h + (2.0 * h * 6144.0 + 4096.0 * h + 3.0 * h * 14336.0) + 32000.0 * h,
            layers: 1,
            kv_heads: 8,
            head_dim: 128,
            q_dim: 4096,
            one_forward: false,
            sglang_algorithm: Some("EAGLE3"),
            vllm_method: Some(("eagle3", "vLLM 0.33 / 0.34")),
        }
    }

    /// A tally of `rounds` rounds emitting `tau` tokens each on average.
    fn tally(tau: f64) -> Tally {
        let rounds = 1000;
        Tally {
            rounds,
            round_tokens: (tau * rounds as f64).round() as usize,
            ..Default::default()
        }
    }

    /// Chains of 3..8 whose drafts are each accepted with probability 0.8 once reached:
    /// tau(n) = 1 + 0.8 + ... + 0.8^n. At batch 1 verification is memory-bound and a longer
    /// chain is nearly free; at batch 256 the verify forward is compute-bound, each verified
    /// token costs its FLOPs, and the best chain is shorter.
    #[test]
    fn larger_batches_pick_shorter_chains() {
        let rows: Vec<(Setting, Tally)> = (3u32..=8)
            .map(|n| {
                let tau: f64 = (0..=n).map(|k| 0.8f64.powi(k as i32)).sum();
                (Setting::Chain { n }, tally(tau))
            })
            .collect();
        let opts = PredictOptions {
            gpus: vec!["h100".into()],
            batches: vec![1, 256],
            context: 1024,
        };
        let recs = recommend(&llama8b(), &eagle3_shape(), &rows, &opts).expect("recommend");
        let chain = |r: &Recommendation| match rows[r.best].0 {
            Setting::Chain { n } => n,
            _ => unreachable!(),
        };
        let (small, large) = (chain(&recs[0]), chain(&recs[1]));
        assert!(large < small, "batch 1 picks chain {small}, batch 256 chain {large}");
        // the speedup falls with the batch for every setting
        for (a, b) in recs[0].predictions.iter().zip(&recs[1].predictions) {
            let (a, b) = (a.as_ref().expect("predicted"), b.as_ref().expect("predicted"));
            assert!(b.speedup < a.speedup, "{} vs {}", a.speedup, b.speedup);
        }
    }

    #[test]
    fn flags_name_the_engines_settings() {
        let shape = eagle3_shape();
        let (sglang, vllm) = engine_flags(&Setting::Chain { n: 5 }, &shape, "out/draft");
        assert_eq!(
            sglang.as_deref(),
            Some("SGLang: --speculative-algorithm EAGLE3 --speculative-draft-model-path out/draft --speculative-num-steps 5 --speculative-eagle-topk 1 --speculative-num-draft-tokens 6")
        );
        assert_eq!(
            vllm.as_deref(),
            Some("vLLM 0.33 / 0.34: --speculative-config '{\"method\": \"eagle3\", \"model\": \"out/draft\", \"num_speculative_tokens\": 5}'")
        );
        let tree = Setting::Tree(TreeSpec {
            steps: 5,
            topk: 4,
            draft_tokens: 8,
        });
        let (sglang, vllm) = engine_flags(&tree, &shape, "d");
        assert!(sglang
            .is_some_and(|s| s
                .ends_with("--speculative-num-steps 5 --speculative-eagle-topk 4 --speculative-num-draft-tokens 8")));
        assert_eq!(vllm, None);
        // Medusa: one forward for the whole chain
        let medusa = ServingShape {
            one_forward: true,
            ..shape
        };
        assert_eq!(
            serving_setting(&Setting::Chain { n: 4 }, &medusa),
            Setting::Block { size: 5 }
        );
    }

    #[test]
    fn candidates_respect_the_drafts_depth_and_branching() {
        let all = default_candidates(usize::MAX, true);
        assert_eq!(all.len(), 6 + 7);
        let medusa = default_candidates(4, true);
        assert!(medusa.iter().all(|s| match s {
            Setting::Chain { n } => *n <= 4,
            Setting::Tree(t) => t.steps <= 4,
            _ => false,
        }));
        assert_eq!(default_candidates(8, false).len(), 6);
    }
}
