//! Tensor parallelism of the frozen target composed with data parallelism (Megatron's
//! layout): a world of `tp x dp` ranks where consecutive ranks `d*tp .. d*tp+tp` share one
//! target split `tp` ways ([`forge_models::layers::tp`]) and ranks `t, t+tp, t+2tp, ..`
//! form the data-parallel groups. Every rank of a target group sees the same batch and
//! computes the same draft step (the target's outputs are equal on all of them after its
//! collectives), so the draft's gradients are averaged over the data-parallel group alone;
//! the group of the targets' first shards (global rank 0's) writes the run's files.

use super::{Comm, ReduceOp};
use crate::error::{Result, TrainerError};
use forge_models::layers::{TensorParallel, TpComm};
use std::sync::{Arc, Mutex};
use tch::Tensor;

/// Where a rank sits in a `tp x dp` world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Ranks per target (1: every rank holds the whole target).
    pub tp: usize,
    /// Data-parallel ranks (`world / tp`).
    pub dp: usize,
    /// This rank's shard of its target (`rank % tp`).
    pub tp_rank: usize,
    /// This rank's data-parallel index (`rank / tp`).
    pub dp_rank: usize,
}

impl Placement {
    /// The placement of `rank` in a world of `world` with targets split `tp` ways; an error
    /// when `tp` does not divide the world.
    pub fn new(rank: usize, world: usize, tp: usize) -> Result<Self> {
        if tp == 0 || !world.is_multiple_of(tp) {
            return Err(TrainerError::Config(format!(
                "target.tensor_parallel {tp} does not divide the {world} launched ranks: launch a multiple of {tp} processes (world = tensor_parallel x data-parallel ranks)"
            )));
        }
        Ok(Self {
            tp,
            dp: world / tp,
            tp_rank: rank % tp,
            dp_rank: rank / tp,
        })
    }
    /// The ranks sharing this rank's target.
    pub fn tp_members(&self) -> Vec<usize> {
        (0..self.tp).map(|t| self.dp_rank * self.tp + t).collect()
    }
    /// The ranks of this rank's data-parallel group (the same shard of every target).
    pub fn dp_members(&self) -> Vec<usize> {
        (0..self.dp).map(|d| d * self.tp + self.tp_rank).collect()
    }
}

/// The groups of one rank of a tensor-parallel run.
pub struct Groups {
    pub placement: Placement,
    /// The draft's data-parallel group (writes only on the targets' first shards).
    pub dp: Box<dyn Comm>,
    /// The target's tensor-parallel group (None when `tp` is 1).
    pub tp: Option<Arc<TensorParallel>>,
}

/// Splits `world` (every launched rank) into the target groups and the data-parallel groups
/// of `tp`-way tensor parallelism. With `tp` 1 the world is the data-parallel group.
pub fn split(world: Box<dyn Comm>, tp: usize) -> Result<Groups> {
    let placement = Placement::new(world.rank(), world.world(), tp)?;
    if tp == 1 {
        return Ok(Groups {
            placement,
            dp: world,
            tp: None,
        });
    }
    // every rank creates its target group, then its data-parallel group (the members of a
    // group rendezvous under its name in the launch's store)
    let tp_comm = world.subgroup(&format!("tp{}", placement.dp_rank), &placement.tp_members())?;
    let dp = world.subgroup(&format!("dp{}", placement.tp_rank), &placement.dp_members())?;
    let dp: Box<dyn Comm> = if placement.tp_rank == 0 {
        dp
    } else {
        Box::new(Replica(dp))
    };
    let group = TargetGroup {
        comm: Mutex::new(tp_comm),
        rank: placement.tp_rank,
        size: tp,
    };
    Ok(Groups {
        placement,
        dp,
        tp: Some(TensorParallel::new(Arc::new(group))),
    })
}

/// For the commands that split only the target (`forge eval`, `forge regenerate`,
/// `forge prepare-hidden`): the group of every launched rank when `tp` > 1, which must be the
/// whole launch (`forge launch --nproc tp -- <command>`); None for 1. Every rank runs the
/// command in lockstep; rank 0 writes and reports.
pub fn target_group(
    tp: usize,
    backend: crate::recipe::Backend,
    device: tch::Device,
    timeout_s: u64,
) -> Result<Option<Arc<TensorParallel>>> {
    if tp <= 1 {
        return Ok(None);
    }
    let launched = super::DistEnv::from_env()?.map(|e| e.world);
    if launched != Some(tp) {
        return Err(TrainerError::Config(format!(
            "tensor parallel {tp} needs exactly {tp} launched ranks ({}): run it as forge launch --nproc {tp} -- <command> (or --gpus {tp})",
            match launched {
                None => "this is a single process".to_string(),
                Some(w) => format!("{w} were launched"),
            }
        )));
    }
    let world = super::from_env(backend, device, timeout_s)?;
    Ok(split(world, tp)?.tp)
}

/// The device of this rank of a command launched for tensor parallelism: a CUDA device is the
/// GPU of the rank's LOCAL_RANK (`forge launch --gpus N`), anything else stays.
pub fn rank_device(device: tch::Device, tp: &Option<Arc<TensorParallel>>) -> tch::Device {
    match (
        device,
        tp,
        std::env::var("LOCAL_RANK")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok()),
    ) {
        (tch::Device::Cuda(_), Some(_), Some(local)) => tch::Device::Cuda(local),
        _ => device,
    }
}

/// A target's tensor-parallel group for the model ([`TpComm`]).
struct TargetGroup {
    comm: Mutex<Box<dyn Comm>>,
    rank: usize,
    size: usize,
}

impl TargetGroup {
    fn with<T>(&self, f: impl FnOnce(&mut dyn Comm) -> Result<T>) -> std::result::Result<T, String> {
        let mut c = self
            .comm
            .lock()
            .map_err(|_| "the tensor-parallel group was poisoned by a panic".to_string())?;
        f(c.as_mut()).map_err(|e| e.to_string())
    }
}

impl TpComm for TargetGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, t: &mut Tensor) -> std::result::Result<(), String> {
        self.with(|c| on_comm_device(c, t, |c, t| c.all_reduce(t, ReduceOp::Sum)))
    }
    fn all_gather(&self, out: &mut Tensor, input: &Tensor) -> std::result::Result<(), String> {
        self.with(|c| {
            let dev = c.device();
            if input.device() == dev {
                return c.all_gather(out, input);
            }
            let mut o = out.to_device(dev);
            c.all_gather(&mut o, &input.to_device(dev))?;
            tch::no_grad(|| out.f_copy_(&o))?;
            Ok(())
        })
    }
}

/// Runs `f` on `t` where the backend wants it (Gloo: the CPU), copying back when moved.
fn on_comm_device(
    c: &mut dyn Comm,
    t: &mut Tensor,
    f: impl FnOnce(&mut dyn Comm, &mut Tensor) -> Result<()>,
) -> Result<()> {
    let dev = c.device();
    if t.device() == dev {
        return f(c, t);
    }
    let mut moved = t.to_device(dev);
    f(c, &mut moved)?;
    tch::no_grad(|| t.f_copy_(&moved))?;
    Ok(())
}

/// The data-parallel group of a target's other shards: the same collectives, no files.
struct Replica(Box<dyn Comm>);

impl Comm for Replica {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world(&self) -> usize {
        self.0.world()
    }
    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.0.all_reduce(t, op)
    }
    fn reduce_scatter(&mut self, out: &mut Tensor, input: &Tensor, op: ReduceOp) -> Result<()> {
        self.0.reduce_scatter(out, input, op)
    }
    fn all_gather(&mut self, out: &mut Tensor, input: &Tensor) -> Result<()> {
        self.0.all_gather(out, input)
    }
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        self.0.broadcast(t, root)
    }
    fn barrier(&mut self) -> Result<()> {
        self.0.barrier()
    }
    fn describe(&self) -> String {
        format!("{} (a replica: another target shard's group)", self.0.describe())
    }
    fn device(&self) -> tch::Device {
        self.0.device()
    }
    fn subgroup(&self, name: &str, members: &[usize]) -> Result<Box<dyn Comm>> {
        Ok(Box::new(Replica(self.0.subgroup(name, members)?)))
    }
    fn writes(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_groups_consecutive_ranks_per_target_and_strided_ranks_per_data_group() {
        let p = Placement::new(5, 8, 2).expect("8 = 2 x 4");
        assert_eq!((p.tp_rank, p.dp_rank, p.dp), (1, 2, 4));
        assert_eq!(p.tp_members(), [4, 5]);
        assert_eq!(p.dp_members(), [1, 3, 5, 7]);
        let p = Placement::new(3, 4, 4).expect("all one target");
        assert_eq!((p.tp_rank, p.dp_rank), (3, 0));
        assert_eq!(p.dp_members(), [3]);
        let e = Placement::new(0, 6, 4).expect_err("4 does not divide 6");
        assert!(e.to_string().contains("tensor_parallel 4"), "{e}");
    }

    #[test]
    fn a_single_process_splits_into_itself() {
        let g = split(Box::new(super::super::SingleProcess), 1).expect("tp 1");
        assert!(g.tp.is_none() && g.dp.writes());
        assert!(split(Box::new(super::super::SingleProcess), 2).is_err());
    }
}
