//! Evaluation: loss and metrics on the eval conversations every `train.eval_every` steps
//! (and before the first step of a fresh run), and the `best/` checkpoint by simulated
//! acceptance length.

use super::accum::Accum;
use super::runlog::RunLog;
use super::{Source, Trainer};
use crate::checkpointer::Checkpointer;
use crate::error::Result;
use crate::parallel::Comm;
use crate::recipe::Recipe;
use crate::schedule::Cadence;
use forge_models::drafters::StepContext;
use std::collections::BTreeMap;

/// The evaluation row of the simulated acceptance length ([`forge_models::drafters::sim_tau`]),
/// which picks the `best/` checkpoint.
const SIM_TAU: &str = "eval/sim_tau";

/// When to evaluate (every `train.eval_every` steps and after the last; before the first
/// step of a fresh run), the evaluations so far, and the best simulated acceptance.
pub(super) struct Validator {
    at: Cadence,
    /// The best simulated acceptance so far: a resumed run continues its record, a fresh one
    /// starts its own (a best/ left by an earlier, crashed run is replaced at its first eval).
    best: Option<f64>,
    pub(super) evals: Vec<(u64, BTreeMap<String, f64>)>,
}

impl Validator {
    /// The evaluations of a run of `total` steps starting at `start_step`.
    pub(super) fn new(recipe: &Recipe, start_step: u64, total: u64, checkpointer: &Checkpointer) -> Validator {
        Validator {
            at: Cadence {
                every: recipe.train.eval_every.unwrap_or(0),
                last: total,
            },
            best: if start_step > 0 {
                checkpointer.best().map(|(v, _)| v)
            } else {
                None
            },
            evals: Vec::new(),
        }
    }

    /// Evaluates before the first step of a fresh run (when evaluations are on).
    pub(super) fn at_start(&mut self, trainer: &mut Trainer, dp: &mut dyn Comm, log: &mut RunLog) -> Result<()> {
        let start_step = trainer.state.step;
        if start_step == 0 && self.at.enabled() {
            if let Some(e) = trainer.evaluate(dp, 0, trainer.state.total_steps)? {
                self.record(0, e, log)?;
            }
        }
        Ok(())
    }

    /// Evaluates when due after `done` steps, and saves `best/` when the simulated
    /// acceptance beats the best so far.
    pub(super) fn after_step(
        &mut self,
        done: u64,
        trainer: &mut Trainer,
        dp: &mut dyn Comm,
        checkpointer: &Checkpointer,
        log: &mut RunLog,
    ) -> Result<()> {
        if !self.at.due(done) {
            return Ok(());
        }
        if let Some(e) = trainer.evaluate(dp, done, trainer.state.total_steps)? {
            if let Some(&t) = e.get(SIM_TAU) {
                if self.best.is_none_or(|b| t > b) {
                    self.best = Some(t);
                    checkpointer.save_best(dp, &trainer.state, trainer.drafter.var_store(), SIM_TAU, t)?;
                }
            }
            self.record(done, e, log)?;
        }
        Ok(())
    }

    fn record(&mut self, step: u64, e: BTreeMap<String, f64>, log: &mut RunLog) -> Result<()> {
        log.row(step, &e)?;
        self.evals.push((step, e));
        Ok(())
    }
}

impl Trainer<'_> {
    /// Loss and metrics on the eval conversations (no gradients).
    pub(super) fn evaluate(
        &mut self,
        dp: &mut dyn Comm,
        step: u64,
        total: u64,
    ) -> Result<Option<BTreeMap<String, f64>>> {
        let Some(eval) = &self.eval_data else {
            return Ok(None);
        };
        let target = match (&self.source, &self.eval_target) {
            (Source::Online { target, .. }, _) => target,
            (Source::Offline { .. }, Some(t)) => t,
            _ => return Ok(None),
        };
        let mb = self.recipe.train.micro_batch_size.max(1) as usize;
        let mut acc = Accum::default();
        let all: Vec<usize> = (0..eval.len()).collect();
        let mine: Vec<&[usize]> = all.chunks(mb).skip(dp.rank()).step_by(dp.world()).collect();
        for idx in mine {
            let (f, tokens) = Self::online_features(target, &self.needs, eval, idx, self.device)?;
            let ctx = StepContext::eval(self.recipe.train.seed, step, total).with_target(Some(target));
            let out = tch::no_grad(|| self.drafter.loss(&f, &ctx))?;
            acc.add(out.loss.double_value(&[]), &out.parts, &out.metrics, tokens);
        }
        acc.sync(dp)?;
        let mut rows: BTreeMap<String, f64> = acc.scalars("eval/").into_iter().collect();
        if let Some(t) = forge_models::drafters::sim_tau(&rows, "eval/") {
            rows.insert(SIM_TAU.into(), t);
        }
        rows.extend(self.served_acceptance(dp, target, eval)?);
        Ok(Some(rows))
    }
}
