//! libtorch's multi-tensor kernels for the optimizer, through the shim in
//! `trainer/csrc/optim_shim.cpp` (tch 0.26 binds none of them): the fused AdamW step
//! (`_fused_adamw_`: one kernel reads each parameter, gradient and moment once and writes
//! the parameter and moments in place, no temporaries), the gradients' global norm
//! (`_foreach_norm`), their scaling (`_foreach_mul_`), zeroing (`_foreach_zero_`) and
//! release (set to none).

use super::AdamWConfig;
use crate::error::{Result, TrainerError};
use std::ffi::{c_char, CStr};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn forge_optim_free_error(e: *mut c_char);
    fn forge_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        n: i64,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    fn forge_foreach_sq_norm(ts: *const *mut C_tensor, n: i64, out: *mut f64) -> *mut c_char;
    fn forge_foreach_mul_(ts: *const *mut C_tensor, n: i64, s: f64) -> *mut c_char;
    fn forge_foreach_zero_(ts: *const *mut C_tensor, n: i64) -> *mut c_char;
    fn forge_release_grads(ts: *const *mut C_tensor, n: i64) -> *mut c_char;
}

fn check(op: &str, err: *mut c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'd by the shim; it is
    // copied, then handed back to the shim's free.
    let message = unsafe {
        let m = CStr::from_ptr(err).to_string_lossy().into_owned();
        forge_optim_free_error(err);
        m
    };
    Err(TrainerError::OptimizerState(format!("{op}: {message}")))
}

/// The handles the shim reads. The kernels change the tensors' data, never the handles.
fn ptrs(ts: &[Tensor]) -> Vec<*mut C_tensor> {
    ts.iter().map(|t| t.as_ptr() as *mut C_tensor).collect()
}

/// Whether [`adamw`] takes this parameter with its gradient: both fp32, contiguous, same
/// shape (other parameters go through [`super::adamw_update`]).
pub fn fusable(p: &Tensor, g: &Tensor) -> bool {
    p.kind() == Kind::Float
        && g.kind() == Kind::Float
        && p.is_contiguous()
        && g.is_contiguous()
        && p.size() == g.size()
        && p.device() == g.device()
}

/// One AdamW step in one kernel over every parameter given, in place: the arithmetic of
/// [`super::adamw_update`] (decoupled decay `p *= 1 - lr*wd` when `decay`, bias-corrected
/// moments, `eps` added to `sqrt(v_hat)`), at the 1-based `step`. Every tensor is fp32,
/// contiguous, on one device, and `params[i]`, `grads[i]`, `m[i]`, `v[i]` have one shape
/// (checked: an error names the first that is not).
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    params: &[Tensor],
    grads: &[Tensor],
    m: &[Tensor],
    v: &[Tensor],
    step: u64,
    lr: f64,
    cfg: &AdamWConfig,
    decay: bool,
) -> Result<()> {
    let n = params.len();
    if grads.len() != n || m.len() != n || v.len() != n {
        return Err(TrainerError::OptimizerState(format!(
            "fused adamw: {n} parameters, {} gradients, {} and {} moments",
            grads.len(),
            m.len(),
            v.len()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let device = params[0].device();
    for i in 0..n {
        let ok = [&grads[i], &m[i], &v[i]].iter().all(|t| fusable(&params[i], t)) && params[i].device() == device;
        if !ok {
            return Err(TrainerError::OptimizerState(format!(
                "fused adamw: parameter {i} ({:?} {:?} on {:?}) does not match its gradient or moments, or is not contiguous fp32 on {device:?}",
                params[i].kind(),
                params[i].size(),
                params[i].device()
            )));
        }
    }
    let wd = if decay { cfg.weight_decay } else { 0.0 };
    let (p, g, a, b) = (ptrs(params), ptrs(grads), ptrs(m), ptrs(v));
    // SAFETY: four arrays of n live tensor handles (checked above to be fp32, contiguous,
    // of matching shapes on one device); the shim catches every C++ exception.
    let err = unsafe {
        forge_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            a.as_ptr(),
            b.as_ptr(),
            n as i64,
            step.max(1) as f64,
            lr,
            cfg.beta1,
            cfg.beta2,
            wd,
            cfg.eps,
        )
    };
    check("fused adamw", err)
}

/// The sum of the tensors' squared L2 norms (each norm in one multi-tensor kernel in the
/// tensor's precision, as `torch.nn.utils.clip_grad_norm_` computes them; the sum in fp64).
/// NaN or infinite when a tensor is not finite.
pub fn sq_norm(ts: &[Tensor]) -> Result<f64> {
    let p = ptrs(ts);
    let mut out = 0.0f64;
    // SAFETY: n live tensor handles and a valid out pointer; exceptions are caught.
    let err = unsafe { forge_foreach_sq_norm(p.as_ptr(), p.len() as i64, &mut out) };
    check("gradient norm", err)?;
    Ok(out)
}

/// `t *= s` for every tensor, in place, in one multi-tensor kernel.
pub fn mul_(ts: &[Tensor], s: f64) -> Result<()> {
    let p = ptrs(ts);
    // SAFETY: n live tensor handles; exceptions are caught.
    let err = unsafe { forge_foreach_mul_(p.as_ptr(), p.len() as i64, s) };
    check("gradient scaling", err)
}

/// `t = 0` for every tensor, in place, in one multi-tensor kernel.
pub fn zero_(ts: &[Tensor]) -> Result<()> {
    let p = ptrs(ts);
    // SAFETY: n live tensor handles; exceptions are caught.
    let err = unsafe { forge_foreach_zero_(p.as_ptr(), p.len() as i64) };
    check("zeroing gradients", err)
}

/// Drops the gradients of these parameters (torch's `zero_grad(set_to_none=True)`): the next
/// backward stores its gradient instead of adding it to a tensor of zeros (one pass over
/// every gradient less, and none to zero them).
pub fn release_grads(params: &[Tensor]) -> Result<()> {
    let p = ptrs(params);
    // SAFETY: n live tensor handles; the shim resets each one's grad (the handle's autograd
    // metadata, not the handle itself); exceptions are caught.
    let err = unsafe { forge_release_grads(p.as_ptr(), p.len() as i64) };
    check("releasing gradients", err)
}
