//! What rank 0 reports while training: metric rows, evaluations and progress.

use super::accum::{Accum, StepMetrics};
use super::{StepProgress, TrainObserver};
use crate::error::{Result, TrainerError};
use crate::metrics::MetricsLogger;
use crate::recipe::Recipe;
use crate::schedule::Cadence;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Peak resident memory of this process in MB (Linux VmHWM).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// What rank 0 reports while training: a metric row every `log.every_steps` steps (and
/// after the last; averaged over the steps since the previous row), the evaluation rows,
/// and the progress (to the observer). Other ranks keep no logger and report nothing.
pub(super) struct RunLog {
    logger: Option<MetricsLogger>,
    rows: Cadence,
    total: u64,
    /// The steps since the last row.
    window: Accum,
    window_start: Instant,
    pub(super) last_loss: f64,
    /// Tokens trained on in this run (all ranks).
    pub(super) run_tokens: u64,
}

impl RunLog {
    /// The metric files in `ckpt_dir` (new, or continued at `start_step`) on rank 0, where
    /// the step loop starts for `obs`.
    pub(super) fn open(
        recipe: &Recipe,
        ckpt_dir: &Path,
        start_step: u64,
        total: u64,
        rank0: bool,
        obs: &mut dyn TrainObserver,
    ) -> Result<RunLog> {
        let logger = if rank0 {
            Some(if start_step == 0 {
                MetricsLogger::new(ckpt_dir, recipe.log.tensorboard, recipe.log.jsonl)?
            } else {
                MetricsLogger::open_resume(ckpt_dir, recipe.log.tensorboard, recipe.log.jsonl, start_step)?
            })
        } else {
            None
        };
        if rank0 {
            obs.started(start_step, total);
        }
        Ok(RunLog {
            logger,
            rows: Cadence {
                every: recipe.log.every_steps.max(1),
                last: total,
            },
            total,
            window: Accum::default(),
            window_start: Instant::now(),
            last_loss: f64::NAN,
            run_tokens: 0,
        })
    }

    fn rank0(&self) -> bool {
        self.logger.is_some()
    }

    /// Records the step that brought the run to `step` steps done; at the end of a log
    /// interval returns its metrics (as logged, on every rank).
    pub(super) fn step(
        &mut self,
        step: u64,
        m: &StepMetrics,
        obs: &mut dyn TrainObserver,
    ) -> Result<Option<Vec<(String, f64)>>> {
        let acc = &m.acc;
        self.run_tokens += acc.tokens as u64;
        self.last_loss = acc.loss_sum / acc.batches.max(1.0);
        self.window.merge(acc);
        let secs = self.window_start.elapsed().as_secs_f64();
        let tps = self.window.tokens / secs.max(1e-9);
        if self.rank0() {
            obs.step(&StepProgress {
                step,
                total_steps: self.total,
                loss: self.last_loss,
                lr: m.lr,
                tokens_per_second: tps,
            });
        }
        if !self.rows.due(step) {
            return Ok(None);
        }
        let mut rows = self.window.scalars("train/");
        rows.push(("train/lr".into(), m.lr));
        rows.push(("train/grad_norm".into(), m.grad_norm));
        rows.push(("train/tokens_per_second".into(), tps));
        rows.push(("train/peak_rss_mb".into(), peak_rss_mb()));
        if let Some(l) = self.logger.as_mut() {
            let r: Vec<(&str, f64)> = rows.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            l.log(step, &r)?;
        }
        self.window = Accum::default();
        self.window_start = Instant::now();
        Ok(Some(rows))
    }

    /// A warning for the person running the job (rank 0).
    pub(super) fn warn(&self, line: &str, obs: &mut dyn TrainObserver) {
        if self.rank0() {
            obs.warn(line);
        }
    }

    /// Logs a row of other metrics (an evaluation) after `step` steps.
    pub(super) fn row(&mut self, step: u64, e: &BTreeMap<String, f64>) -> Result<()> {
        if let Some(l) = self.logger.as_mut() {
            let rows: Vec<(&str, f64)> = e.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            l.log(step, &rows)?;
        }
        Ok(())
    }

    pub(super) fn flush(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    /// The end of the step loop.
    pub(super) fn finish(&mut self, obs: &mut dyn TrainObserver) {
        if self.rank0() {
            obs.finished();
        }
        self.flush();
    }
}

/// Creates the run folder and writes the resolved recipe into it (rank 0).
pub(super) fn write_run_folder(recipe: &Recipe, ckpt_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(ckpt_dir).map_err(|source| TrainerError::Io {
        path: ckpt_dir.to_path_buf(),
        source,
    })?;
    let yaml = recipe.to_yaml().map_err(TrainerError::Config)?;
    let p = ckpt_dir.join("recipe.resolved.yaml");
    std::fs::write(&p, yaml).map_err(|source| TrainerError::Io { path: p, source })?;
    Ok(())
}
