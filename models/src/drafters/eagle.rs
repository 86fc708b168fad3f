//! Pieces shared by EAGLE-1 (`eagle1.rs`) and EAGLE-3 (`eagle3.rs`): the draft decoder
//! layer's shape (defaults from the target, recipe overrides), what they take from the
//! target (its frozen embedding and lm_head), the Llama `config.json` an engine reads, and
//! soft cross-entropy against the target distribution. Methods: docs/methods/eagle1.md and
//! docs/methods/eagle3.md.

use super::{TargetAccess, TargetNeeds, EMBED, LM_HEAD};
use crate::error::{ModelError, Result};
use crate::layers::{AttentionConfig, DecoderLayerConfig, RopeScaling};
use crate::llm::TargetConfig;
use tch::{Device, Kind, Tensor};

/// EAGLE drafters read the target's embedding and lm_head (frozen, shared, never saved).
pub fn target_needs() -> TargetNeeds {
    TargetNeeds::Tensors(vec![LM_HEAD.into(), EMBED.into()])
}

/// A frozen target matrix `[rows, cols]` (`name` from `target`) on `device` in `compute`.
pub(crate) fn frozen(
    target: &TargetAccess,
    name: &str,
    shape: [i64; 2],
    device: Device,
    compute: Kind,
    who: &str,
) -> Result<Tensor> {
    let w = target.require(name, who)?;
    if w.size() != shape {
        return Err(ModelError::Invalid(format!(
            "{who}: the target's {name} is {:?}, expected {shape:?} (the draft's hidden size is the target's)",
            w.size()
        )));
    }
    // the target's own tensor when it already is on `device` in the compute kind (no copy);
    // otherwise cast once, here (a direct cast rounds as through fp32 would)
    Ok(w.detach().to_device(device).to_kind(compute))
}

/// Shape of the one draft decoder layer (Llama layout, no biases).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DraftLayerSpec {
    pub hidden_size: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub intermediate_size: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// `null` (as HF configs write "no scaling") reads as `RopeScaling::None`.
    #[serde(deserialize_with = "rope_scaling_or_null")]
    pub rope_scaling: RopeScaling,
}

fn rope_scaling_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<RopeScaling, D::Error> {
    Ok(<Option<RopeScaling> as serde::Deserialize>::deserialize(d)?.unwrap_or(RopeScaling::None))
}

impl DraftLayerSpec {
    /// The target's dimensions, with optional overrides (recipe fields). The head dimension
    /// is the target's unless the head count is overridden (then hidden / heads).
    pub fn from_target(
        cfg: &TargetConfig,
        hidden_size: Option<i64>,
        num_heads: Option<i64>,
        num_kv_heads: Option<i64>,
        intermediate_size: Option<i64>,
    ) -> Result<Self> {
        let hidden = hidden_size.unwrap_or(cfg.hidden_size);
        let heads = num_heads.unwrap_or(cfg.num_heads);
        // the target's KV heads unless they do not divide an overridden head count
        let kv = num_kv_heads.unwrap_or(if heads % cfg.num_kv_heads == 0 {
            cfg.num_kv_heads
        } else {
            heads
        });
        let head_dim = if num_heads.is_none() && hidden_size.is_none() {
            cfg.head_dim
        } else {
            hidden / heads.max(1)
        };
        let s = Self {
            hidden_size: hidden,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            intermediate_size: intermediate_size.unwrap_or(cfg.intermediate_size),
            rms_norm_eps: cfg.rms_norm_eps,
            rope_theta: cfg.rope_theta,
            rope_scaling: cfg.rope_scaling.clone(),
        };
        s.validate()?;
        Ok(s)
    }

    /// The draft layer an engine builds from an engine draft's own Llama config.json
    /// (`file` names it in errors).
    pub fn from_engine_config(cfg: &serde_json::Value, file: &std::path::Path) -> Result<Self> {
        let c = TargetConfig::from_value(cfg.clone()).map_err(|msg| ModelError::Config {
            path: file.to_path_buf(),
            msg,
        })?;
        let l = Self {
            hidden_size: c.hidden_size,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            intermediate_size: c.intermediate_size,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            rope_scaling: c.rope_scaling,
        };
        l.validate()?;
        Ok(l)
    }

    pub fn validate(&self) -> Result<()> {
        let ok = self.hidden_size > 0
            && self.num_heads > 0
            && self.num_kv_heads > 0
            && self.num_heads % self.num_kv_heads == 0
            && self.head_dim > 0
            && self.head_dim % 2 == 0
            && self.intermediate_size > 0;
        if ok {
            Ok(())
        } else {
            Err(ModelError::Invalid(format!(
                "draft layer: hidden_size {}, num_heads {}, num_kv_heads {}, head_dim {}, intermediate_size {} do not make a valid layer (heads must divide evenly into kv heads, head_dim even)",
                self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
            )))
        }
    }

    /// MACs per position of the layer's matrices (q/k/v over an `in_dim`-wide attention
    /// input, o_proj, the MLP); attention's products apart ([`DraftLayerSpec::attention_macs`]).
    pub fn layer_macs(&self, in_dim: i64) -> f64 {
        super::decoder_layer_macs(
            in_dim,
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
        )
    }

    /// MACs per query of the layer's attention products (Q·K^T and A·V) over `keys` keys.
    pub fn attention_macs(&self, keys: f64) -> f64 {
        super::attention_macs(self.num_heads, self.head_dim, keys)
    }

    /// The decoder-layer config with attention input width `in_dim`; no input_layernorm
    /// (EAGLE-1 has none; EAGLE-3 creates its own two norms).
    pub fn layer_config(&self, in_dim: i64, compute: Kind) -> DecoderLayerConfig {
        DecoderLayerConfig {
            attn: AttentionConfig {
                in_dim,
                out_dim: self.hidden_size,
                num_heads: self.num_heads,
                num_kv_heads: self.num_kv_heads,
                head_dim: self.head_dim,
                qkv_bias: false,
                o_bias: false,
                qk_norm_eps: None,
                repeat_kv: true,
            },
            intermediate: self.intermediate_size,
            mlp_bias: false,
            eps: self.rms_norm_eps,
            input_norm: false,
            compute,
        }
    }

    /// Llama `config.json` fields of the draft (one layer), with the target's token ids,
    /// context length and activation copied from its config.
    pub fn llama_config(&self, architecture: &str, target_config: &serde_json::Value) -> serde_json::Value {
        let mut c = serde_json::json!({
            "architectures": [architecture],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": false,
        });
        for key in [
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "max_position_embeddings",
            "rope_scaling",
            // transformers v5 targets keep theta and scaling here (read by the same loaders)
            "rope_parameters",
        ] {
            if let Some(v) = target_config.get(key) {
                if !v.is_null() {
                    c[key] = v.clone();
                }
            }
        }
        c
    }
}

/// Soft cross-entropy `-sum p log softmax(logits)` averaged over rows, and the rows where the
/// arg-maxes agree. `logits` and `p` are `[N, V]`.
pub(crate) fn soft_ce_and_hits(logits: &Tensor, p: &Tensor) -> (Tensor, f64) {
    let ce = soft_ce(logits, p);
    let hits = tch::no_grad(|| {
        logits
            .argmax(-1, false)
            .eq_tensor(&p.argmax(-1, false))
            .sum(Kind::Float)
            .double_value(&[])
    });
    (ce, hits)
}

/// The mean over rows of the cross-entropy of `logits` `[N, V]` against the distributions
/// `p` `[N, V]` (fp32).
pub(crate) fn soft_ce(logits: &Tensor, p: &Tensor) -> Tensor {
    let logp = logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
    -(p * logp).sum_dim_intlist(-1, false, Kind::Float).mean(Kind::Float)
}

/// Shifts `[B, T, ..]` left by `k` along dim 1, filling the end with zeros.
pub(crate) fn shift_left(x: &Tensor, k: i64) -> Tensor {
    let t = x.size()[1];
    if k == 0 {
        return x.shallow_clone();
    }
    if k >= t {
        return x.zeros_like();
    }
    let mut pad_shape = x.size();
    pad_shape[1] = k;
    Tensor::cat(
        &[x.narrow(1, k, t - k), Tensor::zeros(&pad_shape, (x.kind(), x.device()))],
        1,
    )
}

/// Row indices `[N]` of a `[B, T]` mask, flattened.
pub(crate) fn rows(mask: &Tensor) -> Tensor {
    mask.reshape([-1]).nonzero().squeeze_dim(-1)
}
