//! Draft models: one file per kind, and the registry below (one line per kind).
//!
//! Every drafter owns its VarStore (only its weights are trained, checkpointed and exported),
//! reads a batch of target features, returns its loss with named parts and metrics, and says
//! how it is exported for each inference engine. Everything kind-specific lives in the kind's
//! file: its recipe section, its spec, and the [`DrafterKind`] hooks the rest of forge calls
//! (what it reads of the target, [`FeatureNeeds`]; what it is built from, [`TargetNeeds`];
//! its data-dependent preparation; its engine formats). `registry.rs` turns the list below
//! into [`DrafterSpec`], [`DrafterSection`], [`KINDS`] and every dispatch over them. The
//! methods are described in `docs/methods/`; docs/adding-a-drafter.md walks through a new
//! kind.

pub mod context;
pub mod eagle;
pub mod knowledge_cache;
#[macro_use]
mod registry;

// The registry: `module::Type = "name"`, one line per kind (the file, its type implementing
// `DrafterKind`, and its name in recipes, checkpoints and exports).
drafters! {
    medusa::Medusa = "medusa",
    eagle1::Eagle1 = "eagle1",
    eagle3::Eagle3 = "eagle3",
    hybrid::Hybrid = "hybrid",
    spaf::Spaf = "spaf",
    knowledge::Knowledge = "knowledge",
}

pub use crate::features::FeatureNeeds;
pub use context::{StepContext, StepRng};
pub use registry::{architecture, config_int, DrafterKind, EngineDraft, ResolveTarget};

use crate::error::{ModelError, Result};
use crate::llm::TargetModel;
use crate::speculative::DraftSession;
use std::collections::BTreeMap;
use tch::{nn, Kind, Tensor};

/// The target's HF name of its output projection; [`TargetAccess`] resolves it to the
/// embedding when the target ties them.
pub const LM_HEAD: &str = "lm_head.weight";
/// The target's HF name of its input embedding.
pub const EMBED: &str = "model.embed_tokens.weight";

/// What a drafter is built from, besides its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetNeeds {
    /// Nothing of the target.
    Nothing,
    /// Frozen target tensors by their HF names ([`LM_HEAD`], [`EMBED`], or a layer's weights
    /// such as `model.layers.5.self_attn.q_proj.weight`), read from the target's files
    /// without loading the model.
    Tensors(Vec<String>),
    /// The live target model (a drafter that runs inside the target's layers); it is passed
    /// to every loss in [`StepContext::target`].
    Model,
}

/// The target as given to [`DrafterSpec::build`] and [`Drafter::prepare`], per [`TargetNeeds`].
pub enum TargetAccess<'a> {
    Nothing,
    /// Named frozen tensors (as read, in the target's stored kind and device).
    Tensors(BTreeMap<String, Tensor>),
    Model(&'a TargetModel),
}

impl TargetAccess<'_> {
    /// A target tensor by HF name ([`LM_HEAD`] is the embedding for tied targets), if given.
    pub fn tensor(&self, name: &str) -> Option<Tensor> {
        match self {
            TargetAccess::Nothing => None,
            TargetAccess::Tensors(m) => m.get(name).map(|t| t.shallow_clone()),
            TargetAccess::Model(t) => match name {
                LM_HEAD => Some(t.lm_head_weight().shallow_clone()),
                EMBED => Some(t.embed_weight().shallow_clone()),
                _ => t.vs.variables().get(name).map(|t| t.shallow_clone()),
            },
        }
    }

    /// A target tensor the drafter cannot do without: a clear error when it was not given.
    pub fn require(&self, name: &str, who: &str) -> Result<Tensor> {
        self.tensor(name)
            .ok_or_else(|| ModelError::Invalid(format!("{who} needs the target's {name}, which was not provided")))
    }
}

/// Data-dependent initialisation services the trainer offers [`Drafter::prepare`].
pub trait PrepareData {
    /// A draft vocabulary of `size` tokens: the most frequent target tokens among the trained
    /// tokens (loss mask 1) of the training data, ascending by id, as (`d2t`, `t2d`): target
    /// id = i + d2t[i], t2d[target id] = in the draft vocabulary.
    fn vocab_mapping(&mut self, size: usize) -> Result<(Vec<i64>, Vec<bool>)>;
    /// A line for the person running the job (e.g. measured block costs); the trainer prints
    /// it.
    fn report(&mut self, _line: &str) {}
}

/// A batch of target features (all on the drafter's device).
#[derive(Debug)]
pub struct Features {
    /// `[B, T]` int64.
    pub input_ids: Tensor,
    /// `[B, T]` int64, 1 on real tokens.
    pub attention_mask: Tensor,
    /// `[B, T]` int64.
    pub position_ids: Tensor,
    /// `[B, T]` int64, 1 where the token is trained on (assistant tokens).
    pub loss_mask: Tensor,
    pub hidden_normed: Option<Tensor>,
    pub aux_hidden: Option<Tensor>,
    /// The target's top-k log-probabilities `[B, T, k]` (fp32) and ids `[B, T, k]` (int64)
    /// when the drafter asks for them (`FeatureNeeds::target_topk`).
    pub target_topk: Option<(Tensor, Tensor)>,
}

impl Features {
    pub fn hidden_normed(&self) -> Result<&Tensor> {
        self.hidden_normed
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("the drafter needs the target's last hidden state".into()))
    }
}

/// A metric as a (sum, count) pair so it aggregates exactly over micro-batches and ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    pub sum: f64,
    pub count: f64,
}

impl Metric {
    pub fn value(&self) -> f64 {
        if self.count > 0.0 {
            self.sum / self.count
        } else {
            0.0
        }
    }
}

/// The loss of one micro-batch.
#[derive(Debug)]
pub struct LossOutput {
    /// Scalar loss to back-propagate.
    pub loss: Tensor,
    /// Named parts of the loss (already weighted as in `loss`), as (sum, count) metrics.
    pub parts: Vec<Metric>,
    /// Accuracies and other metrics.
    pub metrics: Vec<Metric>,
}

/// Export formats forge writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// forge's own reloadable format (internal names + the drafter spec).
    Forge,
    Vllm,
    /// The original FasterDecoding Medusa / TensorRT-LLM layout (`--format medusa`).
    FasterDecoding,
    Sglang,
    /// vLLM's `speculators` layout: an EAGLE-3 folder `vllm serve` recognises by itself.
    Speculators,
}

impl ExportFormat {
    pub const NAMES: &'static [&'static str] = &["forge", "vllm", "sglang", "medusa", "speculators"];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "forge" => Self::Forge,
            "vllm" => Self::Vllm,
            "medusa" => Self::FasterDecoding,
            "sglang" => Self::Sglang,
            "speculators" => Self::Speculators,
            _ => return None,
        })
    }

    /// The drafters an engine format holds, for the refusal of another kind.
    pub fn holds(self) -> &'static str {
        match self {
            Self::FasterDecoding => "Medusa",
            Self::Sglang => "EAGLE",
            _ => "other",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Forge => "forge",
            Self::Vllm => "vllm",
            Self::FasterDecoding => "medusa",
            Self::Sglang => "sglang",
            Self::Speculators => "speculators",
        }
    }
}

/// What an export writes: safetensors files of named tensors and JSON files.
#[derive(Debug)]
pub struct ExportBundle {
    pub tensor_files: Vec<(String, Vec<(String, Tensor)>)>,
    pub json_files: Vec<(String, serde_json::Value)>,
}

/// The error for an engine format asked of a drafter that exports to the forge format only,
/// with the drafter's reason (`Drafter::engines_note`).
pub(crate) fn forge_format_only(kind: &str, format: ExportFormat, note: Option<&str>) -> ModelError {
    ModelError::Invalid(format!(
        "{kind} drafters export to forge only, not {}: {}",
        format.name(),
        note.unwrap_or_default()
    ))
}

/// Multiply-accumulates (MACs) of one trained token through a drafter's training step, by
/// what the backward pass computes from them ([`Drafter::token_macs`]). A matrix product
/// `[n, k] x [k, m]` is `k * m` MACs per row. FLOPs: 2 per MAC forward; backward 4 per
/// `grad_both` MAC (a product for the gradient of each operand), 2 per `grad_one` MAC, none
/// for `no_grad`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TokenMacs {
    /// Both operands need a gradient: a trainable weight over an input that needs one (any
    /// layer after the first trainable one), attention's Q·K and A·V inside the draft.
    pub grad_both: f64,
    /// One operand needs a gradient: a trainable weight over inputs that need none (the
    /// first layer over the target's features), or a frozen weight whose input needs one
    /// (a frozen shared lm_head after trainable layers).
    pub grad_one: f64,
    /// Neither: frozen work inside the step (e.g. frozen target layers run under no_grad).
    pub no_grad: f64,
}

impl TokenMacs {
    pub fn forward_flops(&self) -> f64 {
        2.0 * (self.grad_both + self.grad_one + self.no_grad)
    }

    pub fn backward_flops(&self) -> f64 {
        4.0 * self.grad_both + 2.0 * self.grad_one
    }

    /// Forward and backward.
    pub fn train_flops(&self) -> f64 {
        self.forward_flops() + self.backward_flops()
    }
}

impl TokenMacs {
    /// `macs` whose operands both need a gradient.
    pub fn both(macs: f64) -> Self {
        Self {
            grad_both: macs,
            ..Self::default()
        }
    }

    /// `macs` of which one operand needs a gradient.
    pub fn one(macs: f64) -> Self {
        Self {
            grad_one: macs,
            ..Self::default()
        }
    }

    /// `macs` of which no operand needs a gradient.
    pub fn none(macs: f64) -> Self {
        Self {
            no_grad: macs,
            ..Self::default()
        }
    }

    /// All three kinds together.
    pub fn total(&self) -> f64 {
        self.grad_both + self.grad_one + self.no_grad
    }
}

/// MACs per position of a Llama decoder layer's matrices: q/k/v over an `in_dim`-wide input,
/// o_proj back to `hidden`, and the SwiGLU MLP (gate, up, down). Attention's products apart
/// ([`attention_macs`]).
pub(crate) fn decoder_layer_macs(
    in_dim: i64,
    hidden: i64,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    intermediate: i64,
) -> f64 {
    let (q, kv) = ((heads * head_dim) as f64, (kv_heads * head_dim) as f64);
    let (i, h) = (in_dim as f64, hidden as f64);
    i * (q + 2.0 * kv) + q * h + 3.0 * h * intermediate as f64
}

/// MACs per query of attention's two products (Q·K^T and A·V) over `keys` keys: `head_dim`
/// each per key per query head (grouped KV heads are shared, not fewer products).
pub(crate) fn attention_macs(heads: i64, head_dim: i64, keys: f64) -> f64 {
    2.0 * (heads * head_dim) as f64 * keys
}

/// The keys per query, on average, whose scores a target-style self-attention over `seq_len`
/// positions (`llm::layer_inputs` from an empty cache, no padding) computes: a causal kernel
/// (`AttnMask::Causal`) visits the T(T+1)/2 visible pairs, (T+1)/2 per query; a sliding
/// window shorter than the sequence makes the mask explicit, and a kernel under an explicit
/// mask computes all T x T scores.
pub(crate) fn causal_keys(seq_len: i64, sliding_window: Option<i64>) -> f64 {
    let t = seq_len as f64;
    if sliding_window.is_some_and(|w| seq_len > w) {
        t
    } else {
        (t + 1.0) / 2.0
    }
}

impl std::ops::Add for TokenMacs {
    type Output = TokenMacs;
    fn add(self, o: TokenMacs) -> TokenMacs {
        TokenMacs {
            grad_both: self.grad_both + o.grad_both,
            grad_one: self.grad_one + o.grad_one,
            no_grad: self.no_grad + o.no_grad,
        }
    }
}

impl std::ops::Mul<f64> for TokenMacs {
    type Output = TokenMacs;
    fn mul(self, k: f64) -> TokenMacs {
        TokenMacs {
            grad_both: self.grad_both * k,
            grad_one: self.grad_one * k,
            no_grad: self.no_grad * k,
        }
    }
}

/// An optimizer parameter group a drafter declares: the trainable variables whose names start
/// with `prefix` (the longest matching prefix wins; `""` matches every name) get the recipe's
/// learning rate times `lr_scale`, and the recipe's weight decay when `weight_decay` is true
/// (applied, as always, only to parameters of two or more dimensions: never to norms, biases
/// or other vectors).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroup {
    pub name: String,
    pub prefix: String,
    pub lr_scale: f64,
    pub weight_decay: bool,
}

impl ParamGroup {
    /// Every parameter at the recipe's learning rate and weight decay.
    pub fn all() -> Self {
        Self {
            name: "all".into(),
            prefix: String::new(),
            lr_scale: 1.0,
            weight_decay: true,
        }
    }
}

/// Every draft algorithm implements this.
pub trait Drafter {
    /// The optimizer groups of this drafter's trainable variables (default: one group, the
    /// recipe's learning rate and weight decay for everything).
    fn param_groups(&self) -> Vec<ParamGroup> {
        vec![ParamGroup::all()]
    }
    fn spec(&self) -> &DrafterSpec;
    fn var_store(&self) -> &nn::VarStore;
    fn var_store_mut(&mut self) -> &mut nn::VarStore;
    /// Data-dependent initialisation of a fresh drafter, before training (not on resume,
    /// where the checkpoint holds the result): e.g. EAGLE-3's draft vocabulary. `target` is
    /// what [`DrafterSpec::target_needs`] asked for.
    fn prepare(&mut self, _data: &mut dyn PrepareData, _target: &TargetAccess) -> Result<()> {
        Ok(())
    }
    /// Loss on a batch; `ctx` says which step it is and carries the step's random generator
    /// (training-only behaviour such as noise runs when `ctx.train`).
    fn loss(&self, f: &Features, ctx: &StepContext) -> Result<LossOutput>;
    /// Called with the metrics of each training log interval (names as logged, e.g.
    /// `train/gate/mlp_0_prob`, with their interval means): warnings for the person running
    /// the job (e.g. a collapsing gate). Default: none.
    fn watch(&mut self, _interval: &[(String, f64)]) -> Vec<String> {
        Vec::new()
    }
    /// Whether `key=value` is a decoding option of this drafter (`forge eval --draft-option`,
    /// `--ablate`), e.g. the knowledge drafter's `knowledge=off`. Default: no options.
    fn check_option(&self, key: &str, _value: &str) -> Result<()> {
        Err(ModelError::Invalid(format!(
            "{} drafters have no option {key}",
            self.spec().kind()
        )))
    }
    /// Sets a decoding option that [`Drafter::check_option`] accepts. Default: no options.
    fn set_option(&mut self, key: &str, value: &str) -> Result<()> {
        self.check_option(key, value)
    }
    /// Lines describing the draft for `forge eval`'s header (e.g. what it was built from).
    /// Default: none.
    fn describe(&self) -> Vec<String> {
        Vec::new()
    }
    /// The group `forge eval` reports a prompt in besides its file and category, from its
    /// first user turn: the knowledge drafter's `in cache` / `not in cache` (whether the
    /// question is one of its knowledge cache's). Default: none (no groups).
    fn prompt_group(&self, _first_user_turn: &str) -> Option<&'static str> {
        None
    }
    /// Formats this drafter can be exported to (besides `forge`).
    /// Default: none (the forge format only).
    fn export_formats(&self) -> &'static [ExportFormat] {
        &[]
    }
    /// Called by an engine-format import after the folder's tensors were copied in by the
    /// export table's names, with every tensor of the folder: what the table does not name
    /// (EAGLE-3's vocabulary mapping, which an identity mapping leaves out) is installed here.
    /// Returns the names of the tensors it took (the import accepts them beside the table's).
    /// Default: nothing.
    fn imported(&self, _file: &BTreeMap<String, Tensor>) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// Which engine versions serve this drafter's export in `format`, and how (printed by
    /// `forge export`; the table in docs/export.md). Default: none.
    fn serving(&self, _format: ExportFormat) -> Option<&'static str> {
        None
    }
    /// What one draft forward reads when an engine serves this drafter, and the engines'
    /// names for it: the speedup model's input (`forge eval --predict`, `--sweep`).
    /// Default: none (no engine serves this kind).
    fn serving_shape(&self) -> Option<ServingShape> {
        None
    }
    /// Why no engine format can hold this drafter, for drafters with none (shown when one is
    /// asked for).
    fn engines_note(&self) -> Option<&'static str> {
        None
    }
    /// Tensors and configs for an engine format, named as the engine expects. Default (a
    /// drafter without engine formats): the refusal with [`Drafter::engines_note`].
    fn export(&self, format: ExportFormat, _target_config: &serde_json::Value) -> Result<ExportBundle> {
        Err(forge_format_only(self.spec().kind(), format, self.engines_note()))
    }
    /// A speculative-decoding session over one sequence with `target` (`forge eval`,
    /// `speculative.rs`). Drafts that run inside the target (SpAF) use it; others ignore it.
    fn session<'a>(&'a self, target: &'a TargetModel) -> Result<Box<dyn DraftSession + 'a>>;
    /// The work per token of this drafter's training step (its forward and backward; the
    /// target's own forward that produces the features is not counted, it is the benchmark's
    /// apart) on sequences of `seq_len` tokens, every position trained: the step's MACs
    /// divided by `seq_len` (so positions a head or step cannot train, near the end of the
    /// sequence, are left out, and attention grows with `seq_len`). `forge bench train`
    /// turns it into the step's useful FLOPs and utilisation.
    fn token_macs(&self, seq_len: i64) -> TokenMacs;
}

/// What an engine's draft forward reads ([`Drafter::serving_shape`]), for the speedup model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServingShape {
    /// Weights one draft forward reads: its own and the target's it shares (an lm_head), not
    /// the embedding tables it gathers rows from.
    pub params_per_forward: f64,
    /// Decoder layers with a KV cache (0: none).
    pub layers: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    /// Width of the attention queries (heads x head_dim).
    pub q_dim: i64,
    /// One draft forward proposes the whole chain (Medusa's heads), rather than one forward per
    /// drafted position (EAGLE).
    pub one_forward: bool,
    /// SGLang's `--speculative-algorithm` for it (None: SGLang does not serve it).
    pub sglang_algorithm: Option<&'static str>,
    /// vLLM's `method` in `--speculative-config`, with the versions that serve it.
    pub vllm_method: Option<(&'static str, &'static str)>,
}

/// Float weights of a VarStore (integer buffers such as EAGLE-3's vocabulary maps left out).
pub fn float_params(vs: &tch::nn::VarStore) -> f64 {
    vs.variables()
        .values()
        .filter(|t| t.is_floating_point())
        .map(|t| t.numel() as f64)
        .sum()
}

/// Checks exported names and shapes against an expectation computed independently from the
/// config (the engine's view), before anything is written.
pub fn check_names_and_shapes(what: &str, got: &[(String, Tensor)], expected: &[(String, Vec<i64>)]) -> Result<()> {
    let mut problems = Vec::new();
    for (name, shape) in expected {
        match got.iter().find(|(n, _)| n == name) {
            None => problems.push(format!("missing {name}")),
            Some((_, t)) if &t.size() != shape => {
                problems.push(format!("{name} has shape {:?}, expected {shape:?}", t.size()))
            }
            _ => {}
        }
    }
    for (name, _) in got {
        if !expected.iter().any(|(n, _)| n == name) {
            problems.push(format!("unexpected {name}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ModelError::Invalid(format!(
            "{what} export does not match what the engine loads: {}",
            problems.join("; ")
        )))
    }
}

/// The variables of `vs` named in `expected` (an export whose names are the VarStore's own),
/// detached, checked against the expected names and shapes.
pub fn export_same_names(
    vs: &nn::VarStore,
    expected: &[(String, Vec<i64>)],
    what: &str,
) -> Result<Vec<(String, Tensor)>> {
    let vars = vs.variables();
    let mut tensors = Vec::new();
    for (name, _) in expected {
        let t = vars
            .get(name)
            .ok_or_else(|| ModelError::Invalid(format!("{what}: no variable {name}")))?;
        tensors.push((name.clone(), t.detach()));
    }
    check_names_and_shapes(what, &tensors, expected)?;
    Ok(tensors)
}

/// Simulated chain acceptance from per-step hit grids over the same chain starts: `hits[k]`
/// and `valid[k]` are `[B, P]` booleans (step k's proposal from start p is the target's
/// arg-max / label, and is a trained position). A start counts where every step is valid;
/// `chain/k` is the share of counted starts whose steps 0..=k all hit: the chance that a
/// greedy chain of k + 1 proposals is accepted in full, i.e. the product of the first k + 1
/// conditional (position-wise) acceptance rates. The trainer's `eval/sim_tau` is
/// `1 + sum_k chain/k`, the expected tokens per verification of a chain of that length.
pub fn chain_metrics(hits: &[Tensor], valid: &[Tensor]) -> Vec<Metric> {
    let mut all_valid: Option<Tensor> = None;
    for v in valid {
        all_valid = Some(match all_valid {
            Some(a) => a.logical_and(v),
            None => v.shallow_clone(),
        });
    }
    let count = all_valid.as_ref().map_or(0.0, |a| a.sum(Kind::Float).double_value(&[]));
    let mut run: Option<Tensor> = all_valid;
    hits.iter()
        .enumerate()
        .map(|(k, h)| {
            let r = run.as_ref().map(|r| r.logical_and(h));
            let sum = r.as_ref().map_or(0.0, |r| r.sum(Kind::Float).double_value(&[]));
            run = r;
            Metric {
                name: format!("chain/{k}"),
                sum,
                count,
            }
        })
        .collect()
}

/// `1 + sum_k value(chain/k)` from metric rows named `<prefix>chain/<k>`, if there are any.
pub fn sim_tau(rows: &BTreeMap<String, f64>, prefix: &str) -> Option<f64> {
    let chain: Vec<f64> = rows
        .iter()
        .filter(|(k, _)| k.strip_prefix(prefix).is_some_and(|r| r.starts_with("chain/")))
        .map(|(_, v)| *v)
        .collect();
    (!chain.is_empty()).then(|| 1.0 + chain.iter().sum::<f64>())
}

/// Mean cross-entropy and top-1 / top-k hits of `logits` `[N, V]` against `labels` `[N]`.
pub fn ce_and_hits(logits: &Tensor, labels: &Tensor, k: i64) -> (Tensor, f64, f64) {
    let ce = logits.to_kind(Kind::Float).cross_entropy_for_logits(labels);
    let (top1, topk) = tch::no_grad(|| {
        let top1 = logits
            .argmax(-1, false)
            .eq_tensor(labels)
            .sum(Kind::Float)
            .double_value(&[]);
        let k = k.min(logits.size()[1]).max(1);
        let (_, idx) = logits.topk(k, -1, true, false);
        let topk = idx
            .eq_tensor(&labels.unsqueeze(-1))
            .any_dim(-1, false)
            .sum(Kind::Float)
            .double_value(&[]);
        (top1, topk)
    });
    (ce, top1, topk)
}

/// What the drafters' `token_macs` tests share: tiny target tensors to build drafters from,
/// the MACs of a VarStore's trainable matrices, and an exact comparison.
#[cfg(test)]
pub(crate) mod macs_tests {
    use super::{TargetAccess, TokenMacs, EMBED, LM_HEAD};
    use std::collections::BTreeMap;
    use tch::{nn, Device, Kind, Tensor};

    /// A target's embedding and lm_head `[v, h]` (zeros: only their shapes matter here).
    pub fn heads(v: i64, h: i64) -> TargetAccess<'static> {
        let m: BTreeMap<String, Tensor> = [EMBED, LM_HEAD]
            .iter()
            .map(|n| (n.to_string(), Tensor::zeros([v, h], (Kind::Float, Device::Cpu))))
            .collect();
        TargetAccess::Tensors(m)
    }

    /// Sum over the trainable matrices (2-D variables) of `vs` of their elements times
    /// `applications(name)`, the rows each is applied to per token (`None`: a matrix the
    /// test did not expect, which fails it). Vectors (norms, biases) and buffers do not count.
    pub fn matrix_macs(vs: &nn::VarStore, applications: impl Fn(&str) -> Option<f64>) -> f64 {
        let mut total = 0.0;
        for (name, v) in vs.variables() {
            if v.requires_grad() && v.dim() == 2 {
                let n = applications(&name).unwrap_or_else(|| panic!("unexpected trainable matrix {name}"));
                total += v.numel() as f64 * n;
            }
        }
        total
    }

    /// `got` equals `want` in each kind (to f64 rounding of the divisions by T).
    pub fn assert_macs(got: TokenMacs, want: TokenMacs, what: &str) {
        for (name, g, w) in [
            ("grad_both", got.grad_both, want.grad_both),
            ("grad_one", got.grad_one, want.grad_one),
            ("no_grad", got.no_grad, want.no_grad),
        ] {
            assert!(
                (g - w).abs() <= 1e-9 * w.abs().max(1.0),
                "{what}: {name} is {g}, expected {w} (got {got:?})"
            );
        }
    }

    /// A draft layer of hidden 64, 4 heads / 2 KV heads of 16, MLP 128: q 4096 + k 2048 +
    /// v 2048 + o 4096 + MLP 3 x 8192 = 36864 MACs a row over a 64-wide input.
    pub fn tiny_layer() -> super::eagle::DraftLayerSpec {
        super::eagle::DraftLayerSpec {
            hidden_size: 64,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            intermediate_size: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: crate::layers::RopeScaling::None,
        }
    }

    pub fn macs(grad_both: f64, grad_one: f64, no_grad: f64) -> TokenMacs {
        TokenMacs {
            grad_both,
            grad_one,
            no_grad,
        }
    }
}
