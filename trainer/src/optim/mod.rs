//! AdamW implemented in forge (tch's `nn::Optimizer` hides its state): fp32 moment tensors
//! that checkpoints save as `exp_avg/<param>` / `exp_avg_sq/<param>` and that a sharded
//! (ZeRO) optimizer can split, since the update itself ([`adamw_update`]) works on any
//! matching tensors, flat slices included.
//!
//! Semantics are torch.optim.AdamW's (amsgrad=False, maximize=False), and so is the kernel:
//! libtorch's fused AdamW (`fused=True`), one multi-tensor kernel per parameter group that
//! updates fp32 master weights and moments in place ([`fused`]); [`adamw_update`] is the
//! same arithmetic per tensor, for the rare parameter the kernel does not take. The rules:
//! decoupled weight decay `p -= lr * wd * p` before the Adam update, bias-corrected
//! moments, `eps` added to `sqrt(v_hat)`. The drafter's parameter groups ([`ParamPolicy`])
//! give each parameter a learning-rate multiplier and say whether weight decay applies;
//! it is applied only to parameters with two or more dimensions (matrices, embeddings),
//! never to norms, biases or other 1-d parameters. One step counter is shared by all
//! parameters (it is the bias-correction step), so a parameter that misses a gradient on
//! some steps differs from torch's per-parameter count; drafter parameters get a gradient
//! on every step.
//!
//! The parts: [`update`] (the update arithmetic and its settings), [`fused`] (libtorch's
//! multi-tensor kernels: the fused step, gradient norms, scaling, zeroing; shared with the
//! sharded optimizer), [`groups`] (which rule each parameter follows), [`clip`] (the
//! clipping factor) and [`adamw`] (the single-process optimizer holding parameters and
//! moments).

mod adamw;
mod clip;
pub mod fused;
mod groups;
#[cfg(test)]
mod tests;
mod update;

pub use adamw::AdamW;
pub use clip::clip_coef;
pub use groups::{GroupSummary, ParamPolicy, ParamRule};
pub use update::{adamw_update, max_rel_diff, per_tensor_reference, AdamWConfig};
