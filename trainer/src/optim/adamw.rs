//! AdamW over named parameters in one process: the moments, clipping, the step and the
//! checkpointed state.

use super::{adamw_update, clip_coef, fused, AdamWConfig, ParamPolicy};
use crate::error::{Result, TrainerError};
use std::collections::HashMap;
use tch::{Kind, Tensor};

struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Parameters that share a learning-rate scale and weight decay: one fused kernel per step.
struct Group {
    lr_scale: f64,
    decay: bool,
    /// Indices into the slots, in parameter order.
    slots: Vec<usize>,
}

/// AdamW over named parameters; its state is created eagerly (zeros) at construction.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    groups: Vec<Group>,
    step: u64,
}

const EXP_AVG: &str = "exp_avg/";
const EXP_AVG_SQ: &str = "exp_avg_sq/";

impl AdamW {
    /// params: (name, fp32 trainable variable) pairs, e.g. from a VarStore's trainable
    /// variables. The tensors share storage with the variables (steps update them in place).
    /// `policy` gives each its learning-rate scale and weight decay; a parameter that no
    /// group matches is an error.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig, policy: &ParamPolicy) -> Result<Self> {
        let rules = policy.rules(&params)?;
        let mut groups: Vec<Group> = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            match groups
                .iter_mut()
                .find(|g| g.lr_scale == rule.lr_scale && g.decay == rule.decay)
            {
                Some(g) => g.slots.push(i),
                None => groups.push(Group {
                    lr_scale: rule.lr_scale,
                    decay: rule.decay,
                    slots: vec![i],
                }),
            }
        }
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let opts = (Kind::Float, param.device());
                let exp_avg = Tensor::zeros(param.size(), opts);
                let exp_avg_sq = Tensor::zeros(param.size(), opts);
                Slot {
                    name,
                    param,
                    exp_avg,
                    exp_avg_sq,
                }
            })
            .collect();
        Ok(AdamW {
            cfg,
            slots,
            groups,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The gradients the parameters have.
    fn defined_grads(&self) -> Vec<Tensor> {
        self.slots
            .iter()
            .map(|s| s.param.grad())
            .filter(|g| g.defined())
            .collect()
    }

    /// Zeroes every defined gradient (torch's `set_to_none=False`; the data-parallel optimizer
    /// releases them instead), in one multi-tensor kernel.
    pub fn zero_grad(&mut self) -> Result<()> {
        fused::zero_(&self.defined_grads())
    }

    /// Global L2 norm of all gradients (per-tensor norms in one multi-tensor kernel, their
    /// squares summed in fp64, as `torch.nn.utils.clip_grad_norm_`), and scales grads by
    /// max_norm/(norm+1e-6) when norm > max_norm (max_norm <= 0: no clipping). Returns the
    /// norm before clipping (NaN/inf when a gradient is not finite; then nothing is scaled).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        tch::no_grad(|| {
            let grads = self.defined_grads();
            if grads.is_empty() {
                return Ok(0.0);
            }
            let norm = fused::sq_norm(&grads)?.sqrt();
            let coef = clip_coef(norm, max_norm);
            if coef != 1.0 {
                fused::mul_(&grads, coef)?;
            }
            Ok(norm)
        })
    }

    /// One step at learning rate lr (schedule applied by the caller; each parameter runs at
    /// lr times its group's scale). Params without a grad are skipped. Runs under no_grad,
    /// in place: the fp32 parameters of each (lr scale, decay) group in one fused kernel
    /// ([`fused::adamw`]); any other parameter (not fp32, or not contiguous) through an fp32
    /// copy with [`adamw_update`], written back after.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.step += 1;
        let step = self.step;
        let cfg = self.cfg;
        tch::no_grad(|| {
            for group in &self.groups {
                let lr = lr * group.lr_scale;
                let (mut p, mut g, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for &i in &group.slots {
                    let s = &mut self.slots[i];
                    let grad = s.param.grad();
                    if !grad.defined() {
                        continue;
                    }
                    if fused::fusable(&s.param, &grad) {
                        p.push(s.param.shallow_clone());
                        g.push(grad);
                        m.push(s.exp_avg.shallow_clone());
                        v.push(s.exp_avg_sq.shallow_clone());
                        continue;
                    }
                    let mut p32 = s.param.to_kind(Kind::Float);
                    adamw_update(
                        &mut p32,
                        &grad,
                        &mut s.exp_avg,
                        &mut s.exp_avg_sq,
                        step,
                        lr,
                        &cfg,
                        group.decay,
                    );
                    s.param.f_copy_(&p32)?;
                }
                fused::adamw(&p, &g, &m, &v, step, lr, &cfg, group.decay)?;
            }
            Ok(())
        })
    }

    /// Optimizer steps taken (restored by `load_state`).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// State for checkpoints: fp32 tensors `exp_avg/<param>` and `exp_avg_sq/<param>`, in
    /// parameter order. They share storage with the live state: save (or copy) them before
    /// the next step.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.slots.len());
        for s in &self.slots {
            out.push((format!("{EXP_AVG}{}", s.name), s.exp_avg.shallow_clone()));
            out.push((format!("{EXP_AVG_SQ}{}", s.name), s.exp_avg_sq.shallow_clone()));
        }
        out
    }

    /// Restores the state written by `state_tensors` (copied into this optimizer's tensors,
    /// on their device, as fp32) and the step count. Every parameter needs both tensors with
    /// its shape, and every tensor must belong to a parameter; errors name the tensor.
    pub fn load_state(&mut self, tensors: &[(String, Tensor)], step: u64) -> Result<()> {
        let by_name: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let err = |m: String| TrainerError::OptimizerState(m);
        // Check everything before touching the state.
        for s in &self.slots {
            for key in [format!("{EXP_AVG}{}", s.name), format!("{EXP_AVG_SQ}{}", s.name)] {
                let t = by_name
                    .get(key.as_str())
                    .ok_or_else(|| err(format!("missing tensor {key}")))?;
                if t.size() != s.param.size() {
                    return Err(err(format!(
                        "tensor {key} has shape {:?}, the parameter has {:?}",
                        t.size(),
                        s.param.size()
                    )));
                }
                if !t.is_floating_point() {
                    return Err(err(format!("tensor {key} is {:?}, expected a float tensor", t.kind())));
                }
            }
        }
        if by_name.len() != tensors.len() {
            let mut seen = std::collections::HashSet::new();
            if let Some((n, _)) = tensors.iter().find(|(n, _)| !seen.insert(n.as_str())) {
                return Err(err(format!("tensor {n} appears twice")));
            }
        }
        for (name, _) in tensors {
            let known = self.slots.iter().any(|s| {
                name.strip_prefix(EXP_AVG_SQ)
                    .or_else(|| name.strip_prefix(EXP_AVG))
                    .is_some_and(|p| p == s.name)
            });
            if !known {
                return Err(err(format!("unexpected tensor {name} (no such parameter)")));
            }
        }
        tch::no_grad(|| -> Result<()> {
            for s in &mut self.slots {
                for (prefix, dst) in [(EXP_AVG, &mut s.exp_avg), (EXP_AVG_SQ, &mut s.exp_avg_sq)] {
                    let key = format!("{prefix}{}", s.name);
                    if let Some(src) = by_name.get(key.as_str()) {
                        dst.f_copy_(&src.to_device(dst.device()).to_kind(Kind::Float))?;
                    }
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }

    /// Bytes of optimizer state held (both moments, fp32).
    pub fn state_bytes(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| {
                (s.exp_avg.numel() * s.exp_avg.kind().elt_size_in_bytes()
                    + s.exp_avg_sq.numel() * s.exp_avg_sq.kind().elt_size_in_bytes()) as u64
            })
            .sum()
    }
}
