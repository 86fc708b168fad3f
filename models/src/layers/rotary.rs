use tch::{Device, Kind, Tensor};

/// RoPE frequency scaling from HF `rope_scaling` / `rope_parameters` (serialised in drafter
/// specs as `{"rope_type": "none" | "linear" | "llama3" | "yarn", ...}`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    None,
    /// positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.x wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN (Peng et al. 2023) as transformers computes it: frequencies interpolated by
    /// `factor` below the correction range given by `beta_fast` / `beta_slow` rotations over
    /// the original context, kept above it, a linear ramp between; cos and sin are multiplied
    /// by `attention_factor` (resolved from `mscale` when the config gives none).
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
}

/// Rotary position embedding (HF "rotate_half" layout).
#[derive(Debug)]
pub struct Rotary {
    inv_freq: Tensor,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    attention_scaling: f64,
    pub head_dim: i64,
}

impl Rotary {
    pub fn new(head_dim: i64, theta: f64, scaling: &RopeScaling, device: Device) -> Self {
        let half = head_dim / 2;
        let mut freqs: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        let mut attention_scaling = 1.0;
        match *scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => freqs.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in freqs.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen < high_wavelen {
                        // high frequency: unchanged
                    } else if wavelen > low_wavelen {
                        *f /= factor;
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: old,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                let d = head_dim as f64;
                // the dimension whose wavelength makes `rotations` turns over the old context
                let dim_of =
                    |rotations: f64| d * (old / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
                let (mut low, mut high) = (dim_of(beta_fast), dim_of(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, high) = (low.max(0.0), high.min(d - 1.0));
                let span = if low == high { 0.001 } else { high - low };
                for (i, f) in freqs.iter_mut().enumerate() {
                    let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    *f = *f / factor * (1.0 - extrapolation) + *f * extrapolation;
                }
                attention_scaling = attention_factor;
            }
        }
        let freqs: Vec<f32> = freqs.into_iter().map(|f| f as f32).collect();
        Self {
            inv_freq: Tensor::from_slice(&freqs).to_device(device),
            attention_scaling,
            head_dim,
        }
    }

    /// cos and sin for integer positions `[B, T]`, shaped `[B, 1, T, head_dim]` in `kind`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let pos = positions.to_kind(Kind::Float).unsqueeze(-1); // [B,T,1]
        let ang = pos * self.inv_freq.view([1, 1, -1]); // [B,T,half]
        let emb = Tensor::cat(&[&ang, &ang], -1).unsqueeze(1); // [B,1,T,d]
        if self.attention_scaling == 1.0 {
            return (emb.cos().to_kind(kind), emb.sin().to_kind(kind));
        }
        let a = self.attention_scaling;
        ((emb.cos() * a).to_kind(kind), (emb.sin() * a).to_kind(kind))
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    Tensor::cat(&[&x2.neg(), &x1], 3)
}

/// Applies RoPE to `[B, heads, T, d]` with cos/sin from [`Rotary::cos_sin`].
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    x * cos + rotate_half(x) * sin
}
