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
pub mod tp;

pub use attention::{Attention, AttentionConfig, AttnMask, Keys, LayerKv, TttKv};
pub use decoder::{DecoderLayer, DecoderLayerConfig};
pub use mlp::Mlp;
pub use norm::RmsNorm;
pub use rotary::{RopeScaling, Rotary};
pub use tp::{TensorParallel, TpComm};

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
    let xc = if x.kind() == compute {
        x.shallow_clone()
    } else {
        x.to_kind(compute)
    };
    if w.kind() == compute {
        xc.matmul(&w.tr())
    } else {
        xc.matmul(&w.to_kind(compute).tr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn linear_casts_weights_and_input_to_its_compute_kind_only_where_needed() {
        let vs = nn::VarStore::new(Device::Cpu);
        let l32 = linear(vs.root() / "a", 8, 4, true, ParamInit::Default, Kind::Float);
        let x = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        // fp32 everywhere: exactly x W^T + b
        let want = x.matmul(&l32.ws.tr()) + l32.bs.as_ref().expect("bias");
        let got = l32.forward(&x);
        assert!((&got - &want).abs().max().double_value(&[]) < 1e-6);
        // bf16 compute over the same fp32 masters: bf16 out, weights untouched
        let l16 = Linear::from_weights(
            l32.ws.shallow_clone(),
            l32.bs.as_ref().map(|b| b.shallow_clone()),
            Kind::BFloat16,
        );
        let y = l16.forward(&x);
        assert_eq!(y.kind(), Kind::BFloat16);
        assert_eq!(l16.ws.kind(), Kind::Float);
        let manual = x.to_kind(Kind::BFloat16).linear(
            &l32.ws.to_kind(Kind::BFloat16),
            l32.bs.as_ref().map(|b| b.to_kind(Kind::BFloat16)).as_ref(),
        );
        assert!(y.equal(&manual));
        // the projection helper agrees with a bias-free linear
        assert!(project(&x, &l32.ws, Kind::Float).equal(&x.linear::<Tensor>(&l32.ws, None)));
    }

    #[test]
    fn rms_norm_computes_in_fp32_and_returns_the_input_kind() {
        let vs = nn::VarStore::new(Device::Cpu);
        let n = RmsNorm::new(vs.root() / "n", 6, 1e-6, ParamInit::Default);
        tch::no_grad(|| {
            n.weight
                .shallow_clone()
                .copy_(&Tensor::from_slice(&[0.55f32, 1.13, 1.57, 2.21, -0.93, 3.07]))
        });
        let x = Tensor::from_slice(&[1.0f32, -2.0, 3.0, 0.5, 0.0, 4.0]).view([1, 6]);
        let ms: f64 = [1.0f64, 4.0, 9.0, 0.25, 0.0, 16.0].iter().sum::<f64>() / 6.0;
        let w = [0.55, 1.13, 1.57, 2.21, -0.93, 3.07];
        let xs = [1.0, -2.0, 3.0, 0.5, 0.0, 4.0];
        let got = n.forward(&x);
        for i in 0..6 {
            let want = xs[i] / (ms + 1e-6).sqrt() * w[i];
            assert!((got.double_value(&[0, i as i64]) - want).abs() < 1e-5, "element {i}");
        }
        let y = n.forward(&x.to_kind(Kind::BFloat16));
        assert_eq!(y.kind(), Kind::BFloat16);
        // bf16 in, fp32 (master) weight: normalised and scaled in fp32, rounded once to bf16
        let normed = &x * (x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + 1e-6).rsqrt();
        assert!(y.equal(&(&normed * &n.weight).to_kind(Kind::BFloat16)));
        // (which is not what rounding twice gives here)
        assert!(!y.equal(&(normed.to_kind(Kind::BFloat16) * n.weight.to_kind(Kind::BFloat16))));
        // bf16 in, bf16 weight (a target stored in bf16): rounded to bf16, then scaled in bf16
        let vs16 = nn::VarStore::new(Device::Cpu);
        let mut n16 = RmsNorm::new(vs16.root() / "n", 6, 1e-6, ParamInit::Default);
        n16.weight = n.weight.detach().to_kind(Kind::BFloat16);
        let y16 = n16.forward(&x.to_kind(Kind::BFloat16));
        assert_eq!(y16.kind(), Kind::BFloat16);
        assert!(y16.equal(&(normed.to_kind(Kind::BFloat16) * &n16.weight)));
    }
}
