//! `forge bench allreduce` and `forge bench train`.

use super::dist::{open_comm, CommArgs};
use anyhow::{bail, Context, Result};
use forge_models::parse_device;
use forge_trainer::parallel::bench;

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
    /// The online training step per drafter: the time of each phase (target forward, draft
    /// forward, backward, gradient communication, clipping, optimizer), tokens/s, useful
    /// FLOPs and utilisation against a measured (or given) peak, peak memory and optimizer
    /// state. The target is a HF folder (--target) or a named shape with random weights built
    /// on the device (--shape llama3-8b, llama2-7b, qwen3-0.6b, smollm2-135m, tiny). Under
    /// `forge launch` the gradients go through the ranks' collectives (--zero-stage).
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
    /// The device's dense peak in TFLOP/s that utilisation is measured against (H100/H200 SXM
    /// bf16: 989); 0 = measure it with a matmul probe (2048² fp32 on CPU, 8192² on CUDA).
    #[arg(long, default_value_t = 0.0)]
    peak_tflops: f64,
    /// The optimizer's ZeRO stage (0, 1, 2): under `forge launch`, which collectives the
    /// gradients go through.
    #[arg(long, default_value_t = 0)]
    zero_stage: u32,
    /// Collective timeout in seconds (under `forge launch`).
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the rows as JSON lines to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

fn run_train_bench(a: TrainBenchArgs) -> Result<()> {
    use forge_trainer::bench_train::{self, BenchEvent, BenchTarget, TrainBenchOptions};
    let mut device = parse_device(&a.device)?;
    if device.is_cuda() && (a.device == "auto" || a.device == "cuda") {
        // one GPU per rank under `forge launch --gpus N`
        if let Some(local) = std::env::var("LOCAL_RANK").ok().and_then(|v| v.parse::<usize>().ok()) {
            device = parse_device(&format!("cuda:{local}"))?;
        }
    }
    let dtype = forge_trainer::regenerate::resolve_dtype(&a.dtype, device)?;
    if !a.peak_tflops.is_finite() || a.peak_tflops < 0.0 {
        bail!("--peak-tflops must be a number >= 0");
    }
    if a.zero_stage > 2 {
        bail!("--zero-stage must be 0, 1 or 2, got {}", a.zero_stage);
    }
    if a.timeout_s == 0 {
        bail!("--timeout-s must be at least 1");
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
        zero_stage: a.zero_stage,
        seed: a.seed,
    };
    let mut comm = forge_trainer::parallel::from_env(forge_trainer::recipe::Backend::Auto, device, a.timeout_s)
        .context("joining the distributed run (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT)")?;
    let report = comm.rank() == 0;
    let mut json = match (&a.json, report) {
        (Some(p), true) => Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?),
        _ => None,
    };
    let mut write_err = None;
    let mut header = true;
    bench_train::run_observed(&opts, comm.as_mut(), |e| {
        let r = match e {
            BenchEvent::Note(n) => {
                if report {
                    eprintln!("bench train: {n}");
                }
                return;
            }
            BenchEvent::Row(r) if report => r,
            BenchEvent::Row(_) => return,
        };
        if std::mem::take(&mut header) {
            println!(
                "target: {} on {}, weights {}, drafter compute {}, batch {} x {} tokens, {} threads, world {}, ZeRO-{}",
                r.target, r.device, r.target_dtype, r.compute_dtype, r.batch, r.seq_len, r.threads, r.world, r.zero_stage
            );
            println!("peak: {:.3} TFLOP/s ({}); median of {} timed steps", r.peak_tflops, r.peak_source, r.steps);
            println!(
                "{:<9} {:>9} | {:>9} {:>9} {:>9} {:>8} {:>7} {:>9} | {:>9} {:>12} {:>10} {:>6} {:>9} {:>9}",
                "drafter",
                "step ms",
                "target",
                "draft fwd",
                "backward",
                "comm",
                "clip",
                "optimizer",
                "tokens/s",
                "draft GF/tok",
                "step TF/s",
                "util",
                "peak MiB",
                "optim MiB"
            );
        }
        println!(
            "{:<9} {:>9.1} | {:>9.1} {:>9.1} {:>9.1} {:>8.1} {:>7.1} {:>9.1} | {:>9.0} {:>12.3} {:>10.3} {:>5.1}% {:>9.0} {:>9.0}",
            r.drafter,
            r.step_ms,
            r.target_ms,
            r.draft_forward_ms,
            r.backward_ms,
            r.comm_ms,
            r.clip_ms,
            r.optimizer_ms,
            r.tokens_per_s,
            r.draft_flops_per_token / 1e9,
            r.step_tflops_per_s,
            r.step_utilisation * 100.0,
            r.peak_mem_mb,
            r.optimizer_state_mb
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

pub fn run(cmd: BenchCommand) -> Result<()> {
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
