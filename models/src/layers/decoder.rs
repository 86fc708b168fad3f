use super::{Attention, AttentionConfig, AttnMask, LayerKv, Mlp, ParamInit, RmsNorm};
use tch::{nn, Tensor};

/// A pre-norm Llama decoder layer: x + attn(norm(x)), then + mlp(norm(.)).
/// `input_layernorm` is optional because EAGLE-1's layer 0 has none.
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
}

impl DecoderLayer {
    pub fn new(p: nn::Path, cfg: DecoderLayerConfig, init: ParamInit) -> Self {
        let hidden = cfg.attn.out_dim;
        let input_layernorm = cfg
            .input_norm
            .then(|| RmsNorm::new(&p / "input_layernorm", cfg.attn.in_dim, cfg.eps, init));
        let self_attn = Attention::new(&p / "self_attn", cfg.attn, init);
        let post_attention_layernorm =
            RmsNorm::new(&p / "post_attention_layernorm", hidden, cfg.eps, init);
        let mlp = Mlp::new(&p / "mlp", hidden, cfg.intermediate, cfg.mlp_bias, init);
        Self {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp,
        }
    }

    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        cache: Option<&mut LayerKv>,
    ) -> Tensor {
        let normed = match &self.input_layernorm {
            Some(n) => n.forward(x),
            None => x.shallow_clone(),
        };
        let h = x + self.self_attn.forward(&normed, cos, sin, mask, cache);
        let out = self.mlp.forward(&self.post_attention_layernorm.forward(&h));
        h + out
    }
}
