use super::{linear, Linear, ParamInit};
use tch::{nn, Kind, Tensor};

/// SwiGLU MLP: down(silu(gate(x)) * up(x)).
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn new(p: nn::Path, hidden: i64, intermediate: i64, bias: bool, init: ParamInit, compute: Kind) -> Self {
        Self {
            gate_proj: linear(&p / "gate_proj", hidden, intermediate, bias, init, compute),
            up_proj: linear(&p / "up_proj", hidden, intermediate, bias, init, compute),
            down_proj: linear(&p / "down_proj", intermediate, hidden, bias, init, compute),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj
            .forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}
