//! Checks that the ranks of a data-parallel run agree: on where they start, and on their
//! weights every `dist.check_weights_every` steps.

use crate::checkpoint::TrainerState;
use crate::error::{Result, TrainerError};
use crate::parallel::{Comm, ReduceOp};
use tch::{Device, Kind, Tensor};

/// Checks that every rank starts from the same step and data position: ranks that resumed
/// from different checkpoints (a `checkpoint.dir` that is not one folder all ranks see)
/// would otherwise train different models and pair up their collectives wrongly.
pub(super) fn same_start_on_every_rank(dp: &mut dyn Comm, state: &TrainerState) -> Result<()> {
    if dp.world() < 2 {
        return Ok(());
    }
    let r = min_max_over_ranks(
        dp,
        &[state.step as f64, state.epoch as f64, state.batch_in_epoch as f64],
    )?;
    if r.iter().any(|(lo, hi)| lo != hi) {
        return Err(TrainerError::Dist {
            op: "resume check".into(),
            message: format!(
                "the ranks start from different points (step {} to {}, epoch {} to {}, micro-batch {} to {}; this rank: step {}): they resumed from different checkpoints. checkpoint.dir must be one folder every rank sees (on several nodes: a shared filesystem)",
                r[0].0, r[0].1, r[1].0, r[1].1, r[2].0, r[2].1, state.step
            ),
        });
    }
    Ok(())
}

/// (min, max) over the ranks of each of `values` (one all-reduce of the values and their
/// negatives with max).
fn min_max_over_ranks(dp: &mut dyn Comm, values: &[f64]) -> Result<Vec<(f64, f64)>> {
    let both: Vec<f64> = values.iter().copied().chain(values.iter().map(|v| -v)).collect();
    let mut t = Tensor::from_slice(&both).to_device(dp.device());
    dp.all_reduce(&mut t, ReduceOp::Max)?;
    let r = Vec::<f64>::try_from(&t.to_device(Device::Cpu))?;
    let n = values.len();
    Ok((0..n).map(|i| (-r[n + i], r[i])).collect())
}

/// Checks that every rank holds the same weights (fp64 sum and sum of squares of all
/// parameters, compared through their min and max over the ranks): ranks that diverged would
/// silently train different models.
pub(super) fn check_same_weights(dp: &mut dyn Comm, params: &[(String, Tensor)], step: u64) -> Result<()> {
    let (mut s, mut q) = (0.0f64, 0.0f64);
    tch::no_grad(|| {
        for (_, p) in params {
            let d = p.to_kind(Kind::Double);
            s += d.sum(Kind::Double).double_value(&[]);
            q += d.square().sum(Kind::Double).double_value(&[]);
        }
    });
    let r = min_max_over_ranks(dp, &[s, q])?;
    // NaN is never equal to itself: say what happened rather than "different weights"
    if !s.is_finite() || !q.is_finite() {
        return Err(TrainerError::Dist {
            op: "weight check".into(),
            message: format!("the weights are not finite after step {step} (training diverged: lower the learning rate or clip gradients with train.max_grad_norm)"),
        });
    }
    if r.iter().any(|(lo, hi)| lo != hi) {
        return Err(TrainerError::Dist {
            op: "weight check".into(),
            message: format!(
                "ranks hold different weights after step {step} (sum of weights from {} to {}, sum of squares from {} to {})",
                r[0].0, r[0].1, r[1].0, r[1].1
            ),
        });
    }
    Ok(())
}
