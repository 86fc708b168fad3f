//! `forge launch`, `forge bench allreduce` and the hidden `forge dist-selftest`.

use anyhow::{bail, Context, Result};
use forge_models::parse_device;
use forge_trainer::dist::bench;
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

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// All-reduce bandwidth (fp32 sum) for a list of sizes; run it under `forge launch`.
    Allreduce {
        /// Sizes in MiB, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
        sizes_mb: Vec<f64>,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Print JSON rows instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        comm: CommArgs,
    },
}

fn open_comm(a: &CommArgs) -> Result<(Box<dyn forge_trainer::dist::Comm>, tch::Device)> {
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
    let comm = forge_trainer::dist::from_env(backend, device, a.timeout_s)
        .context("joining the distributed run (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT)")?;
    Ok((comm, device))
}

pub fn run_bench(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Allreduce {
            sizes_mb,
            iters,
            json,
            comm,
        } => {
            if sizes_mb.iter().any(|s| s.is_nan() || *s <= 0.0) {
                bail!("--sizes-mb: every size must be > 0 MiB");
            }
            let (mut c, device) = open_comm(&comm)?;
            let rows = bench::allreduce(c.as_mut(), &sizes_mb, iters, device)?;
            if c.rank() != 0 {
                return Ok(());
            }
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
                return Ok(());
            }
            println!("all_reduce (fp32 sum), {}, {iters} iterations per size", c.describe());
            println!("{:>12} {:>12} {:>14} {:>14}", "MiB", "ms", "algbw GB/s", "busbw GB/s");
            for r in &rows {
                println!(
                    "{:>12.2} {:>12.3} {:>14.3} {:>14.3}",
                    r.bytes as f64 / (1024.0 * 1024.0),
                    r.seconds * 1e3,
                    r.algbw_gb_s,
                    r.busbw_gb_s
                );
            }
            Ok(())
        }
    }
}

/// Every collective with known numbers (JSON per rank). `fail_rank` exits with an error
/// instead: before the rendezvous (the others wait in it), or with `fail_after_rendezvous`
/// right after it (the others' first collective fails). Used by the tests of how the other
/// ranks and `forge launch` react.
pub fn run_selftest(comm: CommArgs, fail_rank: Option<usize>, fail_after_rendezvous: bool) -> Result<()> {
    let rank = forge_trainer::dist::DistEnv::from_env()?.map_or(0, |e| e.rank);
    if fail_rank == Some(rank) && !fail_after_rendezvous {
        bail!("rank {rank} fails on purpose before the rendezvous (--fail-rank)");
    }
    let (mut c, device) = open_comm(&comm)?;
    if fail_rank == Some(c.rank()) {
        bail!("rank {} fails on purpose after the rendezvous (--fail-rank --fail-after-rendezvous)", c.rank());
    }
    let v = bench::selftest(c.as_mut(), device)?;
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}

pub fn run_launch(args: forge_trainer::launch::LaunchArgs) -> Result<()> {
    forge_trainer::launch::run(&args)?;
    Ok(())
}
