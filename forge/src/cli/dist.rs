//! `forge launch`, `forge bench allreduce`, `forge bench train` and the hidden
//! `forge dist-selftest`.

use anyhow::{bail, Context, Result};
use forge_models::parse_device;
use forge_trainer::parallel::bench;
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
    /// The online training step's speed and memory per drafter: step time, target-forward
    /// time, tokens/s, peak memory, and the target forward's TFLOP/s and MFU. The target is a
    /// HF folder (--target) or a named shape with random weights built on the device
    /// (--shape llama3-8b, llama2-7b, qwen3-0.6b, smollm2-135m, tiny).
    Train(TrainBenchArgs),
}

#[derive(clap::Args)]
pub struct TrainBenchArgs {
    /// The target's Hugging Face folder.
    #[arg(long, conflicts_with = "shape", required_unless_present = "shape")]
    target: Option<std::path::PathBuf>,
    /// A named target shape with random weights: llama3-8b, llama2-7b, qwen3-0.6b, smollm2-135m, tiny.
    #[arg(long)]
    shape: Option<String>,
    /// Drafter kinds, comma-separated, each with its recipe defaults.
    #[arg(long, value_delimiter = ',', default_value = "eagle3,medusa")]
    drafter: Vec<String>,
    /// Sequences per step.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// The target's weight format: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// The drafter's compute precision (train.dtype): auto, fp32, bf16, fp16.
    #[arg(long, default_value = "auto")]
    compute: String,
    /// The device's dense peak in TFLOP/s for the target forward's MFU (H100/H200 SXM bf16:
    /// 989); 0 = report TFLOP/s only.
    #[arg(long, default_value_t = 0.0)]
    peak_tflops: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the rows as JSON lines to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

fn run_train_bench(a: TrainBenchArgs) -> Result<()> {
    use forge_trainer::bench_train::{self, BenchTarget, TrainBenchOptions};
    let device = parse_device(&a.device)?;
    let dtype = forge_trainer::regenerate::resolve_dtype(&a.dtype, device)?;
    if !a.peak_tflops.is_finite() || a.peak_tflops < 0.0 {
        bail!("--peak-tflops must be a number >= 0");
    }
    let target = match (a.target, a.shape) {
        (Some(dir), _) => BenchTarget::Dir(dir),
        (None, Some(s)) => BenchTarget::Shape(s),
        (None, None) => bail!("give --target DIR or --shape NAME"),
    };
    let opts = TrainBenchOptions {
        target,
        drafters: a.drafter,
        batch: a.batch,
        seq_len: a.seq_len,
        steps: a.steps,
        warmup: a.warmup,
        device,
        dtype,
        compute: a.compute,
        peak_tflops: a.peak_tflops,
        seed: a.seed,
    };
    let mut json = match &a.json {
        Some(p) => Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?),
        None => None,
    };
    let mut write_err = None;
    let mut header = true;
    bench_train::run(&opts, |r| {
        if std::mem::take(&mut header) {
            println!(
                "target: {} on {}, weights {}, drafter compute {}",
                r.target, r.device, r.target_dtype, r.compute_dtype
            );
            println!(
                "{:<8} {:>6} {:>6} {:>10} {:>10} {:>10} {:>11} {:>9} {:>7} {:>10}",
                "drafter", "batch", "seq", "step ms", "target ms", "draft ms", "tokens/s", "TFLOP/s", "MFU", "peak MiB"
            );
        }
        println!(
            "{:<8} {:>6} {:>6} {:>10.2} {:>10.2} {:>10.2} {:>11.0} {:>9.2} {:>7} {:>10.0}",
            r.drafter,
            r.batch,
            r.seq_len,
            r.step_ms,
            r.target_ms,
            r.drafter_ms,
            r.tokens_per_s,
            r.target_tflops_per_s,
            r.target_mfu.map_or("-".into(), |m| format!("{:.1}%", m * 100.0)),
            r.peak_mem_mb
        );
        if let Some(f) = json.as_mut() {
            use std::io::Write;
            let line = serde_json::to_string(r)
                .map_err(std::io::Error::other)
                .and_then(|s| writeln!(f, "{s}"));
            if let Err(e) = line {
                write_err.get_or_insert(e);
            }
        }
    })
    .with_context(|| "forge bench train")?;
    if let (Some(e), Some(p)) = (write_err, &a.json) {
        return Err(anyhow::Error::from(e).context(format!("writing {}", p.display())));
    }
    Ok(())
}

fn open_comm(a: &CommArgs) -> Result<(Box<dyn forge_trainer::parallel::Comm>, tch::Device)> {
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

pub fn run_bench(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train(a) => run_train_bench(a),
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

pub fn run_launch(args: forge_trainer::launch::LaunchArgs) -> Result<()> {
    forge_trainer::launch::run(&args)?;
    Ok(())
}
