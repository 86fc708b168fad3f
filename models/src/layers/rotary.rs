use tch::{Device, Kind, Tensor};

/// RoPE frequency scaling from HF `rope_scaling` (serialised in drafter specs as
/// `{"rope_type": "none" | "linear" | "llama3", ...}`).
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
}

/// Rotary position embedding (HF "rotate_half" layout).
#[derive(Debug)]
pub struct Rotary {
    inv_freq: Tensor,
    pub head_dim: i64,
}

impl Rotary {
    pub fn new(head_dim: i64, theta: f64, scaling: &RopeScaling, device: Device) -> Self {
        let half = head_dim / 2;
        let mut freqs: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
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
        }
        let freqs: Vec<f32> = freqs.into_iter().map(|f| f as f32).collect();
        Self {
            inv_freq: Tensor::from_slice(&freqs).to_device(device),
            head_dim,
        }
    }

    /// cos and sin for integer positions `[B, T]`, shaped `[B, 1, T, head_dim]` in `kind`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let pos = positions.to_kind(Kind::Float).unsqueeze(-1); // [B,T,1]
        let ang = pos * self.inv_freq.view([1, 1, -1]); // [B,T,half]
        let emb = Tensor::cat(&[&ang, &ang], -1).unsqueeze(1); // [B,1,T,d]
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
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
