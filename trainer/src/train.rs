//! The training loop: any drafter, online (frozen target inside the step) or offline
//! (hidden-state shards), with gradient accumulation, clipping, AdamW, LR schedules, logging,
//! periodic evaluation and atomic, exactly-resumable checkpoints.
//!
//! [`train`] is a short loop over the parts: `Trainer` (the drafter, its data and optimizer;
//! `train_step` runs one optimizer step), `RunLog` (metric rows, evaluations, progress),
//! [`Checkpointer`] (when and how checkpoints are written) and [`reshard_position`] (where
//! a checkpoint continues on another number of ranks).

use crate::checkpoint::{self, TrainerState};
use crate::checkpointer::Checkpointer;
use crate::data::{self, target_dir, target_placement};
use crate::parallel::zero::{assemble_full_state, DistAdamW};
use crate::parallel::{keys, Comm, ReduceOp};
use crate::drafter::{target_access, Prepare, PrepareSource};
use crate::error::{Result, TrainerError};
use crate::metrics::MetricsLogger;
use crate::optim::{AdamWConfig, ParamPolicy};
use crate::recipe::{DataMode, Precision, Recipe, Schedule};
use crate::schedule::{Cadence, LrSchedule, ScheduleKind};
use forge_data::batch::{global_plan, global_plan_grouped, shard_plan, PlanOptions};
use forge_data::hidden::HiddenDataset;
use forge_data::{Batch, TokenDataset};
use forge_models::drafters::{Drafter, DrafterSpec, FeatureNeeds, Features, Metric, StepContext};
use forge_models::{Capture, LogitsMode, TargetConfig, TargetModel};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The single-process communicator (what `forge train` uses outside `forge launch`).
pub use crate::parallel::SingleProcess;

/// Options of `forge train` besides the recipe.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// `auto` (newest complete checkpoint, or a fresh start if none) or a checkpoint folder.
    pub resume: Option<String>,
    pub show_progress: bool,
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
}

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

enum Source {
    Online { target: TargetModel, data: TokenDataset },
    Offline { data: HiddenDataset },
}

/// Sums of loss parts and metrics over micro-batches (and ranks).
#[derive(Default)]
struct Accum {
    loss_sum: f64,
    batches: f64,
    tokens: f64,
    /// Samples (rows) trained on.
    samples: f64,
    values: BTreeMap<String, (f64, f64)>,
}

impl Accum {
    fn add(&mut self, loss: f64, parts: &[Metric], metrics: &[Metric], tokens: usize) {
        self.loss_sum += loss;
        self.batches += 1.0;
        self.tokens += tokens as f64;
        for m in parts.iter().chain(metrics) {
            let e = self.values.entry(m.name.clone()).or_default();
            e.0 += m.sum;
            e.1 += m.count;
        }
    }

    /// Flat vector for an all-reduce, and back.
    fn to_vec(&self) -> Vec<f64> {
        let mut v = vec![self.loss_sum, self.batches, self.tokens, self.samples];
        for (s, c) in self.values.values() {
            v.push(*s);
            v.push(*c);
        }
        v
    }

    fn set_from_vec(&mut self, v: &[f64]) {
        self.loss_sum = v[0];
        self.batches = v[1];
        self.tokens = v[2];
        self.samples = v[3];
        for (i, val) in self.values.values_mut().enumerate() {
            *val = (v[4 + 2 * i], v[5 + 2 * i]);
        }
    }

    /// Sums over ranks: first agree on the union of metric names (a rank may lack some,
    /// e.g. a Medusa head without loss positions, or an empty padded micro-batch), then one
    /// all-reduce of every value.
    fn sync(&mut self, comm: &mut dyn Comm) -> Result<()> {
        if comm.world() == 1 {
            return Ok(());
        }
        let mine: BTreeSet<String> = self.values.keys().cloned().collect();
        for k in keys::union_keys(comm, &mine)? {
            self.values.entry(k).or_default();
        }
        let mut t = Tensor::from_slice(&self.to_vec()).to_device(comm.device());
        comm.all_reduce(&mut t, ReduceOp::Sum)?;
        let v = Vec::<f64>::try_from(&t.to_device(Device::Cpu))?;
        self.set_from_vec(&v);
        Ok(())
    }

    /// Adds another sum (e.g. a step's into the window since the last log row).
    fn merge(&mut self, o: &Accum) {
        self.loss_sum += o.loss_sum;
        self.batches += o.batches;
        self.tokens += o.tokens;
        self.samples += o.samples;
        for (k, (s, c)) in &o.values {
            let e = self.values.entry(k.clone()).or_default();
            e.0 += s;
            e.1 += c;
        }
    }

    fn scalars(&self, prefix: &str) -> Vec<(String, f64)> {
        let mut out = vec![(format!("{prefix}loss"), self.loss_sum / self.batches.max(1.0))];
        for (k, (s, c)) in &self.values {
            out.push((format!("{prefix}{k}"), if *c > 0.0 { s / c } else { 0.0 }));
        }
        out
    }
}

impl Source {
    fn lengths(&self) -> Vec<usize> {
        match self {
            Source::Online { data, .. } => data.lengths(),
            Source::Offline { data } => data.lengths(),
        }
    }

    /// The epoch's micro-batches in their global order (before sharding over ranks).
    fn global_plan(&self, recipe: &Recipe, epoch: u64) -> Vec<Vec<usize>> {
        let t = &recipe.train;
        let opts = PlanOptions {
            micro_batch_size: t.micro_batch_size.max(1) as usize,
            seed: t.seed,
            shuffle: true,
            length_grouping: true,
        };
        let lengths = self.lengths();
        match self {
            Source::Online { .. } => global_plan(&lengths, epoch, &opts),
            Source::Offline { data } => global_plan_grouped(&lengths, &data.shard_ranges(), epoch, &opts),
        }
    }
}

/// What one optimizer step did.
struct StepMetrics {
    /// Loss parts, metrics, tokens and samples summed over the step's micro-batches and the
    /// ranks.
    acc: Accum,
    lr: f64,
    /// Global gradient norm before clipping.
    grad_norm: f64,
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

impl<'a> Trainer<'a> {
    /// Loads the data (and the target, online), builds the drafter (prepared from the data
    /// when `fresh`, i.e. not about to be resumed) and its optimizer: a run at step 0 of the
    /// recipe's steps.
    fn new(
        recipe: &'a Recipe,
        cfg: &TargetConfig,
        spec: &DrafterSpec,
        dir: &Path,
        fresh: bool,
        opts: &TrainOptions,
        dp: &mut dyn Comm,
    ) -> Result<Self> {
        let t = &recipe.train;
        let (target_dtype, device) = target_placement(recipe)?;
        tch::manual_seed(t.seed as i64);

        let needs = spec.feature_needs();

        // Data (and the target, online).
        enum TrainData {
            /// Online: the conversations and the frozen target that runs inside each step.
            Tokens(Box<forge_data::LoadedDataset>, TargetModel),
            Shards(Box<HiddenDataset>),
        }
        let eval_tokens;
        let train_data = match recipe.data.mode {
            DataMode::Online => {
                let td = data::load_token_data(recipe, opts.show_progress && dp.rank() == 0)?;
                eval_tokens = td.eval.map(|e| e.dataset);
                TrainData::Tokens(Box::new(td.train), TargetModel::load(dir, target_dtype, device)?)
            }
            DataMode::Offline => {
                let hd = recipe.data.hidden_dir.as_ref().ok_or_else(|| {
                    TrainerError::Config(
                        "data.hidden_dir is not set (offline mode reads forge prepare-hidden output)".into(),
                    )
                })?;
                let ds = HiddenDataset::open(hd)?;
                let s = ds.settings();
                let aux: Vec<i64> = s.aux_layers.iter().map(|&l| l as i64).collect();
                if (needs.last_hidden && !s.last_hidden) || needs.aux_layers != aux || needs.target_topk > s.topk {
                    return Err(TrainerError::Config(format!(
                        "{}: holds last_hidden={} aux_layers={:?} topk={}, the drafter needs last_hidden={} aux_layers={:?} topk={}: run forge prepare-hidden with this recipe",
                        hd.display(), s.last_hidden, s.aux_layers, s.topk, needs.last_hidden, needs.aux_layers, needs.target_topk
                    )));
                }
                if s.hidden_size != cfg.hidden_size as usize {
                    return Err(TrainerError::Config(format!(
                        "{}: hidden size {} does not match the target's {}",
                        hd.display(),
                        s.hidden_size,
                        cfg.hidden_size
                    )));
                }
                // evaluation reads conversations through the target, also in offline mode
                eval_tokens = data::load_eval_data(recipe)?.map(|e| e.dataset);
                TrainData::Shards(Box::new(ds))
            }
        };

        // The drafter (its own VarStore, fp32 master weights) built from what it needs of the
        // target, prepared from the data when fresh (a resumed run loads what preparing made
        // from its checkpoint).
        let live = match &train_data {
            TrainData::Tokens(_, target) => Some(target),
            TrainData::Shards(_) => None,
        };
        let access = target_access(dir, cfg, &spec.target_needs(fresh), live)?;
        let mut drafter = spec.build(&access, device, compute_kind(recipe, device))?;
        if fresh {
            let src = match &train_data {
                TrainData::Tokens(td, _) => PrepareSource::Tokens(td),
                TrainData::Shards(ds) => PrepareSource::Shards(ds),
            };
            drafter.prepare(&mut Prepare::new(recipe, cfg, src), &access)?;
        }
        drop(access);
        // a warm start: another draft's weights (and buffers, e.g. EAGLE-3's vocabulary)
        if let (true, Some(init)) = (fresh, &t.init_from) {
            let src = crate::engines::load_drafter_with_target(init, device, compute_kind(recipe, device), Some(dir))
                .map_err(|e| TrainerError::Config(format!("train.init_from {}: {e}", init.display())))?;
            if src.spec.kind() != spec.kind() || src.spec.feature_needs() != spec.feature_needs() {
                return Err(TrainerError::Config(format!(
                    "train.init_from {}: a {} draft reading {:?}, the recipe trains a {} draft reading {:?}",
                    init.display(),
                    src.spec.kind(),
                    src.spec.feature_needs(),
                    spec.kind(),
                    spec.feature_needs()
                )));
            }
            let mut w: Vec<(String, Tensor)> = src.drafter.var_store().variables().into_iter().collect();
            w.sort_by(|a, b| a.0.cmp(&b.0));
            checkpoint::load_into_var_store(drafter.var_store(), &w, init).map_err(|e| {
                TrainerError::Config(format!(
                    "train.init_from: {e} (the recipe's drafter must have the same weights and shapes: check its keys, e.g. drafter.fc_bias, draft_vocab_size, the block counts)"
                ))
            })?;
            if dp.rank() == 0 {
                eprintln!(
                    "train.init_from: {} weights from {} ({})",
                    w.len(),
                    init.display(),
                    src.source.display()
                );
            }
        }
        let source = match train_data {
            TrainData::Tokens(td, target) => Source::Online {
                target,
                data: td.dataset,
            },
            TrainData::Shards(ds) => Source::Offline { data: *ds },
        };
        let params: Vec<(String, Tensor)> = {
            let mut v: Vec<(String, Tensor)> = drafter
                .var_store()
                .variables()
                .into_iter()
                .filter(|(_, t)| t.requires_grad())
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let policy = ParamPolicy::new(drafter.param_groups())?;
        if dp.rank() == 0 {
            for g in policy.summary(&params)? {
                eprintln!("{g}");
            }
        }
        let opt = optimizer(recipe, &params, &policy, recipe.dist.zero_stage, dp)?;
        let eval_target = if matches!(source, Source::Offline { .. }) && eval_tokens.is_some() {
            Some(TargetModel::load(dir, target_dtype, device)?)
        } else {
            None
        };

        // Steps.
        let grad_accum = t.grad_accum.max(1);
        let epoch_plan = shard_plan(source.global_plan(recipe, 0), dp.rank(), dp.world());
        let per_epoch = epoch_plan.len() as u64;
        let total = match t.max_steps {
            Some(s) => s,
            None => (t.epochs * per_epoch).div_ceil(grad_accum).max(1),
        };
        let warmup = crate::schedule::LrSchedule::warmup_from(t.warmup_ratio, t.warmup_steps, total);
        let sched = LrSchedule {
            kind: schedule_kind(t.schedule),
            base_lr: t.lr,
            warmup_steps: warmup,
            total_steps: total,
            min_lr_ratio: t.min_lr_ratio,
        };
        let state = TrainerState {
            step: 0,
            total_steps: total,
            epoch: 0,
            batch_in_epoch: 0,
            tokens_seen: 0,
            samples_seen: 0,
            seed: t.seed,
            world_size: dp.world(),
            lr: 0.0,
        };
        Ok(Trainer {
            recipe,
            drafter,
            source,
            device,
            needs,
            eval_data: eval_tokens,
            eval_target,
            params,
            opt,
            sched,
            grad_accum,
            state,
            epoch_plan,
        })
    }

    /// Continues from checkpoint `ck` (of drafter `spec`): its weights, optimizer state and
    /// data position, re-sharded when it was written by another number of ranks.
    fn resume(&mut self, ck: &Path, spec: &DrafterSpec, dp: &mut dyn Comm) -> Result<()> {
        let (world, rank) = (dp.world(), dp.rank());
        let loaded = checkpoint::load(ck)?;
        if &loaded.manifest.drafter != spec {
            return Err(TrainerError::Config(format!(
                "{}: was trained with another drafter configuration ({:?}); the recipe now gives {:?}",
                ck.display(),
                loaded.manifest.drafter,
                spec
            )));
        }
        let old_world = loaded.state.world_size.max(1);
        let mut resumed = loaded.state.clone();
        if old_world != world {
            let plan_len = self.source.global_plan(self.recipe, resumed.epoch).len();
            (resumed.epoch, resumed.batch_in_epoch) =
                reshard_position(resumed.batch_in_epoch, resumed.epoch, old_world, world, plan_len)
                    .map_err(|e| e.at(ck))?;
            resumed.world_size = world;
            if rank == 0 {
                eprintln!(
                    "re-sharding {} from {old_world} to {world} rank(s) (optimizer state and data position)",
                    ck.display()
                );
            }
        }
        checkpoint::load_into_var_store(self.drafter.var_store(), &loaded.weights, ck)?;
        let param_shapes: BTreeMap<String, Vec<i64>> = self.params.iter().map(|(n, p)| (n.clone(), p.size())).collect();
        let full = assemble_full_state(loaded.optimizer, &param_shapes)?;
        self.opt.load_full_state(&full, loaded.state.step)?;
        resumed.total_steps = self.state.total_steps;
        self.state = resumed;
        self.epoch_plan = self.plan(self.state.epoch, dp);
        if dp.rank() == 0 {
            eprintln!("resuming from {} (step {})", ck.display(), self.state.step);
        }
        Ok(())
    }

    /// Runs optimizer step `step` (0-based, the next one): this rank's micro-batches of the
    /// step (features, loss, backward; the gradients accumulate), then the optimizer step.
    /// Moves the data position and the counters of `state` on; returns the step's metrics,
    /// summed over its micro-batches and the ranks. Every rank calls it at the same step.
    fn train_step(&mut self, step: u64, dp: &mut dyn Comm) -> Result<StepMetrics> {
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
        self.opt.zero_grad();
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

    fn plan(&self, epoch: u64, dp: &dyn Comm) -> Vec<Vec<usize>> {
        shard_plan(self.source.global_plan(self.recipe, epoch), dp.rank(), dp.world())
    }

    /// Target features of a micro-batch of token samples (online).
    fn online_features(
        target: &TargetModel,
        needs: &FeatureNeeds,
        data: &TokenDataset,
        idx: &[usize],
        device: Device,
    ) -> Result<(Features, usize)> {
        let samples: Vec<(&[u32], &[u8])> = idx.iter().map(|&i| (data.input_ids(i), data.mask(i))).collect();
        let batch = Batch::collate(&samples, 0);
        let (ids, am, pos, lm) = batch_tensors(&batch, device);
        Ok((target_features(target, needs, ids, am, pos, lm)?, batch.tokens()))
    }

    fn offline_features(
        data: &mut HiddenDataset,
        needs: &FeatureNeeds,
        idx: &[usize],
        device: Device,
    ) -> Result<(Features, usize)> {
        let s = data.settings().clone();
        let h = s.hidden_size as i64;
        let a = (s.aux_layers.len() * s.hidden_size) as i64;
        let k = s.topk as i64;
        let mut rows = Vec::with_capacity(idx.len());
        for &i in idx {
            let v = data.sample(i)?;
            let t = v.input_ids.len() as i64;
            let hid =
                (!v.hidden_state.is_empty()).then(|| Tensor::from_data_size(v.hidden_state, &[t, h], Kind::BFloat16));
            let aux = (!v.aux_hidden_state.is_empty())
                .then(|| Tensor::from_data_size(v.aux_hidden_state, &[t, a], Kind::BFloat16));
            let topk = (needs.target_topk > 0 && k > 0).then(|| {
                let lp = Tensor::from_data_size(v.topk_logprobs, &[t, k], Kind::BFloat16);
                let ids = Tensor::from_slice(v.topk_ids).view([t, k]).to_kind(Kind::Int64);
                (lp, ids)
            });
            rows.push((v.input_ids.to_vec(), v.loss_mask.to_vec(), hid, aux, topk));
        }
        let samples: Vec<(&[u32], &[u8])> = rows.iter().map(|r| (&r.0[..], &r.1[..])).collect();
        let batch = Batch::collate(&samples, 0);
        let l = batch.len as i64;
        let pad = |parts: Vec<Option<&Tensor>>, width: i64| -> Option<Tensor> {
            if parts.iter().any(|p| p.is_none()) {
                return None;
            }
            let padded: Vec<Tensor> = parts
                .into_iter()
                .flatten()
                .map(|t| {
                    let n = t.size()[0];
                    if n == l {
                        t.shallow_clone()
                    } else {
                        Tensor::cat(
                            &[
                                t.shallow_clone(),
                                Tensor::zeros([l - n, width], (Kind::BFloat16, Device::Cpu)),
                            ],
                            0,
                        )
                    }
                })
                .collect();
            Some(Tensor::stack(&padded, 0).to_device(device).to_kind(Kind::Float))
        };
        let hidden = pad(rows.iter().map(|r| r.2.as_ref()).collect(), h);
        let aux = pad(rows.iter().map(|r| r.3.as_ref()).collect(), a);
        // the drafter's top-k (the shards may hold more); padded rows: log-prob 0, id 0
        let want = needs.target_topk as i64;
        let target_topk = if want > 0 {
            let (mut lps, mut idss) = (Vec::new(), Vec::new());
            for r in &rows {
                let (lp, ids) = r.4.as_ref().ok_or_else(|| {
                    TrainerError::Config(
                        "the hidden-state shards hold no target top-k: run forge prepare-hidden with this recipe"
                            .into(),
                    )
                })?;
                let n = lp.size()[0];
                lps.push(Tensor::cat(
                    &[
                        lp.to_kind(Kind::Float),
                        Tensor::zeros([l - n, k], (Kind::Float, Device::Cpu)),
                    ],
                    0,
                ));
                idss.push(Tensor::cat(
                    &[
                        ids.shallow_clone(),
                        Tensor::zeros([l - n, k], (Kind::Int64, Device::Cpu)),
                    ],
                    0,
                ));
            }
            let lp = Tensor::stack(&lps, 0).narrow(2, 0, want).to_device(device);
            let ids = Tensor::stack(&idss, 0).narrow(2, 0, want).to_device(device);
            Some((lp, ids))
        } else {
            None
        };
        let (ids, am, pos, lm) = batch_tensors(&batch, device);
        Ok((
            Features {
                input_ids: ids,
                attention_mask: am,
                position_ids: pos,
                loss_mask: lm,
                hidden_normed: hidden,
                aux_hidden: aux,
                target_topk,
            },
            batch.tokens(),
        ))
    }

    fn features(&mut self, idx: &[usize]) -> Result<(Features, usize)> {
        let device = self.device;
        match &mut self.source {
            Source::Online { target, data } => Self::online_features(target, &self.needs, data, idx, device),
            Source::Offline { data } => Self::offline_features(data, &self.needs, idx, device),
        }
    }

    /// Loss and metrics on the eval conversations (no gradients).
    fn evaluate(&mut self, dp: &mut dyn Comm, step: u64, total: u64) -> Result<Option<BTreeMap<String, f64>>> {
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
        Ok(Some(rows))
    }
}

/// The recipe's AdamW over `params` (sorted by name) with the drafter's parameter groups,
/// its state sharded at `zero_stage` over the ranks of `dp`.
pub(crate) fn optimizer(
    recipe: &Recipe,
    params: &[(String, Tensor)],
    policy: &ParamPolicy,
    zero_stage: u32,
    dp: &mut dyn Comm,
) -> Result<DistAdamW> {
    let t = &recipe.train;
    DistAdamW::new(
        params.iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect(),
        AdamWConfig {
            lr: t.lr,
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_eps,
            weight_decay: t.weight_decay,
        },
        policy,
        zero_stage,
        recipe.dist.bucket_mb,
        dp,
    )
}

/// The frozen target's forward over a batch (no gradients) and the features the drafter
/// needs from it: what online training computes inside every step (and `forge bench train`
/// times). Right padding under a causal mask: real tokens never attend to padding.
pub(crate) fn target_features(
    target: &TargetModel,
    needs: &FeatureNeeds,
    ids: Tensor,
    am: Tensor,
    pos: Tensor,
    lm: Tensor,
) -> Result<Features> {
    let capture = Capture {
        layers: needs.aux_layers.clone(),
        logits: LogitsMode::None,
    };
    let out = tch::no_grad(|| target.forward(&ids, None, None, None, &capture))?;
    let aux_hidden = (!out.layers.is_empty()).then(|| Tensor::cat(&out.layers, -1));
    let target_topk = (needs.target_topk > 0).then(|| {
        tch::no_grad(|| {
            let logp = target
                .logits(&out.hidden_normed)
                .to_kind(Kind::Float)
                .log_softmax(-1, Kind::Float);
            logp.topk(needs.target_topk as i64, -1, true, true)
        })
    });
    Ok(Features {
        input_ids: ids,
        attention_mask: am,
        position_ids: pos,
        loss_mask: lm,
        hidden_normed: Some(out.hidden_normed),
        aux_hidden,
        target_topk,
    })
}

fn batch_tensors(b: &Batch, device: Device) -> (Tensor, Tensor, Tensor, Tensor) {
    let shape = [b.batch as i64, b.len as i64];
    let t = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
    (
        t(&b.input_ids),
        t(&b.attention_mask),
        t(&b.position_ids),
        t(&b.loss_mask),
    )
}

fn schedule_kind(s: Schedule) -> ScheduleKind {
    match s {
        Schedule::Constant => ScheduleKind::Constant,
        Schedule::Linear => ScheduleKind::Linear,
        Schedule::Cosine => ScheduleKind::Cosine,
    }
}

pub(crate) fn compute_kind(recipe: &Recipe, device: Device) -> Kind {
    match recipe.train.dtype {
        Precision::Auto if device.is_cuda() => Kind::BFloat16,
        Precision::Auto | Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
        Precision::Fp16 => Kind::Half,
    }
}

/// The checkpoint to resume from, if any.
fn resume_from(recipe: &Recipe, resume: &Option<String>) -> Result<Option<PathBuf>> {
    let dir = recipe
        .checkpoint
        .dir
        .clone()
        .ok_or_else(|| TrainerError::Config("checkpoint.dir is not set".into()))?;
    Ok(match resume.as_deref() {
        None => {
            if let Some(existing) = checkpoint::latest(&dir) {
                return Err(TrainerError::Config(format!(
                    "checkpoint.dir {} already holds checkpoints (newest: {}): pass --resume auto to continue that run, or set another checkpoint.dir (nothing was overwritten)",
                    dir.display(),
                    existing.display()
                )));
            }
            None
        }
        Some("auto") => checkpoint::latest(&dir),
        Some(p) => {
            let p = PathBuf::from(p);
            checkpoint::read_manifest(&p)?;
            Some(p)
        }
    })
}

/// A data position that another world size cannot take over (see [`reshard_position`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReshardError {
    pub old_world: usize,
    pub new_world: usize,
    /// Micro-batches of the epoch's global plan consumed.
    pub global: usize,
    pub epoch: u64,
}

impl std::fmt::Display for ReshardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ReshardError {
            old_world,
            new_world,
            global,
            epoch,
        } = self;
        write!(
            f,
            "was written by {old_world} rank(s) after {global} micro-batches of epoch {epoch}, which {new_world} ranks cannot split evenly: resume with {old_world} rank(s) (or a world size dividing {global}), or start a new run"
        )
    }
}

impl ReshardError {
    /// The error about checkpoint `ckpt`.
    pub fn at(&self, ckpt: &Path) -> TrainerError {
        TrainerError::Config(format!("{}: {self}", ckpt.display()))
    }
}

/// Where a run that `old_world` ranks left at (`epoch`, `batch_in_epoch`: the micro-batches
/// each rank had consumed of its shard of the epoch's global plan, `global_plan_len` long)
/// continues on `new_world` ranks, as (epoch, batch_in_epoch). Same world: unchanged.
/// Every rank had consumed `batch_in_epoch` micro-batches of its shard, i.e. the first
/// `batch_in_epoch * old_world` of the global plan, which the new ranks must split evenly.
/// A position after the last micro-batch of an epoch moves to the start of the next one
/// (the loop moves on lazily, when it needs the next micro-batch).
pub fn reshard_position(
    batch_in_epoch: usize,
    epoch: u64,
    old_world: usize,
    new_world: usize,
    global_plan_len: usize,
) -> std::result::Result<(u64, usize), ReshardError> {
    let (old_world, new_world) = (old_world.max(1), new_world.max(1));
    if old_world == new_world {
        return Ok((epoch, batch_in_epoch));
    }
    let (epoch, batch_in_epoch) = if batch_in_epoch >= global_plan_len.div_ceil(old_world) {
        (epoch + 1, 0)
    } else {
        (epoch, batch_in_epoch)
    };
    let global = batch_in_epoch * old_world;
    if global % new_world != 0 {
        return Err(ReshardError {
            old_world,
            new_world,
            global,
            epoch,
        });
    }
    Ok((epoch, global / new_world))
}

/// What rank 0 reports while training: a metric row every `log.every_steps` steps (and
/// after the last; averaged over the steps since the previous row), the evaluations every
/// `train.eval_every` steps, and the progress bar. Other ranks keep no logger.
struct RunLog {
    logger: Option<MetricsLogger>,
    pb: indicatif::ProgressBar,
    rows: Cadence,
    evals_at: Cadence,
    /// The steps since the last row.
    window: Accum,
    window_start: Instant,
    evals: Vec<(u64, BTreeMap<String, f64>)>,
    last_loss: f64,
    /// Tokens trained on in this run (all ranks).
    run_tokens: u64,
}

impl RunLog {
    /// The metric files in `ckpt_dir` (new, or continued at `start_step`) on rank 0.
    fn open(
        recipe: &Recipe,
        ckpt_dir: &Path,
        start_step: u64,
        total: u64,
        show_progress: bool,
        rank0: bool,
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
        let pb = data::progress_bar(total, "training", show_progress && rank0);
        pb.set_position(start_step);
        Ok(RunLog {
            logger,
            pb,
            rows: Cadence {
                every: recipe.log.every_steps.max(1),
                last: total,
            },
            evals_at: Cadence {
                every: recipe.train.eval_every.unwrap_or(0),
                last: total,
            },
            window: Accum::default(),
            window_start: Instant::now(),
            evals: Vec::new(),
            last_loss: f64::NAN,
            run_tokens: 0,
        })
    }

    /// Whether to evaluate before the first step of a run starting at `start_step`.
    fn eval_at_start(&self, start_step: u64) -> bool {
        start_step == 0 && self.evals_at.enabled()
    }

    /// Whether to evaluate after `step` steps.
    fn eval_due(&self, step: u64) -> bool {
        self.evals_at.due(step)
    }

    /// Records the step that brought the run to `step` steps done; at the end of a log
    /// interval returns its metrics (as logged, on every rank).
    fn step(&mut self, step: u64, m: &StepMetrics) -> Result<Option<Vec<(String, f64)>>> {
        let acc = &m.acc;
        self.run_tokens += acc.tokens as u64;
        self.last_loss = acc.loss_sum / acc.batches.max(1.0);
        self.window.merge(acc);
        let secs = self.window_start.elapsed().as_secs_f64();
        let tps = self.window.tokens / secs.max(1e-9);
        self.pb.set_position(step);
        self.pb
            .set_message(format!("loss {:.4} lr {:.2e} {tps:.0} tok/s", self.last_loss, m.lr));
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

    /// A warning for the person running the job (rank 0), above the progress bar.
    fn warn(&self, line: &str) {
        if self.logger.is_some() {
            self.pb.suspend(|| eprintln!("warning: {line}"));
        }
    }

    /// Records an evaluation after `step` steps.
    fn eval(&mut self, step: u64, e: BTreeMap<String, f64>) -> Result<()> {
        if let Some(l) = self.logger.as_mut() {
            let rows: Vec<(&str, f64)> = e.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            l.log(step, &rows)?;
        }
        self.evals.push((step, e));
        Ok(())
    }

    fn flush(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    fn finish(&mut self) {
        self.pb.finish_and_clear();
        self.flush();
    }
}

/// The evaluation row of the simulated acceptance length ([`forge_models::drafters::sim_tau`]),
/// which picks the `best/` checkpoint.
const SIM_TAU: &str = "eval/sim_tau";

/// Creates the run folder and writes the resolved recipe into it (rank 0).
fn write_run_folder(recipe: &Recipe, ckpt_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(ckpt_dir).map_err(|source| TrainerError::Io {
        path: ckpt_dir.to_path_buf(),
        source,
    })?;
    let yaml = recipe.to_yaml().map_err(TrainerError::Config)?;
    let p = ckpt_dir.join("recipe.resolved.yaml");
    std::fs::write(&p, yaml).map_err(|source| TrainerError::Io { path: p, source })?;
    Ok(())
}

/// Trains the recipe's drafter.
pub fn train(recipe: &Recipe, opts: &TrainOptions, dp: &mut dyn Comm) -> Result<TrainSummary> {
    let t_start = Instant::now();
    let ckpt_dir = recipe
        .checkpoint
        .dir
        .clone()
        .ok_or_else(|| TrainerError::Config("checkpoint.dir is not set: set it to the output folder".into()))?;
    let dir = target_dir(recipe)?.to_path_buf();
    let cfg = data::target_config(recipe)?;
    let spec = recipe.drafter.to_spec(&cfg, Some(&dir))?;
    if dp.rank() == 0 {
        for w in spec.warnings() {
            eprintln!("warning: {w}");
        }
    }
    // decided before any expensive loading: refuses to overwrite an earlier run
    let resume_ck = resume_from(recipe, &opts.resume)?;
    let mut trainer = Trainer::new(recipe, &cfg, &spec, &dir, resume_ck.is_none(), opts, dp)?;
    let total = trainer.state.total_steps;
    let checkpointer = Checkpointer::new(recipe, ckpt_dir.clone(), total, spec.clone(), dir, cfg.raw.clone(), dp)?;
    if let Some(ck) = resume_ck {
        trainer.resume(&ck, &spec, dp)?;
    }
    let start_step = trainer.state.step;
    same_start_on_every_rank(dp, &trainer.state)?;

    let rank0 = dp.rank() == 0;
    if rank0 {
        write_run_folder(recipe, &ckpt_dir)?;
    }
    let mut log = RunLog::open(recipe, &ckpt_dir, start_step, total, opts.show_progress, rank0)?;
    if log.eval_at_start(start_step) {
        if let Some(e) = trainer.evaluate(dp, 0, total)? {
            log.eval(0, e)?;
        }
    }

    let mut last_ckpt = None;
    // the best simulated acceptance so far: a resumed run continues its record, a fresh one
    // starts its own (a best/ left by an earlier, crashed run is replaced at its first eval)
    let mut best = if start_step > 0 {
        checkpointer.best().map(|(v, _)| v)
    } else {
        None
    };
    let loop_start = Instant::now();
    for step in start_step..total {
        let m = trainer.train_step(step, dp)?;
        let done = trainer.state.step;
        if let Some(interval) = log.step(done, &m)? {
            for w in trainer.drafter.watch(&interval) {
                log.warn(&w);
            }
        }
        if log.eval_due(done) {
            if let Some(e) = trainer.evaluate(dp, done, total)? {
                if let Some(&t) = e.get(SIM_TAU) {
                    if best.is_none_or(|b| t > b) {
                        best = Some(t);
                        checkpointer.save_best(dp, &trainer.state, trainer.drafter.var_store(), SIM_TAU, t)?;
                    }
                }
                log.eval(done, e)?;
            }
        }
        if checkpointer.due(done) {
            if let Some(path) = checkpointer.save(dp, &trainer.state, trainer.drafter.var_store(), &trainer.opt)? {
                last_ckpt = Some(path);
            }
            log.flush();
        }
    }
    log.finish();
    Ok(TrainSummary {
        start_step,
        steps: total,
        last_loss: log.last_loss,
        tokens: log.run_tokens,
        seconds: t_start.elapsed().as_secs_f64(),
        last_checkpoint: last_ckpt,
        peak_rss_mb: peak_rss_mb(),
        eval: log.evals,
        step_seconds: loop_start.elapsed().as_secs_f64(),
        optimizer_state_bytes: trainer.opt.state_bytes(),
        rank: dp.rank(),
        world: dp.world(),
    })
}

/// Checks that every rank starts from the same step and data position: ranks that resumed
/// from different checkpoints (a `checkpoint.dir` that is not one folder all ranks see)
/// would otherwise train different models and pair up their collectives wrongly.
fn same_start_on_every_rank(dp: &mut dyn Comm, state: &TrainerState) -> Result<()> {
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
fn check_same_weights(dp: &mut dyn Comm, params: &[(String, Tensor)], step: u64) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshard_same_world_keeps_the_position() {
        assert_eq!(reshard_position(3, 1, 2, 2, 10), Ok((1, 3)));
        // even at the end of an epoch: the loop moves on by itself
        assert_eq!(reshard_position(5, 1, 2, 2, 10), Ok((1, 5)));
        assert_eq!(reshard_position(0, 0, 1, 1, 0), Ok((0, 0)));
    }

    #[test]
    fn reshard_two_ranks_to_one_takes_the_global_count() {
        // 2 ranks had each run 3 micro-batches: the first 6 of the global plan
        assert_eq!(reshard_position(3, 0, 2, 1, 10), Ok((0, 6)));
        assert_eq!(reshard_position(0, 2, 2, 1, 10), Ok((2, 0)));
    }

    #[test]
    fn reshard_one_rank_to_two_needs_an_even_count() {
        assert_eq!(reshard_position(4, 0, 1, 2, 10), Ok((0, 2)));
        let e = reshard_position(3, 1, 1, 2, 10).expect_err("3 micro-batches over 2 ranks");
        assert_eq!(
            e,
            ReshardError {
                old_world: 1,
                new_world: 2,
                global: 3,
                epoch: 1
            }
        );
        let msg = e.at(Path::new("/runs/x/step_3")).to_string();
        assert!(
            msg.contains("/runs/x/step_3: was written by 1 rank(s) after 3 micro-batches of epoch 1, which 2 ranks cannot split evenly")
                && msg.contains("resume with 1 rank(s) (or a world size dividing 3), or start a new run"),
            "{msg}"
        );
    }

    #[test]
    fn reshard_four_ranks_to_two() {
        // 4 ranks x 3 = 12 global micro-batches = 6 per rank on 2
        assert_eq!(reshard_position(3, 0, 4, 2, 20), Ok((0, 6)));
        // and 4 -> 3 cannot split 4 x 1
        assert_eq!(reshard_position(1, 0, 4, 3, 20).map_err(|e| e.global), Err(4));
    }

    #[test]
    fn reshard_at_the_end_of_an_epoch_moves_to_the_next() {
        // a global plan of 7: 2 ranks run 4 each (the last one padded); after all 4 the
        // checkpoint resumes at the start of epoch 1, whatever the new world
        assert_eq!(reshard_position(4, 0, 2, 1, 7), Ok((1, 0)));
        assert_eq!(reshard_position(4, 0, 2, 3, 7), Ok((1, 0)));
        // one micro-batch before the end it stays (3 x 2 = 6 of 7 consumed)
        assert_eq!(reshard_position(3, 0, 2, 1, 7), Ok((0, 6)));
        // 1 rank at the end of a 5-long epoch, onto 2
        assert_eq!(reshard_position(5, 3, 1, 2, 5), Ok((4, 0)));
    }
}
