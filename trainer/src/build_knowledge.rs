//! `forge build-knowledge`: the knowledge drafter's cache (docs/methods/knowledge.md). The
//! target reads question/answer conversations; the outputs of its layers at the answer tokens
//! are stored per layer, projected onto their top `--cache-dim` principal directions when that
//! is below the hidden size, with a manifest (target fingerprint, data hash, counts) in the
//! file's metadata and beside it as JSON.

use forge_data::hash::{data_hash, target_fingerprint};
use crate::regenerate::{resolve_dtype, show_progress, ChatArgs};
use anyhow::{bail, Context, Result};
use forge_data::conversation::parse_conversations;
use forge_data::dataset::tokenize_conversation;
use forge_data::{ChatTemplate, TextTokenizer, TokenizeOptions};
use forge_models::drafters::knowledge::{project_pca, CacheManifest, KnowledgeCache, CACHE_FORMAT};
use forge_models::{parse_device, Capture, TargetModel};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

#[derive(clap::Args, Debug, Clone)]
pub struct BuildKnowledgeArgs {
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

pub fn run(a: BuildKnowledgeArgs) -> Result<()> {
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
    let layers: Vec<i64> = if a.layers.is_empty() {
        (0..cfg.num_layers).collect()
    } else {
        a.layers.clone()
    };
    if let Some(bad) = layers.iter().find(|&&l| l < 0 || l >= cfg.num_layers) {
        bail!(
            "--layers: layer {bad} does not exist ({} has layers 0..{})",
            a.target.display(),
            cfg.num_layers - 1
        );
    }
    if layers.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--layers {layers:?}: list each layer once, ascending");
    }
    let dim = a.cache_dim.unwrap_or(cfg.hidden_size);
    if dim > cfg.hidden_size {
        bail!("--cache-dim {dim} is above the target's hidden size {}: pass at most {} (or leave it out for no projection)", cfg.hidden_size, cfg.hidden_size);
    }
    let tokenizer = TextTokenizer::from_dir(&a.target)?;
    let template = ChatTemplate::from_name(&a.chat.chat_template, &a.target)
        .with_context(|| format!("--chat-template {}", a.chat.chat_template))?;
    let text = std::fs::read_to_string(&a.input).with_context(|| format!("--in {}", a.input.display()))?;
    let data_hash = data_hash(text.as_bytes());
    let read = parse_conversations(&text, &a.input, false).with_context(|| format!("--in {}", a.input.display()))?;
    let opts = TokenizeOptions {
        max_length: a.max_length,
        train_only_last_turn: false,
        skip_invalid: false,
    };
    let mut samples = Vec::new();
    for conv in &read.conversations {
        if samples.len() == a.entries {
            break;
        }
        if let Ok(s) = tokenize_conversation(&tokenizer, &template, conv, &opts)? {
            samples.push(s);
        }
    }
    if samples.len() < a.entries {
        bail!(
            "--entries {}: {} has only {} conversations with an answer (of {} read): pass --entries {} or a larger file",
            a.entries,
            a.input.display(),
            samples.len(),
            read.conversations.len(),
            samples.len()
        );
    }
    eprintln!(
        "forge build-knowledge: {} entries of {} through {} ({} layers stored, {} answer tokens each at most, states {} wide{})",
        samples.len(),
        a.input.display(),
        a.target.display(),
        layers.len(),
        a.max_answer_tokens,
        dim,
        if dim < cfg.hidden_size { format!(", PCA from {}", cfg.hidden_size) } else { String::new() }
    );
    let pb = crate::data::styled_bar(
        samples.len() as u64,
        "knowledge [{bar:30}] {pos}/{len} entries eta {eta}",
        show_progress(&a.chat.progress),
    );
    let capture = Capture {
        layers: layers.clone(),
        ..Default::default()
    };
    let mut per_layer: BTreeMap<i64, Vec<Tensor>> = BTreeMap::new();
    let mut tokens = 0i64;
    for s in &samples {
        let answer: Vec<i64> = s
            .loss_mask
            .iter()
            .enumerate()
            .filter(|(_, &m)| m != 0)
            .map(|(i, _)| i as i64)
            .take(a.max_answer_tokens)
            .collect();
        // the target reads up to the last answer token kept (causal: later ones change nothing)
        let end = answer.last().map_or(0, |&l| l as usize + 1);
        let ids: Vec<i64> = s.input_ids[..end].iter().map(|&i| i as i64).collect();
        let input = Tensor::from_slice(&ids).view([1, -1]).to_device(device);
        let out = tch::no_grad(|| model.forward(&input, None, None, None, &capture))
            .with_context(|| format!("the target's forward over entry {}", s.id))?;
        let idx = Tensor::from_slice(&answer).to_device(device);
        for (l, h) in layers.iter().zip(&out.layers) {
            let rows = h
                .squeeze_dim(0)
                .index_select(0, &idx)
                .to_kind(Kind::Float)
                .to_device(tch::Device::Cpu);
            per_layer.entry(*l).or_default().push(rows);
        }
        tokens += answer.len() as i64;
        pb.inc(1);
    }
    pb.finish_and_clear();
    if tokens < dim {
        eprintln!(
            "forge build-knowledge: note: {tokens} answer tokens span at most {tokens} of the {dim} directions kept; the rest carry no variance (more --entries or a smaller --cache-dim)"
        );
    }
    let stored: BTreeMap<i64, Tensor> = per_layer
        .into_iter()
        .map(|(l, parts)| (l, project_pca(&Tensor::cat(&parts, 0), dim)))
        .collect();
    let manifest = CacheManifest {
        format: CACHE_FORMAT.into(),
        target: a.target.display().to_string(),
        target_fingerprint: target_fingerprint(&a.target)?,
        data: a.input.display().to_string(),
        data_hash,
        entries: samples.len() as i64,
        tokens,
        hidden_size: cfg.hidden_size,
        cache_dim: dim,
        projection: if dim < cfg.hidden_size {
            "pca".into()
        } else {
            "none".into()
        },
        layers,
    };
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("--out: cannot create {}", dir.display()))?;
    }
    let cache = KnowledgeCache {
        manifest,
        layers: stored,
    };
    cache
        .write(&a.out)
        .with_context(|| format!("--out {}", a.out.display()))?;
    let side = a.out.with_extension("manifest.json");
    std::fs::write(&side, serde_json::to_string_pretty(&cache.manifest)? + "\n")
        .with_context(|| format!("writing {}", side.display()))?;
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
