use super::ParamInit;
use tch::{nn, Kind, Tensor};

/// RMSNorm as in HF Llama/Qwen: the normalisation is computed in fp32. A weight stored in
/// the input's kind (a target) scales the normalised input cast back to that kind, as HF
/// does; fp32 master weights (a drafter computing in bf16) scale it in fp32 and the product
/// is rounded once to the input's kind. The one norm of forge: targets and drafters use it.
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
        let normed = xf * (var + self.eps).rsqrt();
        match self.weight.kind() {
            // a model stored in the compute kind (the target): round, then scale, as HF does
            w if w == kind => normed.to_kind(kind) * &self.weight,
            // fp32 master weights (drafters) under a lower compute kind: scale in fp32, round once
            Kind::Float => (normed * &self.weight).to_kind(kind),
            _ => normed.to_kind(kind) * self.weight.to_kind(kind),
        }
    }
}
