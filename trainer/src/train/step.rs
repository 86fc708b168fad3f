//! One optimizer step: this rank's micro-batches (features, loss, backward), the optimizer
//! step, and the data position moving on.

use super::accum::{Accum, StepMetrics};
use super::rank_checks::check_same_weights;
use super::{Source, Trainer};
use crate::error::Result;
use crate::parallel::Comm;
use forge_data::batch::shard_plan;
use forge_models::drafters::StepContext;

impl Trainer<'_> {
    /// Runs optimizer step `step` (0-based, the next one): this rank's micro-batches of the
    /// step (features, loss, backward; the gradients accumulate), then the optimizer step.
    /// Moves the data position and the counters of `state` on; returns the step's metrics,
    /// summed over its micro-batches and the ranks. Every rank calls it at the same step.
    pub(super) fn train_step(&mut self, step: u64, dp: &mut dyn Comm) -> Result<StepMetrics> {
        let recipe = self.recipe;
        let t = &recipe.train;
        let (rank, world) = (dp.rank(), dp.world());
        let accum = self.grad_accum;
        let total = self.state.total_steps;
        let lr = self.sched.lr_at(step);
        let mut acc = Accum::default();
        for a in 0..accum {
            // Randomness (e.g. EAGLE-1 feature noise) comes from the step context's generator,
            // keyed by the micro-batch's index in the step's global batch, not by the rank:
            // 2 ranks x grad_accum 1 draw what 1 rank x grad_accum 2 draws.
            let global_mb = a * world as u64 + rank as u64;
            if self.state.batch_in_epoch >= self.epoch_plan.len() {
                self.state.epoch += 1;
                self.state.batch_in_epoch = 0;
                self.epoch_plan = self.plan(self.state.epoch, dp);
            }
            let idx = self.epoch_plan[self.state.batch_in_epoch].clone();
            self.state.batch_in_epoch += 1;
            if idx.is_empty() {
                continue;
            }
            let (f, tokens) = self.features(&idx)?;
            let live = match &self.source {
                Source::Online { target, .. } => Some(target),
                Source::Offline { .. } => None,
            };
            let ctx = StepContext::train(t.seed, step, total, global_mb).with_target(live);
            let out = self.drafter.loss(&f, &ctx)?;
            (&out.loss / accum as f64).backward();
            acc.add(out.loss.double_value(&[]), &out.parts, &out.metrics, tokens);
            acc.samples += idx.len() as f64;
        }
        let grad_norm = self.opt.step(dp, lr, t.max_grad_norm)?;
        self.opt.zero_grad()?;
        let check_every = recipe.dist.check_weights_every;
        if world > 1 && check_every > 0 && (step + 1).is_multiple_of(check_every) {
            check_same_weights(dp, &self.params, step + 1)?;
        }
        acc.sync(dp)?;
        self.state.step = step + 1;
        self.state.lr = lr;
        self.state.tokens_seen += acc.tokens as u64;
        // summed over ranks by the sync above
        self.state.samples_seen += acc.samples as u64;
        Ok(StepMetrics { acc, lr, grad_norm })
    }

    pub(super) fn plan(&self, epoch: u64, dp: &dyn Comm) -> Vec<Vec<usize>> {
        shard_plan(self.source.global_plan(self.recipe, epoch), dp.rank(), dp.world())
    }
}
