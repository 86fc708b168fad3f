//! Gradient clipping by global norm: the factor (the norm itself is summed where the
//! gradients live: [`super::AdamW::clip_grad_norm`], and per bucket in the sharded optimizer).

/// The factor that clips gradients of global L2 norm `norm` to `max_norm`:
/// `max_norm / (norm + 1e-6)` when `norm > max_norm`, else 1 (also when `max_norm <= 0`,
/// clipping off, and when `norm` is not finite: then nothing is scaled).
pub fn clip_coef(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}
