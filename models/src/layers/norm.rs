use super::ParamInit;
use tch::{nn, Kind, Tensor};

/// RMSNorm as in HF Llama/Qwen: computed in fp32, cast back, then scaled by `weight`.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64, _init: ParamInit) -> Self {
        // RMSNorm weights start at one whether trained or loaded.
        let weight = p.var("weight", &[dim], nn::Init::Const(1.));
        Self { weight, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = (xf * (var + self.eps).rsqrt()).to_kind(kind);
        normed * &self.weight
    }
}
