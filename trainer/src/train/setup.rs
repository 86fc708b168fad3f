//! Building a run: data (and the target, online), the drafter (prepared, or warm-started
//! from another draft), its optimizer and learning-rate schedule.

use super::{Source, TrainObserver, TrainOptions, Trainer};
use crate::checkpoint::{self, TrainerState};
use crate::data::{self, target_placement};
use crate::drafter::{target_access, Prepare, PrepareSource};
use crate::error::{Result, TrainerError};
use crate::optim::{AdamWConfig, ParamPolicy};
use crate::parallel::zero::DistAdamW;
use crate::parallel::Comm;
use crate::recipe::{DataMode, Precision, Recipe, Schedule};
use crate::schedule::{LrSchedule, ScheduleKind};
use forge_data::batch::shard_plan;
use forge_data::hidden::HiddenDataset;
use forge_models::drafters::DrafterSpec;
use forge_models::{TargetConfig, TargetModel};
use std::path::Path;
use tch::{Device, Kind, Tensor};

impl<'a> Trainer<'a> {
    /// Loads the data (and the target, online), builds the drafter (prepared from the data
    /// when `fresh`, i.e. not about to be resumed) and its optimizer: a run at step 0 of the
    /// recipe's steps.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        recipe: &'a Recipe,
        cfg: &TargetConfig,
        spec: &DrafterSpec,
        dir: &Path,
        fresh: bool,
        opts: &TrainOptions,
        dp: &mut dyn Comm,
        obs: &mut dyn TrainObserver,
    ) -> Result<Self> {
        let t = &recipe.train;
        let (target_dtype, device) = target_placement(recipe)?;
        tch::manual_seed(t.seed as i64);

        let needs = spec.feature_needs();

        // Data (and the target, online).
        enum TrainData {
            /// Online: the conversations and the frozen target that runs inside each step.
            Tokens(Box<forge_data::LoadedDataset>, Box<TargetModel>),
            Shards(Box<HiddenDataset>),
        }
        let eval_tokens;
        let train_data = match recipe.data.mode {
            DataMode::Online => {
                let shown = opts.data_progress.as_ref().filter(|_| crate::parallel::leads(dp));
                let td = data::load_token_data(recipe, &|w: &str, d: u64, t: u64| {
                    if let Some(p) = shown {
                        p(w, d, t)
                    }
                })?;
                eval_tokens = td.eval.map(|e| e.dataset);
                let target = TargetModel::load_parallel(dir, target_dtype, device, opts.tensor_parallel.clone())?;
                shard_note(&target, dp, obs)?;
                TrainData::Tokens(Box::new(td.train), Box::new(target))
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
            TrainData::Tokens(_, target) => Some(&**target),
            TrainData::Shards(_) => None,
        };
        let access = target_access(dir, cfg, &spec.target_needs(fresh), live)?;
        let mut drafter = spec.build(&access, device, compute_kind(recipe, device))?;
        if fresh {
            let src = match &train_data {
                TrainData::Tokens(td, _) => PrepareSource::Tokens(td),
                TrainData::Shards(ds) => PrepareSource::Shards(ds),
            };
            let mut report = |line: &str| obs.note(line);
            drafter.prepare(&mut Prepare::new(recipe, cfg, src, &mut report), &access)?;
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
            if crate::parallel::leads(dp) {
                obs.note(&format!(
                    "train.init_from: {} weights from {} ({})",
                    w.len(),
                    init.display(),
                    src.source.display()
                ));
            }
        }
        let source = match train_data {
            TrainData::Tokens(td, target) => Source::Online {
                target: *target,
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
        if crate::parallel::leads(dp) {
            obs.note(&trainable_line(&params, cfg.num_parameters()));
            for g in policy.summary(&params)? {
                obs.note(&g.to_string());
            }
        }
        let opt = optimizer(recipe, &params, &policy, recipe.dist.zero_stage, dp)?;
        let eval_target = if matches!(source, Source::Offline { .. }) && eval_tokens.is_some() {
            let target = TargetModel::load_parallel(dir, target_dtype, device, opts.tensor_parallel.clone())?;
            shard_note(&target, dp, obs)?;
            Some(target)
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

/// Numbers of parameters as people say them: 52.4M, 8.03B, 960K.
pub(crate) fn short_count(n: i64) -> String {
    let x = n as f64;
    let (v, unit) = if x >= 1e9 {
        (x / 1e9, "B")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "K")
    } else {
        return n.to_string();
    };
    // three significant digits
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.decimals$}{unit}")
}

/// `trainable parameters: 52,428,800 (52.4M; frozen target 8.03B, 0.65%)`: the elements
/// of every tensor the optimizer updates, printed at the start of every run.
pub(crate) fn trainable_line(params: &[(String, Tensor)], target_params: i64) -> String {
    let n: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
    let digits = n.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!(
        "trainable parameters: {grouped} ({}; frozen target {}, {:.2}% of it)",
        short_count(n),
        short_count(target_params),
        100.0 * n as f64 / target_params.max(1) as f64
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

/// Reports, for a tensor-parallel target, the layer parameters each rank of the target's
/// group holds against the whole target's (every rank's count, gathered over the group).
fn shard_note(target: &TargetModel, dp: &dyn Comm, obs: &mut dyn TrainObserver) -> Result<()> {
    let Some(tp) = target.tensor_parallel() else {
        return Ok(());
    };
    let (held, full) = target.layer_parameters();
    let counts = tp.gather_last(&Tensor::from_slice(&[held as f64]));
    tp.check()?;
    let counts: Vec<f64> = Vec::<f64>::try_from(&counts).map_err(TrainerError::from)?;
    if crate::parallel::leads(dp) {
        let shares: Vec<String> = counts
            .iter()
            .enumerate()
            .map(|(r, &c)| format!("rank {r} {} ({:.1}%)", c as i64, 100.0 * c / full as f64))
            .collect();
        obs.note(&format!(
            "tensor parallel: the target's {full} layer parameters split over {} ranks: {}",
            tp.size(),
            shares.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trainable_line_sums_the_elements_and_groups_digits() {
        let params = vec![
            ("a".to_string(), Tensor::zeros([4096, 4096], (Kind::Float, Device::Cpu))),
            ("b".to_string(), Tensor::zeros([4096], (Kind::Float, Device::Cpu))),
        ];
        assert_eq!(
            trainable_line(&params, 8_030_261_248),
            "trainable parameters: 16,781,312 (16.8M; frozen target 8.03B, 0.21% of it)"
        );
        assert_eq!(short_count(960), "960");
        assert_eq!(short_count(134_515_008), "135M");
        assert_eq!(short_count(3_830_000), "3.83M");
    }
}
