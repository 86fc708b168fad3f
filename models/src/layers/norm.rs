use super::ParamInit;
use tch::{nn, Kind, Tensor};

/// RMSNorm as in HF Llama/Qwen: the normalisation is computed in fp32 and cast back to the
/// input's kind, then scaled by `weight` (cast to that kind when it is another, e.g. fp32
/// master weights in a bf16 draft). The one norm of forge: targets and drafters use it.
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
        if self.weight.kind() == kind {
            normed * &self.weight
        } else {
            normed * self.weight.to_kind(kind)
        }
    }
}
