//! What speedup a draft gives on a GPU, predicted from its measured acceptance with a roofline
//! (`forge predict`; the model and its assumptions: docs/eval.md, "Predicting the speedup on a
//! GPU").
//!
//! Every forward (a draft step, the target's verification, a plain decoding step) costs
//! `max(FLOPs / (peak * compute), bytes / (bandwidth * bandwidth_eff)) + forward_overhead`,
//! bytes being the weights read once plus the KV cache read, FLOPs `2 * weights * tokens` plus
//! attention. Plain decoding emits one token per target forward; a speculative round runs the
//! draft's forwards ([`Setting::draft_forwards`]), one verification forward over
//! [`Setting::verify_tokens`] and the host work the engine does not hide, and emits `tau`
//! tokens per sequence. A leaf module: it uses nothing else of the trainer.

pub mod gpus;

pub use gpus::{gpu, Gpu, GPUS};

use forge_models::spec_tree::TreeSpec;
use forge_models::TargetConfig;
use std::fmt;

/// A prediction input that cannot work (names the input and what it takes).
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// A serving setting (`chain`, `tree`, `block`) that does not parse or cannot run.
    #[error("setting '{text}': {message}")]
    Setting { text: String, message: String },
    #[error("unknown GPU '{name}' (known: {known})")]
    UnknownGpu { name: String, known: String },
    /// A number out of its range (`what` names it).
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

fn invalid(what: &str, message: impl Into<String>) -> PredictError {
    PredictError::Invalid {
        what: what.to_string(),
        message: message.into(),
    }
}

/// How the engine drafts and verifies: the serving setting a measured tau belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// `n` sequential draft forwards proposing one token each; the target verifies `n + 1`
    /// tokens (the last verified one and the `n` drafts). vLLM `num_speculative_tokens: n`;
    /// SGLang `--speculative-num-steps n --speculative-eagle-topk 1 --speculative-num-draft-tokens n+1`.
    Chain { n: u32 },
    /// SGLang's EAGLE tree: `steps` sequential draft forwards, each after the first over `topk`
    /// tokens per sequence; the target verifies `draft_tokens` tree nodes in one forward.
    Tree(TreeSpec),
    /// One draft forward over a block of `size` positions (a DFlash-style block drafter, or
    /// Medusa with `size - 1` heads); the target verifies the `size` tokens.
    Block { size: u32 },
}

impl Setting {
    /// Parses `chain:N`, `tree:steps=S,topk=K,draft_tokens=D` or `block:N` (`=` or a space
    /// may stand for the `:`), as [`Display`](fmt::Display) writes them.
    pub fn parse(text: &str) -> Result<Setting, PredictError> {
        let err = |message: String| PredictError::Setting {
            text: text.to_string(),
            message,
        };
        let t = text.trim();
        let (kind, rest) = match t.find([':', '=', ' ']) {
            Some(i) => (&t[..i], t[i + 1..].trim()),
            None => (t, ""),
        };
        let number = |what: &str, v: &str| -> Result<u32, PredictError> {
            match v.trim().parse::<u32>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(err(format!("{what} takes a whole number >= 1, not '{}'", v.trim()))),
            }
        };
        let setting = match kind.to_ascii_lowercase().as_str() {
            "chain" => Setting::Chain {
                n: number("chain", rest)?,
            },
            "block" => Setting::Block {
                size: number("block", rest)?,
            },
            "tree" => Setting::Tree(TreeSpec::parse(rest).map_err(err)?),
            _ => {
                return Err(err(
                    "expected chain:N, tree:steps=S,topk=K,draft_tokens=D or block:N".into()
                ))
            }
        };
        setting.check().map_err(err)?;
        Ok(setting)
    }

    /// Whether the engine can run this setting (SGLang's own rules for trees).
    fn check(&self) -> Result<(), String> {
        if let Setting::Tree(t) = self {
            if t.topk == 1 && t.draft_tokens != t.steps + 1 {
                return Err(format!(
                    "with topk=1 the tree is a chain of {}: draft_tokens must be {}",
                    t.steps,
                    t.steps + 1
                ));
            }
        }
        Ok(())
    }

    /// Tokens per sequence in each sequential draft forward of a round. The first forward of
    /// an EAGLE-style draft runs over the tokens just accepted (`tau`: it takes in the
    /// target's features there and proposes the first draft token), each later one over the
    /// tokens drafted in the previous step (1 in a chain, `topk` in a tree). A block drafter
    /// runs once over its block and the accepted tokens.
    pub fn draft_forwards(&self, tau: f64) -> Vec<f64> {
        match *self {
            Setting::Chain { n } => (0..n).map(|i| if i == 0 { tau } else { 1.0 }).collect(),
            Setting::Tree(t) => (0..t.steps).map(|i| if i == 0 { tau } else { t.topk as f64 }).collect(),
            Setting::Block { size } => vec![f64::from(size) + tau],
        }
    }

    /// Tokens per sequence the target verifies in one forward.
    pub fn verify_tokens(&self) -> u32 {
        match *self {
            Setting::Chain { n } => n + 1,
            Setting::Tree(t) => t.draft_tokens as u32,
            Setting::Block { size } => size,
        }
    }

    /// The most tokens one round can emit per sequence (accepted drafts and the bonus token):
    /// the largest tau this setting can measure.
    pub fn max_tau(&self) -> u32 {
        match *self {
            Setting::Chain { n } => n + 1,
            Setting::Tree(t) => t.steps.min(t.draft_tokens.saturating_sub(1)) as u32 + 1,
            Setting::Block { size } => size,
        }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Setting::Chain { n } => write!(f, "chain:{n}"),
            Setting::Tree(t) => write!(f, "tree:{t}"),
            Setting::Block { size } => write!(f, "block:{size}"),
        }
    }
}

/// What the roofline needs of a model: the weights one forward reads and what its KV cache and
/// attention cost per token of context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelShape {
    /// Parameters one forward reads (an untied input embedding is gathered, not read whole, so
    /// it is left out; a tied one is read as the lm_head).
    pub weight_params: f64,
    pub layers: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    /// Width of the attention queries (heads x head_dim), for attention FLOPs.
    pub q_dim: i64,
}

impl ModelShape {
    /// The target a `config.json` describes.
    pub fn target(config: &TargetConfig) -> ModelShape {
        let embed = config.vocab_size * config.hidden_size;
        let untied_embed = if config.tie_word_embeddings { 0 } else { embed };
        ModelShape {
            weight_params: (config.num_parameters() - untied_embed) as f64,
            layers: config.num_layers,
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            q_dim: config.num_heads * config.head_dim,
        }
    }
}

/// A draft's size: the weights it reads per forward, including the lm_head it reads (its own
/// reduced-vocabulary head, or the target's), and its own KV cache per token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DraftShape {
    /// Parameters read per forward, lm_head included (no input embedding table).
    pub weight_params: f64,
    pub layers: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub hidden: i64,
    /// Rows of the lm_head it reads (its draft vocabulary).
    pub lm_head_rows: i64,
}

/// Parameters of a Llama decoder layer of the target's widths whose q/k/v read `in_dim`.
fn layer_params(t: &TargetConfig, in_dim: i64) -> i64 {
    let (h, i) = (t.hidden_size, t.intermediate_size);
    let (q, kv) = (t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim);
    in_dim * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
}

impl DraftShape {
    /// An EAGLE-3 draft on `target`: fc from three target layers (3h -> h), `layers` decoder
    /// layers of the target's widths, the first reading [embedding; feature] (2h), a final norm
    /// and an lm_head of `lm_head_rows` (its draft vocabulary; the target's when that is its
    /// whole vocabulary). Embeddings are the target's, gathered.
    pub fn eagle3(target: &TargetConfig, layers: i64, lm_head_rows: i64) -> DraftShape {
        let h = target.hidden_size;
        let body = layer_params(target, 2 * h) + (layers - 1).max(0) * layer_params(target, h);
        Self::from_parts(target, layers, 3 * h * h + body + h + lm_head_rows * h, lm_head_rows)
    }

    /// An EAGLE-1 draft: fc over [embedding; feature] (2h -> h, with bias) and `layers` decoder
    /// layers; it reads the target's lm_head (`lm_head_rows` = the target's vocabulary).
    pub fn eagle1(target: &TargetConfig, layers: i64, lm_head_rows: i64) -> DraftShape {
        let h = target.hidden_size;
        let body = layers * layer_params(target, h);
        Self::from_parts(target, layers, 2 * h * h + h + body + lm_head_rows * h, lm_head_rows)
    }

    /// Medusa: `heads` heads, each one ResBlock (h x h with bias) and its own lm_head of
    /// `lm_head_rows` rows; no attention, so no KV cache.
    pub fn medusa(target: &TargetConfig, heads: i64, lm_head_rows: i64) -> DraftShape {
        let h = target.hidden_size;
        DraftShape {
            weight_params: (heads * (h * h + h + lm_head_rows * h)) as f64,
            layers: 0,
            kv_heads: target.num_kv_heads,
            head_dim: target.head_dim,
            hidden: h,
            lm_head_rows,
        }
    }

    /// A block drafter in DFlash's layout: fc from `features` target layers, `layers` decoder
    /// layers of the target's widths and the target's lm_head (`lm_head_rows`).
    pub fn block(target: &TargetConfig, layers: i64, features: i64, lm_head_rows: i64) -> DraftShape {
        let h = target.hidden_size;
        let body = layers * layer_params(target, h);
        Self::from_parts(
            target,
            layers,
            features * h * h + body + h + lm_head_rows * h,
            lm_head_rows,
        )
    }

    fn from_parts(target: &TargetConfig, layers: i64, params: i64, lm_head_rows: i64) -> DraftShape {
        DraftShape {
            weight_params: params as f64,
            layers,
            kv_heads: target.num_kv_heads,
            head_dim: target.head_dim,
            hidden: target.hidden_size,
            lm_head_rows,
        }
    }

    fn model(&self) -> ModelShape {
        ModelShape {
            weight_params: self.weight_params,
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            q_dim: self.hidden,
        }
    }
}

/// How well the engine uses the GPU: one set for every prediction (docs/eval.md says why these
/// defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Efficiency {
    /// Share of peak bf16 FLOP/s a forward's matrix products reach.
    pub compute: f64,
    /// Share of peak memory bandwidth a forward's weight and KV reads reach.
    pub bandwidth: f64,
    /// Seconds each forward costs beyond its roofline time (a CUDA-graph launch and the small
    /// kernels around it: sampling, top-k, cache bookkeeping).
    pub forward_overhead_s: f64,
    /// Host work (scheduling, acceptance bookkeeping) a speculative round exposes, as a share
    /// of one plain decoding step: engines overlap it with the GPU in plain decoding but not
    /// between a draft and its verification.
    pub round_host_share: f64,
}

impl Default for Efficiency {
    fn default() -> Self {
        Efficiency {
            compute: 0.6,
            bandwidth: 0.8,
            forward_overhead_s: 30e-6,
            round_host_share: 0.10,
        }
    }
}

impl Efficiency {
    fn check(&self) -> Result<(), PredictError> {
        for (what, v) in [
            ("compute efficiency", self.compute),
            ("bandwidth efficiency", self.bandwidth),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(invalid(what, format!("takes a share in (0, 1], not {v}")));
            }
        }
        for (what, v) in [
            ("forward overhead", self.forward_overhead_s),
            ("round host share", self.round_host_share),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(invalid(what, format!("takes a number >= 0, not {v}")));
            }
        }
        Ok(())
    }
}

/// The load: concurrent sequences, their mean context and the GPUs one model is split over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serving {
    /// Sequences decoded together (each forward runs all of them).
    pub batch: i64,
    /// Mean tokens of context each sequence attends to (prompt and answer so far).
    pub context: i64,
    /// GPUs the target and the draft are split over by tensor parallelism: weights, KV cache
    /// and FLOPs divide among them; the all-reduces between them are not modelled.
    pub tensor_parallel: i64,
}

impl Serving {
    fn check(&self) -> Result<(), PredictError> {
        if self.batch < 1 {
            return Err(invalid(
                "batch",
                format!("takes a whole number >= 1, not {}", self.batch),
            ));
        }
        if self.context < 0 {
            return Err(invalid(
                "context",
                format!("takes a whole number >= 0, not {}", self.context),
            ));
        }
        if self.tensor_parallel < 1 {
            return Err(invalid(
                "tensor parallel",
                format!("takes a whole number >= 1, not {}", self.tensor_parallel),
            ));
        }
        Ok(())
    }
}

/// One forward's roofline terms, seconds: (compute time, memory time), without the overhead.
fn roofline(m: &ModelShape, tokens_per_seq: f64, serving: &Serving, gpu: &Gpu, eff: &Efficiency) -> (f64, f64) {
    let batch = serving.batch as f64;
    let context = serving.context as f64;
    let tp = serving.tensor_parallel as f64;
    let tokens = batch * tokens_per_seq;
    let attention_flops = 4.0 * tokens * context * m.layers as f64 * m.q_dim as f64;
    let flops = 2.0 * m.weight_params * tokens + attention_flops;
    let kv_bytes = batch * context * m.layers as f64 * 2.0 * m.kv_heads as f64 * m.head_dim as f64 * BYTES_PER_VALUE;
    let bytes = m.weight_params * BYTES_PER_VALUE + kv_bytes;
    (
        flops / tp / (gpu.bf16_flops * eff.compute),
        bytes / tp / (gpu.bandwidth * eff.bandwidth),
    )
}

/// One forward's time, seconds: the larger roofline term plus the per-forward overhead.
fn forward_s(m: &ModelShape, tokens_per_seq: f64, serving: &Serving, gpu: &Gpu, eff: &Efficiency) -> f64 {
    let (compute, memory) = roofline(m, tokens_per_seq, serving, gpu, eff);
    compute.max(memory) + eff.forward_overhead_s
}

/// bf16: two bytes per weight and per cached key or value.
pub const BYTES_PER_VALUE: f64 = 2.0;

/// A predicted speculative round against plain decoding on one GPU and load.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// One plain decoding step (one token per sequence), seconds.
    pub plain_step_s: f64,
    /// The draft's forwards of one round, seconds.
    pub draft_s: f64,
    /// The target's verification forward, seconds.
    pub verify_s: f64,
    /// Host work the round exposes, seconds.
    pub host_s: f64,
    /// Tokens per second over the batch: plain decoding and speculative decoding.
    pub plain_tokens_per_s: f64,
    pub tokens_per_s: f64,
    /// `tokens_per_s / plain_tokens_per_s`.
    pub speedup: f64,
    /// Whether the verification forward is limited by compute rather than memory.
    pub verify_compute_bound: bool,
}

impl Prediction {
    /// draft + verification + host time of one round, seconds.
    pub fn round_s(&self) -> f64 {
        self.draft_s + self.verify_s + self.host_s
    }
}

/// Predicts the speedup of a draft with mean acceptance length `tau` (tokens emitted per
/// verification forward, bonus included) under `setting` on `gpu`.
pub fn predict(
    target: &ModelShape,
    draft: &DraftShape,
    setting: &Setting,
    tau: f64,
    gpu: &Gpu,
    serving: &Serving,
    eff: &Efficiency,
) -> Result<Prediction, PredictError> {
    serving.check()?;
    eff.check()?;
    setting.check().map_err(|message| PredictError::Setting {
        text: setting.to_string(),
        message,
    })?;
    let max_tau = f64::from(setting.max_tau());
    if !(tau >= 1.0 && tau <= max_tau) {
        return Err(invalid(
            "tau",
            format!("{tau} is outside [1, {max_tau}]: {setting} emits at most {max_tau} tokens per round"),
        ));
    }
    if !(draft.weight_params >= 0.0 && target.weight_params > 0.0) {
        return Err(invalid("model shape", "weight parameter counts must be positive"));
    }
    let plain_step_s = forward_s(target, 1.0, serving, gpu, eff);
    let draft_model = draft.model();
    let draft_s: f64 = setting
        .draft_forwards(tau)
        .iter()
        .map(|&tokens| forward_s(&draft_model, tokens, serving, gpu, eff))
        .sum();
    let verify_tokens = f64::from(setting.verify_tokens());
    let verify_s = forward_s(target, verify_tokens, serving, gpu, eff);
    let (verify_compute, verify_memory) = roofline(target, verify_tokens, serving, gpu, eff);
    let host_s = eff.round_host_share * plain_step_s;
    let batch = serving.batch as f64;
    let plain_tokens_per_s = batch / plain_step_s;
    let tokens_per_s = batch * tau / (draft_s + verify_s + host_s);
    Ok(Prediction {
        plain_step_s,
        draft_s,
        verify_s,
        host_s,
        plain_tokens_per_s,
        tokens_per_s,
        speedup: tokens_per_s / plain_tokens_per_s,
        verify_compute_bound: verify_compute > verify_memory,
    })
}

#[cfg(test)]
mod tests;
