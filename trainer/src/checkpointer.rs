//! When the trainer checkpoints, and how the ranks write one checkpoint together.
//!
//! A checkpoint is due every `checkpoint.every_steps` steps and after the last step. Rank 0
//! writes the weights, the trainer state and the manifest; the optimizer state is rank 0's
//! whole state (ZeRO stage 0) or, when it is sharded (stages 1-2), every rank's shard, all
//! written into rank 0's temporary folder:
//!
//! 1. rank 0 begins the temporary folder; barrier;
//! 2. every rank writes its shard; barrier;
//! 3. rank 0 finishes (weights, state, manifest, rename) and prunes old checkpoints; barrier,
//!    so that no rank runs ahead while the folder is not complete.
//!
//! Without shards there are no barriers: rank 0 does everything.

use crate::checkpoint::{self, CheckpointData, TrainerState};
use crate::error::Result;
use crate::parallel::zero::DistAdamW;
use crate::parallel::Comm;
use crate::recipe::Recipe;
use crate::schedule::Cadence;
use forge_models::drafters::DrafterSpec;
use serde_json::json;
use std::path::PathBuf;
use tch::{nn, Tensor};

/// Writes the run's checkpoints into `checkpoint.dir`.
pub struct Checkpointer {
    dir: PathBuf,
    /// Rank 0's process id: names the temporary folder every rank writes into.
    tag: u32,
    cadence: Cadence,
    keep_last: usize,
    /// What every manifest records: the drafter, the target folder and its config.json.
    drafter: DrafterSpec,
    target: PathBuf,
    target_config: serde_json::Value,
}

impl Checkpointer {
    /// Checkpoints of a run of `total_steps` steps into `dir`. Collective: every rank learns
    /// rank 0's process id (one broadcast).
    pub fn new(
        recipe: &Recipe,
        dir: PathBuf,
        total_steps: u64,
        drafter: DrafterSpec,
        target: PathBuf,
        target_config: serde_json::Value,
        dp: &mut dyn Comm,
    ) -> Result<Checkpointer> {
        // rank 0's process id names the temporary checkpoint folders all ranks write into
        let tag = {
            let mut pid = Tensor::from_slice(&[std::process::id() as i64]).to_device(dp.device());
            dp.broadcast(&mut pid, 0)?;
            pid.int64_value(&[0]) as u32
        };
        Ok(Checkpointer {
            dir,
            tag,
            cadence: Cadence {
                every: recipe.checkpoint.every_steps.max(1),
                last: total_steps,
            },
            keep_last: recipe.checkpoint.keep_last.max(1) as usize,
            drafter,
            target,
            target_config,
        })
    }

    /// Whether the run checkpoints after `step` steps.
    pub fn due(&self, step: u64) -> bool {
        self.cadence.due(step)
    }

    /// Writes the checkpoint of `state.step`: the weights of `weights`, `opt`'s state and
    /// `state`. Every rank calls it (it holds barriers when `opt`'s state is sharded).
    /// Returns the checkpoint folder on rank 0, None on the other ranks.
    pub fn save(
        &self,
        dp: &mut dyn Comm,
        state: &TrainerState,
        weights: &nn::VarStore,
        opt: &DistAdamW,
    ) -> Result<Option<PathBuf>> {
        let (rank, world) = (dp.rank(), dp.world());
        // a tensor-parallel run's other target shards compute the same state: one group writes
        let writes = dp.writes();
        let rank0 = rank == 0 && writes;
        // sharded state: every rank writes its shard into rank 0's temporary folder
        let sharded = opt.stage() > 0;
        let tmp = checkpoint::tmp_dir(&self.dir, state.step, self.tag);
        if rank0 {
            checkpoint::begin(&self.dir, state.step, self.tag)?;
        }
        if sharded {
            dp.barrier()?;
            if writes {
                checkpoint::write_shard(&tmp, rank, state.step, &opt.state_tensors())?;
            }
            dp.barrier()?;
        }
        let mut saved = None;
        if rank0 {
            let weights: Vec<(String, Tensor)> = {
                let mut w: Vec<(String, Tensor)> = weights.variables().into_iter().collect();
                w.sort_by(|a, b| a.0.cmp(&b.0));
                w
            };
            let path = checkpoint::finish(
                &self.dir,
                &tmp,
                &CheckpointData {
                    weights,
                    optimizer: if sharded { Vec::new() } else { opt.state_tensors() },
                    optimizer_shards: if sharded { world } else { 0 },
                    zero_stage: opt.stage(),
                    state,
                    drafter: &self.drafter,
                    target: &self.target,
                    target_config: &self.target_config,
                },
            )?;
            checkpoint::prune(&self.dir, self.keep_last)?;
            saved = Some(path);
        }
        if sharded {
            dp.barrier()?;
        }
        Ok(saved)
    }

    /// The best evaluation so far (`best/best.json` under `checkpoint.dir`: the value of
    /// `metric` and its step), when a best checkpoint exists.
    pub fn best(&self) -> Option<(f64, u64)> {
        let text = std::fs::read_to_string(self.dir.join(BEST).join(BEST_JSON)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some((v["value"].as_f64()?, v["step"].as_u64()?))
    }

    /// Rank 0 writes the weights of `state.step` as `best/` (weights, trainer state and a
    /// manifest without optimizer state: for export and eval, not for resuming), with
    /// `best.json` naming `metric`, its value and the step. The other ranks do nothing.
    pub fn save_best(
        &self,
        dp: &dyn Comm,
        state: &TrainerState,
        weights: &nn::VarStore,
        metric: &str,
        value: f64,
    ) -> Result<()> {
        if !crate::parallel::leads(dp) {
            return Ok(());
        }
        let tmp = self.dir.join(format!(".best.tmp.{}", self.tag));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|source| crate::error::TrainerError::Io {
                path: tmp.clone(),
                source,
            })?;
        }
        std::fs::create_dir_all(&tmp).map_err(|source| crate::error::TrainerError::Io {
            path: tmp.clone(),
            source,
        })?;
        let mut w: Vec<(String, Tensor)> = weights.variables().into_iter().collect();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        let best = json!({ "metric": metric, "value": value, "step": state.step });
        let p = tmp.join(BEST_JSON);
        std::fs::write(&p, best.to_string()).map_err(|source| crate::error::TrainerError::Io {
            path: p.clone(),
            source,
        })?;
        // assembled beside, then swapped in: a crash at any moment leaves a complete best/
        // (or the previous one under .best.old.<pid>)
        let staged = self.dir.join(format!(".best.new.{}", self.tag));
        checkpoint::finish_as(
            &tmp,
            &CheckpointData {
                weights: w,
                optimizer: Vec::new(),
                optimizer_shards: 0,
                zero_stage: 0,
                state,
                drafter: &self.drafter,
                target: &self.target,
                target_config: &self.target_config,
            },
            staged.clone(),
        )?;
        let io = |path: PathBuf| move |source| crate::error::TrainerError::Io { path, source };
        let best = self.dir.join(BEST);
        let old = self.dir.join(format!(".best.old.{}", self.tag));
        if best.exists() {
            std::fs::rename(&best, &old).map_err(io(best.clone()))?;
        }
        std::fs::rename(&staged, &best).map_err(io(best.clone()))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io(old.clone()))?;
        }
        Ok(())
    }
}

/// The folder of the best evaluated weights under `checkpoint.dir`, and its record.
pub const BEST: &str = "best";
const BEST_JSON: &str = "best.json";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamWConfig, ParamPolicy};
    use crate::parallel::SingleProcess;
    use tch::{Device, Kind};

    /// Any spec will do: checkpoints store it as it is (read as a checkpoint would be).
    fn spec() -> DrafterSpec {
        serde_json::from_value(serde_json::json!({
            "kind": "medusa", "num_heads": 1, "num_layers": 1, "original_lm_head": false,
            "loss_decay": 0.8, "top_k": 1, "hidden_size": 2, "vocab_size": 3
        }))
        .expect("a stored spec")
    }

    fn state(step: u64) -> TrainerState {
        TrainerState {
            step,
            total_steps: 7,
            epoch: 0,
            batch_in_epoch: step as usize,
            tokens_seen: 10 * step,
            samples_seen: step,
            seed: 0,
            world_size: 1,
            lr: 1e-3,
        }
    }

    #[test]
    fn checkpoints_every_n_steps_and_the_last_keeping_the_newest() {
        let dir = std::env::temp_dir().join(format!("forge-checkpointer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let recipe = Recipe::from_str(
            include_str!("../../recipes/medusa-tiny.yaml"),
            &["checkpoint.every_steps=3".into(), "checkpoint.keep_last=2".into()],
        )
        .expect("recipe");
        let mut dp = SingleProcess;
        let c = Checkpointer::new(
            &recipe,
            dir.clone(),
            7,
            spec(),
            PathBuf::from("/target"),
            serde_json::json!({}),
            &mut dp,
        )
        .expect("checkpointer");
        assert_eq!((1..=8).filter(|&s| c.due(s)).collect::<Vec<_>>(), [3, 6, 7]);

        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs
            .root()
            .var_copy("w", &Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]));
        let cfg = AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        for stage in [0, 1] {
            let opt = DistAdamW::new(
                vec![("w".into(), w.shallow_clone())],
                cfg,
                &ParamPolicy::default(),
                stage,
                25.0,
                &dp,
            )
            .expect("optimizer");
            let mut last = None;
            for step in [3, 6, 7] {
                last = c.save(&mut dp, &state(step), &vs, &opt).expect("save");
            }
            assert_eq!(last.as_deref(), Some(dir.join("step_7").as_path()));
            // keep_last 2: step_3 is gone
            let steps: Vec<u64> = checkpoint::list_complete(&dir).into_iter().map(|(s, _)| s).collect();
            assert_eq!(steps, [6, 7], "stage {stage}");
            let loaded = checkpoint::load(&dir.join("step_7")).expect("load");
            assert_eq!(loaded.state, state(7));
            assert_eq!(loaded.manifest.zero_stage, stage);
            // stage 0: the whole state in one file; stage 1: this rank's shard, as pieces
            assert_eq!(loaded.manifest.optimizer_shards, stage as usize);
            let mut names: Vec<&str> = loaded.optimizer.iter().map(|(n, _)| n.as_str()).collect();
            names.sort();
            let want: &[&str] = if stage == 0 {
                &["exp_avg/w", "exp_avg_sq/w"]
            } else {
                &["exp_avg/w@0", "exp_avg_sq/w@0"]
            };
            assert_eq!(names, want);
            assert!(loaded.weights[0].1.to_kind(Kind::Float).equal(&w.detach()));
            // no temporary folder is left behind
            let leftovers: Vec<String> = std::fs::read_dir(&dir)
                .expect("read dir")
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".tmp."))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
