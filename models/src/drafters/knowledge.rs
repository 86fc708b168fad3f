//! The knowledge drafter (method: docs/methods/knowledge.md): a small independent model made
//! of layers sampled from the target, KL-distilled from it, reading a knowledge cache.
//!
//! - Layers: `layers` are target layer indices (`strategy: uniform` spreads
//!   `num_sampled_layers` evenly: [`uniform_layers`]). Each becomes a draft decoder layer
//!   initialised from the target's weights; the draft's final norm starts as the target's.
//!   The embedding and lm_head are the target's, frozen and shared (never saved).
//! - Knowledge blocks: after sampled layer j, when the draft has a knowledge cache, a
//!   cross-attention block over the cache's states of target layer `layers[j]` (answers to
//!   frequent questions, written by `forge build-knowledge`, `[N, cache_dim]`): queries from
//!   `q_norm(x)`, keys and values from `kv_norm(cache)`, no positions (the cache is a set), and
//!   a gate `g = sigmoid(gate([q_norm(x), o]))` mixing it in: `x + g * o`. `o_proj` starts at
//!   zero, so a fresh draft is exactly its sampled target layers.
//! - Transition layers (`transition: true`): after each block a residual linear map
//!   `x + W x` (W zero-initialised) bridging the skipped target layers.
//! - Loss: `kl_weight * T^2 * KL(p_T || q_T)` plus `acceptance_weight * (1 - sum_x
//!   min(p_T, q_T))` plus `ce_weight * CE`, p the target's next-token distribution, q the
//!   draft's, T the temperature. 1 - sum min(p, q) is the chance that one draft token sampled from q is
//!   rejected by speculative sampling against p. With `target_topk: k` the target is known
//!   by its top-k log-probabilities only (offline shards): both terms are taken over k + 1
//!   bins (the k tokens and the rest), which bounds the full KL from below and the overlap
//!   from above.
//! - Decoding ([`KnowledgeSession`]): the draft is an independent model with its own KV
//!   cache over the token sequence (it never reads the target's features); entries of
//!   accepted drafts are kept, rejected ones truncated.
//!
//! Weight names (VarStore = forge checkpoint): `layers.{j}.*` (a target decoder layer's own
//! names), `norm.weight`, `blocks.{j}.{q_norm,kv_norm}.weight`,
//! `blocks.{j}.{q_proj,k_proj,v_proj,o_proj,gate}.weight|bias`, `transitions.{j}.weight`, and
//! the non-trainable buffers `knowledge.{j}` `[N, cache_dim]` (the cache, carried by
//! checkpoints and exports).
//!
//! One file over ~500 lines: one drafter kind is one file (the registry's rule; its cache is
//! knowledge_cache.rs).

use super::knowledge_cache::KnowledgeCache;
use super::{
    ce_and_hits, Drafter, DrafterKind, DrafterSpec, FeatureNeeds, Features, LossOutput, Metric, ParamGroup,
    PrepareData, ResolveTarget, StepContext, TargetAccess, TargetNeeds, TokenMacs, EMBED, LM_HEAD,
};
use forge_schema::Ctx;
use crate::error::{ModelError, Result};
use crate::generate::{RowRng, Sampling};
use crate::layers::{linear, project, DecoderLayer, Keys, Linear, ParamInit, RmsNorm, Rotary};
use crate::speculative::{pick, DraftSession, Proposal, StepFeatures};
use crate::llm::{layer_inputs, KvCache, TargetConfig, TargetModel};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// `n` target layers of `num_layers` spread evenly from the first to the last:
/// `round(i * (L - 1) / (n - 1))` ([0, 5, 11, 16, 22, 27] for 6 of 28); `[0]` for n = 1.
pub fn uniform_layers(n: i64, num_layers: i64) -> Vec<i64> {
    if n <= 1 {
        return vec![0];
    }
    let n = n.min(num_layers);
    (0..n)
        .map(|i| ((i * (num_layers - 1)) as f64 / (n - 1) as f64).round() as i64)
        .collect()
}

/// What the draft knows of the cache it was built with (the buffers' shape and provenance).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CacheSpec {
    /// The cache file a fresh draft loads (a trained draft carries the cache in its weights).
    pub path: String,
    pub tokens: i64,
    pub dim: i64,
    pub entries: i64,
    pub target_fingerprint: String,
    pub data_hash: String,
    /// [`super::knowledge_cache::question_key`] of each entry's question (empty for caches
    /// that did not record them): `forge eval` reports prompts in and out of the cache apart.
    #[serde(default)]
    pub questions: Vec<String>,
}

/// The knowledge drafter's hyper-parameters plus the target it is built from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KnowledgeSpec {
    /// Target layers copied into the draft, ascending.
    pub layers: Vec<i64>,
    /// Residual linear transition layers after each sampled layer.
    pub transition: bool,
    pub kl_weight: f64,
    pub acceptance_weight: f64,
    pub ce_weight: f64,
    /// Softens both distributions in the KL and acceptance terms (KL scaled by T^2).
    pub temperature: f64,
    /// 0: the target's full distribution (from its last hidden state through lm_head);
    /// k > 0: its top-k log-probabilities (offline shards).
    pub target_topk: usize,
    /// The knowledge cache; `None`: no knowledge blocks.
    pub cache: Option<CacheSpec>,
    /// The draft length recorded with the draft (the source system's; give it to `forge eval`
    /// as `--gamma`).
    pub num_draft_tokens: i64,
    /// Learning-rate scale of the parts that start from zero (knowledge blocks, transitions)
    /// over the copied target layers.
    pub new_lr_scale: f64,
    /// The target's config.json (the layers are the target's).
    pub target: serde_json::Value,
}

impl KnowledgeSpec {
    pub fn target_config(&self) -> Result<TargetConfig> {
        TargetConfig::from_value(self.target.clone())
            .map_err(|e| ModelError::Invalid(format!("knowledge: the target config recorded with the draft: {e}")))
    }

    pub fn validate(&self) -> Result<()> {
        let cfg = self.target_config()?;
        let mut p = Vec::new();
        if self.layers.is_empty() {
            p.push("no layers sampled".to_string());
        }
        if let Some(bad) = self.layers.iter().find(|&&l| l < 0 || l >= cfg.num_layers) {
            p.push(format!(
                "layer {bad} does not exist (the target has layers 0..{})",
                cfg.num_layers - 1
            ));
        }
        if self.layers.windows(2).any(|w| w[0] >= w[1]) {
            p.push(format!("layers {:?} must ascend without repeats", self.layers));
        }
        for (name, v) in [
            ("kl_weight", self.kl_weight),
            ("acceptance_weight", self.acceptance_weight),
            ("ce_weight", self.ce_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                p.push(format!("{name} must be >= 0"));
            }
        }
        if self.kl_weight + self.acceptance_weight + self.ce_weight <= 0.0 {
            p.push("kl_weight, acceptance_weight and ce_weight are all 0: nothing to train".into());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            p.push("temperature must be > 0".into());
        }
        if !(self.new_lr_scale.is_finite() && self.new_lr_scale > 0.0) {
            p.push("new_lr_scale must be > 0".into());
        }
        if self.num_draft_tokens < 1 {
            p.push("num_draft_tokens must be >= 1".into());
        }
        if self.target_topk > 0 && self.temperature != 1.0 {
            p.push("temperature needs the target's full distribution: set target_topk: 0".into());
        }
        if let Some(c) = &self.cache {
            if c.tokens < 1 || c.dim < 1 {
                p.push(format!("the knowledge cache {} holds no states", c.path));
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Invalid(format!("knowledge: {}", p.join("; "))))
        }
    }

    /// The names of a target decoder layer's weights within the layer (`self_attn.q_proj.weight`,
    /// ...), sorted.
    fn layer_weight_names(cfg: &TargetConfig) -> Vec<String> {
        // names do not depend on sizes: a layer with the target's options at toy sizes
        let mut c = cfg.layer_config(Kind::Float);
        c.attn.in_dim = 4;
        c.attn.out_dim = 4;
        c.attn.num_heads = 1;
        c.attn.num_kv_heads = 1;
        c.attn.head_dim = 4;
        c.intermediate = 2;
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = DecoderLayer::new(vs.root(), c, ParamInit::Zeros);
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        names
    }

    /// Fresh: the embedding, lm_head, final norm and every sampled layer's weights; loaded:
    /// the shared embedding and lm_head.
    pub fn target_needs(&self, fresh: bool) -> TargetNeeds {
        let mut names = vec![EMBED.to_string(), LM_HEAD.to_string()];
        if fresh {
            if let Ok(cfg) = self.target_config() {
                names.push(FINAL_NORM.into());
                let own = Self::layer_weight_names(&cfg);
                for &l in &self.layers {
                    names.extend(own.iter().map(|n| format!("model.layers.{l}.{n}")));
                }
            }
        }
        TargetNeeds::Tensors(names)
    }
}

const FINAL_NORM: &str = "model.norm.weight";

/// [`Drafter::prompt_group`]s of the knowledge drafter.
pub const IN_CACHE: &str = "in cache";
pub const NOT_IN_CACHE: &str = "not in cache";

/// Cross-attention over the knowledge cache, gated into the stream.
struct KnowledgeBlock {
    q_norm: RmsNorm,
    kv_norm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate: Linear,
    heads: i64,
    head_dim: i64,
}

impl KnowledgeBlock {
    fn new(p: nn::Path, h: i64, dim: i64, heads: i64, head_dim: i64, eps: f64, compute: Kind) -> Self {
        let inner = heads * head_dim;
        let init = ParamInit::Default;
        Self {
            q_norm: RmsNorm::new(&p / "q_norm", h, eps, init),
            kv_norm: RmsNorm::new(&p / "kv_norm", dim, eps, init),
            q_proj: linear(&p / "q_proj", h, inner, false, init, compute),
            k_proj: linear(&p / "k_proj", dim, inner, false, init, compute),
            v_proj: linear(&p / "v_proj", dim, inner, false, init, compute),
            // zero: a fresh block adds nothing
            o_proj: linear(&p / "o_proj", inner, h, false, ParamInit::Zeros, compute),
            gate: linear(&p / "gate", 2 * h, h, true, ParamInit::Zeros, compute),
            heads,
            head_dim,
        }
    }

    /// Keys and values `[1, heads, N, head_dim]` of the cache `[N, dim]`.
    fn memory(&self, cache: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let m = self.kv_norm.forward(&cache.to_kind(kind));
        let n = m.size()[0];
        let split = |t: Tensor| t.view([1, n, self.heads, self.head_dim]).transpose(1, 2);
        (split(self.k_proj.forward(&m)), split(self.v_proj.forward(&m)))
    }

    /// `x + g * o` for `x` `[B, T, H]` with the cache's keys and values.
    fn forward(&self, x: &Tensor, mem: &(Tensor, Tensor)) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let xn = self.q_norm.forward(x);
        let q = self
            .q_proj
            .forward(&xn)
            .view([b, t, self.heads, self.head_dim])
            .transpose(1, 2);
        let (k, v) = (
            mem.0.expand([b, -1, -1, -1], false),
            mem.1.expand([b, -1, -1, -1], false),
        );
        let k = k.to_kind(q.kind());
        let v = v.to_kind(q.kind());
        let a = Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, false, None, false);
        let a = a.transpose(1, 2).reshape([b, t, self.heads * self.head_dim]);
        let o = self.o_proj.forward(&a).to_kind(x.kind());
        let g = self
            .gate
            .forward(&Tensor::cat(&[&xn, &o], -1))
            .sigmoid()
            .to_kind(x.kind());
        x + g * o
    }
}

forge_schema::choice! {
    /// How the knowledge drafter picks its target layers.
    pub enum LayerStrategy { Uniform = "uniform", List = "list" }
}

forge_schema::choice! {
    /// Where the knowledge cache's answers come from.
    pub enum AnswerSource { Target = "target", Data = "data" }
}

impl AnswerSource {
    /// The manifest's name of the source ([`super::knowledge_cache::ANSWERS_TARGET`] | `DATA`).
    pub fn manifest_name(self) -> &'static str {
        match self {
            AnswerSource::Target => super::knowledge_cache::ANSWERS_TARGET,
            AnswerSource::Data => super::knowledge_cache::ANSWERS_DATA,
        }
    }
}

forge_schema::section! {
    /// KL-distilled drafter built from sampled target layers, reading a knowledge cache (docs/methods/knowledge.md).
    pub struct KnowledgeSection {
        /// uniform: num_sampled_layers spread from the first to the last target layer; list: the layers given in `layers`.
        strategy: LayerStrategy = LayerStrategy::Uniform,
        num_sampled_layers: i64 = 6,
        /// Target layers copied into the draft (with strategy: list), ascending.
        layers: Option<Vec<i64>> = None,
        /// The cache file: one forge build-knowledge wrote, or where forge train writes it when it is missing (unset with knowledge_data set: data.cache_dir/knowledge-<key>.safetensors, keyed by the data, the target and the options here; both unset: no knowledge blocks).
        knowledge_cache: Option<std::path::PathBuf> = None,
        /// The questions the cache is built from (the first num_knowledge_entries records): ShareGPT or prompt file; no question may also be a data.train conversation (checked).
        knowledge_data: Option<std::path::PathBuf> = None,
        /// Where the cache's answers come from: target (the target answers each question, greedy, as forge regenerate does) or data (the file's own answers; warned).
        knowledge_answers: AnswerSource = AnswerSource::Target,
        /// Answer tokens per entry: the most the target generates, and the first ones stored.
        max_answer_tokens: i64 = 256,
        /// Train even when cache questions are also data.train conversations (a lookup leak; warned, naming them).
        allow_training_overlap: bool = false,
        /// Conversations in the cache (checked against its manifest).
        num_knowledge_entries: i64 = 15,
        /// Width of the cache's states: what forge train builds (unset: the hidden size, no PCA) and what an existing cache must have (unset: any).
        cache_dim: Option<i64> = None,
        /// A residual linear transition layer after each sampled layer.
        transition: bool = true,
        kl_weight: f64 = 0.8,
        acceptance_weight: f64 = 0.3,
        /// Cross-entropy against the data's next token (0 = off).
        ce_weight: f64 = 0.0,
        /// Softens target and draft in the KL and acceptance terms (KL scaled by T^2); needs target_topk: 0.
        temperature: f64 = 1.0,
        /// 0: the target's full distribution; k > 0: only its top-k log-probabilities (online computed per batch; offline read from shards written with --topk k or more).
        target_topk: i64 = 0,
        /// Draft length recorded with the draft, as the source system decodes (give it to forge eval as --gamma).
        num_draft_tokens: i64 = 5,
        /// Learning-rate scale of the knowledge blocks and transitions (which start from zero) over the copied target layers.
        new_lr_scale: f64 = 10.0,
    }
}

impl DrafterKind for Knowledge {
    const DOCS: &'static str = "docs/methods/knowledge.md";
    type Section = KnowledgeSection;
    type Spec = KnowledgeSpec;

    fn validate(k: &KnowledgeSection, cx: &mut Ctx) {
        cx.positive("drafter.num_sampled_layers", k.num_sampled_layers);
        if k.knowledge_cache.is_none() && k.knowledge_data.is_none() && k.cache_dim.is_some() {
            cx.issue_at(
                "drafter.cache_dim",
                "is the width of the knowledge cache, but neither drafter.knowledge_cache nor drafter.knowledge_data is set",
            );
        }
        cx.positive("drafter.max_answer_tokens", k.max_answer_tokens);
        if let Some(layers) = &k.layers {
            if layers.is_empty() || layers.iter().any(|&l| l < 0) || layers.windows(2).any(|w| w[0] >= w[1]) {
                cx.issue_at(
                    "drafter.layers",
                    "must be a non-empty ascending list of distinct layer indices >= 0",
                );
            }
        }
        cx.positive("drafter.num_knowledge_entries", k.num_knowledge_entries);
        cx.positive_if_set("drafter.cache_dim", k.cache_dim);
        cx.non_negative("drafter.kl_weight", k.kl_weight);
        cx.non_negative("drafter.acceptance_weight", k.acceptance_weight);
        cx.non_negative("drafter.ce_weight", k.ce_weight);
        if k.kl_weight + k.acceptance_weight + k.ce_weight <= 0.0 {
            cx.issue_at(
                "drafter.kl_weight",
                "kl_weight, acceptance_weight and ce_weight are all 0: nothing to train",
            );
        }
        if !(k.temperature.is_finite() && k.temperature > 0.0) {
            cx.issue_at("drafter.temperature", "must be > 0");
        }
        if k.target_topk < 0 {
            cx.issue_at("drafter.target_topk", "must be >= 0 (0 = the target's full distribution)");
        }
        if k.target_topk > 0 && k.temperature != 1.0 {
            cx.issue_at("drafter.temperature", "needs the target's full distribution: set target_topk: 0");
        }
        cx.positive("drafter.num_draft_tokens", k.num_draft_tokens);
        if !(k.new_lr_scale.is_finite() && k.new_lr_scale > 0.0) {
            cx.issue_at("drafter.new_lr_scale", "must be > 0");
        }
    }

    fn resolve(x: &KnowledgeSection, target: ResolveTarget) -> Result<KnowledgeSpec> {
        knowledge_spec(x, target.config, target.dir)
    }

    /// A knowledge cache not built yet is a note; the rest of the section is checked without it.
    fn check_notes(k: &mut KnowledgeSection, _target: &TargetConfig) -> Vec<String> {
        match k.knowledge_cache.take_if(|c| !c.exists()) {
            Some(cache) => {
                let how = match k.knowledge_data.take() {
                    Some(data) => format!(
                        "forge train builds it from drafter.knowledge_data {} ({} answers)",
                        data.display(),
                        k.knowledge_answers.as_str()
                    ),
                    None => "build it with forge build-knowledge before training, or set drafter.knowledge_data and forge train builds it".into(),
                };
                vec![format!(
                    "drafter.knowledge_cache {} does not exist (yet): {how}",
                    cache.display()
                )]
            }
            None => Vec::new(),
        }
    }

    fn build(spec: &KnowledgeSpec, target: &TargetAccess, device: Device, compute: Kind) -> Result<Box<dyn Drafter>> {
        Ok(Box::new(Knowledge::new(spec.clone(), target, device, compute)?))
    }

    fn target_needs(spec: &KnowledgeSpec, fresh: bool) -> TargetNeeds {
        spec.target_needs(fresh)
    }

    /// The target's next-token distribution: in full from its last hidden state, or its top-k
    /// log-probabilities.
    fn feature_needs(k: &KnowledgeSpec) -> FeatureNeeds {
        FeatureNeeds {
            last_hidden: k.target_topk == 0,
            aux_layers: Vec::new(),
            target_topk: k.target_topk,
        }
    }
}

/// The knowledge drafter's spec: its layers resolved against the target, and its cache's
/// shape and provenance read from the cache's manifest (checked against the recipe and the
/// target: a cache built for another target or from other data is refused).
fn knowledge_spec(x: &KnowledgeSection, cfg: &TargetConfig, target_dir: Option<&Path>) -> Result<KnowledgeSpec> {
    let bad = |msg: String| ModelError::Invalid(msg);
    let layers = match (x.strategy, &x.layers) {
        (LayerStrategy::Uniform, None) => {
            if x.num_sampled_layers > cfg.num_layers {
                return Err(bad(format!(
                    "drafter.num_sampled_layers: {} layers asked of a target with {}",
                    x.num_sampled_layers, cfg.num_layers
                )));
            }
            uniform_layers(x.num_sampled_layers, cfg.num_layers)
        }
        (LayerStrategy::List, Some(l)) => {
            if let Some(missing) = l.iter().find(|&&x| x < 0 || x >= cfg.num_layers) {
                return Err(bad(format!(
                    "drafter.layers: layer {missing} does not exist (the target has layers 0..{})",
                    cfg.num_layers - 1
                )));
            }
            l.clone()
        }
        (LayerStrategy::Uniform, Some(_)) => {
            return Err(bad(
                "drafter.layers: set strategy: list to give the layers yourself (strategy: uniform spreads num_sampled_layers)"
                    .into(),
            ))
        }
        (LayerStrategy::List, None) => {
            return Err(bad("drafter.layers: strategy: list needs the list of target layers".into()))
        }
    };
    let cache = match (&x.knowledge_cache, &x.knowledge_data) {
        (None, None) => None,
        (Some(path), _) => Some(checked_cache(x, path, &layers, cfg, target_dir)?),
        (None, Some(data)) => {
            return Err(bad(format!(
                "drafter.knowledge_data {}: the cache built from it lives under data.cache_dir, which forge train and forge check find (or build); set drafter.knowledge_cache to name a file",
                data.display()
            )))
        }
    };
    let spec = KnowledgeSpec {
        layers,
        transition: x.transition,
        kl_weight: x.kl_weight,
        acceptance_weight: x.acceptance_weight,
        ce_weight: x.ce_weight,
        temperature: x.temperature,
        target_topk: x.target_topk.max(0) as usize,
        cache,
        num_draft_tokens: x.num_draft_tokens,
        new_lr_scale: x.new_lr_scale,
        target: cfg.raw.clone(),
    };
    spec.validate().map_err(|e| bad(format!("drafter: {e}")))?;
    Ok(spec)
}

/// The recipe's knowledge cache, its manifest checked against the recipe and the target.
fn checked_cache(
    x: &KnowledgeSection,
    path: &Path,
    layers: &[i64],
    cfg: &TargetConfig,
    target_dir: Option<&Path>,
) -> Result<CacheSpec> {
    let bad = |msg: String| ModelError::Invalid(msg);
    let shown = path.display();
    let build = format!(
        "forge build-knowledge --target {} --in {} --entries {}{}{}{} --out {shown}",
        target_dir.map_or("<target>".into(), |d| d.display().to_string()),
        x.knowledge_data
            .as_ref()
            .map_or("<questions>".into(), |d| d.display().to_string()),
        x.num_knowledge_entries,
        x.cache_dim.map_or(String::new(), |d| format!(" --cache-dim {d}")),
        if x.max_answer_tokens == 256 {
            String::new()
        } else {
            format!(" --max-answer-tokens {}", x.max_answer_tokens)
        },
        match x.knowledge_answers {
            AnswerSource::Target => "",
            AnswerSource::Data => " --answers data",
        },
    );
    if !path.exists() {
        return Err(bad(format!(
            "drafter.knowledge_cache: {shown} does not exist: build it with `{build}`, or set drafter.knowledge_data and forge train builds it"
        )));
    }
    let m = KnowledgeCache::read_manifest(path).map_err(|e| bad(format!("drafter.knowledge_cache: {e}")))?;
    let mut problems = Vec::new();
    if m.hidden_size != cfg.hidden_size {
        problems.push(format!(
            "it holds states of hidden size {}, the target's is {}",
            m.hidden_size, cfg.hidden_size
        ));
    }
    if let Some(dir) = target_dir {
        let fp = forge_data::hash::target_fingerprint(dir)?;
        if fp != m.target_fingerprint {
            problems.push(format!(
                "it was built for another target ({}, fingerprint {}; {} has {fp})",
                m.target,
                m.target_fingerprint,
                dir.display()
            ));
        }
    }
    if let Some(d) = x.cache_dim.filter(|&d| d > cfg.hidden_size) {
        return Err(bad(format!(
            "drafter.cache_dim {d} is above the target's hidden size {}: at most {}",
            cfg.hidden_size, cfg.hidden_size
        )));
    }
    if let Some(d) = x.cache_dim {
        if d != m.cache_dim {
            problems.push(format!("its states are {} wide, drafter.cache_dim is {d}", m.cache_dim));
        }
    }
    if x.num_knowledge_entries != m.entries {
        problems.push(format!(
            "it holds {} entries, drafter.num_knowledge_entries is {}",
            m.entries, x.num_knowledge_entries
        ));
    }
    if let Some(data) = &x.knowledge_data {
        let bytes = std::fs::read(data).map_err(crate::error::io_err(data))?;
        if forge_data::hash::data_hash(&bytes) != m.data_hash {
            problems.push(format!(
                "it was built from other data than drafter.knowledge_data {} ({})",
                data.display(),
                m.data
            ));
        }
    }
    if let Some(l) = layers.iter().find(|l| !m.layers.contains(l)) {
        problems.push(format!("it has no states of target layer {l}"));
    }
    if m.answers != x.knowledge_answers.manifest_name() {
        problems.push(format!(
            "its answers are the {}'s, drafter.knowledge_answers is {}",
            m.answers,
            x.knowledge_answers.as_str()
        ));
    }
    if m.max_answer_tokens > 0 && m.max_answer_tokens != x.max_answer_tokens {
        problems.push(format!(
            "it keeps {} answer tokens per entry, drafter.max_answer_tokens is {}",
            m.max_answer_tokens, x.max_answer_tokens
        ));
    }
    if !problems.is_empty() {
        return Err(bad(format!(
            "drafter.knowledge_cache {shown}: {}: rebuild it with `{build}`",
            problems.join("; ")
        )));
    }
    Ok(CacheSpec {
        path: path.display().to_string(),
        tokens: m.tokens,
        dim: m.cache_dim,
        entries: m.entries,
        target_fingerprint: m.target_fingerprint,
        data_hash: m.data_hash,
        questions: m.questions,
    })
}

pub struct Knowledge {
    spec: DrafterSpec,
    s: KnowledgeSpec,
    cfg: TargetConfig,
    vs: nn::VarStore,
    /// Frozen, shared with the target (`[V, H]`, compute kind).
    embed: Tensor,
    lm_head: Tensor,
    layers: Vec<DecoderLayer>,
    blocks: Vec<KnowledgeBlock>,
    transitions: Vec<Linear>,
    norm: RmsNorm,
    /// The cache per sampled layer, `[N, dim]` fp32 buffers (empty without a cache).
    knowledge: Vec<Tensor>,
    rotary: Rotary,
    compute: Kind,
    /// Whether the knowledge blocks run (`forge eval --draft-option knowledge=off` turns them off).
    use_knowledge: bool,
    /// Rows of vocabulary-wide tensors per loss chunk (None: [`LOSS_CHUNK_ELEMENTS`] / V).
    loss_chunk_rows: Option<i64>,
}

impl Knowledge {
    pub fn new(s: KnowledgeSpec, target: &TargetAccess, device: Device, compute: Kind) -> Result<Self> {
        s.validate()?;
        let cfg = s.target_config()?;
        let who = "the knowledge drafter";
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = super::eagle::frozen(target, EMBED, [v, h], device, compute, who)?;
        let lm_head = super::eagle::frozen(target, LM_HEAD, [v, h], device, compute, who)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let layers: Vec<DecoderLayer> = (0..s.layers.len())
            .map(|j| DecoderLayer::new(&root / "layers" / j as i64, cfg.layer_config(compute), ParamInit::Zeros))
            .collect();
        let norm = RmsNorm::new(&root / "norm", h, cfg.rms_norm_eps, ParamInit::Zeros);
        let (blocks, knowledge) = match &s.cache {
            Some(c) => (0..s.layers.len() as i64)
                .map(|j| {
                    let b = KnowledgeBlock::new(
                        &root / "blocks" / j,
                        h,
                        c.dim,
                        cfg.num_heads,
                        cfg.head_dim,
                        cfg.rms_norm_eps,
                        compute,
                    );
                    let buf = (&root / "knowledge").add(
                        &j.to_string(),
                        Tensor::zeros([c.tokens, c.dim], (Kind::Float, device)),
                        false,
                    );
                    (b, buf)
                })
                .unzip(),
            None => (Vec::new(), Vec::new()),
        };
        let transitions = if s.transition {
            (0..s.layers.len() as i64)
                .map(|j| linear(&root / "transitions" / j, h, h, false, ParamInit::Zeros, compute))
                .collect()
        } else {
            Vec::new()
        };
        // a fresh draft is given the target's layers and final norm: copy them
        let vars = vs.variables();
        let mut copied = 0;
        tch::no_grad(|| -> Result<()> {
            for (j, &l) in s.layers.iter().enumerate() {
                let prefix = format!("layers.{j}.");
                for (name, var) in vars.iter().filter(|(n, _)| n.starts_with(&prefix)) {
                    let src = format!("model.layers.{l}.{}", &name[prefix.len()..]);
                    if let Some(t) = target.tensor(&src) {
                        copy_into(var, &t, &src)?;
                        copied += 1;
                    }
                }
            }
            if let (Some(t), Some(var)) = (target.tensor(FINAL_NORM), vars.get("norm.weight")) {
                copy_into(var, &t, FINAL_NORM)?;
            }
            Ok(())
        })?;
        let per_layer = vars.keys().filter(|n| n.starts_with("layers.0.")).count();
        if copied != 0 && copied != per_layer * s.layers.len() {
            return Err(ModelError::Invalid(format!(
                "{who}: the target gave {copied} of the {} layer weights",
                per_layer * s.layers.len()
            )));
        }
        let rotary = Rotary::new(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling, device);
        Ok(Self {
            spec: DrafterSpec::Knowledge(s.clone()),
            s,
            cfg,
            vs,
            embed,
            lm_head,
            layers,
            blocks,
            transitions,
            norm,
            knowledge,
            rotary,
            compute,
            use_knowledge: true,
            loss_chunk_rows: None,
        })
    }

    /// Whether the draft has a knowledge cache and its blocks run.
    pub fn knowledge_on(&self) -> bool {
        !self.blocks.is_empty() && self.use_knowledge
    }

    /// Rows per chunk of the loss's vocabulary-wide tensors (tests and memory tuning); the
    /// gradients do not depend on it.
    pub fn set_loss_chunk_rows(&mut self, rows: Option<i64>) {
        self.loss_chunk_rows = rows.map(|r| r.max(1));
    }

    /// The cache's keys and values per block (computed once per forward or session).
    fn memories(&self) -> Vec<(Tensor, Tensor)> {
        if !self.knowledge_on() {
            return Vec::new();
        }
        self.blocks
            .iter()
            .zip(&self.knowledge)
            .map(|(b, k)| b.memory(k, self.compute))
            .collect()
    }

    /// The draft's normed last hidden states `[B, T, H]` for `ids` `[B, T]` at positions
    /// `past..`, over `cache` when given.
    fn hidden(
        &self,
        ids: &Tensor,
        past: i64,
        mems: &[(Tensor, Tensor)],
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let mut x = self.embed.index_select(0, &ids.reshape([-1])).view([b, t, -1]);
        let inputs = layer_inputs(
            &self.rotary,
            self.compute,
            self.cfg.sliding_window,
            x.device(),
            b,
            t,
            past,
            None,
            None,
        )?;
        for (j, layer) in self.layers.iter().enumerate() {
            let keys = match cache.as_deref_mut() {
                Some(c) => Keys::Cache(&mut c.layers[j]),
                None => Keys::Own,
            };
            x = layer.forward(&x, &inputs.cos, &inputs.sin, &inputs.mask, keys);
            if let Some(m) = mems.get(j) {
                x = self.blocks[j].forward(&x, m);
            }
            if let Some(tr) = self.transitions.get(j) {
                x = &x + tr.forward(&x).to_kind(x.kind());
            }
        }
        Ok(self.norm.forward(&x))
    }

    /// Next-token logits `[B, T, V]` fp32 of `ids` `[B, T]` (a whole sequence, no cache).
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let hn = self.hidden(ids, 0, &self.memories(), None)?;
        Ok(project(&hn, &self.lm_head, self.compute).to_kind(Kind::Float))
    }

    fn readout(&self, hn: &Tensor) -> Tensor {
        project(hn, &self.lm_head, self.compute).to_kind(Kind::Float)
    }
}

/// Vocabulary-wide elements per loss chunk (rows = this / V): 32 Mi fp32 values, 128 MB per
/// tensor.
pub const LOSS_CHUNK_ELEMENTS: i64 = 1 << 25;

/// The target's side of the trained rows: its normed last hidden states `[M, H]`, or its
/// top-k log-probabilities and ids `[M, k]`.
enum TargetRows {
    Full(Tensor),
    TopK(Tensor, Tensor),
}

/// Sums over the trained rows of the loss terms and hits.
#[derive(Default)]
struct Sums {
    kl: f64,
    rejection: f64,
    ce: f64,
    top1: f64,
    agree: f64,
}

impl Knowledge {
    /// The loss over the trained rows `hn_rows` `[M, H]` (the draft's normed states),
    /// computed in chunks of rows so that only one chunk of vocabulary-wide tensors (logits,
    /// log-softmaxes, probabilities: several `[rows, V]` each) lives at a time. Each chunk's
    /// gradient with respect to its rows is taken at once; the returned loss carries the
    /// exact value and hands those gradients to `hn_rows` (and from there to every draft
    /// weight) in the trainer's backward pass. Without gradients (evaluation) only the values
    /// are computed.
    fn distill(&self, hn_rows: &Tensor, target: &TargetRows, labels: &Tensor) -> Result<(Tensor, Sums)> {
        let s = &self.s;
        let m = hn_rows.size()[0];
        let v = self.cfg.vocab_size;
        let chunk = self.loss_chunk_rows.unwrap_or((LOSS_CHUNK_ELEMENTS / v.max(1)).max(1));
        let train = hn_rows.requires_grad();
        let mut sums = Sums::default();
        let mut grads = Vec::new();
        let mut start = 0;
        while start < m {
            let rows = chunk.min(m - start);
            let h = hn_rows.narrow(0, start, rows).detach().set_requires_grad(train);
            let lab = labels.narrow(0, start, rows);
            let logits = self.readout(&h);
            let (kl, rej, agree) = match target {
                TargetRows::Full(t) => {
                    let tl = tch::no_grad(|| self.readout(&t.narrow(0, start, rows)));
                    let (kl, rej) = kl_and_rejection(&logits, &tl, s.temperature);
                    let agree = tch::no_grad(|| {
                        logits
                            .argmax(-1, false)
                            .eq_tensor(&tl.argmax(-1, false))
                            .sum(Kind::Float)
                            .double_value(&[])
                    });
                    (kl, rej, agree)
                }
                TargetRows::TopK(lp, ids) => {
                    let ids = ids.narrow(0, start, rows);
                    let (kl, rej) = kl_and_rejection_topk(&logits, &lp.narrow(0, start, rows), &ids);
                    let agree = tch::no_grad(|| {
                        logits
                            .argmax(-1, false)
                            .eq_tensor(&ids.select(1, 0))
                            .sum(Kind::Float)
                            .double_value(&[])
                    });
                    (kl, rej, agree)
                }
            };
            // CE joins the graph only when it is in the loss
            let (ce, top1, _) = if s.ce_weight > 0.0 {
                ce_and_hits(&logits, &lab, 1)
            } else {
                tch::no_grad(|| ce_and_hits(&logits, &lab, 1))
            };
            let r = rows as f64;
            sums.kl += kl.double_value(&[]) * r;
            sums.rejection += rej.double_value(&[]) * r;
            sums.ce += ce.double_value(&[]) * r;
            sums.top1 += top1;
            sums.agree += agree;
            if train {
                // this chunk's share of the mean loss over all M rows
                let part = (kl * s.kl_weight + rej * s.acceptance_weight + ce * s.ce_weight) * (r / m as f64);
                let g = Tensor::run_backward(&[part], &[&h], false, false);
                grads.push(
                    g.into_iter()
                        .next()
                        .ok_or_else(|| ModelError::Invalid("knowledge: no gradient for a loss chunk".into()))?,
                );
            }
            start += rows;
        }
        let value = (s.kl_weight * sums.kl + s.acceptance_weight * sums.rejection + s.ce_weight * sums.ce) / m as f64;
        let value = Tensor::from(value as f32).to_device(hn_rows.device());
        let loss = if train {
            // value + (surrogate - its value): the value, with d loss / d hn_rows = the gradients
            let g = Tensor::cat(&grads, 0).to_kind(hn_rows.kind());
            let surrogate = (hn_rows * g).sum(Kind::Float);
            &value + &surrogate - surrogate.detach()
        } else {
            value
        };
        Ok((loss, sums))
    }
}

fn copy_into(var: &Tensor, src: &Tensor, name: &str) -> Result<()> {
    if var.size() != src.size() {
        return Err(ModelError::Invalid(format!(
            "knowledge: the target's {name} is {:?}, the draft's copy is {:?}",
            src.size(),
            var.size()
        )));
    }
    let mut v = var.shallow_clone();
    v.copy_(&src.to_device(var.device()).to_kind(var.kind()));
    Ok(())
}

/// KL(p || q) and the rejection `1 - sum_x min(p(x), q(x))`, each averaged over rows, for
/// draft logits `[N, V]` against target logits `[N, V]`, both softened by `temperature`;
/// the KL is multiplied by `temperature^2`.
pub fn kl_and_rejection(draft_logits: &Tensor, target_logits: &Tensor, temperature: f64) -> (Tensor, Tensor) {
    let k = wide(draft_logits);
    let logq = (draft_logits.to_kind(k) / temperature).log_softmax(-1, k);
    let logp = (target_logits.to_kind(k) / temperature).log_softmax(-1, k).detach();
    let p = logp.exp();
    let kl = (&p * (&logp - &logq)).sum_dim_intlist(-1, false, k).mean(k) * (temperature * temperature);
    let overlap = p.minimum(&logq.exp()).sum_dim_intlist(-1, false, k);
    (kl, (overlap.neg() + 1.0).mean(k))
}

/// fp64 stays fp64 (gradient checks); everything else computes in fp32.
fn wide(t: &Tensor) -> Kind {
    if t.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// [`kl_and_rejection`] with the target known by its top-k log-probabilities `[N, k]` at
/// token ids `[N, k]`: over k + 1 bins (those tokens and the rest of the vocabulary).
pub fn kl_and_rejection_topk(draft_logits: &Tensor, target_logp: &Tensor, target_ids: &Tensor) -> (Tensor, Tensor) {
    let k = wide(draft_logits);
    let logq_all = draft_logits.to_kind(k).log_softmax(-1, k);
    let logq = logq_all.gather(-1, target_ids, false);
    let logp = target_logp.to_kind(k).detach();
    let p = logp.exp();
    let q = logq.exp();
    let tiny = 1e-12;
    let p_rest = (p.sum_dim_intlist(-1, false, k).neg() + 1.0).clamp_min(0.0);
    let q_rest = (q.sum_dim_intlist(-1, false, k).neg() + 1.0).clamp_min(tiny);
    let kl_top = (&p * (&logp - &logq)).sum_dim_intlist(-1, false, k);
    let kl_rest = &p_rest * ((&p_rest + tiny).log() - q_rest.log());
    let kl = (kl_top + kl_rest).mean(k);
    let overlap = p.minimum(&q).sum_dim_intlist(-1, false, k) + p_rest.minimum(&q_rest);
    (kl, (overlap.neg() + 1.0).mean(k))
}

impl Drafter for Knowledge {
    /// The copied target layers and final norm at the recipe's learning rate; the knowledge
    /// blocks and transitions, which start from zero, at `new_lr_scale` times it.
    fn param_groups(&self) -> Vec<ParamGroup> {
        let new = |name: &str| ParamGroup {
            name: name.into(),
            prefix: format!("{name}."),
            lr_scale: self.s.new_lr_scale,
            weight_decay: true,
        };
        let mut groups = vec![ParamGroup {
            name: "layers".into(),
            ..ParamGroup::all()
        }];
        if !self.blocks.is_empty() {
            groups.push(new("blocks"));
        }
        if !self.transitions.is_empty() {
            groups.push(new("transitions"));
        }
        groups
    }

    fn spec(&self) -> &DrafterSpec {
        &self.spec
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// A fresh draft with a cache loads it into its buffers.
    fn prepare(&mut self, data: &mut dyn PrepareData, _target: &TargetAccess) -> Result<()> {
        let Some(c) = self.s.cache.clone() else {
            data.report(
                "knowledge: no knowledge cache (drafter.knowledge_cache is not set): the draft has no knowledge blocks",
            );
            return Ok(());
        };
        let cache = KnowledgeCache::read_layers(Path::new(&c.path), Some(&self.s.layers))?;
        let m = &cache.manifest;
        if m.tokens != c.tokens
            || m.cache_dim != c.dim
            || m.target_fingerprint != c.target_fingerprint
            || m.data_hash != c.data_hash
        {
            return Err(ModelError::Invalid(format!(
                "{}: the knowledge cache changed since the recipe was resolved ({} tokens x {}, target {}, data {}; expected {} x {}, target {}, data {}): run forge train again",
                c.path, m.tokens, m.cache_dim, m.target_fingerprint, m.data_hash, c.tokens, c.dim, c.target_fingerprint, c.data_hash
            )));
        }
        tch::no_grad(|| -> Result<()> {
            for (j, &l) in self.s.layers.iter().enumerate() {
                let t = cache.layers.get(&l).ok_or_else(|| {
                    ModelError::Invalid(format!(
                        "{}: the knowledge cache has no states of target layer {l} (it holds layers {:?}): rebuild it with forge build-knowledge without --layers, or with this layer",
                        c.path, m.layers
                    ))
                })?;
                let device = self.knowledge[j].device();
                self.knowledge[j].copy_(&t.to_device(device));
            }
            Ok(())
        })?;
        data.report(&format!(
            "knowledge: cache {} ({} entries, {} answer tokens x {} per layer, {} projection) after target layers {:?}",
            c.path, m.entries, m.tokens, m.cache_dim, m.projection, self.s.layers
        ));
        Ok(())
    }

    fn loss(&self, f: &Features, _ctx: &StepContext) -> Result<LossOutput> {
        let s = &self.s;
        let (b, t) = (f.input_ids.size()[0], f.input_ids.size()[1]);
        let n = t - 1;
        let hn = self.hidden(&f.input_ids, 0, &self.memories(), None)?;
        // position p predicts token p+1 where that token is trained
        let idx = if n > 0 {
            f.loss_mask
                .narrow(1, 1, n)
                .ne(0)
                .reshape([-1])
                .nonzero()
                .squeeze_dim(-1)
        } else {
            Tensor::zeros([0], (Kind::Int64, hn.device()))
        };
        let count = idx.size()[0];
        // the weighted parts of the loss, named apart from the plain metrics
        let weighted = [
            ("loss/kl", s.kl_weight),
            ("loss/acceptance", s.acceptance_weight),
            ("loss/ce", s.ce_weight),
        ];
        if count == 0 {
            // nothing trained here: a zero loss on the graph, every metric with count 0 (the
            // metric sets of all ranks agree)
            let zero = |name: &str| Metric {
                name: name.into(),
                sum: 0.0,
                count: 0.0,
            };
            return Ok(LossOutput {
                loss: hn.sum(Kind::Float) * 0.0,
                parts: weighted
                    .iter()
                    .filter(|(_, w)| *w > 0.0)
                    .map(|(name, _)| zero(name))
                    .collect(),
                metrics: ["kl", "overlap", "ce", "acc", "agree"].into_iter().map(zero).collect(),
            });
        }
        let c = count as f64;
        let rows = |x: &Tensor| -> Tensor {
            let last = x.size()[2..].to_vec();
            let mut shape = vec![b * n];
            shape.extend(last);
            x.narrow(1, 0, n).reshape(shape.as_slice()).index_select(0, &idx)
        };
        let hn_rows = rows(&hn);
        let labels = f.input_ids.narrow(1, 1, n).reshape([-1]).index_select(0, &idx);
        let target = if s.target_topk > 0 {
            let (lp, ids) = f.target_topk.as_ref().ok_or_else(|| {
                ModelError::Invalid(
                    "the knowledge drafter needs the target's top-k log-probabilities (target_topk)".into(),
                )
            })?;
            let k = s.target_topk as i64;
            TargetRows::TopK(rows(&lp.narrow(2, 0, k)), rows(&ids.narrow(2, 0, k)))
        } else {
            TargetRows::Full(rows(f.hidden_normed()?))
        };
        let (loss, sums) = self.distill(&hn_rows, &target, &labels)?;
        let mut parts = Vec::new();
        for ((name, w), sum) in weighted.into_iter().zip([sums.kl, sums.rejection, sums.ce]) {
            if w > 0.0 {
                parts.push(Metric {
                    name: name.into(),
                    sum: sum * w,
                    count: c,
                });
            }
        }
        let metrics = vec![
            Metric {
                name: "kl".into(),
                sum: sums.kl,
                count: c,
            },
            Metric {
                name: "overlap".into(),
                sum: c - sums.rejection,
                count: c,
            },
            Metric {
                name: "ce".into(),
                sum: sums.ce,
                count: c,
            },
            Metric {
                name: "acc".into(),
                sum: sums.top1,
                count: c,
            },
            Metric {
                name: "agree".into(),
                sum: sums.agree,
                count: c,
            },
        ];
        Ok(LossOutput { loss, parts, metrics })
    }

    fn check_option(&self, key: &str, value: &str) -> Result<()> {
        match (key, value) {
            ("knowledge", "on" | "off") => {
                if self.blocks.is_empty() && value == "on" {
                    return Err(ModelError::Invalid(
                        "knowledge=on: this draft was trained without a knowledge cache".into(),
                    ));
                }
                Ok(())
            }
            ("knowledge", other) => Err(ModelError::Invalid(format!(
                "knowledge={other}: use knowledge=on or knowledge=off"
            ))),
            _ => Err(ModelError::Invalid(format!(
                "the knowledge drafter has no option {key} (it has knowledge=on|off)"
            ))),
        }
    }

    fn set_option(&mut self, key: &str, value: &str) -> Result<()> {
        self.check_option(key, value)?;
        self.use_knowledge = value == "on";
        Ok(())
    }

    /// `in cache` when the prompt's first user turn is one of the cache's questions, `not in
    /// cache` otherwise; none for a draft without a cache or one that did not record them.
    fn prompt_group(&self, first_user_turn: &str) -> Option<&'static str> {
        let c = self.s.cache.as_ref().filter(|c| !c.questions.is_empty())?;
        let key = super::knowledge_cache::question_key(first_user_turn);
        Some(if c.questions.contains(&key) {
            IN_CACHE
        } else {
            NOT_IN_CACHE
        })
    }

    fn describe(&self) -> Vec<String> {
        let mut lines = vec![format!("target layers {:?}", self.s.layers)];
        match &self.s.cache {
            Some(c) if self.use_knowledge => lines.push(format!(
                "knowledge cache on ({} entries, {} tokens x {})",
                c.entries, c.tokens, c.dim
            )),
            Some(_) => lines.push("knowledge cache off".into()),
            None => lines.push("no knowledge cache".into()),
        }
        lines
    }

    /// The draft runs over the token sequence alone: every sampled layer at every position
    /// (its input norm's weight is trained, so even the first layer's q/k/v read an input
    /// that needs a gradient; attention counts the causal kernel's visible pairs, or all T x T
    /// scores under a sliding window's explicit mask), then, with the knowledge cache on, its
    /// block (q_proj, Q·K^T and A·V over the cache's N states, o_proj, the gate over
    /// cat(x, o)) and the cache's keys and values (k_proj, v_proj over the N states, counted
    /// once per sequence: a micro-batch of B sequences computes them once), and the
    /// transition. The T-1 trained positions are read out by the frozen lm_head (its input
    /// needs a gradient) and, with the target's full distribution (`target_topk: 0`), the
    /// target's last hidden states through it under no_grad.
    fn token_macs(&self, seq_len: i64) -> TokenMacs {
        if seq_len < 1 {
            return TokenMacs::default();
        }
        let c = &self.cfg;
        let t = seq_len as f64;
        let (h, v) = (c.hidden_size as f64, c.vocab_size as f64);
        let layer = super::decoder_layer_macs(
            c.hidden_size,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.intermediate_size,
        ) + super::attention_macs(c.num_heads, c.head_dim, super::causal_keys(seq_len, c.sliding_window));
        let block = match (&self.s.cache, self.knowledge_on()) {
            (Some(cache), true) => {
                let inner = (c.num_heads * c.head_dim) as f64;
                let n = cache.tokens as f64;
                let memory = 2.0 * cache.dim as f64 * inner * n / t;
                2.0 * h * inner + super::attention_macs(c.num_heads, c.head_dim, n) + 2.0 * h * h + memory
            }
            _ => 0.0,
        };
        let transition = if self.transitions.is_empty() { 0.0 } else { h * h };
        let readout = TokenMacs::one(v * h)
            + if self.s.target_topk == 0 {
                TokenMacs::none(v * h)
            } else {
                TokenMacs::default()
            };
        TokenMacs::both(self.layers.len() as f64 * (layer + block + transition)) + readout * ((t - 1.0) / t)
    }

    fn engines_note(&self) -> Option<&'static str> {
        Some("its knowledge blocks cross-attend over a cache of target states, which no inference engine (vLLM, SGLang, TensorRT-LLM) draft model has; the forge format holds the sampled layers, blocks and the cache, and forge eval decodes with it")
    }

    fn session<'a>(&'a self, _target: &'a TargetModel) -> Result<Box<dyn DraftSession + 'a>> {
        let n = self.layers.len() as i64;
        Ok(Box::new(KnowledgeSession {
            m: self,
            mems: tch::no_grad(|| self.memories()),
            cache: KvCache::new(n),
            inputs: Vec::new(),
            seq: Vec::new(),
        }))
    }
}

/// The draft as an independent model over one sequence, with its own KV cache.
pub struct KnowledgeSession<'a> {
    m: &'a Knowledge,
    /// The cache's keys and values per block, computed once.
    mems: Vec<(Tensor, Tensor)>,
    cache: KvCache,
    /// The tokens whose keys and values `cache` holds (positions 0..).
    inputs: Vec<i64>,
    /// The committed sequence, its last token not yet verified by the target.
    seq: Vec<i64>,
}

impl KnowledgeSession<'_> {
    /// Runs `ids` at positions `inputs.len()..` through the draft, appending to its cache:
    /// the normed state `[1, 1, H]` after the last one.
    fn feed(&mut self, ids: &[i64]) -> Result<Tensor> {
        let m = self.m;
        let past = self.inputs.len() as i64;
        let t = Tensor::from_slice(ids).view([1, -1]).to_device(m.embed.device());
        let hn = m.hidden(&t, past, &self.mems, Some(&mut self.cache))?;
        self.inputs.extend_from_slice(ids);
        Ok(hn.narrow(1, ids.len() as i64 - 1, 1))
    }

    /// [`Self::feed`], then the logits `[V]` after the last token.
    fn next_logits(&mut self, ids: &[i64]) -> Result<Tensor> {
        let hn = self.feed(ids)?;
        Ok(self.m.readout(&hn).view([-1]))
    }

    /// The logits `[V]` after the committed sequence followed by `path`: keeps the cache of
    /// the longest common prefix of what it holds and that sequence, and runs at least its
    /// last token.
    fn logits_after(&mut self, path: &[i64]) -> Result<Tensor> {
        let full: Vec<i64> = self.seq.iter().chain(path).copied().collect();
        let same = self.inputs.iter().zip(&full).take_while(|(a, b)| a == b).count();
        let keep = same.min(full.len().saturating_sub(1));
        self.inputs.truncate(keep);
        self.cache.truncate(keep as i64);
        let pending = full[keep..].to_vec();
        if pending.is_empty() {
            return Err(ModelError::Invalid("knowledge: propose before begin".into()));
        }
        self.next_logits(&pending)
    }
}

impl DraftSession for KnowledgeSession<'_> {
    fn begin(&mut self, prompt: &[i64]) -> Result<()> {
        self.seq = prompt.to_vec();
        self.inputs.clear();
        self.cache.truncate(0);
        // the draft's own prefill of the prompt
        if prompt.len() > 1 {
            let _ = self.feed(&prompt[..prompt.len() - 1])?;
        }
        Ok(())
    }

    fn commit(&mut self, start: i64, _features: &StepFeatures, next: &[i64]) -> Result<()> {
        let start = start as usize;
        if start >= self.seq.len() {
            return Err(ModelError::Invalid(format!(
                "knowledge: commit from position {start} of a sequence of {} tokens (begin not called?)",
                self.seq.len()
            )));
        }
        self.seq.truncate(start + 1);
        self.seq.extend_from_slice(next);
        Ok(())
    }

    fn propose(&mut self, gamma: usize, sampling: &Sampling, rng: &mut RowRng) -> Result<Proposal> {
        // keep the cache of the tokens that are still the sequence's (accepted drafts too),
        // and run at least the last committed token for its logits
        let mut l = self.logits_after(&[])?;
        let (mut tokens, mut logits) = (Vec::with_capacity(gamma), Vec::with_capacity(gamma));
        for i in 0..gamma {
            let token = pick(&l, sampling, rng)?;
            tokens.push(token);
            logits.push(l.shallow_clone());
            if i + 1 < gamma {
                l = self.next_logits(&[token])?;
            }
        }
        Ok(Proposal {
            tokens,
            logits: Tensor::stack(&logits, 0),
        })
    }

    fn can_branch(&self) -> bool {
        true
    }

    fn path_logits(&mut self, path: &[i64]) -> Result<Tensor> {
        self.logits_after(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drafters::macs_tests::{assert_macs, heads, macs, matrix_macs};

    /// A knowledge drafter of target layers [0, 3] of a 4-layer target of hidden 64 (4 heads
    /// / 2 KV heads of 16, MLP 128, vocabulary 96); a cache of 4 states 32 wide when `cache`.
    fn knowledge(cache: bool, transition: bool, target_topk: usize, sliding_window: Option<i64>) -> Knowledge {
        let mut target = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 96,
            "tie_word_embeddings": false,
        });
        if let Some(w) = sliding_window {
            target["model_type"] = "mistral".into();
            target["sliding_window"] = w.into();
        }
        let spec = KnowledgeSpec {
            layers: vec![0, 3],
            transition,
            kl_weight: 0.8,
            acceptance_weight: 0.3,
            ce_weight: 0.0,
            temperature: 1.0,
            target_topk,
            cache: cache.then(|| CacheSpec {
                path: String::new(),
                tokens: 4,
                dim: 32,
                entries: 1,
                target_fingerprint: String::new(),
                data_hash: String::new(),
                questions: Vec::new(),
            }),
            num_draft_tokens: 5,
            new_lr_scale: 10.0,
            target,
        };
        Knowledge::new(spec, &heads(96, 64), Device::Cpu, Kind::Float).expect("knowledge")
    }

    /// Per position (all grad_both but the readouts): each of the 2 layers, q 4096 + k 2048 +
    /// v 2048 + o 4096 + MLP 24576 = 36864 and causal attention 2 x 64 x (T+1)/2 (1088 at
    /// T = 16, 2112 at T = 32; all 16 keys, 2048, under a sliding window of 8 < T); each
    /// transition 64 x 64 = 4096. The frozen lm_head 96 x 64 = 6144 over T-1 of T positions
    /// (5760 at T = 16, 5952 at T = 32) reads the draft's states (grad_one) and, with the
    /// full target distribution, the target's (no_grad).
    /// - T = 16: 2 x 37952 + 2 x 4096 = 84096; T = 32: 2 x 38976 + 8192 = 86144.
    /// - a cache of N = 4 states 32 wide, per block: q_proj 4096, attention 2 x 64 x 4 = 512,
    ///   o_proj 4096, gate 128 x 64 = 8192, the cache's keys and values 2 x 32 x 64 x 4 =
    ///   16384 per sequence (1024 a token at T = 16, 512 at T = 32): + 2 x 17920 = 119936 at
    ///   T = 16, + 2 x 17408 = 120960 at T = 32; knowledge=off: as without a cache.
    /// - no transitions at T = 16: 75904; sliding window 8 at T = 16: 2 x 38912 + 8192 = 86016.
    #[test]
    fn token_macs_count_the_sampled_layers_blocks_transitions_and_distillation() {
        let cases = [
            (false, true, 0, None, true, 16, macs(84096.0, 5760.0, 5760.0)),
            (false, true, 0, None, true, 32, macs(86144.0, 5952.0, 5952.0)),
            (false, true, 8, None, true, 16, macs(84096.0, 5760.0, 0.0)),
            (true, true, 0, None, true, 16, macs(119936.0, 5760.0, 5760.0)),
            (true, true, 0, None, true, 32, macs(120960.0, 5952.0, 5952.0)),
            (true, true, 0, None, false, 16, macs(84096.0, 5760.0, 5760.0)),
            (false, false, 0, None, true, 16, macs(75904.0, 5760.0, 5760.0)),
            (false, true, 0, Some(8), true, 16, macs(86016.0, 5760.0, 5760.0)),
        ];
        for (cache, transition, topk, window, on, t, want) in cases {
            let mut m = knowledge(cache, transition, topk, window);
            if cache && !on {
                m.set_option("knowledge", "off").expect("knowledge=off");
            }
            let got = m.token_macs(t);
            let what =
                format!("cache {cache} (on {on}), transition {transition}, topk {topk}, window {window:?}, T {t}");
            assert_macs(got, want, &what);
            // from the VarStore: layers, transitions and the blocks' q/o/gate once per
            // position, the blocks' k/v over the N cache states once per sequence; plus the
            // attention terms and the frozen lm_head on the T-1 trained positions
            let tf = t as f64;
            let blocks_on = if cache && on { 1.0 } else { 0.0 };
            let trained = matrix_macs(&m.vs, |name| {
                let kv = name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight");
                match name.split('.').next()? {
                    "layers" | "transitions" => Some(1.0),
                    "blocks" if kv => Some(blocks_on * 4.0 / tf),
                    "blocks" => Some(blocks_on),
                    _ => None,
                }
            });
            let keys = if window.is_some_and(|w| t > w) {
                tf
            } else {
                (tf + 1.0) / 2.0
            };
            let attention = 2.0 * 2.0 * 64.0 * keys + blocks_on * 2.0 * 2.0 * 64.0 * 4.0;
            assert_macs(
                macs(got.grad_both + got.grad_one, 0.0, 0.0),
                macs(trained + attention + 6144.0 * (tf - 1.0) / tf, 0.0, 0.0),
                &format!("{what}: from the VarStore"),
            );
        }
    }
}
