//! What `forge eval` found: the run's setup, a [`Tally`] per prompt file (and per category),
//! overall, per ablation, as structs the caller prints and as the `--json` report.

use super::decode::TurnRecord;
use super::tally::Tally;
use super::EvalOptions;
use crate::error::{Result, TrainerError};
use forge_models::DType;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The run's draft, target and settings, known before decoding starts.
#[derive(Debug, Clone)]
pub struct EvalSetup {
    /// The drafter kind (`eagle3`, `medusa`, ...).
    pub kind: String,
    /// The folder the draft was loaded from (a step_<N> checkpoint, an export, ...).
    pub source: PathBuf,
    /// The draft's spec as JSON.
    pub spec: Value,
    /// The draft's own weights: their number and bytes (besides its KV cache).
    pub weights: i64,
    pub weight_bytes: i64,
    /// The draft's own description lines (`Drafter::describe`).
    pub description: Vec<String>,
    pub target: PathBuf,
    pub device: tch::Device,
    pub dtype: DType,
    /// User turns over all prompt files.
    pub total_turns: usize,
    pub files: usize,
    /// The options of the run.
    pub options: EvalOptions,
}

impl EvalSetup {
    /// Whether plain decoding ran (speedup and greedy comparison).
    pub fn baseline(&self) -> bool {
        !self.options.no_baseline
    }
}

/// One prompt file's figures.
#[derive(Debug, Clone)]
pub struct FileReport {
    pub path: PathBuf,
    pub all: Tally,
    /// Per category (`-` for prompts without one).
    pub categories: BTreeMap<String, Tally>,
    /// Per drafter group of prompts (`Drafter::prompt_group`: the knowledge drafter's `in
    /// cache` / `not in cache`); empty for drafters without groups.
    pub groups: BTreeMap<String, Tally>,
    pub prompts: Vec<TurnRecord>,
}

impl FileReport {
    pub fn to_json(&self, baseline: bool) -> Value {
        let mut v = json!({
            "path": self.path.display().to_string(),
            "summary": self.all.to_json(baseline),
            "categories": self.categories.iter().map(|(c, t)| (c.clone(), t.to_json(baseline))).collect::<serde_json::Map<String, Value>>(),
            "prompts": self.prompts,
        });
        add_groups(&mut v, &self.groups, baseline);
        v
    }
}

/// The same prompts decoded again with one more draft option; the main run's plain decoding
/// is its baseline.
#[derive(Debug, Clone)]
pub struct AblationReport {
    /// The KEY=VALUE draft option added.
    pub option: String,
    pub all: Tally,
    /// Per drafter group (as [`FileReport::groups`]), over all files.
    pub groups: BTreeMap<String, Tally>,
}

/// Adds `"groups": {name: summary}` to a report object when there are groups (drafters
/// without groups keep their report as it was).
fn add_groups(v: &mut Value, groups: &BTreeMap<String, Tally>, baseline: bool) {
    if let (false, Some(m)) = (groups.is_empty(), v.as_object_mut()) {
        let g: serde_json::Map<String, Value> = groups.iter().map(|(n, t)| (n.clone(), t.to_json(baseline))).collect();
        m.insert("groups".into(), Value::Object(g));
    }
}

/// What `--verify` found (see [`EvalReport::verify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Not asked for.
    NotAsked,
    /// Every greedy speculative output equals plain greedy decoding.
    AllEqual { compared: usize },
    /// Equal except `at_ties` outputs that depart at a floating-point tie of the target's two
    /// best logits.
    EqualBesidesTies { compared: usize, at_ties: usize },
}

/// Everything `forge eval` measured.
#[derive(Debug, Clone)]
pub struct EvalReport {
    pub setup: EvalSetup,
    pub files: Vec<FileReport>,
    /// All files together.
    pub overall: Tally,
    /// All files together per drafter group (as [`FileReport::groups`]).
    pub groups: BTreeMap<String, Tally>,
    pub ablations: Vec<AblationReport>,
    /// What an engine's draft forward reads (None: no engine serves this kind).
    pub serving_shape: Option<forge_models::drafters::ServingShape>,
    /// `--predict`: the main run's tau on each GPU and batch size.
    pub predictions: Vec<(&'static crate::predict::Gpu, i64, crate::predict::Prediction)>,
    /// `--sweep`: each setting decoded and its figures.
    pub sweep: Vec<(crate::predict::Setting, Tally)>,
    /// `--sweep` with `--predict`: the best setting per GPU and batch size.
    pub recommendations: Vec<super::sweep::Recommendation>,
}

impl EvalReport {
    /// The `--json` report: draft, target, settings, summary, ablations, per file.
    pub fn to_json(&self) -> Value {
        let s = &self.setup;
        let a = &s.options;
        let baseline = s.baseline();
        let mut ablations = serde_json::Map::new();
        for ab in &self.ablations {
            let mut v = ab.all.to_json(baseline);
            add_groups(&mut v, &ab.groups, baseline);
            // no plain run was compared in this pass
            let strip = |v: &mut Value| {
                if let Some(m) = v.as_object_mut() {
                    for k in ["greedy_compared", "greedy_mismatches", "greedy_mismatches_at_ties"] {
                        m.remove(k);
                    }
                }
            };
            strip(&mut v);
            if let Some(Value::Object(g)) = v.get_mut("groups") {
                g.values_mut().for_each(strip);
            }
            ablations.insert(ab.option.clone(), v);
        }
        let mut v = json!({
            "draft": {"path": s.source.display().to_string(), "kind": s.kind, "spec": s.spec, "weights": s.weights, "weight_bytes": s.weight_bytes, "options": a.draft_options, "description": s.description},
            "target": s.target.display().to_string(),
            "settings": {
                "gamma": a.gamma,
                "tree": a.tree.map(|t| t.to_string()),
                "dynamic_gamma": a.dynamic_gamma,
                "min_gamma": a.min_gamma,
                "max_gamma": a.max_gamma,
                "temperature": a.sampling.temperature,
                "top_p": a.sampling.top_p,
                "top_k": a.sampling.top_k,
                "acceptance": if a.sampling.is_greedy() { "greedy" } else { a.acceptance.name() },
                "max_new_tokens": a.max_new_tokens,
                "seed": a.seed,
                "device": format!("{:?}", s.device),
                "dtype": s.dtype.name(),
                "baseline": baseline,
            },
            "summary": self.overall.to_json(baseline),
            "ablations": ablations,
            "predicted": self.predictions.iter().map(|(g, b, p)| json!({
                "gpu": g.name, "batch": b, "speedup": p.speedup, "tokens_per_s": p.tokens_per_s,
                "plain_tokens_per_s": p.plain_tokens_per_s, "draft_ms": p.draft_s * 1e3, "verify_ms": p.verify_s * 1e3,
            })).collect::<Vec<_>>(),
            "sweep": self.sweep.iter().map(|(s, t)| json!({"setting": s.to_string(), "summary": t.to_json(false)})).collect::<Vec<_>>(),
            "recommended": self.recommendations.iter().map(|r| json!({
                "gpu": r.gpu.name, "batch": r.batch, "setting": self.sweep[r.best].0.to_string(),
                "speedup": r.predictions[r.best].as_ref().map(|p| p.speedup),
                "speedups": r.predictions.iter().zip(&self.sweep).map(|(p, (s, _))| (s.to_string(), json!(p.as_ref().map(|p| p.speedup)))).collect::<serde_json::Map<String, Value>>(),
            })).collect::<Vec<_>>(),
            "files": self.files.iter().map(|f| f.to_json(baseline)).collect::<Vec<_>>(),
        });
        if let (false, Some(m)) = (self.groups.is_empty(), v.as_object_mut()) {
            let g: serde_json::Map<String, Value> = self
                .groups
                .iter()
                .map(|(n, t)| (n.clone(), t.to_json(baseline)))
                .collect();
            m.insert("groups".into(), Value::Object(g));
        }
        v
    }

    /// With `verify` set: an error unless every greedy speculative output equals plain greedy
    /// decoding or departs from it only at a floating-point tie.
    pub fn verify(&self) -> Result<Verified> {
        let o = &self.overall;
        if !self.setup.options.verify {
            return Ok(Verified::NotAsked);
        }
        let errors = o.mismatches - o.mismatches_at_ties;
        if errors > 0 {
            return Err(TrainerError::VerifyFailed {
                errors,
                compared: o.compared,
            });
        }
        Ok(if o.mismatches_at_ties > 0 {
            Verified::EqualBesidesTies {
                compared: o.compared,
                at_ties: o.mismatches_at_ties,
            }
        } else {
            Verified::AllEqual { compared: o.compared }
        })
    }
}
