//! The training loop: any drafter, online (frozen target inside the step) or offline
//! (hidden-state shards), with gradient accumulation, clipping, AdamW, LR schedules, logging,
//! periodic evaluation and atomic, exactly-resumable checkpoints.
//!
//! [`train`] is a short loop over parts that each own their cadence: `Trainer` (the drafter,
//! its data and optimizer: built in `setup`, continued in `resume`, one optimizer step in
//! `step` over the features of `features`), `RunLog` (metric rows and progress, `runlog`),
//! `Validator` (evaluations and the `best/` checkpoint, `validator`) and [`Checkpointer`]
//! (when and how checkpoints are written). `rank_checks` keeps the ranks of a data-parallel
//! run in agreement.
//!
//! The library prints nothing: what the person running the job sees (notes, warnings,
//! progress) goes to the caller's [`TrainObserver`].

mod accum;
mod features;
mod rank_checks;
mod resume;
mod runlog;
mod served;
mod setup;
mod step;
mod validator;

pub use resume::{reshard_position, ReshardError};
pub use runlog::peak_rss_mb;

/// The single-process communicator (what `forge train` uses outside `forge launch`).
pub use crate::parallel::SingleProcess;

pub(crate) use features::target_features;
pub(crate) use setup::{compute_kind, optimizer};

use crate::artifacts;
use crate::checkpoint::TrainerState;
use crate::checkpointer::Checkpointer;
use crate::data::{self, target_dir};
use crate::error::{Result, TrainerError};
use crate::parallel::zero::DistAdamW;
use crate::parallel::Comm;
use crate::recipe::Recipe;
use crate::schedule::LrSchedule;
use forge_data::hidden::HiddenDataset;
use forge_data::TokenDataset;
use forge_models::drafters::{Drafter, FeatureNeeds};
use forge_models::TargetModel;
use rank_checks::same_start_on_every_rank;
use runlog::{write_run_folder, RunLog};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Tensor};
use validator::Validator;

/// Hears how loading (and tokenising) the data goes: (what, done, total).
pub type DataProgress = std::sync::Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// Options of `forge train` besides the recipe.
#[derive(Clone, Default)]
pub struct TrainOptions {
    /// `auto` (newest complete checkpoint, or a fresh start if none) or a checkpoint folder.
    pub resume: Option<String>,
    /// Told how loading the data goes, on rank 0 (the command draws it).
    pub data_progress: Option<DataProgress>,
    /// The target's tensor-parallel group (`target.tensor_parallel` > 1, from
    /// [`crate::parallel::tensor::split`]); `dp` is then the draft's data-parallel group.
    pub tensor_parallel: Option<std::sync::Arc<forge_models::layers::TensorParallel>>,
}

/// Where a run stands after an optimizer step (what a progress display shows).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepProgress {
    /// Optimizer steps done.
    pub step: u64,
    pub total_steps: u64,
    /// Mean loss of the step's micro-batches (all ranks).
    pub loss: f64,
    /// The step's learning rate.
    pub lr: f64,
    /// Tokens per second since the last metric row (all ranks).
    pub tokens_per_second: f64,
}

/// What the person running the job sees of a run, implemented by the caller (`forge train`
/// prints it). The training loop itself never prints. Rank 0 gets everything; the other
/// ranks of a data-parallel run get only what concerns them alone (notes of the drafter's
/// preparation, which every rank runs).
pub trait TrainObserver {
    /// A line of information: the parameter groups, a warm start, resuming from a checkpoint.
    fn note(&mut self, line: &str);
    /// A warning (about the recipe, or the drafter's own watch over the metric rows).
    fn warn(&mut self, line: &str);
    /// The step loop starts with `start_step` of `total_steps` steps done (rank 0).
    fn started(&mut self, start_step: u64, total_steps: u64);
    /// An optimizer step is done (rank 0).
    fn step(&mut self, progress: &StepProgress);
    /// The step loop is over (rank 0).
    fn finished(&mut self);
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub start_step: u64,
    pub steps: u64,
    pub last_loss: f64,
    pub tokens: u64,
    pub seconds: f64,
    pub last_checkpoint: Option<PathBuf>,
    pub peak_rss_mb: f64,
    pub eval: Vec<(u64, BTreeMap<String, f64>)>,
    /// Seconds spent in the steps themselves (no loading, no initial evaluation).
    pub step_seconds: f64,
    /// Optimizer-state bytes held by this rank (both AdamW moments, fp32).
    pub optimizer_state_bytes: u64,
    pub rank: usize,
    pub world: usize,
    /// Whether this rank reports for the run (rank 0 of the group that writes).
    pub reports: bool,
}

/// Where the features of a micro-batch come from.
enum Source {
    Online { target: TargetModel, data: TokenDataset },
    Offline { data: HiddenDataset },
}

/// The drafter, its data and its optimizer, and where training stands.
struct Trainer<'a> {
    recipe: &'a Recipe,
    drafter: Box<dyn Drafter>,
    source: Source,
    device: Device,
    /// What the drafter reads from the target (its spec's feature needs).
    needs: FeatureNeeds,
    eval_data: Option<TokenDataset>,
    /// Offline runs with eval data load the target for evaluation only.
    eval_target: Option<TargetModel>,
    /// The trainable parameters, sorted by name (what `opt` updates).
    params: Vec<(String, Tensor)>,
    opt: DistAdamW,
    sched: LrSchedule,
    /// Micro-batches per optimizer step on each rank.
    grad_accum: u64,
    /// Steps done, data position and counters (what a checkpoint saves).
    state: TrainerState,
    /// This rank's micro-batches of epoch `state.epoch`.
    epoch_plan: Vec<Vec<usize>>,
}

/// Trains the recipe's drafter, reporting to `obs`.
pub fn train(
    recipe: &Recipe,
    opts: &TrainOptions,
    dp: &mut dyn Comm,
    obs: &mut dyn TrainObserver,
) -> Result<TrainSummary> {
    let t_start = Instant::now();
    let ckpt_dir = recipe
        .checkpoint
        .dir
        .clone()
        .ok_or_else(|| TrainerError::Config("checkpoint.dir is not set: set it to the output folder".into()))?;
    let dir = target_dir(recipe)?.to_path_buf();
    let cfg = data::target_config(recipe)?;
    // decided before any expensive loading: refuses to overwrite an earlier run
    let resume_ck = resume::resume_from(recipe, &opts.resume)?;
    // a knowledge drafter's cache, built when missing (rank 0; the others wait for it)
    let prepared = artifacts::prepare(recipe, dp)?;
    if let Some(tp) = &opts.tensor_parallel {
        // the other shards of a target wait for what its first shard's group prepared
        tp.sync()?;
    }
    let spec = artifacts::resolved_section(recipe)?.to_spec(&cfg, Some(&dir))?;
    if crate::parallel::leads(dp) {
        for line in &prepared.notes {
            obs.note(line);
        }
        for w in prepared.warnings.iter().chain(&spec.warnings()) {
            obs.warn(w);
        }
    }
    let mut trainer = Trainer::new(recipe, &cfg, &spec, &dir, resume_ck.is_none(), opts, dp, obs)?;
    let total = trainer.state.total_steps;
    let checkpointer = Checkpointer::new(recipe, ckpt_dir.clone(), total, spec.clone(), dir, cfg.raw.clone(), dp)?;
    if let Some(ck) = resume_ck {
        trainer.resume(&ck, &spec, dp, obs)?;
    }
    let start_step = trainer.state.step;
    same_start_on_every_rank(dp, &trainer.state)?;

    let rank0 = crate::parallel::leads(dp);
    if rank0 {
        write_run_folder(recipe, &ckpt_dir)?;
    }
    let mut log = RunLog::open(recipe, &ckpt_dir, start_step, total, rank0, obs)?;
    let mut validator = Validator::new(recipe, start_step, total, &checkpointer);
    validator.at_start(&mut trainer, dp, &mut log)?;

    let mut last_ckpt = None;
    let loop_start = Instant::now();
    for step in start_step..total {
        let m = trainer.train_step(step, dp)?;
        let done = trainer.state.step;
        if let Some(interval) = log.step(done, &m, obs)? {
            for w in trainer.drafter.watch(&interval) {
                log.warn(&w, obs);
            }
        }
        validator.after_step(done, &mut trainer, dp, &checkpointer, &mut log)?;
        if checkpointer.due(done) {
            if let Some(path) = checkpointer.save(dp, &trainer.state, trainer.drafter.var_store(), &trainer.opt)? {
                last_ckpt = Some(path);
            }
            log.flush();
        }
    }
    log.finish(obs);
    Ok(TrainSummary {
        start_step,
        steps: total,
        last_loss: log.last_loss,
        tokens: log.run_tokens,
        seconds: t_start.elapsed().as_secs_f64(),
        last_checkpoint: last_ckpt,
        peak_rss_mb: peak_rss_mb(),
        eval: validator.evals,
        step_seconds: loop_start.elapsed().as_secs_f64(),
        optimizer_state_bytes: trainer.opt.state_bytes(),
        rank: dp.rank(),
        world: dp.world(),
        reports: crate::parallel::leads(dp),
    })
}
