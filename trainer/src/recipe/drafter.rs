//! The `drafter:` section: `kind` picks the algorithm; the remaining keys are that kind's.
//! Each kind's section turns into its drafter spec here ([`DrafterSection::to_spec`]), next to
//! its keys: the spec then says everything else (features, target tensors, preparation).

use super::schema::{choice, join, section, type_issue, Ctx, FromNode};
use super::yaml::{Node, NodeKind};
use crate::error::TrainerError;
use forge_models::drafters::eagle::DraftLayerSpec;
use forge_models::drafters::eagle1::Eagle1Spec;
use forge_models::drafters::eagle3::Eagle3Spec;
use forge_models::drafters::hybrid::{CostMode, HybridSpec};
use forge_models::drafters::knowledge::{uniform_layers, CacheSpec, KnowledgeCache, KnowledgeSpec};
use forge_models::drafters::medusa::MedusaSpec;
use forge_models::drafters::spaf::{AdapterLoss, AlignmentLoss, SpafSpec};
use forge_models::drafters::DrafterSpec;
use forge_models::TargetConfig;

choice! {
    /// Alignment loss of the SpAF alignment head.
    pub enum AlignLoss { Mse = "mse", Cosine = "cosine" }
}

section! {
    /// Medusa heads on the target's last hidden state (docs/methods/medusa.md).
    pub struct MedusaConfig {
        /// Number of heads; head k (1-based) predicts token t+k+1.
        num_heads: i64 = 4,
        /// ResBlocks (x + SiLU(Linear(x))) per head.
        num_layers: i64 = 1,
        /// Share the target's lm_head (frozen) instead of one trainable copy per head.
        original_lm_head: bool = false,
        /// Loss weight of head k is loss_decay^k.
        loss_decay: f64 = 0.8,
        /// Accuracy@k logged per head besides top-1.
        top_k: i64 = 3,
    }
}

section! {
    /// EAGLE-1: one decoder layer over cat(embed(t+1), feature_t).
    pub struct Eagle1Config {
        /// Weight of the SmoothL1 feature-regression loss.
        feature_weight: f64 = 1.0,
        /// Weight of the soft cross-entropy against the target distribution.
        token_weight: f64 = 0.1,
        /// Half-width of uniform noise added to input features during training (0 = off).
        feature_noise: f64 = 0.0,
        /// A bias in fc. SGLang's LlamaForCausalLMEagle has one (a bias-free draft exports with a zero bias); vLLM's EagleLlamaForCausalLM has none and refuses a draft trained with one: set false to serve with vLLM.
        fc_bias: bool = true,
    }
}

section! {
    /// EAGLE-3 with training-time test.
    pub struct Eagle3Config {
        /// Unrolled training-time-test steps.
        ttt_length: i64 = 7,
        /// Loss weight of step i is step_decay^i.
        step_decay: f64 = 0.8,
        /// Draft vocabulary size (capped at the target's vocabulary).
        draft_vocab_size: i64 = 32000,
        /// Target layers whose outputs feed the draft (default: 1, L/2-1, L-4).
        aux_layers: Option<Vec<i64>> = None,
        /// Draft hidden size (default: the target's).
        hidden_size: Option<i64> = None,
        /// Draft attention heads (default: the target's).
        num_heads: Option<i64> = None,
        /// Draft KV heads (default: the target's).
        num_kv_heads: Option<i64> = None,
        /// Draft MLP width (default: the target's).
        intermediate_size: Option<i64> = None,
    }
}

choice! {
    /// Where the hybrid drafter's per-block costs come from.
    pub enum CostSetting { Fixed = "fixed", Measured = "measured" }
}

section! {
    /// Gated hybrid drafter: a gate picks, per position, one of several MLP and transformer blocks (docs/methods/hybrid.md).
    pub struct HybridConfig {
        /// Light blocks: x + SwiGLU(norm(x)).
        num_mlp_blocks: i64 = 2,
        /// Heavy blocks: one Llama decoder layer each (the target's shape).
        num_transformer_blocks: i64 = 3,
        /// Width of the gate's hidden layer (default: hidden_size / 4).
        gate_hidden_size: Option<i64> = None,
        /// Width of an MLP block's SwiGLU (default: hidden_size).
        mlp_intermediate_size: Option<i64> = None,
        /// Width of a transformer block's MLP (default: the target's intermediate_size).
        transformer_intermediate_size: Option<i64> = None,
        /// Gumbel-Softmax temperature at the start of training (lower = more discrete).
        gumbel_temperature: f64 = 1.0,
        /// Temperature at the end of the anneal (geometric from gumbel_temperature; default: no anneal).
        gumbel_temperature_end: Option<f64> = None,
        /// Steps of the anneal (default: the whole run).
        anneal_steps: Option<u64> = None,
        /// Straight-through hard (one-hot) samples in training instead of soft ones.
        hard: bool = false,
        /// Soft cross-entropy against the target's distribution instead of cross-entropy against the data's next token.
        distill: bool = false,
        /// fixed: mlp_cost / transformer_cost; measured: timed block forwards at the start of a run, scaled so that the MLP blocks' mean is mlp_cost.
        cost: CostSetting = CostSetting::Fixed,
        /// Cost of an MLP block.
        mlp_cost: f64 = 1.0,
        /// Cost of a transformer block.
        transformer_cost: f64 = 5.0,
        /// Weight of the expected compute cost in the loss.
        cost_lambda: f64 = 0.01,
        /// Weight of a SmoothL1 loss between the predicted and the target's next feature (0 = off).
        feature_weight: f64 = 0.0,
        /// Learning-rate scale of the gate's parameter group (never weight-decayed).
        gate_lr_scale: f64 = 1.0,
        /// A trainable head over the draft_vocab_size most frequent trained tokens (EAGLE-3's d2t/t2d mapping) instead of the target's frozen lm_head (default: the frozen lm_head).
        draft_vocab_size: Option<i64> = None,
    }
}

choice! {
    /// What each SpAF exit is trained against.
    pub enum AdapterLossSetting { Ce = "ce", Kl = "kl" }
}

section! {
    /// SpAF: adapters inside the frozen target, an alignment head, self-speculative decoding (docs/methods/spaf.md).
    pub struct SpafConfig {
        /// First layer with an adapter, k (default: num_layers / 2); drafting runs the target's layers 0..k.
        cutoff_layer: Option<i64> = None,
        /// Adapter bottleneck width as a fraction of the hidden size.
        adapter_dim_ratio: f64 = 0.25,
        /// Linear layers of the alignment head (token embedding -> pseudo output of layer k-1).
        alignment_num_layers: i64 = 2,
        /// Alignment head width as a multiple of the hidden size.
        alignment_hidden_dim_ratio: f64 = 2.0,
        /// mse or cosine between the alignment head's output and the real output of layer k-1.
        alignment_loss_type: AlignLoss = AlignLoss::Mse,
        /// ce: each exit against the data's next token; kl: KL(target || exit) against the target's distribution.
        adapter_loss: AdapterLossSetting = AdapterLossSetting::Ce,
        adapter_weight: f64 = 1.0,
        alignment_weight: f64 = 1.0,
        /// Loss weight of each exit k..L-1, one per layer (default: 1 / (L - k) each, or as train_exits says).
        layer_weights: Option<Vec<f64>> = None,
        /// Train only these exits (target layers in k..L-1), weighted equally; the other exits are not in the loss (adapters below a trained exit still learn through it). Exclusive with layer_weights.
        train_exits: Option<Vec<i64>> = None,
        /// The exit drafting decodes with (default: cutoff_layer, the cheapest).
        exit_layer: Option<i64> = None,
        /// Draft length recorded with the draft, as the source system decodes (give it to forge eval as --gamma).
        num_draft_tokens: i64 = 5,
        /// Draft inputs per round that run the target's layers 0..k (their keys and values are reused by verification) before the alignment head takes over.
        serial_parallel_transition: i64 = 2,
    }
}

choice! {
    /// How the knowledge drafter picks its target layers.
    pub enum LayerStrategy { Uniform = "uniform", List = "list" }
}

section! {
    /// KL-distilled drafter built from sampled target layers, reading a knowledge cache (docs/methods/knowledge.md).
    pub struct KnowledgeConfig {
        /// uniform: num_sampled_layers spread from the first to the last target layer; list: the layers given in `layers`.
        strategy: LayerStrategy = LayerStrategy::Uniform,
        num_sampled_layers: i64 = 6,
        /// Target layers copied into the draft (with strategy: list), ascending.
        layers: Option<Vec<i64>> = None,
        /// The cache written by forge build-knowledge (unset: no knowledge blocks).
        knowledge_cache: Option<std::path::PathBuf> = None,
        /// The question/answer file the cache must have been built from (checked against its manifest).
        knowledge_data: Option<std::path::PathBuf> = None,
        /// Conversations in the cache (checked against its manifest).
        num_knowledge_entries: i64 = 15,
        /// Width of the cache's states (checked against its manifest; unset: any).
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

/// The drafter kinds, one variant per algorithm.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DrafterSection {
    Medusa(MedusaConfig),
    Eagle1(Eagle1Config),
    Eagle3(Eagle3Config),
    Hybrid(HybridConfig),
    Spaf(SpafConfig),
    Knowledge(KnowledgeConfig),
}

impl DrafterSection {
    pub const KINDS: &'static [&'static str] = &["medusa", "eagle1", "eagle3", "hybrid", "spaf", "knowledge"];
    /// The kinds this build trains (the others parse, and are refused by validation).
    pub const IMPLEMENTED: &'static [&'static str] = &["medusa", "eagle1", "eagle3", "hybrid", "spaf", "knowledge"];

    /// The drafter spec this section describes for a target: the recipe's hyper-parameters
    /// plus the target's dimensions, with the recipe's defaults resolved against the target.
    /// `target_dir` (the recipe's target.path) is where a knowledge cache's fingerprint is
    /// checked; `None` skips that check (synthetic targets).
    pub fn to_spec(
        &self,
        cfg: &TargetConfig,
        target_dir: Option<&std::path::Path>,
    ) -> crate::error::Result<DrafterSpec> {
        Ok(match self {
            DrafterSection::Medusa(m) => DrafterSpec::Medusa(MedusaSpec {
                num_heads: m.num_heads,
                num_layers: m.num_layers,
                original_lm_head: m.original_lm_head,
                loss_decay: m.loss_decay,
                top_k: m.top_k,
                hidden_size: cfg.hidden_size,
                vocab_size: cfg.vocab_size,
            }),
            DrafterSection::Eagle1(e) => DrafterSpec::Eagle1(Eagle1Spec {
                feature_weight: e.feature_weight,
                token_weight: e.token_weight,
                feature_noise: e.feature_noise,
                fc_bias: e.fc_bias,
                vocab_size: cfg.vocab_size,
                layer: DraftLayerSpec::from_target(cfg, None, None, None, None)?,
            }),
            DrafterSection::Eagle3(e) => {
                let aux_layers = e.aux_layers.clone().unwrap_or_else(|| cfg.default_aux_layers());
                let mut problems = Vec::new();
                let missing: Vec<String> = aux_layers
                    .iter()
                    .filter(|&&l| l < 0 || l >= cfg.num_layers)
                    .map(|l| l.to_string())
                    .collect();
                if !missing.is_empty() {
                    problems.push(format!(
                        "layer(s) {} do not exist (the target has layers 0..{})",
                        missing.join(", "),
                        cfg.num_layers - 1
                    ));
                }
                if aux_layers.len() != 3 {
                    problems.push(format!(
                        "{} layers given, EAGLE-3 takes exactly 3 (SGLang and vLLM build fc over 3 x hidden)",
                        aux_layers.len()
                    ));
                }
                if aux_layers.windows(2).any(|w| w[0] > w[1]) {
                    problems
                        .push("the layers must ascend (engines concatenate the captured layers in layer order)".into());
                }
                if !problems.is_empty() {
                    return Err(TrainerError::Config(format!(
                        "drafter.aux_layers {aux_layers:?}: {}",
                        problems.join("; ")
                    )));
                }
                DrafterSpec::Eagle3(Eagle3Spec {
                    ttt_length: e.ttt_length,
                    step_decay: e.step_decay,
                    aux_layers,
                    draft_vocab_size: e.draft_vocab_size.min(cfg.vocab_size).max(1),
                    target_hidden_size: cfg.hidden_size,
                    vocab_size: cfg.vocab_size,
                    layer: DraftLayerSpec::from_target(
                        cfg,
                        e.hidden_size,
                        e.num_heads,
                        e.num_kv_heads,
                        e.intermediate_size,
                    )?,
                })
            }
            DrafterSection::Hybrid(x) => {
                let h = cfg.hidden_size;
                DrafterSpec::Hybrid(HybridSpec {
                    num_mlp_blocks: x.num_mlp_blocks,
                    num_transformer_blocks: x.num_transformer_blocks,
                    gate_hidden_size: x.gate_hidden_size.unwrap_or((h / 4).max(1)),
                    mlp_intermediate_size: x.mlp_intermediate_size.unwrap_or(h),
                    gumbel_temperature: x.gumbel_temperature,
                    gumbel_temperature_end: x.gumbel_temperature_end.unwrap_or(x.gumbel_temperature),
                    anneal_steps: x.anneal_steps,
                    hard: x.hard,
                    distill: x.distill,
                    cost: match x.cost {
                        CostSetting::Fixed => CostMode::Fixed,
                        CostSetting::Measured => CostMode::Measured,
                    },
                    mlp_cost: x.mlp_cost,
                    transformer_cost: x.transformer_cost,
                    cost_lambda: x.cost_lambda,
                    feature_weight: x.feature_weight,
                    gate_lr_scale: x.gate_lr_scale,
                    draft_vocab_size: x.draft_vocab_size.map(|d| d.min(cfg.vocab_size)),
                    vocab_size: cfg.vocab_size,
                    layer: DraftLayerSpec::from_target(cfg, None, None, None, x.transformer_intermediate_size)?,
                })
            }
            DrafterSection::Spaf(x) => {
                let (h, l) = (cfg.hidden_size, cfg.num_layers);
                let k = x.cutoff_layer.unwrap_or(l / 2);
                let exits = (l - k).max(0) as usize;
                let spec = SpafSpec {
                    cutoff_layer: k,
                    adapter_dim: ((h as f64 * x.adapter_dim_ratio).round() as i64).max(1),
                    alignment_num_layers: x.alignment_num_layers,
                    alignment_hidden_size: ((h as f64 * x.alignment_hidden_dim_ratio).round() as i64).max(1),
                    alignment_loss: match x.alignment_loss_type {
                        AlignLoss::Mse => AlignmentLoss::Mse,
                        AlignLoss::Cosine => AlignmentLoss::Cosine,
                    },
                    adapter_loss: match x.adapter_loss {
                        AdapterLossSetting::Ce => AdapterLoss::Ce,
                        AdapterLossSetting::Kl => AdapterLoss::Kl,
                    },
                    adapter_weight: x.adapter_weight,
                    alignment_weight: x.alignment_weight,
                    layer_weights: match (&x.layer_weights, &x.train_exits) {
                        (Some(_), Some(_)) => {
                            return Err(TrainerError::Config(
                                "drafter: set layer_weights or train_exits, not both".into(),
                            ))
                        }
                        (Some(w), None) => w.clone(),
                        (None, Some(list)) => {
                            if list.is_empty() {
                                return Err(TrainerError::Config(
                                    "drafter.train_exits: list at least one exit layer".into(),
                                ));
                            }
                            if let Some(bad) = list.iter().find(|&&e| e < k || e >= l) {
                                return Err(TrainerError::Config(format!(
                                    "drafter.train_exits: layer {bad} has no exit (exits are layers {k}..{})",
                                    l - 1
                                )));
                            }
                            let n = list.iter().collect::<std::collections::BTreeSet<_>>().len().max(1) as f64;
                            (k..l).map(|e| if list.contains(&e) { 1.0 / n } else { 0.0 }).collect()
                        }
                        (None, None) => vec![1.0 / exits.max(1) as f64; exits],
                    },
                    exit_layer: x.exit_layer.unwrap_or(k),
                    num_draft_tokens: x.num_draft_tokens,
                    serial_parallel_transition: x.serial_parallel_transition,
                    hidden_size: h,
                    num_layers: l,
                    vocab_size: cfg.vocab_size,
                };
                spec.validate()
                    .map_err(|e| TrainerError::Config(format!("drafter: {e}")))?;
                DrafterSpec::Spaf(spec)
            }
            DrafterSection::Knowledge(x) => DrafterSpec::Knowledge(knowledge_spec(x, cfg, target_dir)?),
        })
    }

    /// Why a kind cannot be trained by this build.
    pub fn not_implemented(kind: &str) -> String {
        format!(
            "drafter kind '{kind}' is not implemented yet (this build trains: {}); see docs/methods/README.md",
            Self::IMPLEMENTED.join(", ")
        )
    }

    pub fn kind(&self) -> &'static str {
        match self {
            DrafterSection::Medusa(_) => "medusa",
            DrafterSection::Eagle1(_) => "eagle1",
            DrafterSection::Eagle3(_) => "eagle3",
            DrafterSection::Hybrid(_) => "hybrid",
            DrafterSection::Spaf(_) => "spaf",
            DrafterSection::Knowledge(_) => "knowledge",
        }
    }

    /// The valid keys of a kind (besides `kind`), for the reference docs.
    pub fn field_docs(kind: &str) -> Vec<(&'static str, String)> {
        match kind {
            "medusa" => MedusaConfig::field_docs(),
            "eagle1" => Eagle1Config::field_docs(),
            "eagle3" => Eagle3Config::field_docs(),
            "hybrid" => HybridConfig::field_docs(),
            "spaf" => SpafConfig::field_docs(),
            "knowledge" => KnowledgeConfig::field_docs(),
            _ => Vec::new(),
        }
    }
}

fn parse_kind<T: FromNode + Default>(rest: &Node, path: &str, cx: &mut Ctx) -> T {
    T::from_node(rest, path, cx).unwrap_or_default()
}

impl FromNode for DrafterSection {
    const EXPECTED: &'static str = "a mapping with 'kind'";
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        let entries = match &node.kind {
            NodeKind::Map(e) => e,
            _ => {
                type_issue::<Self>(node, path, cx);
                return None;
            }
        };
        let kind_path = join(path, "kind");
        let kind = match entries.iter().find(|(k, _, _)| k == "kind") {
            None => {
                cx.issue(
                    &kind_path,
                    &node.loc,
                    format!("missing; set drafter.kind to one of {}", Self::KINDS.join(", ")),
                );
                return None;
            }
            Some((_, _, v)) => {
                cx.locs.insert(kind_path.clone(), v.loc.clone());
                String::from_node(v, &kind_path, cx)?
            }
        };
        let rest = Node {
            kind: NodeKind::Map(entries.iter().filter(|(k, _, _)| k != "kind").cloned().collect()),
            loc: node.loc.clone(),
        };
        Some(match kind.as_str() {
            "medusa" => DrafterSection::Medusa(parse_kind(&rest, path, cx)),
            "eagle1" => DrafterSection::Eagle1(parse_kind(&rest, path, cx)),
            "eagle3" => DrafterSection::Eagle3(parse_kind(&rest, path, cx)),
            "hybrid" => DrafterSection::Hybrid(parse_kind(&rest, path, cx)),
            "spaf" => DrafterSection::Spaf(parse_kind(&rest, path, cx)),
            "knowledge" => DrafterSection::Knowledge(parse_kind(&rest, path, cx)),
            other => {
                let loc = cx.locs.get(&kind_path).cloned().unwrap_or(node.loc.clone());
                let hint = match super::schema::suggest(other, Self::KINDS) {
                    Some(s) => format!(" (did you mean '{s}'?)"),
                    None => String::new(),
                };
                cx.issue(
                    &kind_path,
                    &loc,
                    format!(
                        "unknown drafter kind '{other}'{hint}; kinds: {}",
                        Self::KINDS.join(", ")
                    ),
                );
                return None;
            }
        })
    }
}

/// The knowledge drafter's spec: its layers resolved against the target, and its cache's
/// shape and provenance read from the cache's manifest (checked against the recipe and the
/// target: a cache built for another target or from other data is refused).
fn knowledge_spec(
    x: &KnowledgeConfig,
    cfg: &TargetConfig,
    target_dir: Option<&std::path::Path>,
) -> crate::error::Result<KnowledgeSpec> {
    let bad = |msg: String| TrainerError::Config(msg);
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
                return Err(bad(format!("drafter.layers: layer {missing} does not exist (the target has layers 0..{})", cfg.num_layers - 1)));
            }
            l.clone()
        }
        (LayerStrategy::Uniform, Some(_)) => {
            return Err(bad("drafter.layers: set strategy: list to give the layers yourself (strategy: uniform spreads num_sampled_layers)".into()))
        }
        (LayerStrategy::List, None) => return Err(bad("drafter.layers: strategy: list needs the list of target layers".into())),
    };
    let cache = match &x.knowledge_cache {
        None => None,
        Some(path) => {
            let shown = path.display();
            let build = format!(
                "forge build-knowledge --target {} --in {} --entries {}{} --out {shown}",
                target_dir.map_or("<target>".into(), |d| d.display().to_string()),
                x.knowledge_data
                    .as_ref()
                    .map_or("<questions and answers>".into(), |d| d.display().to_string()),
                x.num_knowledge_entries,
                x.cache_dim.map_or(String::new(), |d| format!(" --cache-dim {d}")),
            );
            if !path.exists() {
                return Err(bad(format!(
                    "drafter.knowledge_cache: {shown} does not exist: build it with `{build}`"
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
                let fp = crate::data::target_fingerprint(dir)?;
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
                let bytes = std::fs::read(data).map_err(|source| TrainerError::Io {
                    path: data.clone(),
                    source,
                })?;
                if crate::build_knowledge::data_hash(&bytes) != m.data_hash {
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
            if !problems.is_empty() {
                return Err(bad(format!(
                    "drafter.knowledge_cache {shown}: {}: rebuild it with `{build}`",
                    problems.join("; ")
                )));
            }
            Some(CacheSpec {
                path: path.display().to_string(),
                tokens: m.tokens,
                dim: m.cache_dim,
                entries: m.entries,
                target_fingerprint: m.target_fingerprint,
                data_hash: m.data_hash,
            })
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
