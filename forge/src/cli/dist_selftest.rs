//! `forge dist-selftest` (hidden): every collective with known numbers, for the tests.

use super::dist::{open_comm, CommArgs};
use anyhow::{bail, Result};
use forge_trainer::parallel::bench;

#[derive(clap::Args)]
pub struct DistSelftestArgs {
    #[command(flatten)]
    comm: CommArgs,
    /// This rank exits with an error before the rendezvous.
    #[arg(long)]
    fail_rank: Option<usize>,
    /// With --fail-rank: fail right after the rendezvous instead.
    #[arg(long)]
    fail_after_rendezvous: bool,
}

/// Every collective with known numbers (JSON per rank). `fail_rank` exits with an error
/// instead: before the rendezvous (the others wait in it), or with `fail_after_rendezvous`
/// right after it (the others' first collective fails). Used by the tests of how the other
/// ranks and `forge launch` react.
pub fn run(a: DistSelftestArgs) -> Result<()> {
    let DistSelftestArgs {
        comm,
        fail_rank,
        fail_after_rendezvous,
    } = a;
    let rank = forge_trainer::parallel::DistEnv::from_env()?.map_or(0, |e| e.rank);
    if fail_rank == Some(rank) && !fail_after_rendezvous {
        bail!("rank {rank} fails on purpose before the rendezvous (--fail-rank)");
    }
    let (mut c, device) = open_comm(&comm)?;
    if fail_rank == Some(c.rank()) {
        bail!(
            "rank {} fails on purpose after the rendezvous (--fail-rank --fail-after-rendezvous)",
            c.rank()
        );
    }
    let v = bench::selftest(c.as_mut(), device)?;
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}
