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
    use forge_trainer::bench_train::{self, BenchEvent, BenchTarget, TrainBenchOptions};
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
    bench_train::run_observed(&opts, |e| {
        let r = match e {
            BenchEvent::Note(n) => {
                eprintln!("bench train: {n}");
                return;
            }
            BenchEvent::Row(r) => r,
        };
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
