//! What the distributed subcommands share (`forge bench allreduce`, `forge dist-selftest`):
//! the collective flags and joining the run `forge launch` started.

use anyhow::{bail, Context, Result};
use forge_models::parse_device;
use forge_trainer::recipe::Backend;

#[derive(clap::Args)]
pub struct CommArgs {
    /// auto (NCCL on CUDA, Gloo on CPU), gloo or nccl.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// cpu, cuda or cuda:N (default: cpu; under --gpus use cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Collective timeout in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
}

/// Joins the distributed run (rank and world from the environment `forge launch` sets).
pub fn open_comm(a: &CommArgs) -> Result<(Box<dyn forge_trainer::parallel::Comm>, tch::Device)> {
    let backend = match a.backend.as_str() {
        "auto" => Backend::Auto,
        "gloo" => Backend::Gloo,
        "nccl" => Backend::Nccl,
        other => bail!("--backend '{other}' is not one of auto, gloo, nccl"),
    };
    if a.timeout_s == 0 {
        bail!("--timeout-s must be at least 1");
    }
    let mut device = parse_device(&a.device)?;
    if device.is_cuda() && a.device == "cuda" {
        if let Some(local) = std::env::var("LOCAL_RANK").ok().and_then(|v| v.parse::<usize>().ok()) {
            device = parse_device(&format!("cuda:{local}"))?;
        }
    }
    let comm = forge_trainer::parallel::from_env(backend, device, a.timeout_s)
        .context("joining the distributed run (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT)")?;
    Ok((comm, device))
}
