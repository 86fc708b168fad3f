use crate::error::{io_err, ModelError, Result};
use crate::layers::RopeScaling;
use serde::Deserialize;
use std::path::Path;

/// Architecture family, from `model_type` in config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3, SmolLM2, Mistral (same layer layout).
    Llama,
    Mistral,
    /// Qwen2 / Qwen2.5: bias on q/k/v projections.
    Qwen2,
    /// Qwen3: per-head RMSNorm on q and k.
    Qwen3,
}

impl Family {
    pub const MODEL_TYPES: &'static [&'static str] = &["llama", "mistral", "qwen2", "qwen3"];
}

/// The RoPE keys of config.json: transformers v5's `rope_parameters` (theta and scaling in one
/// object) or v4's `rope_scaling` (with `rope_theta` beside it).
#[derive(Debug, Clone, Deserialize)]
struct RawRope {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    attention_factor: Option<f64>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    truncate: Option<bool>,
    partial_rotary_factor: Option<f64>,
}

/// YaRN's attention scaling for a context `scale` (DeepSeek's `yarn_get_mscale`).
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// RoPE theta and scaling from either config form. Every rope type forge does not compute is
/// an error naming it (never a silent fallback); a v5 `rope_parameters` that disagrees with a
/// top-level `rope_theta` is refused.
fn rope_of(
    rope_theta: Option<f64>,
    rope_scaling: &Option<serde_json::Value>,
    rope_parameters: &Option<serde_json::Value>,
    max_position_embeddings: Option<i64>,
) -> std::result::Result<(f64, RopeScaling), String> {
    let (key, value) = match (rope_parameters, rope_scaling) {
        (Some(p), _) if !p.is_null() => ("rope_parameters", Some(p)),
        (_, Some(s)) if !s.is_null() => ("rope_scaling", Some(s)),
        _ => ("rope_scaling", None),
    };
    let Some(value) = value else {
        // transformers' own default for these families when config.json has no rope_theta
        return Ok((rope_theta.unwrap_or(10000.0), RopeScaling::None));
    };
    if key == "rope_parameters" && value.as_object().is_some_and(|o| o.values().all(|v| v.is_object())) {
        let kinds: Vec<&String> = value.as_object().map(|o| o.keys().collect()).unwrap_or_default();
        return Err(format!(
            "rope_parameters per layer type ({kinds:?}) is not supported: forge's targets use one RoPE for every layer"
        ));
    }
    let r: RawRope = serde_json::from_value(value.clone()).map_err(|e| format!("{key}: {e}"))?;
    let theta = match (key, r.rope_theta, rope_theta) {
        ("rope_parameters", Some(a), Some(b)) if a != b => {
            return Err(format!(
                "rope_parameters.rope_theta {a} disagrees with rope_theta {b}: keep one of them"
            ))
        }
        ("rope_parameters", Some(a), _) => a,
        ("rope_parameters", None, Some(b)) => b,
        ("rope_parameters", None, None) => {
            return Err("rope_parameters has no rope_theta (transformers v5 keeps the RoPE base there)".into())
        }
        (_, _, b) => b.unwrap_or(10000.0),
    };
    if let Some(f) = r.partial_rotary_factor.filter(|&f| f != 1.0) {
        return Err(format!(
            "{key}.partial_rotary_factor {f} is not supported (forge rotates every head dimension)"
        ));
    }
    let need = |v: Option<f64>, field: &str| v.ok_or_else(|| format!("{key}.{field} missing"));
    let scaling = match r.rope_type.as_deref().unwrap_or("default") {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need(r.factor, "factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need(r.factor, "factor")?,
            low_freq_factor: need(r.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(r.high_freq_factor, "high_freq_factor")?,
            // transformers 5 falls back to max_position_embeddings as well
            original_max_position_embeddings: need(
                r.original_max_position_embeddings
                    .or(max_position_embeddings.map(|m| m as f64)),
                "original_max_position_embeddings",
            )?,
        },
        "yarn" => {
            // as transformers 5: the original length from the rope keys, else
            // max_position_embeddings; without a factor, the ratio of the two lengths
            let original = r
                .original_max_position_embeddings
                .or(max_position_embeddings.map(|m| m as f64))
                .ok_or_else(|| {
                    format!("{key}.original_max_position_embeddings missing (and no max_position_embeddings)")
                })?;
            let factor = match (r.factor, max_position_embeddings) {
                (Some(f), _) => f,
                (None, Some(m)) => m as f64 / original,
                (None, None) => return Err(format!("{key}.factor missing")),
            };
            let attention_factor = match (r.attention_factor, r.mscale, r.mscale_all_dim) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(d)) if m != 0.0 && d != 0.0 => yarn_mscale(factor, m) / yarn_mscale(factor, d),
                _ => yarn_mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: r.beta_fast.unwrap_or(32.0),
                beta_slow: r.beta_slow.unwrap_or(1.0),
                attention_factor,
                truncate: r.truncate.unwrap_or(true),
            }
        }
        other => {
            return Err(format!(
                "{key}: rope_type '{other}' is not supported (forge computes default, linear, llama3 and yarn)"
            ))
        }
    };
    Ok((theta, scaling))
}

/// The fields of a HF `config.json` forge reads (unknown fields are ignored: config.json
/// files carry many fields irrelevant to the forward pass).
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    vocab_size: i64,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: bool,
    sliding_window: Option<i64>,
    use_sliding_window: Option<bool>,
    max_position_embeddings: Option<i64>,
    hidden_act: Option<String>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}

/// A validated target configuration.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub family: Family,
    pub model_type: String,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub vocab_size: i64,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub sliding_window: Option<i64>,
    pub max_position_embeddings: Option<i64>,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    /// The config.json as read, kept for exports that copy target fields.
    pub raw: serde_json::Value,
}

fn ids(v: &Option<serde_json::Value>) -> Vec<i64> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
        _ => Vec::new(),
    }
}

impl TargetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_value(value).map_err(|msg| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        })
    }

    pub fn from_value(value: serde_json::Value) -> std::result::Result<Self, String> {
        let raw: RawConfig = serde_json::from_value(value.clone()).map_err(|e| format!("unsupported config: {e}"))?;
        let model_type = raw.model_type.clone().unwrap_or_else(|| "llama".into());
        let family = match model_type.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            other => {
                return Err(format!(
                    "model_type '{other}' is not supported; forge loads {:?}",
                    Family::MODEL_TYPES
                ))
            }
        };
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(format!("hidden_act '{act}' is not supported (only silu)"));
            }
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if raw.num_attention_heads % num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                raw.num_attention_heads, num_kv_heads
            ));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
        let (rope_theta, rope_scaling) = rope_of(
            raw.rope_theta,
            &raw.rope_scaling,
            &raw.rope_parameters,
            raw.max_position_embeddings,
        )?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let sliding_window = match family {
            Family::Mistral => raw.sliding_window,
            Family::Qwen2 | Family::Qwen3 if raw.use_sliding_window == Some(true) => raw.sliding_window,
            _ => None,
        };
        Ok(TargetConfig {
            family,
            model_type,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            vocab_size: raw.vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings,
            // Qwen2 always has q/k/v bias (its config has no attention_bias key).
            qkv_bias: attention_bias || family == Family::Qwen2,
            o_bias: attention_bias,
            mlp_bias: raw.mlp_bias,
            sliding_window,
            max_position_embeddings: raw.max_position_embeddings,
            bos_token_id: ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: ids(&raw.eos_token_id),
            raw: value,
        })
    }

    /// The config of one of this target's decoder layers, computing in `compute`.
    pub fn layer_config(&self, compute: tch::Kind) -> crate::layers::DecoderLayerConfig {
        crate::layers::DecoderLayerConfig {
            attn: crate::layers::AttentionConfig {
                in_dim: self.hidden_size,
                out_dim: self.hidden_size,
                num_heads: self.num_heads,
                num_kv_heads: self.num_kv_heads,
                head_dim: self.head_dim,
                qkv_bias: self.qkv_bias,
                o_bias: self.o_bias,
                qk_norm_eps: (self.family == Family::Qwen3).then_some(self.rms_norm_eps),
                repeat_kv: false,
            },
            intermediate: self.intermediate_size,
            mlp_bias: self.mlp_bias,
            eps: self.rms_norm_eps,
            input_norm: true,
            compute,
        }
    }

    /// Parameters of the model this config describes (what [`crate::TargetModel::build`]
    /// creates): embedding, layers, final norm and, untied, the lm_head.
    pub fn num_parameters(&self) -> i64 {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let bias = |on: bool, n: i64| if on { n } else { 0 };
        let attn = h * q + 2 * h * kv + q * h + bias(self.qkv_bias, q + 2 * kv) + bias(self.o_bias, h);
        let qk_norm = if self.family == Family::Qwen3 {
            2 * self.head_dim
        } else {
            0
        };
        let mlp = 3 * h * i + bias(self.mlp_bias, 2 * i + h);
        let layer = attn + qk_norm + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + self.num_layers * layer + h + head
    }

    /// The per-rank shape of this config split `size` ways (tensor parallelism,
    /// [`crate::layers::tp`]): heads, KV heads, MLP width and vocabulary divided (what each
    /// rank's layers are built with); errors name the config field that does not divide.
    pub fn tensor_parallel_shard(&self, size: usize) -> std::result::Result<TargetConfig, String> {
        let n = size as i64;
        for (field, v) in [
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
        ] {
            if n < 1 || v % n != 0 {
                return Err(format!(
                    "target.tensor_parallel {size}: the target's {field} {v} does not divide into {size} equal parts (pick a tensor_parallel that divides it)"
                ));
            }
        }
        let mut local = self.clone();
        local.num_heads /= n;
        local.num_kv_heads /= n;
        local.intermediate_size /= n;
        local.vocab_size /= n;
        Ok(local)
    }

    /// EAGLE-3's default auxiliary layers: outputs of layers 1, L/2-1 and L-4.
    pub fn default_aux_layers(&self) -> Vec<i64> {
        let l = self.num_layers;
        vec![1, l / 2 - 1, l - 4]
    }
}
