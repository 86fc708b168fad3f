//! Recipes: one YAML file picks a drafter and every hyper-parameter.
//!
//! Reading goes YAML text -> [`yaml::Node`] tree (with line numbers) -> `--set` overrides
//! applied to the tree -> typed [`Recipe`] with every problem collected -> semantic checks.
//! All problems are reported at once, each with its key path and line.

pub mod drafter;
pub mod reference;
pub mod schema;
pub mod yaml;

pub use drafter::*;
use schema::{choice, section, Ctx, FromNode, Issue};
use std::fmt;
use std::path::{Path, PathBuf};
use yaml::{Loc, Node};

choice! {
    /// Floating-point format; `auto` = bf16 on CUDA, fp32 on CPU.
    pub enum Precision { Auto = "auto", Fp32 = "fp32", Bf16 = "bf16", Fp16 = "fp16" }
}
choice! {
    /// Learning-rate schedule after warm-up.
    pub enum Schedule { Constant = "constant", Linear = "linear", Cosine = "cosine" }
}
choice! {
    /// Where target features come from: the frozen target inside the step, or precomputed shards.
    pub enum DataMode { Online = "online", Offline = "offline" }
}
choice! {
    /// Chat template used to render conversations.
    pub enum TemplateName { Auto = "auto", Chatml = "chatml", Llama3 = "llama3", Qwen3 = "qwen3" }
}
choice! {
    /// Collective backend; `auto` = NCCL for CUDA, Gloo for CPU.
    pub enum Backend { Auto = "auto", Gloo = "gloo", Nccl = "nccl" }
}

section! {
    /// The frozen target model.
    pub struct TargetSection {
        /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
        path: Option<PathBuf> = None,
        /// Weight format of the target in memory.
        dtype: Precision = Precision::Auto,
        /// auto, cpu, cuda or cuda:N (under `forge launch`, the local rank's GPU).
        device: String = "auto".into(),
    }
}

section! {
    /// Training data.
    pub struct DataSection {
        /// ShareGPT-style conversation files (JSON or JSONL); one path or a list.
        train: Vec<PathBuf> = Vec::new(),
        /// Held-out conversations for periodic evaluation.
        eval: Vec<PathBuf> = Vec::new(),
        chat_template: TemplateName = TemplateName::Auto,
        /// Tokens per sample after rendering; longer samples are truncated.
        max_length: i64 = 2048,
        /// Train only on the last assistant turn of each conversation.
        train_only_last_turn: bool = false,
        /// Skip (and count) malformed records instead of stopping.
        skip_invalid: bool = false,
        mode: DataMode = DataMode::Online,
        /// Hidden-state shards from `forge prepare-hidden` (offline mode).
        hidden_dir: Option<PathBuf> = None,
        /// Token cache folder.
        cache_dir: PathBuf = PathBuf::from(".forge/cache"),
    }
}

section! {
    /// Optimisation.
    pub struct TrainSection {
        /// Total optimizer steps; when unset, `epochs` passes over the data.
        max_steps: Option<u64> = None,
        epochs: u64 = 1,
        /// Samples per forward/backward.
        micro_batch_size: u64 = 1,
        /// Micro-batches per optimizer step.
        grad_accum: u64 = 1,
        lr: f64 = 1e-4,
        /// Warm-up as a fraction of total steps (ignored when warmup_steps is set).
        warmup_ratio: f64 = 0.015,
        warmup_steps: Option<u64> = None,
        schedule: Schedule = Schedule::Cosine,
        /// Final learning rate as a fraction of lr (linear and cosine schedules).
        min_lr_ratio: f64 = 0.0,
        /// Decoupled AdamW weight decay (matrices only).
        weight_decay: f64 = 0.0,
        adam_beta1: f64 = 0.9,
        adam_beta2: f64 = 0.95,
        adam_eps: f64 = 1e-8,
        /// Clip the global gradient norm to this (0 = no clipping).
        max_grad_norm: f64 = 0.5,
        /// Compute precision (master weights and optimizer state stay fp32).
        dtype: Precision = Precision::Auto,
        seed: u64 = 0,
        /// Evaluate on data.eval every this many steps.
        eval_every: Option<u64> = None,
        /// Start from this draft's weights (a forge checkpoint or export, or an engine-format folder: SGLang/vLLM EAGLE-3 or EAGLE-1, vLLM or FasterDecoding Medusa): same kind, shapes and target features as the recipe's drafter.
        init_from: Option<std::path::PathBuf> = None,
    }
}

section! {
    /// Data-parallel training.
    pub struct DistSection {
        /// 0 = replicated optimizer state; 1 = sharded state; 2 = sharded state and gradients.
        zero_stage: u32 = 0,
        backend: Backend = Backend::Auto,
        /// Gradient all-reduce bucket size in MiB.
        bucket_mb: f64 = 25.0,
        /// Collective (and rendezvous) timeout in seconds.
        timeout_s: u64 = 600,
        /// Check that all ranks hold identical weights every this many steps (0 = never).
        check_weights_every: u64 = 1,
    }
}

section! {
    /// Checkpoints.
    pub struct CheckpointSection {
        /// Output folder (checkpoints, logs, the resolved recipe).
        dir: Option<PathBuf> = None,
        every_steps: u64 = 500,
        /// Complete checkpoints kept (older ones are pruned).
        keep_last: u64 = 2,
    }
}

section! {
    /// Logging.
    pub struct LogSection {
        every_steps: u64 = 10,
        tensorboard: bool = true,
        jsonl: bool = true,
        /// Progress bar: true, false, or unset = only on a terminal.
        progress: Option<bool> = None,
    }
}

/// A complete recipe.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Recipe {
    pub drafter: DrafterSection,
    pub target: TargetSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub dist: DistSection,
    pub checkpoint: CheckpointSection,
    pub log: LogSection,
}

const SECTIONS: &[&str] = &["drafter", "target", "data", "train", "dist", "checkpoint", "log"];

/// Every problem found in a recipe, printable as `file:line:col: path: message` lines.
#[derive(Debug, Clone)]
pub struct RecipeErrors {
    pub file: PathBuf,
    pub issues: Vec<Issue>,
}

impl fmt::Display for RecipeErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.issues.len();
        writeln!(
            f,
            "{}: {} problem{} in recipe",
            self.file.display(),
            n,
            if n == 1 { "" } else { "s" }
        )?;
        for i in &self.issues {
            match &i.loc {
                Loc::File { line, col } => writeln!(f, "  {}:{line}:{col}: {i}", self.file.display())?,
                other => writeln!(f, "  ({other}): {i}")?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for RecipeErrors {}

fn read_section<T: FromNode + Default>(root: &Node, key: &str, cx: &mut Ctx) -> T {
    match root.get(key) {
        Some(node) => {
            cx.locs.insert(key.to_string(), node.loc.clone());
            T::from_node(node, key, cx).unwrap_or_default()
        }
        None => T::default(),
    }
}

impl Recipe {
    /// Reads, overrides and validates a recipe file. `overrides` are `key.path=value`.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe, RecipeErrors> {
        let fail = |issues: Vec<Issue>| RecipeErrors {
            file: path.to_path_buf(),
            issues,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            fail(vec![Issue {
                path: String::new(),
                loc: Loc::Default,
                msg: format!("cannot read the recipe: {e}"),
            }])
        })?;
        Self::from_str(&text, overrides).map_err(fail)
    }

    /// Like [`Recipe::load`] on text already read.
    pub fn from_str(text: &str, overrides: &[String]) -> Result<Recipe, Vec<Issue>> {
        let mut root = yaml::parse(text, None).map_err(|e| {
            vec![Issue {
                path: String::new(),
                loc: Loc::File {
                    line: e.line,
                    col: e.col,
                },
                msg: format!("YAML syntax: {}", e.msg),
            }]
        })?;
        if matches!(root.kind, yaml::NodeKind::Null) {
            root = Node::empty_map(Loc::File { line: 1, col: 1 });
        }
        let mut issues = Vec::new();
        for o in overrides {
            if let Err(i) = apply_override(&mut root, o) {
                issues.push(i);
            }
        }
        let mut cx = Ctx::default();
        match &root.kind {
            yaml::NodeKind::Map(entries) => schema::check_keys("", entries, SECTIONS, &mut cx),
            _ => cx.issue(
                "",
                &root.loc,
                format!("a recipe is a mapping with sections {}", SECTIONS.join(", ")),
            ),
        }
        let drafter = match root.get("drafter") {
            Some(node) => {
                cx.locs.insert("drafter".into(), node.loc.clone());
                DrafterSection::from_node(node, "drafter", &mut cx)
            }
            None => {
                cx.issue(
                    "drafter",
                    &root.loc,
                    format!(
                        "missing section; add `drafter: {{kind: ...}}` with kind one of {}",
                        DrafterSection::KINDS.join(", ")
                    ),
                );
                None
            }
        };
        let recipe = Recipe {
            drafter: drafter
                .clone()
                .unwrap_or(DrafterSection::Medusa(MedusaConfig::default())),
            target: read_section(&root, "target", &mut cx),
            data: read_section(&root, "data", &mut cx),
            train: read_section(&root, "train", &mut cx),
            dist: read_section(&root, "dist", &mut cx),
            checkpoint: read_section(&root, "checkpoint", &mut cx),
            log: read_section(&root, "log", &mut cx),
        };
        if drafter.is_some() {
            recipe.validate(&mut cx);
        } else {
            recipe.validate_common(&mut cx);
        }
        issues.extend(cx.issues);
        // File positions in reading order, then command-line overrides, then defaults.
        issues.sort_by_key(|i| match &i.loc {
            Loc::File { line, col } => (0, *line, *col),
            Loc::Override(_) => (1, 0, 0),
            Loc::Default => (2, 0, 0),
        });
        if issues.is_empty() {
            Ok(recipe)
        } else {
            Err(issues)
        }
    }

    /// The recipe as YAML, every default filled in (written next to checkpoints).
    pub fn to_yaml(&self) -> Result<String, String> {
        serde_saphyr::to_string(self).map_err(|e| e.to_string())
    }

    fn validate(&self, cx: &mut Ctx) {
        self.validate_common(cx);
        let positive = |cx: &mut Ctx, path: &str, v: i64| {
            if v < 1 {
                cx.issue_at(path, format!("must be at least 1, got {v}"));
            }
        };
        // optional drafter keys that, when set, must be at least 1
        let positive_if_set = |cx: &mut Ctx, keys: &[(&str, Option<i64>)]| {
            for (k, v) in keys {
                if let Some(v) = *v {
                    positive(cx, &format!("drafter.{k}"), v);
                }
            }
        };
        let fraction = |cx: &mut Ctx, path: &str, v: f64| {
            if !(v > 0.0 && v <= 1.0) {
                cx.issue_at(path, format!("must be in (0, 1], got {v}"));
            }
        };
        let non_negative = |cx: &mut Ctx, path: &str, v: f64| {
            if v < 0.0 {
                cx.issue_at(path, format!("must be >= 0, got {v}"));
            }
        };
        match &self.drafter {
            DrafterSection::Medusa(m) => {
                positive(cx, "drafter.num_heads", m.num_heads);
                if m.num_layers < 0 {
                    cx.issue_at("drafter.num_layers", format!("must be >= 0, got {}", m.num_layers));
                }
                fraction(cx, "drafter.loss_decay", m.loss_decay);
                positive(cx, "drafter.top_k", m.top_k);
            }
            DrafterSection::Eagle1(e) => {
                non_negative(cx, "drafter.feature_weight", e.feature_weight);
                non_negative(cx, "drafter.token_weight", e.token_weight);
                non_negative(cx, "drafter.feature_noise", e.feature_noise);
            }
            DrafterSection::Eagle3(e) => {
                positive(cx, "drafter.ttt_length", e.ttt_length);
                fraction(cx, "drafter.step_decay", e.step_decay);
                positive(cx, "drafter.draft_vocab_size", e.draft_vocab_size);
                if let Some(layers) = &e.aux_layers {
                    if layers.is_empty() {
                        cx.issue_at(
                            "drafter.aux_layers",
                            "must list at least one layer (or be left out for the default 1, L/2-1, L-4)",
                        );
                    }
                    for (i, &l) in layers.iter().enumerate() {
                        if l < 0 {
                            cx.issue_at(
                                "drafter.aux_layers",
                                format!("entry {i} is {l}; layer indices are >= 0"),
                            );
                        }
                    }
                }
                positive_if_set(
                    cx,
                    &[
                        ("hidden_size", e.hidden_size),
                        ("num_heads", e.num_heads),
                        ("num_kv_heads", e.num_kv_heads),
                        ("intermediate_size", e.intermediate_size),
                    ],
                );
                if let (Some(h), Some(kv)) = (e.num_heads, e.num_kv_heads) {
                    if kv > 0 && h % kv != 0 {
                        cx.issue_at(
                            "drafter.num_kv_heads",
                            format!("num_heads {h} must be a multiple of num_kv_heads {kv}"),
                        );
                    }
                }
            }
            DrafterSection::Hybrid(h) => {
                if h.num_mlp_blocks < 0
                    || h.num_transformer_blocks < 0
                    || h.num_mlp_blocks + h.num_transformer_blocks < 1
                {
                    cx.issue_at(
                        "drafter.num_mlp_blocks",
                        "num_mlp_blocks and num_transformer_blocks must be >= 0 with at least one block",
                    );
                }
                for (k, v) in [
                    ("gumbel_temperature", Some(h.gumbel_temperature)),
                    ("gumbel_temperature_end", h.gumbel_temperature_end),
                ] {
                    if let Some(v) = v {
                        if !(v.is_finite() && v > 0.0) {
                            cx.issue_at(&format!("drafter.{k}"), format!("must be > 0, got {v}"));
                        }
                    }
                }
                positive_if_set(
                    cx,
                    &[
                        ("gate_hidden_size", h.gate_hidden_size),
                        ("mlp_intermediate_size", h.mlp_intermediate_size),
                        ("transformer_intermediate_size", h.transformer_intermediate_size),
                        ("draft_vocab_size", h.draft_vocab_size),
                    ],
                );
                if h.anneal_steps == Some(0) {
                    cx.issue_at(
                        "drafter.anneal_steps",
                        "must be >= 1 (leave it unset to anneal over the whole run)",
                    );
                }
                non_negative(cx, "drafter.feature_weight", h.feature_weight);
                non_negative(cx, "drafter.gate_lr_scale", h.gate_lr_scale);
                non_negative(cx, "drafter.mlp_cost", h.mlp_cost);
                non_negative(cx, "drafter.transformer_cost", h.transformer_cost);
                non_negative(cx, "drafter.cost_lambda", h.cost_lambda);
            }
            DrafterSection::Spaf(s) => {
                if let Some(k) = s.cutoff_layer {
                    positive(cx, "drafter.cutoff_layer", k);
                }
                if let Some(e) = s.exit_layer {
                    positive(cx, "drafter.exit_layer", e);
                }
                fraction(cx, "drafter.adapter_dim_ratio", s.adapter_dim_ratio);
                positive(cx, "drafter.alignment_num_layers", s.alignment_num_layers);
                if !(s.alignment_hidden_dim_ratio.is_finite() && s.alignment_hidden_dim_ratio > 0.0) {
                    cx.issue_at("drafter.alignment_hidden_dim_ratio", "must be > 0");
                }
                non_negative(cx, "drafter.adapter_weight", s.adapter_weight);
                non_negative(cx, "drafter.alignment_weight", s.alignment_weight);
                if let Some(w) = &s.layer_weights {
                    if w.iter().any(|v| !v.is_finite() || *v < 0.0) || w.iter().all(|v| *v == 0.0) {
                        cx.issue_at(
                            "drafter.layer_weights",
                            "must be >= 0, one per layer from cutoff_layer to the last, with at least one > 0",
                        );
                    }
                }
                positive(cx, "drafter.num_draft_tokens", s.num_draft_tokens);
                if s.serial_parallel_transition < 0 {
                    cx.issue_at("drafter.serial_parallel_transition", "must be >= 0");
                }
                if self.data.mode == DataMode::Offline {
                    cx.issue_at(
                        "data.mode",
                        "spaf trains inside the live target (gradients flow through its layers): set data.mode: online",
                    );
                }
            }
            DrafterSection::Knowledge(k) => {
                positive(cx, "drafter.num_sampled_layers", k.num_sampled_layers);
                if k.knowledge_cache.is_none() {
                    if k.knowledge_data.is_some() {
                        cx.issue_at(
                            "drafter.knowledge_data",
                            "names what the knowledge cache was built from, but drafter.knowledge_cache is not set",
                        );
                    }
                    if k.cache_dim.is_some() {
                        cx.issue_at(
                            "drafter.cache_dim",
                            "is checked against the knowledge cache, but drafter.knowledge_cache is not set",
                        );
                    }
                }
                if let Some(layers) = &k.layers {
                    if layers.is_empty() || layers.iter().any(|&l| l < 0) || layers.windows(2).any(|w| w[0] >= w[1]) {
                        cx.issue_at(
                            "drafter.layers",
                            "must be a non-empty ascending list of distinct layer indices >= 0",
                        );
                    }
                }
                positive(cx, "drafter.num_knowledge_entries", k.num_knowledge_entries);
                if let Some(d) = k.cache_dim {
                    positive(cx, "drafter.cache_dim", d);
                }
                non_negative(cx, "drafter.kl_weight", k.kl_weight);
                non_negative(cx, "drafter.acceptance_weight", k.acceptance_weight);
                non_negative(cx, "drafter.ce_weight", k.ce_weight);
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
                    cx.issue_at(
                        "drafter.target_topk",
                        "must be >= 0 (0 = the target's full distribution)",
                    );
                }
                if k.target_topk > 0 && k.temperature != 1.0 {
                    cx.issue_at(
                        "drafter.temperature",
                        "needs the target's full distribution: set target_topk: 0",
                    );
                }
                positive(cx, "drafter.num_draft_tokens", k.num_draft_tokens);
                if !(k.new_lr_scale.is_finite() && k.new_lr_scale > 0.0) {
                    cx.issue_at("drafter.new_lr_scale", "must be > 0");
                }
            }
        }
        let kind = self.drafter.kind();
        if !DrafterSection::IMPLEMENTED.contains(&kind) {
            cx.issue_at("drafter.kind", DrafterSection::not_implemented(kind));
        }
    }

    fn validate_common(&self, cx: &mut Ctx) {
        if self.target.path.is_none() {
            cx.issue_at(
                "target.path",
                "missing: set target.path to the Hugging Face folder of the target model",
            );
        }
        if crate::recipe::parse_device_name(&self.target.device).is_none() {
            cx.issue_at(
                "target.device",
                format!("'{}' is not one of auto, cpu, cuda, cuda:N", self.target.device),
            );
        }
        let d = &self.data;
        if d.mode == DataMode::Online && d.train.is_empty() {
            cx.issue_at(
                "data.train",
                "missing: list the conversation files to train on (ShareGPT JSON/JSONL)",
            );
        }
        if d.mode == DataMode::Offline && d.hidden_dir.is_none() {
            cx.issue_at(
                "data.hidden_dir",
                "offline mode needs the folder written by `forge prepare-hidden`",
            );
        }
        if d.max_length < 2 {
            cx.issue_at("data.max_length", format!("must be at least 2, got {}", d.max_length));
        }
        let t = &self.train;
        if t.max_steps == Some(0) {
            cx.issue_at(
                "train.max_steps",
                "must be at least 1 (or left out to train for `epochs`)",
            );
        }
        if t.max_steps.is_none() && t.epochs == 0 {
            cx.issue_at("train.epochs", "must be at least 1 when train.max_steps is not set");
        }
        if t.micro_batch_size == 0 {
            cx.issue_at("train.micro_batch_size", "must be at least 1");
        }
        if t.grad_accum == 0 {
            cx.issue_at("train.grad_accum", "must be at least 1");
        }
        if t.lr <= 0.0 {
            cx.issue_at("train.lr", format!("must be > 0, got {}", t.lr));
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            cx.issue_at(
                "train.warmup_ratio",
                format!("must be in [0, 1), got {}", t.warmup_ratio),
            );
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            cx.issue_at(
                "train.min_lr_ratio",
                format!("must be in [0, 1], got {}", t.min_lr_ratio),
            );
        }
        if t.weight_decay < 0.0 {
            cx.issue_at("train.weight_decay", "must be >= 0");
        }
        for (k, v) in [("adam_beta1", t.adam_beta1), ("adam_beta2", t.adam_beta2)] {
            if !(0.0..1.0).contains(&v) {
                cx.issue_at(&format!("train.{k}"), format!("must be in [0, 1), got {v}"));
            }
        }
        if t.adam_eps <= 0.0 {
            cx.issue_at("train.adam_eps", "must be > 0");
        }
        if t.max_grad_norm < 0.0 {
            cx.issue_at("train.max_grad_norm", "must be >= 0 (0 disables clipping)");
        }
        if t.eval_every == Some(0) {
            cx.issue_at("train.eval_every", "must be at least 1 (or left out)");
        }
        if t.eval_every.is_some() && d.eval.is_empty() {
            cx.issue_at("train.eval_every", "is set but data.eval lists no files to evaluate on");
        }
        if self.dist.zero_stage > 2 {
            cx.issue_at(
                "dist.zero_stage",
                format!("must be 0, 1 or 2, got {}", self.dist.zero_stage),
            );
        }
        if self.dist.bucket_mb <= 0.0 {
            cx.issue_at("dist.bucket_mb", "must be > 0");
        }
        if self.dist.timeout_s == 0 {
            cx.issue_at("dist.timeout_s", "must be at least 1");
        }
        if self.checkpoint.dir.is_none() {
            cx.issue_at("checkpoint.dir", "missing: set checkpoint.dir to the output folder");
        }
        if self.checkpoint.every_steps == 0 {
            cx.issue_at("checkpoint.every_steps", "must be at least 1");
        }
        if self.checkpoint.keep_last == 0 {
            cx.issue_at("checkpoint.keep_last", "must be at least 1");
        }
        if self.log.every_steps == 0 {
            cx.issue_at("log.every_steps", "must be at least 1");
        }
    }
}

/// `auto`, `cpu`, `cuda`, `cuda:N` -> normalised name, without touching the hardware.
pub fn parse_device_name(s: &str) -> Option<&str> {
    match s {
        "auto" | "cpu" | "cuda" => Some(s),
        _ => s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()).map(|_| s),
    }
}

/// Applies one `key.path=value` override to the tree.
fn apply_override(root: &mut Node, spec: &str) -> Result<(), Issue> {
    let bad = |msg: String| Issue {
        path: String::new(),
        loc: Loc::Override(spec.to_string()),
        msg,
    };
    let (key, value) = spec
        .split_once('=')
        .ok_or_else(|| bad("expected key.path=value, e.g. --set train.max_steps=20".into()))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|s| s.is_empty()) {
        return Err(bad(format!("'{key}' is not a dotted key path like train.lr")));
    }
    let node = yaml::parse(value, Some(spec.to_string())).map_err(|e| Issue {
        path: key.to_string(),
        loc: Loc::Override(spec.to_string()),
        msg: format!("value is not valid YAML: {}", e.msg),
    })?;
    let parts: Vec<&str> = key.split('.').collect();
    root.set_path(&parts, node).map_err(|msg| Issue {
        path: key.to_string(),
        loc: Loc::Override(spec.to_string()),
        msg,
    })
}
