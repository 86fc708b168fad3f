//! `forge build-knowledge`: the knowledge drafter's cache (docs/methods/knowledge.md). This
//! command reads and tokenises the question/answer conversations and loads the target; the
//! cache itself is built by forge_models::drafters::knowledge_cache.

use super::chat::ChatArgs;
use super::progress;
use anyhow::{bail, Context, Result};
use forge_data::dataset::read_first_samples;
use forge_data::hash::target_fingerprint;
use forge_data::{ChatTemplate, TextTokenizer, TokenizeOptions};
use forge_models::drafters::knowledge_cache::{build_cache, CacheOptions, CacheSource};
use forge_models::{parse_device, TargetModel};
use forge_trainer::regenerate::resolve_dtype;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The target's Hugging Face folder.
    #[arg(long)]
    pub target: PathBuf,
    /// Questions with their answers: ShareGPT JSON/JSONL (the assistant turns are the answers).
    #[arg(long = "in", value_name = "FILE")]
    pub input: PathBuf,
    /// The cache file to write (safetensors); its manifest is also written as <out>.manifest.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Width of the stored states (PCA below the hidden size; default: the hidden size).
    #[arg(long)]
    pub cache_dim: Option<i64>,
    /// Conversations to take, from the start of the file (those with an answer).
    #[arg(long, default_value_t = 15)]
    pub entries: usize,
    /// Answer tokens kept per conversation (the first ones).
    #[arg(long, default_value_t = 256)]
    pub max_answer_tokens: usize,
    /// Longest tokenised conversation read (longer ones are cut).
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// Target layers to store, comma-separated (default: every layer, which any sampling reads).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<i64>,
    #[command(flatten)]
    pub chat: ChatArgs,
}

/// `forge build-knowledge`.
pub fn run(a: Args) -> Result<()> {
    if a.entries == 0 || a.max_answer_tokens == 0 {
        bail!("--entries and --max-answer-tokens must be at least 1");
    }
    if a.chat.system.is_some() {
        bail!("--system: the cache reads each conversation as written (put a system turn in the file instead)");
    }
    if a.cache_dim.is_some_and(|d| d < 1) {
        bail!("--cache-dim must be at least 1");
    }
    let device = parse_device(&a.chat.device).context("--device")?;
    let dtype = resolve_dtype(&a.chat.dtype, device)?;
    let model =
        TargetModel::load(&a.target, dtype, device).with_context(|| format!("--target {}", a.target.display()))?;
    let cfg = &model.config;
    let mut opts = CacheOptions::full(&model, a.max_answer_tokens);
    if !a.layers.is_empty() {
        opts.layers = a.layers.clone();
    }
    if let Some(bad) = opts.layers.iter().find(|&&l| l < 0 || l >= cfg.num_layers) {
        bail!(
            "--layers: layer {bad} does not exist ({} has layers 0..{})",
            a.target.display(),
            cfg.num_layers - 1
        );
    }
    if opts.layers.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--layers {:?}: list each layer once, ascending", opts.layers);
    }
    let dim = a.cache_dim.unwrap_or(cfg.hidden_size);
    if dim > cfg.hidden_size {
        bail!("--cache-dim {dim} is above the target's hidden size {}: pass at most {} (or leave it out for no projection)", cfg.hidden_size, cfg.hidden_size);
    }
    opts.cache_dim = dim;
    let tokenizer = TextTokenizer::from_dir(&a.target)?;
    let template = ChatTemplate::from_name(&a.chat.chat_template, &a.target)
        .with_context(|| format!("--chat-template {}", a.chat.chat_template))?;
    let tokenize = TokenizeOptions {
        max_length: a.max_length,
        train_only_last_turn: false,
        skip_invalid: false,
    };
    let read = read_first_samples(&a.input, &tokenizer, &template, &tokenize, a.entries).context("--in")?;
    if read.samples.len() < a.entries {
        bail!(
            "--entries {}: {} has only {} conversations with an answer (of {} read): pass --entries {} or a larger file",
            a.entries,
            a.input.display(),
            read.samples.len(),
            read.conversations,
            read.samples.len()
        );
    }
    let source = CacheSource {
        target: a.target.display().to_string(),
        target_fingerprint: target_fingerprint(&a.target).context("--target")?,
        data: a.input.display().to_string(),
        data_hash: read.data_hash.clone(),
    };
    eprintln!(
        "forge build-knowledge: {} entries of {} through {} ({} layers stored, {} answer tokens each at most, states {} wide{})",
        read.samples.len(),
        a.input.display(),
        a.target.display(),
        opts.layers.len(),
        a.max_answer_tokens,
        dim,
        if dim < cfg.hidden_size { format!(", PCA from {}", cfg.hidden_size) } else { String::new() }
    );
    let pb = progress::bar(
        read.samples.len() as u64,
        "knowledge [{bar:30}] {pos}/{len} entries eta {eta}",
        progress::show(&a.chat.progress),
    );
    let cache = build_cache(&model, &read.samples, &opts, source, &mut |n| pb.inc(n))
        .context("building the knowledge cache (the target's forward over the entries)")?;
    pb.finish_and_clear();
    let tokens = cache.manifest.tokens;
    if tokens < dim {
        eprintln!(
            "forge build-knowledge: note: {tokens} answer tokens span at most {tokens} of the {dim} directions kept; the rest carry no variance (more --entries or a smaller --cache-dim)"
        );
    }
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("--out: cannot create {}", dir.display()))?;
    }
    cache
        .write(&a.out)
        .with_context(|| format!("--out {}", a.out.display()))?;
    let side = cache.write_manifest_json(&a.out)?;
    let mb = std::fs::metadata(&a.out).map(|m| m.len() as f64 / 1e6).unwrap_or(0.0);
    println!(
        "forge build-knowledge: wrote {} ({} entries, {} answer tokens x {} per layer, {} layers, {:.1} MB) and {}",
        a.out.display(),
        cache.manifest.entries,
        tokens,
        dim,
        cache.manifest.layers.len(),
        mb,
        side.display()
    );
    Ok(())
}
