//! Communication between data-parallel ranks: one trait ([`Comm`]) with a single-process
//! implementation ([`SingleProcess`]) and libtorch's c10d ([`c10d::ProcessGroup`]: Gloo for
//! CPU tensors, NCCL for CUDA tensors when built with it). The trainer never knows which.
//!
//! Rendezvous follows torchrun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR
//! and MASTER_PORT in the environment ([`DistEnv::from_env`]); rank 0 hosts a TCPStore.

pub mod bench;
pub mod c10d;
pub mod keys;
pub mod layout;
pub mod tensor;
pub mod zero;

use crate::error::{Result, TrainerError};
use crate::recipe::Backend;
use tch::Tensor;

/// Element-wise reduction of a collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// Collectives over the ranks of a data-parallel group. Every rank must call the same
/// collectives in the same order with tensors of the same shape and kind.
pub trait Comm: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Reduces `t` over ranks, in place, on every rank.
    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<()>;
    /// `input` holds `world` equal contiguous chunks; `out` (one chunk's size) receives the
    /// reduction over ranks of chunk `rank`.
    fn reduce_scatter(&mut self, out: &mut Tensor, input: &Tensor, op: ReduceOp) -> Result<()>;
    /// `out` (world × input's elements) receives every rank's `input`, rank r's at chunk r.
    fn all_gather(&mut self, out: &mut Tensor, input: &Tensor) -> Result<()>;
    /// Copies root's `t` into every rank's `t`.
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
    /// Short description for logs ("single process", "gloo, rank 0 of 2").
    fn describe(&self) -> String;
    /// Where small bookkeeping tensors (metric sums, checks) must live for this backend:
    /// the CPU for Gloo, the rank's GPU for NCCL.
    fn device(&self) -> tch::Device {
        tch::Device::Cpu
    }
    /// The group of `members` (ascending ranks of this group, this rank among them) named
    /// `name`, as `torch.distributed.new_group`: every member calls it with the same name and
    /// members. A group of one is the single process.
    fn subgroup(&self, name: &str, members: &[usize]) -> Result<Box<dyn Comm>>;
    /// Whether this group writes the run's files (checkpoints, metrics, reports). False for
    /// the data-parallel groups of a tensor-parallel run's other target shards
    /// ([`tensor::split`]): they compute what the writing group computes.
    fn writes(&self) -> bool {
        true
    }
}

/// Whether this rank writes the run's files and reports: rank 0 of the group that writes
/// ([`Comm::writes`]).
pub fn leads(comm: &dyn Comm) -> bool {
    comm.rank() == 0 && comm.writes()
}

/// Checks the shapes of a reduce-scatter / all-gather pair: `big` has `world` times the
/// elements of `small`, both contiguous and of one kind.
pub(crate) fn check_chunked(op: &str, small: &Tensor, big: &Tensor, world: usize) -> Result<()> {
    let (s, b) = (small.numel(), big.numel());
    if b != s * world || small.kind() != big.kind() || !small.is_contiguous() || !big.is_contiguous() {
        return Err(TrainerError::Dist {
            op: op.into(),
            message: format!(
                "needs contiguous tensors of one kind with {world} x {s} = {} elements in the large one, got {b} ({:?} and {:?})",
                s * world,
                small.kind(),
                big.kind()
            ),
        });
    }
    Ok(())
}

/// One process: collectives are identities.
pub struct SingleProcess;

impl Comm for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce(&mut self, _t: &mut Tensor, _op: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter(&mut self, out: &mut Tensor, input: &Tensor, _op: ReduceOp) -> Result<()> {
        check_chunked("reduce_scatter", out, input, 1)?;
        tch::no_grad(|| out.f_copy_(input))?;
        Ok(())
    }
    fn all_gather(&mut self, out: &mut Tensor, input: &Tensor) -> Result<()> {
        check_chunked("all_gather", input, out, 1)?;
        tch::no_grad(|| out.f_copy_(input))?;
        Ok(())
    }
    fn broadcast(&mut self, _t: &mut Tensor, root: usize) -> Result<()> {
        if root != 0 {
            return Err(TrainerError::Dist {
                op: "broadcast".into(),
                message: format!("root rank {root} does not exist in a world of 1"),
            });
        }
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "single process".into()
    }
    fn subgroup(&self, name: &str, members: &[usize]) -> Result<Box<dyn Comm>> {
        if members != [0] {
            return Err(TrainerError::Dist {
                op: format!("subgroup {name}"),
                message: format!("members {members:?} of a single process (only [0] exists)"),
            });
        }
        Ok(Box::new(SingleProcess))
    }
}

/// torchrun-style process placement read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub local_world: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// TORCHELASTIC_USE_AGENT_STORE=True: torchrun's agent hosts the TCPStore on
    /// MASTER_ADDR:MASTER_PORT, so rank 0 connects to it instead of hosting its own.
    pub agent_store: bool,
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_num<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
    match env_var(name) {
        None => Ok(None),
        Some(v) => v.trim().parse::<T>().map(Some).map_err(|_| {
            TrainerError::Config(format!(
                "environment variable {name}='{v}' is not a valid non-negative number"
            ))
        }),
    }
}

impl DistEnv {
    /// The placement given by RANK/WORLD_SIZE/... (None when WORLD_SIZE is not set: a plain
    /// single-process run). Errors name the variable that is missing or wrong.
    pub fn from_env() -> Result<Option<DistEnv>> {
        let Some(world) = env_num::<usize>("WORLD_SIZE")? else {
            return Ok(None);
        };
        let need = |name: &str| -> Result<usize> {
            env_num::<usize>(name)?.ok_or_else(|| {
                TrainerError::Config(format!("WORLD_SIZE is set but {name} is not: set it (forge launch sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"))
            })
        };
        let rank = need("RANK")?;
        let local_rank = env_num::<usize>("LOCAL_RANK")?.unwrap_or(rank);
        let local_world = env_num::<usize>("LOCAL_WORLD_SIZE")?.unwrap_or(world);
        let master_addr = env_var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = env_num::<u16>("MASTER_PORT")?.ok_or_else(|| {
            TrainerError::Config(
                "WORLD_SIZE is set but MASTER_PORT is not: set it to a free TCP port on MASTER_ADDR".into(),
            )
        })?;
        if world == 0 || rank >= world {
            return Err(TrainerError::Config(format!(
                "RANK={rank} WORLD_SIZE={world}: RANK must be below WORLD_SIZE (and WORLD_SIZE at least 1)"
            )));
        }
        if local_world == 0 || local_rank >= local_world {
            return Err(TrainerError::Config(format!(
                "LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}: LOCAL_RANK must be below LOCAL_WORLD_SIZE"
            )));
        }
        Ok(Some(DistEnv {
            rank,
            world,
            local_rank,
            local_world,
            master_addr,
            master_port,
            agent_store: env_var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"),
        }))
    }
}

/// The backend a recipe's `dist.backend` picks for a device: auto = NCCL on CUDA, Gloo on CPU.
pub fn resolve_backend(backend: Backend, device: tch::Device) -> c10d::BackendKind {
    match backend {
        Backend::Gloo => c10d::BackendKind::Gloo,
        Backend::Nccl => c10d::BackendKind::Nccl,
        Backend::Auto if device.is_cuda() => c10d::BackendKind::Nccl,
        Backend::Auto => c10d::BackendKind::Gloo,
    }
}

/// The communicator for this process: c10d when the environment names a distributed run,
/// the single-process one otherwise.
pub fn from_env(backend: Backend, device: tch::Device, timeout_s: u64) -> Result<Box<dyn Comm>> {
    match DistEnv::from_env()? {
        None => Ok(Box::new(SingleProcess)),
        Some(env) => {
            let kind = resolve_backend(backend, device);
            let comm_device = match kind {
                c10d::BackendKind::Gloo => tch::Device::Cpu,
                c10d::BackendKind::Nccl => device,
            };
            let pg = c10d::ProcessGroup::new(
                &env.master_addr,
                env.master_port,
                env.rank,
                env.world,
                std::time::Duration::from_secs(timeout_s),
                kind,
                env.agent_store,
                comm_device,
            )?;
            Ok(Box::new(pg))
        }
    }
}
