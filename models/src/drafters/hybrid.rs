//! Gated hybrid drafter: a gating network picks, per position, one of several light MLP
//! blocks and heavy transformer blocks. Method: docs/methods/hybrid.md.
//! One file (about 950 lines): the registry's rule is one drafter kind, one file.
//!
//! At position p the draft input is EAGLE-1's: `x_p = fc(cat(embed(x_{p+1}), f_p))` with f_p
//! the target's last hidden state after the final norm. The gate reads x_p:
//! `gate.fc2(silu(gate.fc1(x_p)))` -> logits over the `n` blocks (MLP blocks first, then
//! transformer blocks). Every block maps x to a hidden state with a residual:
//! - MLP block i: `x + mlp(norm(x))` (SwiGLU, `mlp_intermediate_size` wide);
//! - transformer block j: one pre-norm Llama decoder layer (the shared block), causal over the
//!   sequence of draft inputs.
//!
//! The outputs are fused with gate weights w (`sum_i w_i * block_i(x)`), normalised
//! (`norm`) into the predicted feature of position p + 1 and read out by the target's frozen
//! lm_head (or, with `draft_vocab_size`, a trainable head over EAGLE-3's reduced draft
//! vocabulary); the token predicted is x_{p+2}.
//!
//! Gate weights: training draws a Gumbel-Softmax sample `softmax((logits + g) / tau)` (g from
//! the step's generator; straight-through one-hot with `hard`), tau annealed (geometric, linear
//! or cosine: `temperature_schedule`) from `gumbel_temperature` to `gumbel_temperature_end`
//! over `anneal_steps` (default: the run). Evaluation and decoding use the arg-max block alone,
//! with no noise and no temperature: training's soft mixture is not what decoding runs
//! (docs/methods/hybrid.md measures the gap).
//!
//! Loss over positions whose predicted token x_{p+2} is trained: cross-entropy against x_{p+2}
//! (or, with `distill`, soft cross-entropy against the target's distribution at p + 1) +
//! `lambda * sum_i softmax(logits)_i * cost_i` (lambda: `cost_lambda`, or a linear ramp to it
//! with `cost_lambda_schedule: linear`) + optionally `feature_weight *
//! SmoothL1(predicted feature, f_{p+1})`.
//!
//! KV cache at decoding: every transformer block appends the keys and values of every
//! position's draft input, also when the gate routed that position to another block (only
//! the k/v projections run there), so a block's attention sees the same context in decoding
//! as in training, where all blocks run on all positions.
//!
//! Weight names (forge format only): `fc.{weight,bias}`, `gate.fc1.{weight,bias}`,
//! `gate.fc2.{weight,bias}`, `mlp_blocks.<i>.norm.weight`,
//! `mlp_blocks.<i>.mlp.{gate,up,down}_proj.weight`, `transformer_blocks.<j>.` + a Llama
//! layer's names, `norm.weight`, the buffer `block_costs` `[n]`, and with a draft vocabulary
//! `lm_head.weight`, `d2t`, `t2d`.

use super::eagle::{frozen, rows, shift_left, soft_ce_and_hits, DraftLayerSpec};
use super::eagle3::install_vocab_mapping;
use super::{
    Drafter, DrafterKind, DrafterSpec, FeatureNeeds, Features, LossOutput, Metric, ParamGroup, PrepareData,
    ResolveTarget, StepContext, TargetAccess, TargetNeeds, TokenMacs, EMBED, LM_HEAD,
};
use forge_schema::Ctx;
use crate::error::{ModelError, Result};
use crate::generate::{RowRng, Sampling};
use crate::layers::attention::build_mask;
use crate::layers::{linear, project, AttnMask, DecoderLayer, Keys, LayerKv, Linear, Mlp, ParamInit, RmsNorm, Rotary};
use crate::speculative::{propose_chain, DraftSession, DraftedPath, Proposal, StepFeatures};
use crate::llm::TargetModel;
use tch::{nn, Device, Kind, Tensor};

/// How the per-block costs of the compute-cost loss are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CostMode {
    /// `mlp_cost` for every MLP block, `transformer_cost` for every transformer block.
    Fixed,
    /// Timed single-token forwards of each block on the training device when a fresh run
    /// starts, scaled so that the MLP blocks' mean is `mlp_cost`.
    Measured,
}

/// How the Gumbel-Softmax temperature goes from `gumbel_temperature` (t0) to
/// `gumbel_temperature_end` (t1) over the anneal, with f = min(1, step / anneal steps).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemperatureSchedule {
    /// `t0 * (t1 / t0)^f` (what specs written before the choice existed use).
    #[default]
    Geometric,
    /// `t0 + (t1 - t0) * f`.
    Linear,
    /// `t1 + (t0 - t1) * (1 + cos(pi f)) / 2`.
    Cosine,
}

/// How the cost-loss weight lambda goes from `cost_lambda_start` to `cost_lambda`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LambdaSchedule {
    /// `cost_lambda` at every step (what specs written before the choice existed use).
    #[default]
    Constant,
    /// `start + (cost_lambda - start) * min(1, step / cost_lambda_steps)`: a small weight
    /// while the blocks learn, rising to `cost_lambda`.
    Linear,
}

/// The hybrid drafter's hyper-parameters plus the target dimensions it is built for.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HybridSpec {
    pub num_mlp_blocks: i64,
    pub num_transformer_blocks: i64,
    /// Width of the gate's hidden layer.
    pub gate_hidden_size: i64,
    /// Width of an MLP block's SwiGLU.
    pub mlp_intermediate_size: i64,
    pub gumbel_temperature: f64,
    pub gumbel_temperature_end: f64,
    /// Steps of the temperature anneal (`None`: the whole run).
    pub anneal_steps: Option<u64>,
    #[serde(default)]
    pub temperature_schedule: TemperatureSchedule,
    pub hard: bool,
    pub distill: bool,
    pub cost: CostMode,
    pub mlp_cost: f64,
    pub transformer_cost: f64,
    pub cost_lambda: f64,
    #[serde(default)]
    pub cost_lambda_schedule: LambdaSchedule,
    /// Lambda at step 0 under [`LambdaSchedule::Linear`].
    #[serde(default)]
    pub cost_lambda_start: f64,
    /// Steps of the lambda ramp (`None`: the whole run).
    #[serde(default)]
    pub cost_lambda_steps: Option<u64>,
    pub feature_weight: f64,
    /// Learning-rate scale of the gate's parameter group.
    pub gate_lr_scale: f64,
    /// A trainable head over a reduced draft vocabulary of this many tokens (EAGLE-3's
    /// mapping: `d2t`, `t2d`), instead of the target's frozen lm_head.
    #[serde(default)]
    pub draft_vocab_size: Option<i64>,
    /// The target's vocabulary size.
    pub vocab_size: i64,
    /// The transformer blocks' shape; its hidden size is the target's.
    pub layer: DraftLayerSpec,
}

impl HybridSpec {
    pub fn num_blocks(&self) -> i64 {
        self.num_mlp_blocks + self.num_transformer_blocks
    }

    /// Block names in gate order: `mlp_0`.., then `transformer_0`...
    pub fn block_names(&self) -> Vec<String> {
        (0..self.num_mlp_blocks)
            .map(|i| format!("mlp_{i}"))
            .chain((0..self.num_transformer_blocks).map(|j| format!("transformer_{j}")))
            .collect()
    }

    /// The per-block costs of `CostMode::Fixed` (the starting value of `block_costs`).
    pub fn fixed_costs(&self) -> Vec<f64> {
        (0..self.num_blocks())
            .map(|i| {
                if i < self.num_mlp_blocks {
                    self.mlp_cost
                } else {
                    self.transformer_cost
                }
            })
            .collect()
    }

    /// The Gumbel-Softmax temperature at the 0-based `step` of `total`: from the start to
    /// the end value over `anneal_steps` (or the whole run) as `temperature_schedule` says,
    /// then constant.
    pub fn temperature_at(&self, step: u64, total: u64) -> f64 {
        let f = progress(step, self.anneal_steps.unwrap_or(total));
        let (t0, t1) = (self.gumbel_temperature, self.gumbel_temperature_end);
        match self.temperature_schedule {
            TemperatureSchedule::Geometric => t0 * (t1 / t0).powf(f),
            TemperatureSchedule::Linear => t0 + (t1 - t0) * f,
            TemperatureSchedule::Cosine => t1 + (t0 - t1) * 0.5 * (1.0 + (std::f64::consts::PI * f).cos()),
        }
    }

    /// The cost-loss weight lambda at the 0-based `step` of `total`.
    pub fn cost_lambda_at(&self, step: u64, total: u64) -> f64 {
        match self.cost_lambda_schedule {
            LambdaSchedule::Constant => self.cost_lambda,
            LambdaSchedule::Linear => {
                let f = progress(step, self.cost_lambda_steps.unwrap_or(total));
                self.cost_lambda_start + (self.cost_lambda - self.cost_lambda_start) * f
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        let mut bad = Vec::new();
        if self.num_mlp_blocks < 0 || self.num_transformer_blocks < 0 || self.num_blocks() < 1 {
            bad.push(format!(
                "num_mlp_blocks {} and num_transformer_blocks {} must be >= 0 with at least one block",
                self.num_mlp_blocks, self.num_transformer_blocks
            ));
        }
        if self.gate_hidden_size < 1 || self.mlp_intermediate_size < 1 {
            bad.push("gate_hidden_size and mlp_intermediate_size must be >= 1".into());
        }
        if let Some(dv) = self.draft_vocab_size {
            if dv < 1 || dv > self.vocab_size {
                bad.push(format!("draft_vocab_size must be in 1..={}, got {dv}", self.vocab_size));
            }
        }
        for (name, v) in [
            ("gumbel_temperature", self.gumbel_temperature),
            ("gumbel_temperature_end", self.gumbel_temperature_end),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bad.push(format!("{name} must be > 0, got {v}"));
            }
        }
        if !(self.cost_lambda_start.is_finite() && self.cost_lambda_start >= 0.0) {
            bad.push(format!("cost_lambda_start must be >= 0, got {}", self.cost_lambda_start));
        }
        if bad.is_empty() {
            self.layer.validate()
        } else {
            Err(ModelError::Invalid(format!("hybrid: {}", bad.join("; "))))
        }
    }
}

/// `step / span` clamped to [0, 1] (a span of 0 counts as 1).
fn progress(step: u64, span: u64) -> f64 {
    (step as f64 / span.max(1) as f64).clamp(0.0, 1.0)
}

/// A Gumbel-Softmax sample over the last dimension of `logits` with Gumbel `noise` of the same
/// shape: `softmax((logits + noise) / tau)`; with `hard`, the one-hot arg-max in the forward
/// pass with the soft sample's gradient (straight-through).
pub fn gumbel_softmax(logits: &Tensor, noise: &Tensor, tau: f64, hard: bool) -> Tensor {
    let y = ((logits.to_kind(Kind::Float) + noise) / tau).softmax(-1, Kind::Float);
    if hard {
        one_hot_argmax(&y) - y.detach() + y
    } else {
        y
    }
}

/// One-hot `[.., n]` (fp32) of the arg-max over the last dimension.
pub fn one_hot_argmax(x: &Tensor) -> Tensor {
    x.zeros_like()
        .to_kind(Kind::Float)
        .scatter_value(-1, &x.argmax(-1, true), 1.0)
}

/// Expected cost `sum_i p_i c_i` of gate probabilities `p` `[.., n]` and costs `c` `[n]`.
pub fn expected_cost(probs: &Tensor, costs: &Tensor) -> Tensor {
    (probs * costs).sum_dim_intlist(-1, false, Kind::Float)
}

/// An MLP block: `x + mlp(norm(x))`.
struct MlpBlock {
    norm: RmsNorm,
    mlp: Mlp,
}

impl MlpBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        x + self.mlp.forward(&self.norm.forward(x))
    }
}

/// The trainable head over a reduced draft vocabulary: `lm_head` `[Vd, h]`, draft id i is
/// target id `i + d2t[i]`, `t2d[target id]` marks the draft vocabulary.
struct DraftHead {
    lm_head: Linear,
    d2t: Tensor,
    t2d: Tensor,
}

forge_schema::choice! {
    /// Where the hybrid drafter's per-block costs come from.
    pub enum CostSetting { Fixed = "fixed", Measured = "measured" }
}

forge_schema::choice! {
    /// How the hybrid drafter's Gumbel-Softmax temperature is annealed.
    pub enum TemperatureScheduleSetting { Geometric = "geometric", Linear = "linear", Cosine = "cosine" }
}

forge_schema::choice! {
    /// How the hybrid drafter's cost-loss weight changes over the run.
    pub enum LambdaScheduleSetting { Constant = "constant", Linear = "linear" }
}

forge_schema::section! {
    /// Gated hybrid drafter: a gate picks, per position, one of several MLP and transformer blocks (docs/methods/hybrid.md).
    pub struct HybridSection {
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
        /// Temperature at the end of the anneal (default: gumbel_temperature, no anneal).
        gumbel_temperature_end: Option<f64> = None,
        /// Steps of the anneal (default: the whole run).
        anneal_steps: Option<u64> = None,
        /// Shape of the anneal from gumbel_temperature to gumbel_temperature_end: geometric (t0 (t1/t0)^f), linear (t0 + (t1 - t0) f) or cosine, f = step / anneal_steps.
        temperature_schedule: TemperatureScheduleSetting = TemperatureScheduleSetting::Geometric,
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
        /// Weight of the expected compute cost in the loss (with cost_lambda_schedule linear: the weight the ramp ends at).
        cost_lambda: f64 = 0.01,
        /// constant: cost_lambda throughout; linear: from cost_lambda_start to cost_lambda over cost_lambda_steps, then cost_lambda (the source's advice: a small weight first, then larger).
        cost_lambda_schedule: LambdaScheduleSetting = LambdaScheduleSetting::Constant,
        /// The weight at step 0 of a linear lambda schedule.
        cost_lambda_start: f64 = 0.0,
        /// Steps of the lambda ramp (default: the whole run).
        cost_lambda_steps: Option<u64> = None,
        /// Weight of a SmoothL1 loss between the predicted and the target's next feature (0 = off).
        feature_weight: f64 = 0.0,
        /// Learning-rate scale of the gate's parameter group (never weight-decayed).
        gate_lr_scale: f64 = 1.0,
        /// A trainable head over the draft_vocab_size most frequent trained tokens (EAGLE-3's d2t/t2d mapping) instead of the target's frozen lm_head (default: the frozen lm_head).
        draft_vocab_size: Option<i64> = None,
    }
}

impl DrafterKind for Hybrid {
    const DOCS: &'static str = "docs/methods/hybrid.md";
    type Section = HybridSection;
    type Spec = HybridSpec;

    fn validate(h: &HybridSection, cx: &mut Ctx) {
        if h.num_mlp_blocks < 0 || h.num_transformer_blocks < 0 || h.num_mlp_blocks + h.num_transformer_blocks < 1 {
            cx.issue_at(
                "drafter.num_mlp_blocks",
                "num_mlp_blocks and num_transformer_blocks must be >= 0 with at least one block",
            );
        }
        cx.above_zero("drafter.gumbel_temperature", h.gumbel_temperature);
        if let Some(t) = h.gumbel_temperature_end {
            cx.above_zero("drafter.gumbel_temperature_end", t);
        }
        cx.positive_if_set("drafter.gate_hidden_size", h.gate_hidden_size);
        cx.positive_if_set("drafter.mlp_intermediate_size", h.mlp_intermediate_size);
        cx.positive_if_set("drafter.transformer_intermediate_size", h.transformer_intermediate_size);
        cx.positive_if_set("drafter.draft_vocab_size", h.draft_vocab_size);
        if h.anneal_steps == Some(0) {
            cx.issue_at("drafter.anneal_steps", "must be >= 1 (leave it unset to anneal over the whole run)");
        }
        cx.non_negative("drafter.feature_weight", h.feature_weight);
        cx.non_negative("drafter.gate_lr_scale", h.gate_lr_scale);
        cx.non_negative("drafter.mlp_cost", h.mlp_cost);
        cx.non_negative("drafter.transformer_cost", h.transformer_cost);
        cx.non_negative("drafter.cost_lambda", h.cost_lambda);
        cx.non_negative("drafter.cost_lambda_start", h.cost_lambda_start);
        if h.cost_lambda_steps == Some(0) {
            cx.issue_at(
                "drafter.cost_lambda_steps",
                "must be >= 1 (leave it unset to ramp over the whole run)",
            );
        }
        if h.cost_lambda_schedule == LambdaScheduleSetting::Constant {
            for key in ["cost_lambda_start", "cost_lambda_steps"] {
                let path = format!("drafter.{key}");
                if cx.is_set(&path) {
                    cx.issue_at(
                        &path,
                        "only a linear lambda schedule reads it: set drafter.cost_lambda_schedule: linear, or remove it",
                    );
                }
            }
        }
    }

    fn resolve(x: &HybridSection, target: ResolveTarget) -> Result<HybridSpec> {
        let cfg = target.config;
        let h = cfg.hidden_size;
        Ok(HybridSpec {
            num_mlp_blocks: x.num_mlp_blocks,
            num_transformer_blocks: x.num_transformer_blocks,
            gate_hidden_size: x.gate_hidden_size.unwrap_or((h / 4).max(1)),
            mlp_intermediate_size: x.mlp_intermediate_size.unwrap_or(h),
            gumbel_temperature: x.gumbel_temperature,
            gumbel_temperature_end: x.gumbel_temperature_end.unwrap_or(x.gumbel_temperature),
            anneal_steps: x.anneal_steps,
            temperature_schedule: match x.temperature_schedule {
                TemperatureScheduleSetting::Geometric => TemperatureSchedule::Geometric,
                TemperatureScheduleSetting::Linear => TemperatureSchedule::Linear,
                TemperatureScheduleSetting::Cosine => TemperatureSchedule::Cosine,
            },
            hard: x.hard,
            distill: x.distill,
            cost: match x.cost {
                CostSetting::Fixed => CostMode::Fixed,
                CostSetting::Measured => CostMode::Measured,
            },
            mlp_cost: x.mlp_cost,
            transformer_cost: x.transformer_cost,
            cost_lambda: x.cost_lambda,
            cost_lambda_schedule: match x.cost_lambda_schedule {
                LambdaScheduleSetting::Constant => LambdaSchedule::Constant,
                LambdaScheduleSetting::Linear => LambdaSchedule::Linear,
            },
            cost_lambda_start: x.cost_lambda_start,
            cost_lambda_steps: x.cost_lambda_steps,
            feature_weight: x.feature_weight,
            gate_lr_scale: x.gate_lr_scale,
            draft_vocab_size: x.draft_vocab_size.map(|d| d.min(cfg.vocab_size)),
            vocab_size: cfg.vocab_size,
            layer: DraftLayerSpec::from_target(cfg, None, None, None, x.transformer_intermediate_size)?,
        })
    }

    fn build(spec: &HybridSpec, target: &TargetAccess, device: Device, compute: Kind) -> Result<Box<dyn Drafter>> {
        Ok(Box::new(Hybrid::new(spec.clone(), target, device, compute)?))
    }

    fn target_needs(_spec: &HybridSpec, _fresh: bool) -> TargetNeeds {
        super::eagle::target_needs()
    }

    fn feature_needs(_spec: &HybridSpec) -> FeatureNeeds {
        FeatureNeeds {
            last_hidden: true,
            ..FeatureNeeds::default()
        }
    }

    fn prepare_data(spec: &HybridSpec, data: &mut dyn PrepareData) -> Result<()> {
        match spec.draft_vocab_size {
            Some(vd) => data.vocab_mapping(vd as usize).map(|_| ()),
            None => Ok(()),
        }
    }

    fn choices() -> Vec<(&'static str, &'static [&'static str])> {
        vec![
            ("`drafter.cost` (hybrid)", CostSetting::NAMES),
            ("`drafter.temperature_schedule` (hybrid)", TemperatureScheduleSetting::NAMES),
            ("`drafter.cost_lambda_schedule` (hybrid)", LambdaScheduleSetting::NAMES),
        ]
    }
}

pub struct Hybrid {
    spec: DrafterSpec,
    s: HybridSpec,
    vs: nn::VarStore,
    fc: Linear,
    gate_fc1: Linear,
    gate_fc2: Linear,
    mlp_blocks: Vec<MlpBlock>,
    transformer_blocks: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[n]` fp32, not trained; saved with the weights (measured costs survive a resume).
    block_costs: Tensor,
    /// The draft-vocabulary head, when the spec asks for one.
    draft_head: Option<DraftHead>,
    /// The target's embedding and lm_head `[V, h]`, frozen, in the compute kind.
    embed: Tensor,
    lm_head: Tensor,
    rotary: Rotary,
    compute: Kind,
    /// Log intervals in a row in which one block held more than 95% of the gate's mass.
    collapse_streak: usize,
}

/// The gate's outputs and the fused prediction of a batch.
pub struct Forward {
    /// Gate logits `[B, T, n]` fp32.
    pub gate_logits: Tensor,
    /// The predicted (normalised) features `[B, T, h]`.
    pub predicted: Tensor,
}

impl Hybrid {
    pub fn new(s: HybridSpec, target: &TargetAccess, device: Device, compute: Kind) -> Result<Self> {
        s.validate()?;
        let l = &s.layer;
        let (h, v) = (l.hidden_size, s.vocab_size);
        let embed = frozen(target, EMBED, [v, h], device, compute, "hybrid")?;
        let lm_head = frozen(target, LM_HEAD, [v, h], device, compute, "hybrid")?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let init = ParamInit::Default;
        let fc = linear(&root / "fc", 2 * h, h, true, init, compute);
        let gate_fc1 = linear(&root / "gate" / "fc1", h, s.gate_hidden_size, true, init, compute);
        // zero output layer: the gate starts uniform over the blocks, so that no block gets a
        // head start from a random initialisation
        let gate_fc2 = linear(
            &root / "gate" / "fc2",
            s.gate_hidden_size,
            s.num_blocks(),
            true,
            ParamInit::Zeros,
            compute,
        );
        let mlp_blocks = (0..s.num_mlp_blocks)
            .map(|i| {
                let p = &root / "mlp_blocks" / i;
                MlpBlock {
                    norm: RmsNorm::new(&p / "norm", h, l.rms_norm_eps, init),
                    mlp: Mlp::new(&p / "mlp", h, s.mlp_intermediate_size, false, init, compute),
                }
            })
            .collect();
        let layer_cfg = || {
            let mut c = l.layer_config(h, compute);
            c.input_norm = true;
            c
        };
        let transformer_blocks = (0..s.num_transformer_blocks)
            .map(|j| DecoderLayer::new(&root / "transformer_blocks" / j, layer_cfg(), init))
            .collect();
        let norm = RmsNorm::new(&root / "norm", h, l.rms_norm_eps, init);
        // the draft-vocabulary head (EAGLE-3's names; `prepare` installs the mapping and
        // initialises the head from the target's lm_head rows)
        let draft_head = s.draft_vocab_size.map(|vd| DraftHead {
            lm_head: linear(&root / "lm_head", h, vd, false, init, compute),
            d2t: root.add("d2t", Tensor::zeros([vd], (Kind::Int64, device)), false),
            t2d: root.add("t2d", Tensor::arange(v, (Kind::Int64, device)).lt(vd), false),
        });
        let costs = Tensor::from_slice(&s.fixed_costs())
            .to_kind(Kind::Float)
            .to_device(device);
        let block_costs = root.add("block_costs", costs, false);
        let rotary = Rotary::new(l.head_dim, l.rope_theta, &l.rope_scaling, device);
        Ok(Self {
            spec: DrafterSpec::Hybrid(s.clone()),
            s,
            vs,
            fc,
            gate_fc1,
            gate_fc2,
            mlp_blocks,
            transformer_blocks,
            norm,
            block_costs,
            draft_head,
            embed,
            lm_head,
            rotary,
            compute,
            collapse_streak: 0,
        })
    }

    /// Draft inputs `[B, T, h]` (compute kind): features `[B, T, h]` and the embedding of the
    /// token that follows each position (`next_ids` `[B, T]`).
    fn draft_input(&self, features: &Tensor, next_ids: &Tensor) -> Tensor {
        let c = self.compute;
        let (b, t) = (next_ids.size()[0], next_ids.size()[1]);
        let h = self.s.layer.hidden_size;
        let emb = self.embed.index_select(0, &next_ids.reshape([-1])).view([b, t, h]);
        self.fc
            .forward(&Tensor::cat(&[emb.to_kind(c), features.to_kind(c)], -1))
    }

    /// Gate logits `[.., n]` fp32 of draft inputs `[.., h]`.
    pub fn gate_logits(&self, x: &Tensor) -> Tensor {
        self.gate_fc2
            .forward(&self.gate_fc1.forward(x).silu())
            .to_kind(Kind::Float)
    }

    /// Block `i` (gate order) on `x` `[B, T, h]`; transformer blocks attend over `keys`.
    fn block(&self, i: i64, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &AttnMask, keys: Keys) -> Tensor {
        if i < self.s.num_mlp_blocks {
            self.mlp_blocks[i as usize].forward(x)
        } else {
            self.transformer_blocks[(i - self.s.num_mlp_blocks) as usize].forward(x, cos, sin, mask, keys)
        }
    }

    /// The draft inputs `[B, T, h]` of a batch whose input features are `features`, and every
    /// block's output on every position (gate order).
    pub fn block_outputs(&self, f: &Features, features: &Tensor) -> (Tensor, Vec<Tensor>) {
        let (b, t) = (f.input_ids.size()[0], f.input_ids.size()[1]);
        let x = self.draft_input(features, &shift_left(&f.input_ids, 1));
        let mask = AttnMask::Explicit(build_mask(b, 0, t, Some(&f.attention_mask), None, x.device()));
        let (cos, sin) = self.rotary.cos_sin(&f.position_ids, self.compute);
        let outs = (0..self.s.num_blocks())
            .map(|i| self.block(i, &x, &cos, &sin, &mask, Keys::Own))
            .collect();
        (x, outs)
    }

    /// The whole training-side forward: every block on every position, fused with `weights`
    /// computed from the gate logits by `weigh`.
    pub fn forward_with(
        &self,
        f: &Features,
        features: &Tensor,
        weigh: impl FnOnce(&Tensor) -> Tensor,
    ) -> Result<Forward> {
        let (x, outs) = self.block_outputs(f, features);
        let gate_logits = self.gate_logits(&x);
        let weights = weigh(&gate_logits);
        let mut fused: Option<Tensor> = None;
        for (i, y) in outs.into_iter().enumerate() {
            let term = y * weights.narrow(-1, i as i64, 1).to_kind(self.compute);
            fused = Some(match fused {
                Some(acc) => acc + term,
                None => term,
            });
        }
        let fused = fused.ok_or_else(|| ModelError::Invalid("hybrid: no blocks".into()))?;
        Ok(Forward {
            gate_logits,
            predicted: self.norm.forward(&fused),
        })
    }

    /// Logits (fp32) of predicted features `[N, h]`: over the draft vocabulary `[N, Vd]` with
    /// a draft-vocabulary head, else through the target's lm_head `[N, V]`.
    pub fn readout(&self, predicted: &Tensor) -> Tensor {
        match &self.draft_head {
            Some(d) => d.lm_head.forward(predicted).to_kind(Kind::Float),
            None => self.target_readout(predicted),
        }
    }

    /// The target's lm_head on features `[N, h]`: `[N, V]` fp32.
    fn target_readout(&self, features: &Tensor) -> Tensor {
        project(features, &self.lm_head, self.compute).to_kind(Kind::Float)
    }

    /// [`Hybrid::readout`] over the target vocabulary `[N, V]` (-inf outside a draft
    /// vocabulary): what a proposal's logits are.
    pub fn proposal_logits(&self, predicted: &Tensor) -> Tensor {
        let l = self.readout(predicted);
        match &self.draft_head {
            Some(d) => {
                let full = Tensor::full(
                    [l.size()[0], self.s.vocab_size],
                    f64::NEG_INFINITY,
                    (Kind::Float, l.device()),
                );
                full.index_copy(1, &self.draft_ids(d), &l)
            }
            None => l,
        }
    }

    /// Target ids of the draft vocabulary `[Vd]`.
    fn draft_ids(&self, d: &DraftHead) -> Tensor {
        Tensor::arange(d.d2t.size()[0], (Kind::Int64, d.d2t.device())) + &d.d2t
    }

    /// Times a single-token forward of each block (after a 128-token context for the
    /// transformer blocks) on the drafter's device: median milliseconds per block.
    fn time_blocks(&self) -> Vec<f64> {
        let device = self.vs.device();
        let h = self.s.layer.hidden_size;
        let ctx = 128;
        tch::no_grad(|| {
            // inputs from a generator of its own: libtorch's global one is left untouched
            let x = (super::StepRng::new(0, 0, 0).uniform(&[1, ctx + 1, h], device) - 0.5).to_kind(self.compute);
            let pos = Tensor::arange(ctx + 1, (Kind::Int64, device)).view([1, -1]);
            let (cos, sin) = self.rotary.cos_sin(&pos, self.compute);
            let last = |t: &Tensor| t.narrow(2, ctx, 1);
            let (cos1, sin1) = (last(&cos), last(&sin));
            let x1 = x.narrow(1, ctx, 1);
            (0..self.s.num_blocks())
                .map(|i| {
                    let mut times = Vec::new();
                    for rep in 0..23 {
                        let mut cache = LayerKv::default();
                        if i >= self.s.num_mlp_blocks {
                            let blk = &self.transformer_blocks[(i - self.s.num_mlp_blocks) as usize];
                            blk.append_kv(
                                &x.narrow(1, 0, ctx),
                                &cos.narrow(2, 0, ctx),
                                &sin.narrow(2, 0, ctx),
                                &mut cache,
                            );
                        }
                        crate::dtype::synchronize(device);
                        let t0 = std::time::Instant::now();
                        let y = self.block(i, &x1, &cos1, &sin1, &AttnMask::Full, Keys::Cache(&mut cache));
                        if device.is_cuda() {
                            crate::dtype::synchronize(device);
                        } else {
                            let _ = y.sum(Kind::Float).double_value(&[]);
                        }
                        if rep >= 3 {
                            times.push(t0.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                    times.sort_by(|a, b| a.total_cmp(b));
                    times[times.len() / 2]
                })
                .collect()
        })
    }
}

impl Drafter for Hybrid {
    fn param_groups(&self) -> Vec<ParamGroup> {
        vec![
            ParamGroup::all(),
            ParamGroup {
                name: "gate".into(),
                prefix: "gate.".into(),
                lr_scale: self.s.gate_lr_scale,
                weight_decay: false,
            },
        ]
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

    fn prepare(&mut self, data: &mut dyn PrepareData, target: &TargetAccess) -> Result<()> {
        if let Some(vd) = self.s.draft_vocab_size {
            let (d2t, t2d) = data.vocab_mapping(vd as usize)?;
            install_vocab_mapping(&self.vs, &d2t, &t2d, target.tensor(LM_HEAD).as_ref())?;
        }
        if self.s.cost != CostMode::Measured {
            return Ok(());
        }
        let ms = self.time_blocks();
        let nm = self.s.num_mlp_blocks as usize;
        // relative to the MLP blocks' mean (or, without MLP blocks, to the first block)
        let base = if nm > 0 {
            ms[..nm].iter().sum::<f64>() / nm as f64
        } else {
            ms[0]
        };
        let unit = if nm > 0 {
            self.s.mlp_cost
        } else {
            self.s.transformer_cost
        };
        let costs: Vec<f64> = ms.iter().map(|t| t / base.max(1e-12) * unit).collect();
        tch::no_grad(|| self.block_costs.copy_(&Tensor::from_slice(&costs).to_kind(Kind::Float)));
        let names = self.s.block_names();
        let parts: Vec<String> = names
            .iter()
            .zip(ms.iter().zip(&costs))
            .map(|(n, (t, c))| format!("{n} {t:.3} ms -> {c:.3}"))
            .collect();
        data.report(&format!(
            "hybrid: measured block costs on {:?}: {}",
            self.vs.device(),
            parts.join(", ")
        ));
        Ok(())
    }

    fn loss(&self, f: &Features, ctx: &StepContext) -> Result<LossOutput> {
        let feats = f.hidden_normed()?.to_kind(Kind::Float);
        let (b, t) = (f.input_ids.size()[0], f.input_ids.size()[1]);
        let n_blocks = self.s.num_blocks();
        let tau = self.s.temperature_at(ctx.step, ctx.total_steps);
        let lambda = self.s.cost_lambda_at(ctx.step, ctx.total_steps);
        let fw = self.forward_with(f, &feats, |logits| {
            if ctx.train {
                gumbel_softmax(
                    logits,
                    &ctx.rng.gumbel(&logits.size(), logits.device()),
                    tau,
                    self.s.hard,
                )
            } else {
                one_hot_argmax(logits)
            }
        })?;
        // zero with a graph: a batch without trained positions still back-propagates
        let mut total = self.fc.ws.sum(Kind::Float) * 0.0;
        let (mut ce_v, mut cost_v, mut feat_v, mut cnt) = (0.0, 0.0, 0.0, 0.0);
        let mut hits = [0.0f64; 3];
        let mut probs_sum = vec![0.0f64; n_blocks as usize];
        let mut chosen = vec![0.0f64; n_blocks as usize];
        let mut entropy = 0.0;
        // trained positions before a draft vocabulary drops the labels it does not hold
        let mut trained_rows = 0.0;
        let n = t - 2;
        if n > 0 {
            // position p predicts feature p+1 and so token p+2
            let mut idx = rows(&f.loss_mask.narrow(1, 2, n).ne(0));
            trained_rows = idx.size()[0] as f64;
            let sel_at = |x: &Tensor, start: i64, idx: &Tensor| {
                let d = x.size()[2];
                x.narrow(1, start, n).reshape([b * n, d]).index_select(0, idx)
            };
            // the labels as target ids: the data's token p+2, or (distill) the target's
            // distribution at p+1 and its arg-max
            let data_labels = |idx: &Tensor| f.input_ids.narrow(1, 2, n).reshape([-1]).index_select(0, idx);
            let target_logits = |idx: &Tensor| tch::no_grad(|| self.target_readout(&sel_at(&feats, 1, idx)));
            if let Some(d) = &self.draft_head {
                // a reduced vocabulary trains the positions whose label it holds
                let labels = if self.s.distill {
                    target_logits(&idx).argmax(-1, false)
                } else {
                    data_labels(&idx)
                };
                idx = idx.masked_select(&d.t2d.index_select(0, &labels));
            }
            let count = idx.size()[0];
            if count > 0 {
                let sel = |x: &Tensor, start: i64| sel_at(x, start, &idx);
                let pred = sel(&fw.predicted, 0);
                let logits = self.readout(&pred);
                let (ce, labels) = if self.s.distill {
                    let tl = target_logits(&idx);
                    let tl = match &self.draft_head {
                        Some(d) => tl.index_select(1, &self.draft_ids(d)),
                        None => tl,
                    };
                    let p = tl.softmax(-1, Kind::Float);
                    let (ce, _) = soft_ce_and_hits(&logits, &p);
                    (ce, p.argmax(-1, false))
                } else {
                    let labels = data_labels(&idx);
                    let labels = match &self.draft_head {
                        // draft id = the label's rank among the draft vocabulary's target ids
                        Some(d) => (d.t2d.to_kind(Kind::Int64).cumsum(0, Kind::Int64) - 1).index_select(0, &labels),
                        None => labels,
                    };
                    (logits.cross_entropy_for_logits(&labels), labels)
                };
                let gate_logits = sel(&fw.gate_logits, 0);
                let probs = gate_logits.softmax(-1, Kind::Float);
                let cost = expected_cost(&probs, &self.block_costs).mean(Kind::Float);
                total = total + &ce + &cost * lambda;
                if self.s.feature_weight > 0.0 {
                    let feature = pred
                        .to_kind(Kind::Float)
                        .smooth_l1_loss(&sel(&feats, 1), tch::Reduction::None, 1.0)
                        .mean_dim(-1, false, Kind::Float)
                        .mean(Kind::Float);
                    feat_v = feature.double_value(&[]);
                    // out of place, as the line above: the loss graph stays as it was
                    total = &total + feature * self.s.feature_weight;
                }
                cnt = count as f64;
                ce_v = ce.double_value(&[]);
                cost_v = cost.double_value(&[]);
                tch::no_grad(|| {
                    // one sorted top-5: its first k columns are the top k
                    let v = logits.size()[1];
                    let (_, top) = logits.topk(5.min(v), -1, true, true);
                    let hit = top.eq_tensor(&labels.unsqueeze(-1));
                    for (slot, k) in [1i64, 3, 5].iter().enumerate() {
                        hits[slot] = hit
                            .narrow(1, 0, (*k).min(v))
                            .any_dim(-1, false)
                            .sum(Kind::Float)
                            .double_value(&[]);
                    }
                    let ps = Vec::<f64>::try_from(&probs.sum_dim_intlist(0, false, Kind::Double)).unwrap_or_default();
                    let ch =
                        Vec::<f64>::try_from(&one_hot_argmax(&gate_logits).sum_dim_intlist(0, false, Kind::Double))
                            .unwrap_or_default();
                    for i in 0..n_blocks as usize {
                        probs_sum[i] = ps.get(i).copied().unwrap_or(0.0);
                        chosen[i] = ch.get(i).copied().unwrap_or(0.0);
                    }
                    entropy = -(&probs * probs.clamp_min(1e-12).log())
                        .sum(Kind::Double)
                        .double_value(&[]);
                });
            }
        }
        let m = |name: String, sum: f64| Metric { name, sum, count: cnt };
        let mut parts = vec![
            m("draft/ce".into(), ce_v * cnt),
            m("cost/weighted".into(), lambda * cost_v * cnt),
        ];
        if self.s.feature_weight > 0.0 {
            parts.push(m("feature/smooth_l1".into(), self.s.feature_weight * feat_v * cnt));
        }
        let mut metrics = vec![
            m("acc/top1".into(), hits[0]),
            m("acc/top3".into(), hits[1]),
            m("acc/top5".into(), hits[2]),
            m("gate/expected_cost".into(), cost_v * cnt),
            m("gate/entropy".into(), entropy),
            m("gate/temperature".into(), tau * cnt),
            m("gate/cost_lambda".into(), lambda * cnt),
        ];
        if !ctx.train {
            // one proposal per chain in training's view (later ones read the draft's own features)
            // a label outside a draft vocabulary is a miss
            metrics.push(Metric {
                name: "chain/0".into(),
                sum: hits[0],
                count: trained_rows,
            });
        }
        let nm = self.s.num_mlp_blocks as usize;
        metrics.push(m("gate/mlp_mass".into(), probs_sum[..nm].iter().sum()));
        metrics.push(m("gate/transformer_mass".into(), probs_sum[nm..].iter().sum()));
        for (i, name) in self.s.block_names().into_iter().enumerate() {
            metrics.push(m(format!("gate/{name}_prob"), probs_sum[i]));
            metrics.push(m(format!("gate/{name}_chosen"), chosen[i]));
        }
        Ok(LossOutput {
            loss: total,
            parts,
            metrics,
        })
    }

    fn watch(&mut self, interval: &[(String, f64)]) -> Vec<String> {
        let top = self
            .s
            .block_names()
            .iter()
            .filter_map(|n| {
                let key = format!("gate/{n}_prob");
                interval
                    .iter()
                    .find(|(k, _)| k.ends_with(&key))
                    .map(|(_, v)| (n.clone(), *v))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match top {
            Some((name, p)) if p > 0.95 && self.s.num_blocks() > 1 => {
                self.collapse_streak += 1;
                if self.collapse_streak == COLLAPSE_INTERVALS {
                    return vec![format!(
                        "hybrid gate collapse: block {name} has held {:.1}% of the gate's mass for {COLLAPSE_INTERVALS} log intervals in a row (the other blocks no longer train); lower drafter.cost_lambda, raise drafter.gumbel_temperature or use drafter.gate_lr_scale < 1",
                        100.0 * p
                    )];
                }
            }
            _ => self.collapse_streak = 0,
        }
        Vec::new()
    }

    /// Training runs every block on every position (the gated mixture weighs all of their
    /// outputs): per position fc over cat(embedding, target feature) (inputs need no
    /// gradient), the gate (fc1, fc2), each MLP block's SwiGLU and each transformer block
    /// (projections, MLP, attention under an explicit mask computing all T x T scores).
    /// Positions 0..T-2 are read out: by the draft-vocabulary head (trainable) or the target's
    /// frozen lm_head; with `distill` the target's lm_head also reads the target's next
    /// feature under no_grad, twice with a draft-vocabulary head (once to pick the positions
    /// whose label it holds, once for the soft labels).
    fn token_macs(&self, seq_len: i64) -> TokenMacs {
        if seq_len < 1 {
            return TokenMacs::default();
        }
        let s = &self.s;
        let l = &s.layer;
        let t = seq_len as f64;
        let (h, v) = (l.hidden_size as f64, s.vocab_size as f64);
        let g = s.gate_hidden_size as f64;
        let gate = h * g + g * s.num_blocks() as f64;
        let mlp_blocks = s.num_mlp_blocks as f64 * 3.0 * h * s.mlp_intermediate_size as f64;
        let transformer_blocks = s.num_transformer_blocks as f64 * (l.layer_macs(l.hidden_size) + l.attention_macs(t));
        let position = TokenMacs::one(2.0 * h * h) + TokenMacs::both(gate + mlp_blocks + transformer_blocks);
        let head = match s.draft_vocab_size {
            Some(vd) => TokenMacs::both(vd as f64 * h),
            None => TokenMacs::one(v * h),
        };
        let target_reads = match (s.distill, s.draft_vocab_size) {
            (false, _) => 0.0,
            (true, None) => 1.0,
            (true, Some(_)) => 2.0,
        };
        position + (head + TokenMacs::none(target_reads * v * h)) * ((t - 2.0).max(0.0) / t)
    }

    fn engines_note(&self) -> Option<&'static str> {
        Some("no inference engine (vLLM, SGLang, TensorRT-LLM) has a gated multi-block draft architecture to load it into; the forge format (docs/methods/hybrid.md) holds it and forge eval decodes with it")
    }

    fn session<'a>(&'a self, _target: &'a TargetModel) -> Result<Box<dyn DraftSession + 'a>> {
        Ok(Box::new(HybridSession {
            m: self,
            caches: (0..self.s.num_transformer_blocks).map(|_| LayerKv::default()).collect(),
            committed: 0,
            last: None,
            counts: vec![0; self.s.num_blocks() as usize],
            drafted: DraftedPath::default(),
        }))
    }
}

/// Log intervals in a row above 95% before the collapse warning.
const COLLAPSE_INTERVALS: usize = 3;

/// Speculative decoding with the hybrid drafter: at each drafted position the gate's arg-max
/// block alone computes the prediction; every transformer block still appends that position's
/// keys and values (see the module comment). Cache entries past the committed positions are
/// dropped at the next commit.
struct HybridSession<'a> {
    m: &'a Hybrid,
    /// One cache per transformer block.
    caches: Vec<LayerKv>,
    committed: i64,
    /// The predicted feature after the last committed position `[1, 1, h]`.
    last: Option<Tensor>,
    /// Times each block ran.
    counts: Vec<u64>,
    /// Tree drafting: the path whose steps the caches hold past the committed positions.
    drafted: DraftedPath,
}

impl HybridSession<'_> {
    /// Draft inputs for `features` `[1, k, h]` followed by `next` at positions `start..`:
    /// keys and values of all k for every transformer block, the gate's block on the last.
    /// Returns the predicted feature after the last position `[1, 1, h]`.
    fn step(&mut self, features: &Tensor, next: &[i64], start: i64) -> Result<Tensor> {
        let m = self.m;
        let device = features.device();
        let k = next.len() as i64;
        let ids = Tensor::from_slice(next).view([1, k]).to_device(device);
        let x = m.draft_input(features, &ids);
        let x_last = x.narrow(1, k - 1, 1);
        let choice = m.gate_logits(&x_last).view([-1]).argmax(0, false).int64_value(&[]);
        let pos = |a: i64, n: i64| Tensor::arange_start(a, a + n, (Kind::Int64, device)).view([1, n]);
        let (cos, sin) = m.rotary.cos_sin(&pos(start, k), m.compute);
        let (cos_l, sin_l) = (cos.narrow(2, k - 1, 1), sin.narrow(2, k - 1, 1));
        let nm = m.s.num_mlp_blocks;
        for (j, cache) in self.caches.iter_mut().enumerate() {
            let blk = &m.transformer_blocks[j];
            if choice == nm + j as i64 {
                continue;
            }
            blk.append_kv(&x, &cos, &sin, cache);
        }
        let out = if choice < nm {
            m.mlp_blocks[choice as usize].forward(&x_last)
        } else {
            let j = (choice - nm) as usize;
            let blk = &m.transformer_blocks[j];
            let cache = &mut self.caches[j];
            if k > 1 {
                blk.append_kv(
                    &x.narrow(1, 0, k - 1),
                    &cos.narrow(2, 0, k - 1),
                    &sin.narrow(2, 0, k - 1),
                    cache,
                );
            }
            blk.forward(&x_last, &cos_l, &sin_l, &AttnMask::Full, Keys::Cache(cache))
        };
        self.counts[choice as usize] += 1;
        Ok(m.norm.forward(&out))
    }
}

impl DraftSession for HybridSession<'_> {
    fn commit(&mut self, start: i64, features: &StepFeatures, next: &[i64]) -> Result<()> {
        if start != self.committed {
            return Err(ModelError::Invalid(format!(
                "hybrid: commit at {start}, {} positions committed",
                self.committed
            )));
        }
        for c in &mut self.caches {
            c.truncate(start);
        }
        let k = next.len() as i64;
        let last = self.step(&features.hidden_normed.unsqueeze(0), next, start)?;
        self.drafted.reset(&last);
        self.last = Some(last);
        self.committed = start + k;
        Ok(())
    }

    fn propose(&mut self, gamma: usize, sampling: &Sampling, rng: &mut RowRng) -> Result<Proposal> {
        let first = self
            .last
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("hybrid: propose before commit".into()))?
            .shallow_clone();
        let (m, committed) = (self.m, self.committed);
        self.drafted.reset(&first);
        // the predicted feature of position committed + i, followed by proposal i
        propose_chain(
            &first,
            gamma,
            sampling,
            rng,
            |f| m.proposal_logits(f),
            |f, token, i| self.step(f, &[token], committed + i as i64),
        )
    }

    fn can_branch(&self) -> bool {
        true
    }

    /// The proposal chain's steps along `path` (each step's gate picks its block, as in a chain).
    fn path_logits(&mut self, path: &[i64]) -> Result<Tensor> {
        let committed = self.committed;
        let mut drafted = std::mem::take(&mut self.drafted);
        let c = drafted.keep_common(path);
        let feature = c.and_then(|c| {
            for cache in &mut self.caches {
                cache.truncate(committed + c as i64);
            }
            drafted.extend(path, |f, token, i| self.step(f, &[token], committed + i as i64))
        });
        self.drafted = drafted;
        Ok(self.m.proposal_logits(&feature?.view([1, -1])).view([-1]))
    }

    fn counters(&self) -> Vec<(String, u64)> {
        self.m
            .s
            .block_names()
            .into_iter()
            .zip(&self.counts)
            .map(|(n, c)| (format!("block/{n}"), *c))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drafters::macs_tests::{assert_macs, heads, macs, matrix_macs, tiny_layer};

    fn hybrid(draft_vocab_size: Option<i64>, distill: bool) -> Hybrid {
        let spec = HybridSpec {
            num_mlp_blocks: 2,
            num_transformer_blocks: 1,
            gate_hidden_size: 16,
            mlp_intermediate_size: 64,
            gumbel_temperature: 1.0,
            gumbel_temperature_end: 1.0,
            anneal_steps: None,
            temperature_schedule: TemperatureSchedule::Geometric,
            hard: false,
            distill,
            cost: CostMode::Fixed,
            mlp_cost: 1.0,
            transformer_cost: 5.0,
            cost_lambda: 0.01,
            cost_lambda_schedule: LambdaSchedule::Constant,
            cost_lambda_start: 0.0,
            cost_lambda_steps: None,
            feature_weight: 0.0,
            gate_lr_scale: 1.0,
            draft_vocab_size,
            vocab_size: 96,
            layer: tiny_layer(),
        };
        Hybrid::new(spec, &heads(96, 64), Device::Cpu, Kind::Float).expect("hybrid")
    }

    /// Hidden 64, vocabulary 96, 2 MLP blocks (SwiGLU 64 wide) and 1 transformer block (4
    /// heads / 2 KV heads of 16, MLP 128), gate 16 wide. Every block runs on every position.
    /// Per position: fc 128 x 64 = 8192 (grad_one); grad_both: gate 64 x 16 + 16 x 3 = 1072,
    /// MLP blocks 2 x 3 x 64 x 64 = 24576, the transformer block 36864 + attention 2 x 64 x T
    /// over all T keys (2048 at T = 16, 4096 at T = 32): 64560 at T = 16, 66608 at T = 32.
    /// T-2 of T positions are read out (14/16, 30/32): the frozen lm_head 96 x 64 = 6144
    /// (grad_one 5376 / 5760) or the draft head 32 x 64 = 2048 (grad_both 1792 / 1920);
    /// distill adds the target's lm_head under no_grad, twice with a draft head.
    #[test]
    fn token_macs_count_every_block_on_every_position_and_the_readouts() {
        let cases = [
            (None, false, 16, macs(64560.0, 13568.0, 0.0)),
            (None, false, 32, macs(66608.0, 13952.0, 0.0)),
            (None, true, 16, macs(64560.0, 13568.0, 5376.0)),
            (Some(32), false, 16, macs(66352.0, 8192.0, 0.0)),
            (Some(32), true, 16, macs(66352.0, 8192.0, 10752.0)),
            (Some(32), true, 32, macs(68528.0, 8192.0, 11520.0)),
        ];
        for (vd, distill, t, want) in cases {
            let m = hybrid(vd, distill);
            let got = m.token_macs(t);
            let what = format!("draft vocabulary {vd:?}, distill {distill}, T {t}");
            assert_macs(got, want, &what);
            // from the VarStore: every trainable matrix once per position, the draft head on
            // T-2 of T; plus attention over T keys and the frozen lm_head on the predictions
            let tf = t as f64;
            let read = (tf - 2.0) / tf;
            let trained = matrix_macs(&m.vs, |name| Some(if name == "lm_head.weight" { read } else { 1.0 }));
            let frozen_head = if vd.is_none() { 6144.0 * read } else { 0.0 };
            assert_macs(
                macs(got.grad_both + got.grad_one, 0.0, 0.0),
                macs(trained + 2.0 * 64.0 * tf + frozen_head, 0.0, 0.0),
                &format!("{what}: from the VarStore"),
            );
        }
    }
}
