use super::{Attention, AttentionConfig, AttnMask, Keys, Mlp, ParamInit, RmsNorm};
use tch::{nn, Kind, Tensor};

/// A pre-norm Llama decoder layer: h = residual + attn(attention input), then
/// h + mlp(post_attention_layernorm(h)). The one decoder block of forge: the target's layers,
/// EAGLE-1's draft layer and EAGLE-3's midlayer are all this struct.
///
/// In the plain form ([`DecoderLayer::forward`]) the residual is the input `x` and the
/// attention input is `input_layernorm(x)` (or `x` itself without an input norm: EAGLE-1's
/// layer 0). [`DecoderLayer::forward_split`] takes the two separately: EAGLE-3's midlayer
/// attends over `cat(input_layernorm(embed), hidden_norm(h))`, 2h wide, with `h` as residual.
#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: Option<RmsNorm>,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

pub struct DecoderLayerConfig {
    pub attn: AttentionConfig,
    pub intermediate: i64,
    pub mlp_bias: bool,
    pub eps: f64,
    pub input_norm: bool,
    /// The kind every projection computes in (see `layers::Linear`).
    pub compute: Kind,
}

impl DecoderLayer {
    pub fn new(p: nn::Path, cfg: DecoderLayerConfig, init: ParamInit) -> Self {
        let hidden = cfg.attn.out_dim;
        let input_layernorm = cfg
            .input_norm
            .then(|| RmsNorm::new(&p / "input_layernorm", cfg.attn.in_dim, cfg.eps, init));
        let self_attn = Attention::new(&p / "self_attn", cfg.attn, init, cfg.compute);
        let post_attention_layernorm =
            RmsNorm::new(&p / "post_attention_layernorm", hidden, cfg.eps, init);
        let mlp = Mlp::new(&p / "mlp", hidden, cfg.intermediate, cfg.mlp_bias, init, cfg.compute);
        Self {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp,
        }
    }

    /// `x` `[B, T, H]` through the layer; RoPE `cos`/`sin` for its positions.
    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &AttnMask, keys: Keys) -> Tensor {
        let normed = match &self.input_layernorm {
            Some(n) => n.forward(x),
            None => x.shallow_clone(),
        };
        self.forward_split(x, &normed, cos, sin, mask, keys)
    }

    /// The layer with its residual stream and its attention input given separately.
    pub fn forward_split(
        &self,
        residual: &Tensor,
        attn_input: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        keys: Keys,
    ) -> Tensor {
        let h = residual + self.self_attn.forward(attn_input, cos, sin, mask, keys);
        let out = self.mlp.forward(&self.post_attention_layernorm.forward(&h));
        h + out
    }
}
