//! Layers shared by target models and drafters. Every layer creates its weights under the
//! `nn::Path` it is given, with Hugging Face names, so weights load and export name-for-name.
//!
//! Precision lives at the leaves: a [`Linear`] knows its compute kind (fixed when it is built)
//! and casts its weights (fp32 masters in drafters, the stored kind in targets) and its input
//! to that kind where it is used; [`RmsNorm`] computes in fp32 and returns its input's kind.
//! A module built for one compute kind therefore never needs re-casting afterwards.

pub mod attention;
pub mod decoder;
pub mod mlp;
pub mod norm;
pub mod rotary;

pub use attention::{Attention, AttentionConfig, AttnMask, Keys, LayerKv, TttKv};
pub use decoder::{DecoderLayer, DecoderLayerConfig};
pub use mlp::Mlp;
pub use norm::RmsNorm;
pub use rotary::{RopeScaling, Rotary};

use tch::{nn, Kind, Tensor};

/// How new parameters are initialised. Models whose weights are loaded right after
/// construction use `Zeros` (cheap); trainable modules use `Default` (tch's Kaiming/uniform).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamInit {
    Default,
    Zeros,
}

/// A linear layer with HF names `weight` [out, in] and optional `bias` [out], computing in
/// `compute`: `x @ weight^T + bias` with weight, bias and input cast to `compute` where they
/// are another kind (autocast-style; no copy when everything already is `compute`).
#[derive(Debug)]
pub struct Linear {
    pub ws: Tensor,
    pub bs: Option<Tensor>,
    pub compute: Kind,
}

impl Linear {
    /// Wraps existing weight (and bias) tensors.
    pub fn from_weights(ws: Tensor, bs: Option<Tensor>, compute: Kind) -> Self {
        Self { ws, bs, compute }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let c = self.compute;
        if x.kind() == c && self.ws.kind() == c && self.bs.as_ref().is_none_or(|b| b.kind() == c) {
            x.linear(&self.ws, self.bs.as_ref())
        } else {
            let b = self.bs.as_ref().map(|b| b.to_kind(c));
            x.to_kind(c).linear(&self.ws.to_kind(c), b.as_ref())
        }
    }
}

/// A [`Linear`] created under `p` (`weight`, and `bias` when asked) computing in `compute`.
pub fn linear(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool, init: ParamInit, compute: Kind) -> Linear {
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
    let l = nn::linear(p, in_dim, out_dim, cfg);
    Linear::from_weights(l.ws, l.bs, compute)
}

/// `x @ w^T` in `compute` (a bias-free projection onto a shared, frozen matrix such as the
/// target's lm_head or embedding), casting `x` and `w` where they are another kind.
pub fn project(x: &Tensor, w: &Tensor, compute: Kind) -> Tensor {
    let xc = if x.kind() == compute { x.shallow_clone() } else { x.to_kind(compute) };
    if w.kind() == compute {
        xc.matmul(&w.tr())
    } else {
        xc.matmul(&w.to_kind(compute).tr())
    }
}
