//! SpAF, speculative adapter fusion (method: docs/methods/spaf.md): the draft is the frozen
//! target's own shallow layers plus small trained parts, no separate draft model.
//!
//! - Adapters: after every target layer l from the cutoff k on, a bottleneck
//!   `A_l(x) = x + up(SiLU(down(x)))` (width `adapter_dim`, `up` zero-initialised so that
//!   every exit starts as the target's plain early exit). They sit inside the draft's stream:
//!   `s_k = A_k(layer_k(h_{k-1}))`, `s_l = A_l(layer_l(s_{l-1}))` for l > k, where `h_{k-1}` is
//!   the target's own output of layer k-1. Exit l predicts the next token as
//!   `lm_head(norm(s_l))` with the target's final norm and lm_head. The target's weights are
//!   never trained, changed or saved with the drafter.
//! - Alignment head: an MLP from a token's embedding to a pseudo `h_{k-1}` of that token
//!   (imitating layer k-1's output), so that drafting can skip layers < k.
//! - Loss: `adapter_weight * sum_l w_l CE_l` (or KL(target || exit l) over the vocabulary)
//!   `+ alignment_weight * (MSE | 1 - cosine)` between the pseudo and the real `h_{k-1}`.
//!   The frozen layers k+1..l run with gradients, so exit l's loss reaches the adapters
//!   A_k..A_l through them: the activations of the layers from k+1 to the deepest weighted
//!   exit are kept for the backward pass (docs/methods/spaf.md gives the memory).
//! - Decoding ([`SpafSession`]): self-speculative. The draft exits at `exit_layer` (default
//!   k). The first `serial_parallel_transition` draft inputs run the target's layers 0..k
//!   with the target's own KV cache, which verification then reuses; later ones take the
//!   alignment head's pseudo `h_{k-1}` and skip layers < k. Verification runs layers 0..k only
//!   for the inputs drafting did not, and layers k+1.. for all: the outputs equal a full
//!   forward (greedy output equals plain greedy output).
//!
//! Weight names (VarStore = forge checkpoint): `adapters.{l}.down.weight|bias` `[r, H]|[r]`,
//! `adapters.{l}.up.weight|bias` `[H, r]|[H]` (l = the target layer), `align.{i}.weight|bias`,
//! and the buffer `target_probe` `[128]`: 64 values spread over the target's embedding and 64
//! over layer k's q_proj, checked against the target a draft is used with.
//!
//! One file over ~500 lines: one drafter kind is one file (the registry's rule).

use super::{
    ce_and_hits, Drafter, DrafterKind, DrafterSpec, FeatureNeeds, Features, LossOutput, Metric, ResolveTarget,
    StepContext, TargetAccess, TargetNeeds, TokenMacs, EMBED,
};
use forge_schema::Ctx;
use crate::error::{ModelError, Result};
use crate::generate::{RowRng, Sampling};
use crate::layers::{linear, Keys, LayerKv, Linear, ParamInit};
use crate::speculative::{pick, DraftSession, Proposal, SharedTarget, StepFeatures};
use crate::llm::{Capture, KvCache, LogitsMode, TargetModel, TargetOutput};
use tch::{nn, Device, Kind, Tensor};

/// What the alignment head's output is compared with the real `h_{k-1}` by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlignmentLoss {
    /// Mean over positions of the mean squared difference over the hidden dimension.
    Mse,
    /// Mean over positions of 1 - cosine similarity.
    Cosine,
}

/// What each exit is trained against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterLoss {
    /// Cross-entropy against the data's next token.
    Ce,
    /// KL(target || exit) against the target's own next-token distribution.
    Kl,
}

/// The shape of the target's decoder layers: what the frozen layers a training step runs
/// cost ([`Drafter::token_macs`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpafTargetLayer {
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub intermediate_size: i64,
    #[serde(default)]
    pub sliding_window: Option<i64>,
}

impl SpafTargetLayer {
    pub fn of(cfg: &crate::llm::TargetConfig) -> Self {
        Self {
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            intermediate_size: cfg.intermediate_size,
            sliding_window: cfg.sliding_window,
        }
    }
}

/// SpAF's hyper-parameters plus the target dimensions it is built for.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SpafSpec {
    /// k: the first layer with an adapter (1 <= k < num_layers).
    pub cutoff_layer: i64,
    /// The adapters' bottleneck width.
    pub adapter_dim: i64,
    /// Linear layers of the alignment head (SiLU between them).
    pub alignment_num_layers: i64,
    /// Width of the alignment head's hidden layers.
    pub alignment_hidden_size: i64,
    pub alignment_loss: AlignmentLoss,
    pub adapter_loss: AdapterLoss,
    pub adapter_weight: f64,
    pub alignment_weight: f64,
    /// w_l for the exits k..num_layers-1 (0 = that exit is not trained).
    pub layer_weights: Vec<f64>,
    /// The exit the draft decodes with (k..num_layers-1).
    pub exit_layer: i64,
    /// The draft length `forge eval` uses by default.
    pub num_draft_tokens: i64,
    /// Draft inputs that run the target's layers 0..k before the alignment head takes over.
    pub serial_parallel_transition: i64,
    pub hidden_size: i64,
    pub num_layers: i64,
    pub vocab_size: i64,
    /// The target's layer shape; `None` in specs written before it was recorded (their
    /// [`Drafter::token_macs`] leaves the frozen target layers out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_layer: Option<SpafTargetLayer>,
}

/// Field by field, except that a spec written before the target's layer shape was recorded
/// (`target_layer: None`) equals the same spec with it: the shape is the target's, which
/// the other fields and the probe already tie the draft to, so a checkpoint from before it
/// still resumes under the recipe it was trained with.
impl PartialEq for SpafSpec {
    fn eq(&self, o: &Self) -> bool {
        let SpafSpec {
            cutoff_layer,
            adapter_dim,
            alignment_num_layers,
            alignment_hidden_size,
            alignment_loss,
            adapter_loss,
            adapter_weight,
            alignment_weight,
            layer_weights,
            exit_layer,
            num_draft_tokens,
            serial_parallel_transition,
            hidden_size,
            num_layers,
            vocab_size,
            target_layer,
        } = self;
        *cutoff_layer == o.cutoff_layer
            && *adapter_dim == o.adapter_dim
            && *alignment_num_layers == o.alignment_num_layers
            && *alignment_hidden_size == o.alignment_hidden_size
            && *alignment_loss == o.alignment_loss
            && *adapter_loss == o.adapter_loss
            && *adapter_weight == o.adapter_weight
            && *alignment_weight == o.alignment_weight
            && *layer_weights == o.layer_weights
            && *exit_layer == o.exit_layer
            && *num_draft_tokens == o.num_draft_tokens
            && *serial_parallel_transition == o.serial_parallel_transition
            && *hidden_size == o.hidden_size
            && *num_layers == o.num_layers
            && *vocab_size == o.vocab_size
            && match (target_layer, &o.target_layer) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl SpafSpec {
    pub fn validate(&self) -> Result<()> {
        let mut p = Vec::new();
        let (k, l) = (self.cutoff_layer, self.num_layers);
        if k < 1 || k >= l {
            p.push(format!(
                "cutoff_layer {k} must be in 1..{} (the target has {l} layers; layer k-1 feeds the alignment target)",
                l - 1
            ));
        }
        if self.adapter_dim < 1 || self.alignment_hidden_size < 1 || self.alignment_num_layers < 1 {
            p.push("adapter and alignment widths and alignment_num_layers must be at least 1".into());
        }
        if k >= 1 && k < l {
            if self.layer_weights.len() as i64 != l - k {
                p.push(format!(
                    "layer_weights has {} entries for {} exits (layers {k}..{})",
                    self.layer_weights.len(),
                    l - k,
                    l - 1
                ));
            } else if self.layer_weights.iter().any(|w| !w.is_finite() || *w < 0.0)
                || self.layer_weights.iter().all(|w| *w == 0.0)
            {
                p.push("the exits' weights (layer_weights or train_exits) must be >= 0 with at least one > 0".into());
            }
        }
        if self.exit_layer < k || self.exit_layer >= l {
            p.push(format!("exit_layer {} must be in {k}..{}", self.exit_layer, l - 1));
        }
        if self.num_draft_tokens < 1 || self.serial_parallel_transition < 0 {
            p.push("num_draft_tokens must be >= 1 and serial_parallel_transition >= 0".into());
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Invalid(format!("spaf: {}", p.join("; "))))
        }
    }

    /// The target tensors the probe samples.
    fn probe_names(&self) -> Vec<String> {
        vec![
            EMBED.into(),
            format!("model.layers.{}.self_attn.q_proj.weight", self.cutoff_layer),
        ]
    }

    /// A fresh drafter records the probe of the target it is built for; a loaded one has it
    /// in its weights and checks it against the live target.
    pub fn target_needs(&self, fresh: bool) -> TargetNeeds {
        if fresh {
            TargetNeeds::Tensors(self.probe_names())
        } else {
            TargetNeeds::Nothing
        }
    }
}

/// Values of the target at fixed positions spread evenly over each probed tensor: 64 of each.
const PROBES: i64 = 64;

fn probe(tensors: &[Tensor]) -> Tensor {
    let parts: Vec<Tensor> = tensors
        .iter()
        .map(|t| {
            let flat = t.detach().reshape([-1]);
            let n = flat.size()[0].max(1);
            let idx: Vec<i64> = (0..PROBES)
                .map(|i| (i * n / PROBES + (i * 7919) % (n / PROBES).max(1)).min(n - 1))
                .collect();
            // picked where the tensor lives; only the picked values travel and widen
            let picked = flat.index_select(0, &Tensor::from_slice(&idx).to_device(flat.device()));
            picked.to_device(Device::Cpu).to_kind(Kind::Float)
        })
        .collect();
    Tensor::cat(&parts, 0)
}

struct Adapter {
    down: Linear,
    up: Linear,
}

impl Adapter {
    /// `x + up(SiLU(down(x)))`, in `x`'s kind.
    fn forward(&self, x: &Tensor) -> Tensor {
        x + self.up.forward(&self.down.forward(x).silu()).to_kind(x.kind())
    }
}

forge_schema::choice! {
    /// Alignment loss of the SpAF alignment head.
    pub enum AlignLoss { Mse = "mse", Cosine = "cosine" }
}

forge_schema::choice! {
    /// What each SpAF exit is trained against.
    pub enum AdapterLossSetting { Ce = "ce", Kl = "kl" }
}

/// `drafter.train_exits`: `all` (every exit k..L-1, weighted equally) or a list of exit layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrainExits {
    All,
    Layers(Vec<i64>),
}

impl serde::Serialize for TrainExits {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            TrainExits::All => s.serialize_str("all"),
            TrainExits::Layers(l) => l.serialize(s),
        }
    }
}

impl forge_schema::FromNode for TrainExits {
    const EXPECTED: &'static str = "all or a list of exit layers";
    fn from_node(node: &forge_schema::yaml::Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        if let forge_schema::yaml::NodeKind::Scalar { text, .. } = &node.kind {
            if text == "all" {
                return Some(TrainExits::All);
            }
            if text.parse::<i64>().is_err() {
                cx.issue(
                    path,
                    &node.loc,
                    format!("expected all or a list of exit layers (e.g. [16]), got '{text}'"),
                );
                return None;
            }
        }
        <Vec<i64> as forge_schema::FromNode>::from_node(node, path, cx).map(TrainExits::Layers)
    }
}

forge_schema::section! {
    /// SpAF: adapters inside the frozen target, an alignment head, self-speculative decoding (docs/methods/spaf.md).
    pub struct SpafSection {
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
        /// Loss weight of each exit k..L-1, one per layer (default: as train_exits says). Exclusive with train_exits.
        layer_weights: Option<Vec<f64>> = None,
        /// The exits in the loss, weighted equally: a list of target layers in k..L-1, or all (every exit, 1 / (L - k) each, the default of runs before this one was). Default: the drafting exit (exit_layer) alone. The other exits are not in the loss (adapters below a trained exit still learn through it). Exclusive with layer_weights.
        train_exits: Option<TrainExits> = None,
        /// The exit drafting decodes with (default: cutoff_layer, the cheapest).
        exit_layer: Option<i64> = None,
        /// Draft length recorded with the draft, as the source system decodes (give it to forge eval as --gamma).
        num_draft_tokens: i64 = 5,
        /// Draft inputs per round that run the target's layers 0..k (their keys and values are reused by verification) before the alignment head takes over.
        serial_parallel_transition: i64 = 2,
    }
}

impl DrafterKind for Spaf {
    const DOCS: &'static str = "docs/methods/spaf.md";
    const ONLINE_ONLY: Option<&'static str> = Some("trains inside the live target (gradients flow through its layers)");
    type Section = SpafSection;
    type Spec = SpafSpec;

    fn validate(s: &SpafSection, cx: &mut Ctx) {
        cx.positive_if_set("drafter.cutoff_layer", s.cutoff_layer);
        cx.positive_if_set("drafter.exit_layer", s.exit_layer);
        cx.fraction("drafter.adapter_dim_ratio", s.adapter_dim_ratio);
        cx.positive("drafter.alignment_num_layers", s.alignment_num_layers);
        if !(s.alignment_hidden_dim_ratio.is_finite() && s.alignment_hidden_dim_ratio > 0.0) {
            cx.issue_at("drafter.alignment_hidden_dim_ratio", "must be > 0");
        }
        cx.non_negative("drafter.adapter_weight", s.adapter_weight);
        cx.non_negative("drafter.alignment_weight", s.alignment_weight);
        if let Some(w) = &s.layer_weights {
            if w.iter().any(|v| !v.is_finite() || *v < 0.0) || w.iter().all(|v| *v == 0.0) {
                cx.issue_at(
                    "drafter.layer_weights",
                    "must be >= 0, one per layer from cutoff_layer to the last, with at least one > 0",
                );
            }
        }
        cx.positive("drafter.num_draft_tokens", s.num_draft_tokens);
        if s.serial_parallel_transition < 0 {
            cx.issue_at("drafter.serial_parallel_transition", "must be >= 0");
        }
    }

    fn resolve(x: &SpafSection, target: ResolveTarget) -> Result<SpafSpec> {
        let cfg = target.config;
        let bad = |msg: String| ModelError::Invalid(msg);
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
                (Some(_), Some(_)) => return Err(bad("drafter: set layer_weights or train_exits, not both".into())),
                (Some(w), None) => w.clone(),
                (None, Some(TrainExits::All)) => vec![1.0 / exits.max(1) as f64; exits],
                (None, Some(TrainExits::Layers(list))) => {
                    if list.is_empty() {
                        return Err(bad("drafter.train_exits: list at least one exit layer".into()));
                    }
                    if let Some(bad_exit) = list.iter().find(|&&e| e < k || e >= l) {
                        return Err(bad(format!(
                            "drafter.train_exits: layer {bad_exit} has no exit (exits are layers {k}..{})",
                            l - 1
                        )));
                    }
                    let n = list.iter().collect::<std::collections::BTreeSet<_>>().len().max(1) as f64;
                    (k..l).map(|e| if list.contains(&e) { 1.0 / n } else { 0.0 }).collect()
                }
                // the exit that drafts, alone: every other exit's loss would only dilute it
                (None, None) => {
                    let e = x.exit_layer.unwrap_or(k);
                    (k..l).map(|l| if l == e { 1.0 } else { 0.0 }).collect()
                }
            },
            exit_layer: x.exit_layer.unwrap_or(k),
            num_draft_tokens: x.num_draft_tokens,
            serial_parallel_transition: x.serial_parallel_transition,
            hidden_size: h,
            num_layers: l,
            vocab_size: cfg.vocab_size,
            target_layer: Some(SpafTargetLayer::of(cfg)),
        };
        spec.validate().map_err(|e| bad(format!("drafter: {e}")))?;
        Ok(spec)
    }

    fn build(spec: &SpafSpec, target: &TargetAccess, device: Device, compute: Kind) -> Result<Box<dyn Drafter>> {
        Ok(Box::new(Spaf::new(spec.clone(), target, device, compute)?))
    }

    fn target_needs(spec: &SpafSpec, fresh: bool) -> TargetNeeds {
        spec.target_needs(fresh)
    }

    /// The output of layer k-1 starts the draft's stream and is the alignment target; the
    /// last hidden state gives the target's distribution (KL).
    fn feature_needs(s: &SpafSpec) -> FeatureNeeds {
        FeatureNeeds {
            last_hidden: true,
            aux_layers: vec![s.cutoff_layer - 1],
            target_topk: 0,
        }
    }

    fn warnings(s: &SpafSpec) -> Vec<String> {
        let deepest = s
            .layer_weights
            .iter()
            .rposition(|w| *w > 0.0)
            .map(|i| s.cutoff_layer + i as i64);
        if deepest.is_none_or(|d| d < s.exit_layer) {
            vec![format!(
                "drafter.exit_layer {} is below no trained exit (the deepest is {deepest:?}): decoding would use adapters this run does not train; add it to train_exits",
                s.exit_layer
            )]
        } else {
            Vec::new()
        }
    }

    fn choices() -> Vec<(&'static str, &'static [&'static str])> {
        vec![
            ("`drafter.alignment_loss_type` (spaf)", AlignLoss::NAMES),
            ("`drafter.adapter_loss` (spaf)", AdapterLossSetting::NAMES),
        ]
    }
}

pub struct Spaf {
    spec: DrafterSpec,
    s: SpafSpec,
    vs: nn::VarStore,
    /// A_k..A_{L-1}.
    adapters: Vec<Adapter>,
    align: Vec<Linear>,
    /// `[128]` fp32, not trained (see the module comment).
    target_probe: Tensor,
}

impl Spaf {
    pub fn new(s: SpafSpec, target: &TargetAccess, device: Device, compute: Kind) -> Result<Self> {
        s.validate()?;
        let (h, r, a) = (s.hidden_size, s.adapter_dim, s.alignment_hidden_size);
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let init = ParamInit::Default;
        let adapters = (s.cutoff_layer..s.num_layers)
            .map(|l| {
                let p = &root / "adapters" / l;
                Adapter {
                    down: linear(&p / "down", h, r, true, init, compute),
                    // zero: every exit starts as the target's early exit at its layer
                    up: linear(&p / "up", r, h, true, ParamInit::Zeros, compute),
                }
            })
            .collect();
        let n = s.alignment_num_layers;
        let align = (0..n)
            .map(|i| {
                let (din, dout) = (if i == 0 { h } else { a }, if i == n - 1 { h } else { a });
                linear(&root / "align" / i, din, dout, true, init, compute)
            })
            .collect();
        let mut target_probe = root.add(
            "target_probe",
            Tensor::zeros([2 * PROBES], (Kind::Float, device)),
            false,
        );
        // a fresh drafter is given the probed tensors and records them
        let named: Vec<Tensor> = s.probe_names().iter().filter_map(|n| target.tensor(n)).collect();
        if named.len() == 2 {
            tch::no_grad(|| target_probe.copy_(&probe(&named).to_device(device)));
        }
        Ok(Self {
            spec: DrafterSpec::Spaf(s.clone()),
            s,
            vs,
            adapters,
            align,
            target_probe,
        })
    }

    /// Refuses a target whose probed values differ from the ones recorded (relative L2
    /// difference above 1%: more than bf16 rounding of the same weights, about 0.2%). It
    /// tells another model apart; a close fine-tune of the same base may pass.
    pub fn check_target(&self, target: &TargetModel) -> Result<()> {
        let c = &target.config;
        if c.hidden_size != self.s.hidden_size || c.num_layers != self.s.num_layers || c.vocab_size != self.s.vocab_size
        {
            return Err(ModelError::Invalid(format!(
                "this SpAF draft was trained inside a target with hidden {}, {} layers, vocabulary {}; this target has hidden {}, {} layers, vocabulary {}: SpAF adapters only work inside the target they were trained in",
                self.s.hidden_size, self.s.num_layers, self.s.vocab_size, c.hidden_size, c.num_layers, c.vocab_size
            )));
        }
        let names = self.s.probe_names();
        let access = TargetAccess::Model(target);
        let got: Vec<Tensor> = names
            .iter()
            .map(|n| access.tensor(n))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ModelError::Invalid(format!("spaf: the target has no {names:?}")))?;
        let now = probe(&got);
        let want = self.target_probe.to_device(Device::Cpu);
        let norm = want.norm().double_value(&[]);
        let diff = (&now - &want).norm().double_value(&[]);
        if norm == 0.0 || diff > 0.01 * norm {
            return Err(ModelError::Invalid(format!(
                "this SpAF draft was trained inside another target: the target's weights differ from the ones recorded at training (relative difference {:.3} of 64 values of each of {} and {}); SpAF adapters only work inside the target they were trained in",
                if norm > 0.0 { diff / norm } else { f64::INFINITY },
                names[0],
                names[1]
            )));
        }
        Ok(())
    }

    /// The alignment head: pseudo `h_{k-1}` `[.., H]` (compute kind) of token embeddings.
    pub fn align(&self, embedded: &Tensor) -> Tensor {
        let mut x = embedded.shallow_clone();
        for (i, l) in self.align.iter().enumerate() {
            x = l.forward(&x);
            if i + 1 < self.align.len() {
                x = x.silu();
            }
        }
        x
    }

    fn adapter(&self, layer: i64) -> &Adapter {
        &self.adapters[(layer - self.s.cutoff_layer) as usize]
    }

    /// Exit logits `[.., V]` fp32 of adapted states.
    fn exit_logits(target: &TargetModel, s: &Tensor) -> Tensor {
        target.logits(&target.final_norm(s)).to_kind(Kind::Float)
    }
}

fn need_target<'a>(ctx: &StepContext<'a>) -> Result<&'a TargetModel> {
    ctx.target.ok_or_else(|| {
        ModelError::Invalid("spaf trains inside the live target: set data.mode: online (offline hidden-state shards cannot run the target's layers)".into())
    })
}

impl Drafter for Spaf {
    fn spec(&self) -> &DrafterSpec {
        &self.spec
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    fn loss(&self, f: &Features, ctx: &StepContext) -> Result<LossOutput> {
        let target = need_target(ctx)?;
        self.check_target(target)?;
        let s = &self.s;
        let k = s.cutoff_layer;
        let h_prev = f
            .aux_hidden
            .as_ref()
            .ok_or_else(|| {
                ModelError::Invalid("spaf needs the target's output of layer cutoff_layer - 1 (aux features)".into())
            })?
            .detach();
        let (b, t) = (f.input_ids.size()[0], f.input_ids.size()[1]);
        let device = h_prev.device();
        let mut total = Tensor::zeros([], (Kind::Float, device));
        let (mut parts, mut metrics) = (Vec::new(), Vec::new());

        // the trained positions: position p predicts token p+1 where that token is trained
        let n = t - 1;
        let mask = f.loss_mask.narrow(1, 1, n).ne(0).reshape([-1]);
        let idx = mask.nonzero().squeeze_dim(-1);
        let count = idx.size()[0];
        let labels = f.input_ids.narrow(1, 1, n).reshape([-1]).index_select(0, &idx);
        let target_logp = match (s.adapter_loss, count > 0) {
            (AdapterLoss::Kl, true) => {
                let hn = f
                    .hidden_normed()?
                    .narrow(1, 0, n)
                    .reshape([b * n, -1])
                    .index_select(0, &idx);
                Some(tch::no_grad(|| {
                    target.logits(&hn).to_kind(Kind::Float).log_softmax(-1, Kind::Float)
                }))
            }
            _ => None,
        };
        // the draft's stream through the frozen layers, with gradients, to the deepest exit
        // that is trained
        let last = k + s.layer_weights.iter().rposition(|w| *w > 0.0).unwrap_or(0) as i64;
        if count > 0 {
            let inputs = target.layer_inputs(b, t, 0, Some(&f.position_ids), None)?;
            let mut x = h_prev.to_kind(target.kind());
            for l in k..=last {
                x = target.run_layers(x, l as usize..l as usize + 1, &inputs, None, None)?;
                x = self.adapter(l).forward(&x);
                let w = s.layer_weights[(l - k) as usize];
                let sel = x.narrow(1, 0, n).reshape([b * n, -1]).index_select(0, &idx);
                let logits = Self::exit_logits(target, &sel);
                let (ce, top1, _) = ce_and_hits(&logits, &labels, 1);
                let c = count as f64;
                let name = format!("layer{l}");
                let term = match &target_logp {
                    Some(tl) => {
                        let q = logits.log_softmax(-1, Kind::Float);
                        let kl = (tl.exp() * (tl - &q))
                            .sum_dim_intlist(-1, false, Kind::Float)
                            .mean(Kind::Float);
                        parts.push(Metric {
                            name: format!("kl/{name}"),
                            sum: kl.double_value(&[]) * c * w * s.adapter_weight,
                            count: c,
                        });
                        metrics.push(Metric {
                            name: format!("ce/{name}"),
                            sum: ce.double_value(&[]) * c,
                            count: c,
                        });
                        kl
                    }
                    None => {
                        parts.push(Metric {
                            name: format!("ce/{name}"),
                            sum: ce.double_value(&[]) * c * w * s.adapter_weight,
                            count: c,
                        });
                        ce
                    }
                };
                metrics.push(Metric {
                    name: format!("acc/{name}"),
                    sum: top1,
                    count: c,
                });
                if w > 0.0 {
                    total += term * (w * s.adapter_weight);
                }
            }
        }

        // the alignment head against the real h_{k-1}, at every real position
        let valid = f.attention_mask.reshape([-1]).ne(0).nonzero().squeeze_dim(-1);
        let nv = valid.size()[0];
        if nv > 0 {
            let emb = target
                .embed(&f.input_ids)
                .detach()
                .reshape([b * t, -1])
                .index_select(0, &valid);
            let pseudo = self.align(&emb).to_kind(Kind::Float);
            let real = h_prev.reshape([b * t, -1]).index_select(0, &valid).to_kind(Kind::Float);
            let mse = (&pseudo - &real)
                .square()
                .mean_dim(-1, false, Kind::Float)
                .mean(Kind::Float);
            let cos = Tensor::cosine_similarity(&pseudo, &real, -1, 1e-8).mean(Kind::Float);
            let term = match s.alignment_loss {
                AlignmentLoss::Mse => mse.shallow_clone(),
                AlignmentLoss::Cosine => cos.neg() + 1.0,
            };
            let c = nv as f64;
            parts.push(Metric {
                name: "align".into(),
                sum: term.double_value(&[]) * c * s.alignment_weight,
                count: c,
            });
            metrics.push(Metric {
                name: "align/mse".into(),
                sum: mse.double_value(&[]) * c,
                count: c,
            });
            metrics.push(Metric {
                name: "align/cos".into(),
                sum: cos.double_value(&[]) * c,
                count: c,
            });
            total += term * s.alignment_weight;
        }
        Ok(LossOutput {
            loss: total,
            parts,
            metrics,
        })
    }

    /// What the step runs besides the target's own forward (which gave `h_{k-1}` and the last
    /// hidden state): with `adapter_loss: kl`, the target's lm_head over the T-1 trained
    /// positions' last hidden states under no_grad; target layer k again from `h_{k-1}`
    /// (nothing in it needs a gradient: no backward), then A_k (down over an input without
    /// gradient, up over one with), then for each layer l from k+1 to the deepest trained
    /// exit the frozen target layer l over the adapted stream (its matrices with a frozen
    /// weight over an input that needs a gradient; attention's products with both operands
    /// needing one) and A_l; every exit from k to the deepest trained one reads out its T-1
    /// positions through the frozen final norm and lm_head (a gradient flows back only from
    /// the exits with a weight > 0; an exit weighted 0 is forward work only); the alignment
    /// head over all T positions (its first layer reads the target's embedding, which needs
    /// no gradient). The target layers' attention counts the causal kernel's visible pairs
    /// (what `forge bench train` counts for the target's forward).
    fn token_macs(&self, seq_len: i64) -> TokenMacs {
        if seq_len < 1 {
            return TokenMacs::default();
        }
        let s = &self.s;
        let t = seq_len as f64;
        let (h, v, r) = (s.hidden_size as f64, s.vocab_size as f64, s.adapter_dim as f64);
        let rows = (t - 1.0) / t;
        // one frozen target layer per position: (matrices, attention's products)
        let (layer, attention) = match &s.target_layer {
            Some(c) => (
                super::decoder_layer_macs(
                    s.hidden_size,
                    s.hidden_size,
                    c.num_heads,
                    c.num_kv_heads,
                    c.head_dim,
                    c.intermediate_size,
                ),
                super::attention_macs(c.num_heads, c.head_dim, super::causal_keys(seq_len, c.sliding_window)),
            ),
            None => (0.0, 0.0),
        };
        let mut macs = match s.adapter_loss {
            AdapterLoss::Kl => TokenMacs::none(v * h * rows),
            AdapterLoss::Ce => TokenMacs::default(),
        };
        let deepest = s.layer_weights.iter().rposition(|w| *w > 0.0).unwrap_or(0);
        for (i, w) in s.layer_weights.iter().take(deepest + 1).enumerate() {
            // target layer k + i and its adapter
            macs = macs
                + match i {
                    0 => TokenMacs::none(layer + attention) + TokenMacs::one(h * r) + TokenMacs::both(r * h),
                    _ => TokenMacs::one(layer) + TokenMacs::both(attention + 2.0 * h * r),
                };
            // its exit
            let exit = v * h * rows;
            macs = macs
                + if *w > 0.0 {
                    TokenMacs::one(exit)
                } else {
                    TokenMacs::none(exit)
                };
        }
        // the alignment head: h -> a -> .. -> a -> h, its first layer over the embedding
        let a = s.alignment_hidden_size as f64;
        let n = s.alignment_num_layers;
        for i in 0..n {
            let (din, dout) = (if i == 0 { h } else { a }, if i == n - 1 { h } else { a });
            macs = macs
                + match i {
                    0 => TokenMacs::one(din * dout),
                    _ => TokenMacs::both(din * dout),
                };
        }
        macs
    }

    fn engines_note(&self) -> Option<&'static str> {
        Some("SpAF drafts run inside the target itself (adapters after its layers, its KV cache shared with verification); no inference engine (vLLM, SGLang, TensorRT-LLM) has that draft mode. The forge format holds the adapters and the alignment head alone, with the probe of the target they belong to; forge eval decodes with them")
    }

    fn session<'a>(&'a self, target: &'a TargetModel) -> Result<Box<dyn DraftSession + 'a>> {
        self.check_target(target)?;
        Ok(Box::new(SpafSession {
            m: self,
            target,
            cache: target.new_cache(),
            draft_cache: KvCache::new(self.s.num_layers),
            committed: 0,
            last: None,
            serial: Vec::new(),
            verified_hk: None,
            counts: SharingCounts::default(),
        }))
    }
}

/// How a session's draft inputs were computed, reported by `forge eval` (`draft_counters`):
/// serial inputs ran the target's layers 0..k, whose keys and values verification reuses;
/// parallel ones took the alignment head's pseudo state.
#[derive(Default)]
struct SharingCounts {
    serial: u64,
    parallel: u64,
}

/// A draft input that ran the target's layers 0..k during drafting: its token, and its
/// outputs of layers k-1 and k (`[1, 1, H]`), which verification reuses.
struct SerialInput {
    token: i64,
    h_prev: Tensor,
    h_k: Tensor,
}

/// Self-speculative decoding with SpAF over one sequence.
///
/// The session owns the target's KV cache (`cache`, every layer) and runs the target's
/// forwards for the engine ([`SharedTarget`]). Per round, with k the cutoff and e the exit:
/// - the first `serial_parallel_transition` draft inputs (the last committed token, then
///   the proposals) run the target's layers 0..k, appending to `cache`: these keys and values
///   are the target's own (same weights, same inputs), so verification keeps them;
/// - later draft inputs take the alignment head's pseudo `h_{k-1}` and run layer k against a
///   fork of layer k's cache (scratch entries past its valid positions);
/// - every draft input then runs A_k and, for e > k, layers k+1..e with adapters on the
///   draft's own cache (`draft_cache`), which holds the adapted stream of every committed
///   position (filled at commit from the verified `h_k`);
/// - verification runs layers 0..k for the inputs drafting did not, then layers k+1..L-1 for
///   all, over `cache`; rejected positions are truncated away.
struct SpafSession<'a> {
    m: &'a Spaf,
    target: &'a TargetModel,
    cache: KvCache,
    draft_cache: KvCache,
    /// Positions final in every layer of `cache`.
    committed: i64,
    /// The token after the committed positions (the next draft input).
    last: Option<i64>,
    /// This round's serial draft inputs, from position `committed` on.
    serial: Vec<SerialInput>,
    /// `h_k` of the positions of the latest target forward, from its first position.
    verified_hk: Option<Tensor>,
    counts: SharingCounts,
}

impl SpafSession<'_> {
    fn k(&self) -> i64 {
        self.m.s.cutoff_layer
    }

    /// Layers 0..=k for `ids` at `pos..` over `cache`: (outputs of layer k-1, of layer k).
    fn shallow(&mut self, ids: &[i64], pos: i64) -> Result<(Tensor, Tensor)> {
        let t = self.target;
        let k = self.k() as usize;
        let x = t.embed(&Tensor::from_slice(ids).view([1, -1]).to_device(t.device()));
        let inputs = t.layer_inputs(1, ids.len() as i64, pos, None, None)?;
        let h_prev = t.run_layers(x, 0..k, &inputs, Some(&mut self.cache), None)?;
        let h_k = t.run_layers(h_prev.shallow_clone(), k..k + 1, &inputs, Some(&mut self.cache), None)?;
        Ok((h_prev, h_k))
    }

    /// The adapted stream from `h_k` `[1, n, H]` at positions `pos..` through the exit:
    /// A_k, then layers k+1..=e with adapters over `draft_cache`. Returns `s_e`.
    fn adapted(&mut self, h_k: &Tensor, pos: i64) -> Result<Tensor> {
        let (k, e) = (self.k(), self.m.s.exit_layer);
        let mut x = self.m.adapter(k).forward(h_k);
        if e > k {
            let t = self.target;
            let inputs = t.layer_inputs(1, h_k.size()[1], pos, None, None)?;
            for l in k + 1..=e {
                x = t.run_layers(
                    x,
                    l as usize..l as usize + 1,
                    &inputs,
                    Some(&mut self.draft_cache),
                    None,
                )?;
                x = self.m.adapter(l).forward(&x);
            }
        }
        Ok(x)
    }
}

impl DraftSession for SpafSession<'_> {
    fn commit(&mut self, start: i64, _features: &StepFeatures, next: &[i64]) -> Result<()> {
        if start + next.len() as i64 != self.committed {
            return Err(ModelError::Invalid(format!(
                "spaf: commit of {}..{} but the target's cache holds {} positions",
                start,
                start + next.len() as i64,
                self.committed
            )));
        }
        self.last = next.last().copied();
        if self.m.s.exit_layer > self.k() {
            // the adapted stream of the newly final positions, from their verified h_k
            let hk = self
                .verified_hk
                .as_ref()
                .ok_or_else(|| ModelError::Invalid("spaf: commit without a target forward".into()))?
                .narrow(1, 0, next.len() as i64);
            self.draft_cache.truncate(start);
            let _ = self.adapted(&hk, start)?;
        }
        Ok(())
    }

    fn propose(&mut self, gamma: usize, sampling: &Sampling, rng: &mut RowRng) -> Result<Proposal> {
        let mut token = self
            .last
            .ok_or_else(|| ModelError::Invalid("spaf: propose before commit".into()))?;
        let (k, transition) = (self.k(), self.m.s.serial_parallel_transition as usize);
        let t = self.target;
        self.serial.clear();
        // drafting appends past the committed positions only: start clean
        self.cache.truncate(self.committed);
        self.draft_cache.truncate(self.committed);
        let mut fork: Option<LayerKv> = None;
        let (mut tokens, mut logits) = (Vec::with_capacity(gamma), Vec::with_capacity(gamma));
        for i in 0..gamma {
            let pos = self.committed + i as i64;
            let h_k = if i < transition {
                self.counts.serial += 1;
                let (h_prev, h_k) = self.shallow(&[token], pos)?;
                self.serial.push(SerialInput {
                    token,
                    h_prev,
                    h_k: h_k.shallow_clone(),
                });
                h_k
            } else {
                self.counts.parallel += 1;
                // the alignment head's pseudo h_{k-1}, then layer k over a fork of its cache
                let layer_cache = fork.get_or_insert_with(|| self.cache.layers[k as usize].fork());
                let emb = t.embed(&Tensor::from_slice(&[token]).view([1, 1]).to_device(t.device()));
                let pseudo = self.m.align(&emb).to_kind(t.kind());
                let inputs = t.layer_inputs(1, 1, pos, None, None)?;
                t.layers()[k as usize].forward(
                    &pseudo,
                    &inputs.cos,
                    &inputs.sin,
                    &inputs.mask,
                    Keys::Cache(layer_cache),
                )
            };
            let s = self.adapted(&h_k, pos)?;
            let l = Spaf::exit_logits(t, &s).view([-1]);
            token = pick(&l, sampling, rng)?;
            tokens.push(token);
            logits.push(l);
        }
        Ok(Proposal {
            tokens,
            logits: Tensor::stack(&logits, 0),
        })
    }

    fn shared_target(&mut self) -> Option<&mut dyn SharedTarget> {
        Some(self)
    }

    fn counters(&self) -> Vec<(String, u64)> {
        let c = &self.counts;
        vec![("spaf/serial".into(), c.serial), ("spaf/parallel".into(), c.parallel)]
    }
}

impl SharedTarget for SpafSession<'_> {
    fn cached(&self) -> i64 {
        self.committed
    }

    fn forward(&mut self, ids: &[i64], capture: &Capture) -> Result<TargetOutput> {
        let t = self.target;
        let k = self.k();
        let n = ids.len() as i64;
        if capture.layers.iter().any(|&l| l != k - 1) {
            return Err(ModelError::Invalid(format!(
                "spaf: the shared target forward captures layer {} only",
                k - 1
            )));
        }
        // the draft inputs whose layers 0..k drafting ran (the same tokens, in order)
        let reuse = self
            .serial
            .iter()
            .zip(ids)
            .take_while(|(s, id)| s.token == **id)
            .count();
        self.serial.truncate(reuse);
        self.cache.truncate(self.committed + reuse as i64);
        let (mut prevs, mut hks): (Vec<Tensor>, Vec<Tensor>) = self.serial.drain(..).map(|s| (s.h_prev, s.h_k)).unzip();
        if (reuse as i64) < n {
            let (h_prev, h_k) = self.shallow(&ids[reuse..], self.committed + reuse as i64)?;
            prevs.push(h_prev);
            hks.push(h_k);
        }
        let h_prev = Tensor::cat(&prevs, 1);
        let h_k = Tensor::cat(&hks, 1);
        let inputs = t.layer_inputs(1, n, self.committed, None, None)?;
        let l = t.num_layers() as usize;
        let x = t.run_layers(
            h_k.shallow_clone(),
            k as usize + 1..l,
            &inputs,
            Some(&mut self.cache),
            None,
        )?;
        self.committed += n;
        self.verified_hk = Some(h_k);
        let hidden_normed = t.final_norm(&x);
        let logits = match capture.logits {
            LogitsMode::None => None,
            LogitsMode::All => Some(t.logits(&hidden_normed)),
            LogitsMode::Last => Some(t.logits(&hidden_normed.narrow(1, n - 1, 1))),
        };
        let layers = if capture.layers.is_empty() {
            Vec::new()
        } else {
            vec![h_prev]
        };
        Ok(TargetOutput {
            logits,
            hidden: x,
            hidden_normed,
            layers,
        })
    }

    fn truncate(&mut self, len: i64) {
        let kept = (len - (self.committed - self.verified_hk.as_ref().map_or(0, |h| h.size()[1]))).max(0);
        self.cache.truncate(len);
        self.committed = self.committed.min(len);
        if let Some(h) = self.verified_hk.take() {
            self.verified_hk = Some(h.narrow(1, 0, kept.min(h.size()[1])));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drafters::macs_tests::{assert_macs, macs, matrix_macs};

    /// A 4-layer target of hidden 64 (4 heads / 2 KV heads of 16, MLP 128, vocabulary 96),
    /// cutoff 1, adapters 16 wide, an alignment head of 2 layers 128 wide.
    fn spec(weights: Vec<f64>, loss: AdapterLoss, sliding_window: Option<i64>) -> SpafSpec {
        SpafSpec {
            cutoff_layer: 1,
            adapter_dim: 16,
            alignment_num_layers: 2,
            alignment_hidden_size: 128,
            alignment_loss: AlignmentLoss::Mse,
            adapter_loss: loss,
            adapter_weight: 1.0,
            alignment_weight: 1.0,
            layer_weights: weights,
            exit_layer: 1,
            num_draft_tokens: 5,
            serial_parallel_transition: 2,
            hidden_size: 64,
            num_layers: 4,
            vocab_size: 96,
            target_layer: Some(SpafTargetLayer {
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 16,
                intermediate_size: 128,
                sliding_window,
            }),
        }
    }

    /// Per position: a target layer's matrices q 4096 + k 2048 + v 2048 + o 4096 + MLP 24576
    /// = 36864, its causal attention 2 x 64 x (T+1)/2 = 1088 at T = 16, 2112 at T = 32 (all
    /// 16 keys, 2048, under a sliding window of 8 < T); an adapter's down and up 64 x 16 =
    /// 1024 each; an exit's lm_head 96 x 64 = 6144 over T-1 of T positions (5760 at T = 16,
    /// 5952 at T = 32); the alignment head 64 x 128 = 8192 (grad_one) + 128 x 64 = 8192
    /// (grad_both).
    /// Weights [1, 0, 1] (exits 1, 2, 3; the deepest trained is 3), CE:
    /// - layer 1 again from the target's h_0: no_grad 36864 + 1088;
    /// - A_1: down grad_one 1024, up grad_both 1024;
    /// - layers 2, 3 (frozen, on the adapted stream): grad_one 2 x 36864 = 73728, attention
    ///   grad_both 2 x 1088 = 2176; A_2, A_3: grad_both 4 x 1024 = 4096;
    /// - exits 1 and 3: grad_one 2 x 5760; exit 2 (weight 0): no_grad 5760.
    ///
    /// T = 16: grad_one 1024 + 73728 + 11520 + 8192 = 94464, grad_both 1024 + 2176 + 4096 +
    /// 8192 = 15488, no_grad 36864 + 1088 + 5760 = 43712. KL adds the target's lm_head on T-1
    /// positions: no_grad + 5760 = 49472. T = 32: grad_one 94848, grad_both 17536, no_grad
    /// 44928. Sliding window 8 at T = 16: grad_both 17408, no_grad 44672.
    /// Weights [1, 0, 0]: only layer 1, A_1 and exit 1: grad_one 1024 + 5760 + 8192 = 14976,
    /// grad_both 1024 + 8192 = 9216, no_grad 37952.
    #[test]
    fn token_macs_count_the_frozen_layers_the_adapters_exits_and_alignment_head() {
        use AdapterLoss::{Ce, Kl};
        // (exit weights, loss, sliding window, T, [grad_both, grad_one, no_grad])
        let cases = [
            ([1.0, 0.0, 1.0], Ce, None, 16, [15488.0, 94464.0, 43712.0]),
            ([1.0, 0.0, 1.0], Kl, None, 16, [15488.0, 94464.0, 49472.0]),
            ([1.0, 0.0, 1.0], Ce, None, 32, [17536.0, 94848.0, 44928.0]),
            ([1.0, 0.0, 1.0], Ce, Some(8), 16, [17408.0, 94464.0, 44672.0]),
            ([1.0, 0.0, 0.0], Ce, None, 16, [9216.0, 14976.0, 37952.0]),
        ];
        for (weights, loss, window, t, [both, one, none]) in cases {
            let want = macs(both, one, none);
            let deepest = weights.iter().rposition(|w| *w > 0.0).expect("a trained exit") as i64 + 1;
            let trained_exits = weights.iter().filter(|w| **w > 0.0).count() as f64;
            let m = Spaf::new(
                spec(weights.to_vec(), loss, window),
                &TargetAccess::Nothing,
                Device::Cpu,
                Kind::Float,
            )
            .expect("spaf");
            let got = m.token_macs(t);
            let what = format!("weights {weights:?}, {loss:?}, window {window:?}, T {t}");
            assert_macs(got, want, &what);
            // from the VarStore: the adapters up to the deepest trained exit and the
            // alignment head once per position; plus the frozen layers after the cutoff up to
            // it, their attention, and the lm_head of the trained exits
            let trained = matrix_macs(&m.vs, |name| {
                if name.starts_with("align.") {
                    return Some(1.0);
                }
                let l: i64 = name.strip_prefix("adapters.")?.split('.').next()?.parse().ok()?;
                Some(if l <= deepest { 1.0 } else { 0.0 })
            });
            let tf = t as f64;
            let keys = if window.is_some_and(|w| t > w) {
                tf
            } else {
                (tf + 1.0) / 2.0
            };
            let frozen = (deepest - 1) as f64 * (36864.0 + 2.0 * 64.0 * keys);
            let exits = trained_exits * 6144.0 * (tf - 1.0) / tf;
            assert_macs(
                macs(got.grad_both + got.grad_one, 0.0, 0.0),
                macs(trained + frozen + exits, 0.0, 0.0),
                &format!("{what}: from the VarStore"),
            );
        }
    }

    /// A spec written before the target's layer shape was recorded reads without it and
    /// equals the same spec resolved now (a checkpoint resumes); two different shapes differ.
    #[test]
    fn a_spec_without_the_target_layer_shape_reads_and_matches() {
        let now = spec(vec![1.0, 0.0, 1.0], AdapterLoss::Ce, None);
        let mut old = serde_json::to_value(&now).expect("json");
        old.as_object_mut().expect("object").remove("target_layer");
        let old: SpafSpec = serde_json::from_value(old).expect("an old spec");
        assert_eq!(old.target_layer, None);
        assert_eq!(old, now);
        assert_eq!(now, old);
        let other = spec(vec![1.0, 0.0, 1.0], AdapterLoss::Ce, Some(8));
        assert_ne!(other, now);
        let mut changed = old.clone();
        changed.adapter_dim = 8;
        assert_ne!(changed, now);
    }
}
