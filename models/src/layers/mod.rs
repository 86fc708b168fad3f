//! Layers shared by target models and drafters. Every layer creates its weights under the
//! `nn::Path` it is given, with Hugging Face names, so weights load and export name-for-name.

pub mod attention;
pub mod decoder;
pub mod mlp;
pub mod norm;
pub mod rotary;

pub use attention::{Attention, AttentionConfig, AttnMask, LayerKv};
pub use decoder::{DecoderLayer, DecoderLayerConfig};
pub use mlp::Mlp;
pub use norm::RmsNorm;
pub use rotary::{RopeScaling, Rotary};

use tch::nn;

/// How new parameters are initialised. Models whose weights are loaded right after
/// construction use `Zeros` (cheap); trainable modules use `Default` (tch's Kaiming/uniform).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamInit {
    Default,
    Zeros,
}

/// A linear layer with HF names `weight` [out, in] and optional `bias` [out].
pub fn linear(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool, init: ParamInit) -> nn::Linear {
    let cfg = match init {
        ParamInit::Default => nn::LinearConfig {
            bias,
            ..Default::default()
        },
        ParamInit::Zeros => nn::LinearConfig {
            ws_init: nn::Init::Const(0.),
            bs_init: Some(nn::Init::Const(0.)),
            bias,
        },
    };
    nn::linear(p, in_dim, out_dim, cfg)
}
