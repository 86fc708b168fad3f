//! One AdamW update on matching tensors (whole parameters or flat slices of a bucket), and
//! its settings.

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Recipe learning rate (informational: `step` takes the scheduled rate).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One AdamW update, in place, under no_grad: `p` (any float kind) given its gradient `g`
/// (any float kind) and fp32 moments `m`, `v` of the same shape, at the 1-based optimizer
/// `step`, learning rate `lr`; `decay` applies the decoupled weight decay `p *= 1 - lr*wd`.
/// The tensors may be views (e.g. a rank's slice of a flattened bucket).
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    p: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    step: u64,
    lr: f64,
    cfg: &AdamWConfig,
    decay: bool,
) {
    tch::no_grad(|| {
        let g32;
        let g = if g.kind() == Kind::Float {
            g
        } else {
            g32 = g.to_kind(Kind::Float);
            &g32
        };
        if decay && cfg.weight_decay != 0.0 {
            let _ = p.g_mul_scalar_(1.0 - lr * cfg.weight_decay);
        }
        // m = beta1*m + (1-beta1)*g ; v = beta2*v + (1-beta2)*g^2
        let _ = m.lerp_(g, 1.0 - cfg.beta1);
        let _ = v.g_mul_scalar_(cfg.beta2);
        let _ = v.g_add_(&(g.square() * (1.0 - cfg.beta2)));
        let t = step.max(1) as f64;
        let bias_correction1 = 1.0 - cfg.beta1.powf(t);
        let bias_correction2 = 1.0 - cfg.beta2.powf(t);
        let step_size = lr / bias_correction1;
        // denom = sqrt(v) / sqrt(bc2) + eps ; p -= step_size * m / denom
        let denom = (v.sqrt() / bias_correction2.sqrt()) + cfg.eps;
        let update = (&*m / denom) * step_size;
        let _ = p.g_sub_(&update);
    })
}

/// Checks of the fused optimizer (the unit tests and `forge dist-selftest`): the per-tensor
/// AdamW over copies of `init` (rule `rules[i]` for tensor i) taking the gradients
/// `grads[s]` at step s+1, clipped to `max_norm` by their global norm computed in fp64.
pub fn per_tensor_reference(
    init: &[Tensor],
    rules: &[super::ParamRule],
    grads: &[Vec<Tensor>],
    cfg: &AdamWConfig,
    lr: f64,
    max_norm: f64,
) -> Vec<Tensor> {
    let mut p: Vec<Tensor> = init.iter().map(|t| t.detach().copy()).collect();
    let mut m: Vec<Tensor> = init.iter().map(Tensor::zeros_like).collect();
    let mut v: Vec<Tensor> = init.iter().map(Tensor::zeros_like).collect();
    for (step, g) in grads.iter().enumerate() {
        let sq: f64 = g
            .iter()
            .map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]))
            .sum();
        let coef = super::clip_coef(sq.sqrt(), max_norm);
        for (i, r) in rules.iter().enumerate().take(p.len()) {
            let gi = &g[i] * coef;
            adamw_update(
                &mut p[i],
                &gi,
                &mut m[i],
                &mut v[i],
                step as u64 + 1,
                lr * r.lr_scale,
                cfg,
                r.decay,
            );
        }
    }
    p
}

/// `max |a - b| / max |b|`, the worst over the pairs of tensors.
pub fn max_rel_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            let d = (a.detach() - b).abs().max().double_value(&[]);
            d / b.abs().max().double_value(&[]).max(f64::MIN_POSITIVE)
        })
        .fold(0.0, f64::max)
}
