//! Recipes: one YAML file picks a drafter and every hyper-parameter.
//!
//! Reading goes YAML text -> [`yaml::Node`] tree (with line numbers) -> `--set` overrides
//! applied to the tree -> typed [`Recipe`] with every problem collected -> semantic checks.
//! All problems are reported at once, each with its key path and line.

pub mod reference;

pub use forge_models::drafters::{DrafterSection, KINDS};
use forge_schema::{choice, section, yaml, Ctx, FromNode, Issue, Loc, Node, NodeKind};
use std::fmt;
use std::path::{Path, PathBuf};

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
    /// How `forge prepare-hidden` stores hidden states: bf16, or float8 e4m3fn with one scale per token.
    pub enum HiddenDtype { Bf16 = "bf16", Fp8 = "fp8" }
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
        /// Ranks the frozen target is split over (Megatron-style tensor parallelism: heads, MLP width and vocabulary). The launched world is tensor_parallel x data-parallel ranks; consecutive ranks share one target. Must divide the target's heads, KV heads, intermediate size and vocabulary.
        tensor_parallel: usize = 1,
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
        /// How `forge prepare-hidden` stores the hidden states when its --dtype is not given: bf16, or fp8 (float8 e4m3fn with one f32 scale per token, about half the bytes). Training reads what the shards' headers say, whatever this is.
        hidden_dtype: HiddenDtype = HiddenDtype::Bf16,
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
        /// At each evaluation, also decode held-out prompts (the first user turns of data.eval) speculatively, greedy, as the engines will serve the draft: `chain:N` or `tree:steps=S,topk=K,draft_tokens=D`, one TensorBoard curve each (`eval/tau/<setting>`: tokens per target forward). Needs a target (online, or offline with the target folder).
        eval_decode: Vec<String> = Vec::new(),
        /// Prompts eval_decode decodes (the first of data.eval).
        eval_decode_prompts: u64 = 8,
        /// New tokens per prompt in eval_decode.
        eval_decode_tokens: u64 = 64,
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
        if matches!(root.kind, NodeKind::Null) {
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
            NodeKind::Map(entries) => forge_schema::check_keys("", entries, SECTIONS, &mut cx),
            _ => cx.issue(
                "",
                &root.loc,
                format!("a recipe is a mapping with sections {}", SECTIONS.join(", ")),
            ),
        }
        let drafter = match root.get("drafter") {
            Some(node) => {
                cx.locs.insert("drafter".into(), node.loc.clone());
                read_drafter(node, "drafter", &mut cx)
            }
            None => {
                cx.issue(
                    "drafter",
                    &root.loc,
                    format!(
                        "missing section; add `drafter: {{kind: ...}}` with kind one of {}",
                        KINDS.join(", ")
                    ),
                );
                None
            }
        };
        let recipe = Recipe {
            drafter: drafter.clone().unwrap_or_default(),
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
        self.drafter.validate(cx);
        if self.target.tensor_parallel == 0 {
            cx.issue_at(
                "target.tensor_parallel",
                "must be at least 1 (1 = the whole target on every rank)",
            );
        }
        if let (true, Some(why)) = (self.target.tensor_parallel > 1, self.drafter.online_only()) {
            cx.issue_at(
                "target.tensor_parallel",
                format!(
                    "{} {why}: its gradients pass through the target's layers, which a tensor-parallel target does not support; set target.tensor_parallel: 1",
                    self.drafter.kind()
                ),
            );
        }
        if let Some(why) = self.drafter.online_only() {
            if self.data.mode == DataMode::Offline {
                cx.issue_at(
                    "data.mode",
                    format!("{} {why}: set data.mode: online", self.drafter.kind()),
                );
            }
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
        for (i, s) in t.eval_decode.iter().enumerate() {
            let field = format!("train.eval_decode[{i}]");
            match crate::predict::Setting::parse(s) {
                Err(e) => cx.issue_at(
                    &field,
                    format!("{e} (write chain:5 or tree:steps=5,topk=4,draft_tokens=8)"),
                ),
                Ok(crate::predict::Setting::Block { .. }) => {
                    cx.issue_at(&field, "block drafters are not decoded yet: chain:N or tree:...")
                }
                Ok(_) => {}
            }
        }
        if !t.eval_decode.is_empty() && d.eval.is_empty() {
            cx.issue_at("train.eval_decode", "is set but data.eval lists no prompts to decode");
        }
        if t.eval_decode_prompts == 0 || t.eval_decode_tokens == 0 {
            cx.issue_at(
                "train.eval_decode_prompts",
                "eval_decode_prompts and eval_decode_tokens must be at least 1",
            );
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

/// The `drafter:` section: `kind` picks the kind, whose own section reads the other keys.
fn read_drafter(node: &Node, path: &str, cx: &mut Ctx) -> Option<DrafterSection> {
    let entries = match &node.kind {
        NodeKind::Map(e) => e,
        _ => {
            cx.issue(
                path,
                &node.loc,
                format!("expected a mapping with 'kind', got {}", forge_schema::describe(node)),
            );
            return None;
        }
    };
    let kind_path = forge_schema::join(path, "kind");
    let kind = match entries.iter().find(|(k, _, _)| k == "kind") {
        None => {
            cx.issue(
                &kind_path,
                &node.loc,
                format!("missing; set drafter.kind to one of {}", KINDS.join(", ")),
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
    let section = DrafterSection::parse(&kind, &rest, path, cx);
    if section.is_none() {
        let loc = cx.locs.get(&kind_path).cloned().unwrap_or(node.loc.clone());
        let hint = match forge_schema::suggest(&kind, KINDS) {
            Some(s) => format!(" (did you mean '{s}'?)"),
            None => String::new(),
        };
        cx.issue(
            &kind_path,
            &loc,
            format!("unknown drafter kind '{kind}'{hint}; kinds: {}", KINDS.join(", ")),
        );
    }
    section
}
