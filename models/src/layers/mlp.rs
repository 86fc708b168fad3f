use super::{linear, ParamInit};
use tch::{nn, nn::Module, Tensor};

/// SwiGLU MLP: down(silu(gate(x)) * up(x)).
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: nn::Linear,
    pub up_proj: nn::Linear,
    pub down_proj: nn::Linear,
}

impl Mlp {
    pub fn new(p: nn::Path, hidden: i64, intermediate: i64, bias: bool, init: ParamInit) -> Self {
        Self {
            gate_proj: linear(&p / "gate_proj", hidden, intermediate, bias, init),
            up_proj: linear(&p / "up_proj", hidden, intermediate, bias, init),
            down_proj: linear(&p / "down_proj", intermediate, hidden, bias, init),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj
            .forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}
