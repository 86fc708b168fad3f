//! Continuing a run: which checkpoint (`--resume`), loading it, and where its data
//! position lies on another number of ranks.

use super::{TrainObserver, Trainer};
use crate::checkpoint;
use crate::error::{Result, TrainerError};
use crate::parallel::zero::assemble_full_state;
use crate::parallel::Comm;
use crate::recipe::Recipe;
use forge_models::drafters::DrafterSpec;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The checkpoint to resume from, if any.
pub(super) fn resume_from(recipe: &Recipe, resume: &Option<String>) -> Result<Option<PathBuf>> {
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

impl Trainer<'_> {
    /// Continues from checkpoint `ck` (of drafter `spec`): its weights, optimizer state and
    /// data position, re-sharded when it was written by another number of ranks.
    pub(super) fn resume(
        &mut self,
        ck: &Path,
        spec: &DrafterSpec,
        dp: &mut dyn Comm,
        obs: &mut dyn TrainObserver,
    ) -> Result<()> {
        let world = dp.world();
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
            if crate::parallel::leads(dp) {
                obs.note(&format!(
                    "re-sharding {} from {old_world} to {world} rank(s) (optimizer state and data position)",
                    ck.display()
                ));
            }
        }
        checkpoint::load_into_var_store(self.drafter.var_store(), &loaded.weights, ck)?;
        let param_shapes: BTreeMap<String, Vec<i64>> = self.params.iter().map(|(n, p)| (n.clone(), p.size())).collect();
        let full = assemble_full_state(loaded.optimizer, &param_shapes)?;
        self.opt.load_full_state(&full, loaded.state.step)?;
        resumed.total_steps = self.state.total_steps;
        self.state = resumed;
        self.epoch_plan = self.plan(self.state.epoch, dp);
        if crate::parallel::leads(dp) {
            obs.note(&format!("resuming from {} (step {})", ck.display(), self.state.step));
        }
        Ok(())
    }
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
