//! `forge prepare-data` and `forge prepare-hidden`.

use super::progress::{self, Steps};
use crate::load_recipe;
use anyhow::{Context, Result};
use forge_data::dataset::{CacheStatus, LoadedDataset};
use forge_trainer::data::{self, HiddenOptions};
use forge_trainer::drafter;
use std::path::PathBuf;

/// Options of `forge prepare-data`.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    recipe: PathBuf,
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    set: Vec<String>,
    /// Print the counts as JSON.
    #[arg(long)]
    json: bool,
}

/// Options of `forge prepare-hidden`.
#[derive(clap::Args, Debug, Clone)]
pub struct HiddenArgs {
    recipe: PathBuf,
    /// Output folder (shards + manifest.json); an interrupted run continues in it.
    #[arg(long)]
    out: PathBuf,
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    set: Vec<String>,
    /// Samples per target forward.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Samples per shard file.
    #[arg(long, default_value_t = 256)]
    samples_per_shard: usize,
    /// Also store the target's top-k log-probabilities per token (0 = no).
    #[arg(long, default_value_t = 0)]
    topk: usize,
    /// How to store the hidden states: bf16, or fp8 (float8 e4m3fn with one f32 scale per
    /// token, about half the bytes). Default: the recipe's data.hidden_dtype (bf16).
    #[arg(long, value_parser = ["bf16", "fp8"])]
    dtype: Option<String>,
}

fn status_json(s: &CacheStatus) -> serde_json::Value {
    match s {
        CacheStatus::Hit(p) => serde_json::json!({"cache": "hit", "path": p}),
        CacheStatus::Built(p) => serde_json::json!({"cache": "built", "path": p}),
        CacheStatus::Off => serde_json::json!({"cache": "off"}),
    }
}

fn summary(name: &str, files: &[PathBuf], d: &LoadedDataset) -> serde_json::Value {
    let s = &d.dataset.stats;
    serde_json::json!({
        "split": name,
        "files": files,
        "conversations": s.conversations,
        "samples": s.samples,
        "tokens": s.tokens,
        "trainable_tokens": s.trainable_tokens,
        "truncated_to_max_length": s.truncated,
        "dropped": {
            "no_assistant_tokens": s.dropped_no_assistant,
            "no_assistant_tokens_within_max_length": s.dropped_truncated_away,
            "invalid_records_skipped": s.skipped_invalid.len(),
        },
        "skipped_records": s.skipped_invalid,
        "caches": d.statuses.iter().map(status_json).collect::<Vec<_>>(),
    })
}

fn print_summary(v: &serde_json::Value) {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let d = &v["dropped"];
    let dn = |k: &str| d[k].as_u64().unwrap_or(0);
    let hits = v["caches"]
        .as_array()
        .map(|a| a.iter().filter(|c| c["cache"] == "hit").count())
        .unwrap_or(0);
    let files = v["caches"].as_array().map_or(0, |a| a.len());
    println!(
        "{}: {} conversations -> {} samples, {} tokens ({} trainable, {:.1}%), {} truncated to max_length",
        v["split"].as_str().unwrap_or(""),
        n("conversations"),
        n("samples"),
        n("tokens"),
        n("trainable_tokens"),
        100.0 * n("trainable_tokens") as f64 / n("tokens").max(1) as f64,
        n("truncated_to_max_length"),
    );
    println!(
        "  dropped: {} with no assistant tokens, {} with none within max_length, {} malformed records skipped",
        dn("no_assistant_tokens"),
        dn("no_assistant_tokens_within_max_length"),
        dn("invalid_records_skipped"),
    );
    if let Some(skipped) = v["skipped_records"].as_array() {
        for s in skipped.iter().take(10) {
            println!("    skipped {}", s.as_str().unwrap_or(""));
        }
        if skipped.len() > 10 {
            println!("    ... and {} more", skipped.len() - 10);
        }
    }
    println!("  token cache: {hits}/{files} file(s) from cache");
    if let Some(c) = v["caches"].as_array() {
        for c in c {
            println!(
                "    {} {}",
                c["cache"].as_str().unwrap_or(""),
                c["path"].as_str().unwrap_or("")
            );
        }
    }
}

/// `forge prepare-data`.
pub fn run_prepare_data(a: DataArgs) -> Result<()> {
    let DataArgs {
        recipe: path,
        set,
        json,
    } = a;
    let recipe = load_recipe(&path, &set)?;
    let steps = Steps::new(progress::for_recipe(&recipe) && !json);
    let t0 = std::time::Instant::now();
    let td = data::load_token_data(&recipe, &|what, done, total| steps.update(what, done, total))
        .with_context(|| format!("preparing the data of {}", path.display()))?;
    drop(steps);
    let seconds = t0.elapsed().as_secs_f64();
    let mut out = vec![summary("train", &recipe.data.train, &td.train)];
    if let Some(e) = &td.eval {
        out.push(summary("eval", &recipe.data.eval, e));
    }
    // what the drafter prepares from the data (EAGLE-3: its draft vocabulary), cached; the
    // drafter itself is not built
    let cfg = data::target_config(&recipe)?;
    let spec =
        forge_trainer::artifacts::section_without_artifacts(&recipe).to_spec(&cfg, recipe.target.path.as_deref())?;
    let mut report = |line: &str| eprintln!("{line}");
    let mut prep = drafter::Prepare::new(&recipe, &cfg, drafter::PrepareSource::Tokens(&td.train), &mut report);
    spec.prepare_data(&mut prep)?;
    let vocab = prep.vocab;
    let vocab_json = vocab.as_ref().map(|(m, st)| {
        serde_json::json!({
            "draft_vocab_size": m.draft_vocab(),
            "target_vocab_size": m.t2d.len(),
            "coverage_of_trainable_tokens": m.coverage(),
            "cache": status_json(st),
        })
    });
    if json {
        let tokens: u64 = out.iter().map(|v| v["tokens"].as_u64().unwrap_or(0)).sum();
        let v = serde_json::json!({
            "recipe": path,
            "data": out,
            "vocab_mapping": vocab_json,
            "seconds": seconds,
            "tokens_per_second": tokens as f64 / seconds.max(1e-9),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for v in &out {
        print_summary(v);
    }
    let tokens: u64 = out.iter().map(|v| v["tokens"].as_u64().unwrap_or(0)).sum();
    println!(
        "loaded in {seconds:.2}s ({:.0} tokens/s, tokenizer loading included)",
        tokens as f64 / seconds.max(1e-9)
    );
    if let Some(v) = vocab_json {
        println!(
            "vocab mapping: draft vocabulary {} of {} covers {:.2}% of trainable tokens ({} {})",
            v["draft_vocab_size"],
            v["target_vocab_size"],
            100.0 * v["coverage_of_trainable_tokens"].as_f64().unwrap_or(0.0),
            v["cache"]["cache"].as_str().unwrap_or(""),
            v["cache"]["path"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

/// `forge prepare-hidden`.
pub fn run_prepare_hidden(a: HiddenArgs) -> Result<()> {
    let recipe = load_recipe(&a.recipe, &a.set)?;
    let (_, device) = data::target_placement(&recipe)?;
    let tensor_parallel = forge_trainer::parallel::tensor::target_group(
        recipe.target.tensor_parallel,
        recipe.dist.backend,
        device,
        recipe.dist.timeout_s,
    )
    .with_context(|| format!("{}: target.tensor_parallel", a.recipe.display()))?;
    let reports = tensor_parallel.as_ref().is_none_or(|t| t.rank() == 0);
    let opts = HiddenOptions {
        out: a.out,
        batch_size: a.batch_size,
        samples_per_shard: a.samples_per_shard,
        topk: a.topk,
        dtype: a.dtype.as_deref().map(str::parse).transpose()?,
        tensor_parallel,
    };
    let steps = Steps::new(reports && progress::for_recipe(&recipe));
    let r = data::prepare_hidden(&recipe, &opts, &|what, done, total| steps.update(what, done, total))
        .with_context(|| format!("preparing hidden states for {}", a.recipe.display()))?;
    drop(steps);
    if !reports {
        return Ok(());
    }
    let already = r.shards_total - r.shards_written;
    println!(
        "{}: {} samples in {} shard(s) ({} written now, {} already there), {} tokens, {:.1} MB, {:.0} bytes/token ({})",
        opts.out.display(),
        r.samples,
        r.shards_total,
        r.shards_written,
        already,
        r.tokens_total,
        r.bytes_total as f64 / 1e6,
        r.bytes_per_token,
        r.dtype
    );
    if r.tokens_written > 0 {
        println!(
            "  target forward: {} tokens in {:.1}s ({:.0} tokens/s, data loading included)",
            r.tokens_written,
            r.seconds,
            r.tokens_written as f64 / r.seconds.max(1e-9)
        );
    }
    println!(
        "  train offline with: data.mode: offline, data.hidden_dir: {}",
        opts.out.display()
    );
    Ok(())
}
