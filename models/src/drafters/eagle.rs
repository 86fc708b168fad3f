//! Pieces shared by EAGLE-1 (`eagle1.rs`) and EAGLE-3 (`eagle3.rs`): the draft decoder
//! layer's shape (defaults from the target, recipe overrides), compute-kind casts of fp32
//! master weights (autocast-style), the Llama `config.json` an engine reads, and soft
//! cross-entropy against the target distribution.

use crate::error::{ModelError, Result};
use crate::layers::attention::build_mask;
use crate::layers::{AttentionConfig, DecoderLayerConfig, LayerKv, RmsNorm, RopeScaling};
use crate::target::TargetConfig;
use tch::{nn, nn::Module, Kind, Tensor};

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
        let kv = num_kv_heads.unwrap_or(if heads % cfg.num_kv_heads == 0 { cfg.num_kv_heads } else { heads });
        let head_dim = if num_heads.is_none() && hidden_size.is_none() { cfg.head_dim } else { hidden / heads.max(1) };
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

    /// The decoder-layer config with attention input width `in_dim`; no input_layernorm
    /// (EAGLE-1 has none; EAGLE-3 creates its own two norms).
    pub fn layer_config(&self, in_dim: i64) -> DecoderLayerConfig {
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
            },
            intermediate: self.intermediate_size,
            mlp_bias: false,
            eps: self.rms_norm_eps,
            input_norm: false,
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
        for key in ["bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "rope_scaling"] {
            if let Some(v) = target_config.get(key) {
                if !v.is_null() {
                    c[key] = v.clone();
                }
            }
        }
        c
    }
}

/// `x @ l.weight^T + bias` in `kind` (weights are fp32 masters).
pub(crate) fn lin(l: &nn::Linear, x: &Tensor, kind: Kind) -> Tensor {
    if kind == Kind::Float && x.kind() == Kind::Float {
        l.forward(x)
    } else {
        let b = l.bs.as_ref().map(|b| b.to_kind(kind));
        x.to_kind(kind).linear(&l.ws.to_kind(kind), b.as_ref())
    }
}

/// RMSNorm computed in fp32, returned in `kind`.
pub(crate) fn rms(n: &RmsNorm, x: &Tensor, kind: Kind) -> Tensor {
    let xf = x.to_kind(Kind::Float);
    let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    ((xf * (var + n.eps).rsqrt()) * &n.weight).to_kind(kind)
}

/// `[B, kvh, T, d]` -> `[B, kvh * rep, T, d]` (HF `repeat_kv`).
pub(crate) fn repeat_kv(x: &Tensor, rep: i64) -> Tensor {
    if rep == 1 {
        return x.shallow_clone();
    }
    let s = x.size();
    x.unsqueeze(2)
        .expand([s[0], s[1], rep, s[2], s[3]], false)
        .reshape([s[0], s[1] * rep, s[2], s[3]])
}

/// Scaled-dot-product attention of `q` `[B, nh, T, d]` over keys/values `[B, kvh, T, d]`,
/// returned as `[B, T, nh * d]`. Without a cache, `mask` (`[B, 1, T, T]`, true = attend)
/// applies; with one, the new keys/values are appended to it and the queries attend causally
/// over everything cached (decoding).
pub(crate) fn attend(q: &Tensor, k: &Tensor, v: &Tensor, cache: Option<&mut LayerKv>, mask: Option<&Tensor>) -> Tensor {
    let s = q.size();
    let (b, nh, t, d) = (s[0], s[1], s[2], s[3]);
    let rep = nh / k.size()[1];
    let (k, v, mask) = match cache {
        Some(c) => {
            let past = c.len();
            let (k, v) = c.append(k, v);
            let m = (t > 1).then(|| build_mask(b, past, t, None, None, q.device()));
            (k, v, m)
        }
        None => (k.shallow_clone(), v.shallow_clone(), mask.map(|m| m.shallow_clone())),
    };
    let (k, v) = (repeat_kv(&k, rep), repeat_kv(&v, rep));
    Tensor::scaled_dot_product_attention(q, &k, &v, mask.as_ref(), 0.0, false, None, false)
        .transpose(1, 2)
        .reshape([b, t, nh * d])
}

/// Soft cross-entropy `-sum p log softmax(logits)` averaged over rows, and the rows where the
/// arg-maxes agree. `logits` and `p` are `[N, V]`.
pub(crate) fn soft_ce_and_hits(logits: &Tensor, p: &Tensor) -> (Tensor, f64) {
    let logp = logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
    let ce = -(p * logp).sum_dim_intlist(-1, false, Kind::Float).mean(Kind::Float);
    let hits = tch::no_grad(|| {
        logits
            .argmax(-1, false)
            .eq_tensor(&p.argmax(-1, false))
            .sum(Kind::Float)
            .double_value(&[])
    });
    (ce, hits)
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
    Tensor::cat(&[x.narrow(1, k, t - k), Tensor::zeros(&pad_shape, (x.kind(), x.device()))], 1)
}

/// Row indices `[N]` of a `[B, T]` mask, flattened.
pub(crate) fn rows(mask: &Tensor) -> Tensor {
    mask.reshape([-1]).nonzero().squeeze_dim(-1)
}
