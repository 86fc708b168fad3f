//! `forge launch`: data-parallel workers like torchrun (the process management is
//! `forge_trainer::launch`; here the flags, the banner and the workers' prefixed output).

use anyhow::Result;
use forge_trainer::launch::{self, LaunchOptions, Stream, WorkerOutput};
use std::io::Write;
use std::sync::Arc;

#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    /// One worker per GPU on this node; worker i uses cuda:<LOCAL_RANK>.
    #[arg(long, value_name = "N")]
    pub gpus: Option<usize>,
    /// N CPU workers on this node (Gloo).
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
    /// Number of nodes (machines) taking part.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0..nnodes (node 0 hosts the rendezvous).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, reachable from every node (default 127.0.0.1 on one node).
    #[arg(long)]
    pub master_addr: Option<String>,
    /// TCP port on node 0 for the rendezvous (default on one node: a free port).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Seconds the other workers get to exit after a failure or Ctrl-C before being killed.
    #[arg(long, default_value_t = 5)]
    pub grace_s: u64,
    /// The forge command each worker runs, after `--`, e.g. `-- train recipe.yaml`.
    #[arg(last = true, required = true, value_name = "FORGE_ARGS")]
    pub command: Vec<String>,
}

/// Each worker line on the launcher's stdout or stderr, prefixed with `[rank N] `.
struct Prefixed;

impl WorkerOutput for Prefixed {
    fn line(&self, rank: usize, stream: Stream, line: &[u8]) {
        let mut buf = format!("[rank {rank}] ").into_bytes();
        buf.extend_from_slice(line);
        let _ = match stream {
            Stream::Stdout => std::io::stdout().lock().write_all(&buf),
            Stream::Stderr => std::io::stderr().lock().write_all(&buf),
        };
    }
}

pub fn run(a: LaunchArgs) -> Result<()> {
    let opts = LaunchOptions {
        gpus: a.gpus,
        nproc: a.nproc,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr,
        master_port: a.master_port,
        grace_s: a.grace_s,
        command: a.command,
        // rank 0 keeps the terminal for its progress bar; other output is prefixed
        rank0_inherits_stderr: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let plan = opts.plan()?;
    eprintln!(
        "forge launch: {} {} worker(s) on node {} of {} (ranks {}..{} of {}), rendezvous {}:{}",
        plan.nproc,
        if plan.gpus { "GPU" } else { "CPU" },
        opts.node_rank,
        opts.nnodes,
        plan.first_rank,
        plan.first_rank + plan.nproc - 1,
        plan.world,
        plan.master_addr,
        plan.master_port
    );
    launch::run(&opts, &plan, Arc::new(Prefixed))?;
    Ok(())
}
