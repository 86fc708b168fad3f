//! The recipe's data, ready for training: tokenised conversations (cached), the EAGLE-3
//! vocabulary mapping, and hidden-state datasets for offline training (`forge prepare-hidden`).

use crate::error::{Result, TrainerError};
// the recipe's target, used by data preparation and by its callers as data::*
pub use crate::target::{chat_template, target_config, target_dir, target_placement};

use crate::recipe::Recipe;
use forge_data::dataset::{load_dataset, CacheStatus, LoadedDataset, TokenizeOptions};
use forge_data::hidden::{HiddenDtype, HiddenSettings, HiddenWriter, SampleRows, HIDDEN_FORMAT};
use forge_data::{ChatTemplate, TextTokenizer, VocabMapping};
use forge_models::{Capture, TargetConfig, TargetModel};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Kind, Tensor};

pub fn tokenize_options(recipe: &Recipe) -> TokenizeOptions {
    TokenizeOptions {
        max_length: recipe.data.max_length.max(1) as usize,
        train_only_last_turn: recipe.data.train_only_last_turn,
        skip_invalid: recipe.data.skip_invalid,
    }
}

/// Tokenised train (and eval) data with the tokenizer and template that made it.
pub struct TokenData {
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub train: LoadedDataset,
    pub eval: Option<LoadedDataset>,
    pub seconds: f64,
}

/// How a data step reports progress: `(what, done, total)`, `what` naming the step
/// ("tokenising", "eval data", "hidden states"); `total` may change when a step starts.
pub type PhaseReport<'a> = &'a (dyn Fn(&str, u64, u64) + Sync);

/// A [`Progress`] that reports nothing.
pub fn no_progress(_: &str, _: u64, _: u64) {}

fn load_files(
    files: &[PathBuf],
    tok: &TextTokenizer,
    template: &ChatTemplate,
    opts: &TokenizeOptions,
    cache_dir: &Path,
    what: &str,
    progress: PhaseReport,
) -> Result<LoadedDataset> {
    let report = |done: u64, total: u64| progress(what, done, total);
    Ok(load_dataset(files, tok, template, opts, Some(cache_dir), &report)?)
}

/// Loads the recipe's conversations from the token cache, tokenising what is not cached;
/// `progress` hears of each file's tokenisation.
pub fn load_token_data(recipe: &Recipe, progress: PhaseReport) -> Result<TokenData> {
    let t0 = Instant::now();
    let dir = target_dir(recipe)?;
    let tokenizer = TextTokenizer::from_dir(dir)?;
    let template = chat_template(recipe)?;
    let opts = tokenize_options(recipe);
    let cache = &recipe.data.cache_dir;
    let train = load_files(
        &recipe.data.train,
        &tokenizer,
        &template,
        &opts,
        cache,
        "tokenising",
        progress,
    )?;
    if train.dataset.is_empty() {
        return Err(TrainerError::Config(format!(
            "data.train ({}) gives no trainable sample: {} conversations read, {} without assistant tokens, {} with none within max_length {}",
            recipe.data.train.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            train.dataset.stats.conversations,
            train.dataset.stats.dropped_no_assistant,
            train.dataset.stats.dropped_truncated_away,
            opts.max_length,
        )));
    }
    let eval = if recipe.data.eval.is_empty() {
        None
    } else {
        Some(load_files(
            &recipe.data.eval,
            &tokenizer,
            &template,
            &opts,
            cache,
            "eval data",
            progress,
        )?)
    };
    Ok(TokenData {
        tokenizer,
        template,
        train,
        eval,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Only the eval conversations (offline runs evaluate through the target).
pub fn load_eval_data(recipe: &Recipe) -> Result<Option<LoadedDataset>> {
    if recipe.data.eval.is_empty() {
        return Ok(None);
    }
    let dir = target_dir(recipe)?;
    let tokenizer = TextTokenizer::from_dir(dir)?;
    let template = chat_template(recipe)?;
    let opts = tokenize_options(recipe);
    Ok(Some(load_files(
        &recipe.data.eval,
        &tokenizer,
        &template,
        &opts,
        &recipe.data.cache_dir,
        "eval data",
        &no_progress,
    )?))
}

/// Loads (or builds and caches beside the token cache) a draft vocabulary of `size` tokens
/// from the training data (`Drafter::prepare` asks for it through `drafter::Prepare`).
pub fn vocab_mapping(
    recipe: &Recipe,
    cfg: &TargetConfig,
    data: &LoadedDataset,
    size: usize,
) -> Result<(VocabMapping, CacheStatus)> {
    Ok(VocabMapping::load_or_build(
        &data.dataset,
        &data.key,
        Some(&recipe.data.cache_dir),
        cfg.vocab_size as usize,
        size,
    )?)
}

/// Options of `forge prepare-hidden`.
#[derive(Debug, Clone)]
pub struct HiddenOptions {
    pub out: PathBuf,
    pub batch_size: usize,
    pub samples_per_shard: usize,
    pub topk: usize,
    /// How the states are stored (`--dtype`); `None`: the recipe's `data.hidden_dtype`.
    pub dtype: Option<HiddenDtype>,
    /// The target's tensor-parallel group (`target.tensor_parallel` > 1): every rank runs
    /// the target, rank 0 writes the shards.
    pub tensor_parallel: Option<std::sync::Arc<forge_models::layers::TensorParallel>>,
}

/// The storage `prepare-hidden` uses: `--dtype` when given, else `data.hidden_dtype`.
pub fn hidden_dtype(recipe: &Recipe, opts: &HiddenOptions) -> HiddenDtype {
    opts.dtype.unwrap_or(match recipe.data.hidden_dtype {
        crate::recipe::HiddenDtype::Bf16 => HiddenDtype::Bf16,
        crate::recipe::HiddenDtype::Fp8 => HiddenDtype::Fp8,
    })
}

/// What `prepare-hidden` did.
#[derive(Debug, Clone)]
pub struct HiddenReport {
    pub samples: usize,
    pub shards_total: usize,
    pub shards_written: usize,
    pub tokens_written: u64,
    pub seconds: f64,
    pub bytes_total: u64,
    pub tokens_total: u64,
    pub bytes_per_token: f64,
    pub dtype: HiddenDtype,
}

/// bf16 bytes of a tensor (any float kind), row-major.
pub fn bf16_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_kind(Kind::BFloat16).contiguous().to_device(tch::Device::Cpu);
    let n = t.numel();
    let mut out = vec![0u8; n * 2];
    t.copy_data_u8(&mut out, n);
    out
}

/// A state tensor's rows (`[T, width]`, any float kind) in the dataset's storage: bf16 bytes
/// and no scales, or e4m3fn codes and one f32 scale per row (`what` names it in errors).
fn state_rows(t: &Tensor, dtype: HiddenDtype, what: &str) -> Result<(Vec<u8>, Vec<f32>)> {
    match dtype {
        HiddenDtype::Bf16 => Ok((bf16_bytes(t), Vec::new())),
        HiddenDtype::Fp8 => {
            let width = t.size().last().copied().unwrap_or(0).max(0) as usize;
            let values = Vec::<f32>::try_from(&t.to_kind(Kind::Float).contiguous().view([-1]))?;
            Ok(forge_data::fp8::quantize_rows(&values, width, what)?)
        }
    }
}

/// Runs the frozen target over the recipe's tokenised data and writes hidden-state shards.
/// Finished shards of an interrupted run with the same settings are kept. `progress` hears of
/// the tokenisation, then of the tokens run through the target ("hidden states").
pub fn prepare_hidden(recipe: &Recipe, opts: &HiddenOptions, progress: PhaseReport) -> Result<HiddenReport> {
    let t0 = Instant::now();
    let dir = target_dir(recipe)?;
    let cfg = target_config(recipe)?;
    // the features a drafter needs never depend on its knowledge cache (built by forge train)
    let needs = crate::artifacts::section_without_artifacts(recipe)
        .to_spec(&cfg, Some(dir))?
        .feature_needs();
    let aux_layers: Vec<usize> = needs.aux_layers.iter().map(|&l| l as usize).collect();
    // the drafter's own top-k need, or more when asked on the command line
    let topk = opts.topk.max(needs.target_topk);
    let data = load_token_data(recipe, progress)?;
    let ds = &data.train.dataset;
    let storage = hidden_dtype(recipe, opts);
    let settings = HiddenSettings {
        format: HIDDEN_FORMAT.into(),
        target: dir.display().to_string(),
        target_fingerprint: forge_data::hash::target_fingerprint(dir)?,
        data_key: data.train.key.clone(),
        hidden_size: cfg.hidden_size as usize,
        last_hidden: needs.last_hidden,
        aux_layers,
        topk,
        dtype: storage,
        samples_per_shard: opts.samples_per_shard.max(1),
        num_samples: ds.len(),
    };
    // under tensor parallelism rank 0 opens the folder (dropping a killed run's temporaries)
    // before the others read which shards are pending; it writes nothing before they join
    // its first forward
    let tp = opts.tensor_parallel.clone();
    let writes = tp.as_ref().is_none_or(|t| t.rank() == 0);
    if let (Some(t), false) = (&tp, writes) {
        t.sync()?;
    }
    let mut writer = HiddenWriter::open(&opts.out, settings)?;
    if let (Some(t), true) = (&tp, writes) {
        t.sync()?;
    }
    let pending = writer.pending_shards();
    let shards_total = writer.manifest().num_shards();
    let mut tokens_written = 0u64;
    let mut shards_written = 0usize;
    if !pending.is_empty() {
        let (dtype, device) = target_placement(recipe)?;
        let model = TargetModel::load_parallel(dir, dtype, device, tp)?;
        let todo: u64 = pending
            .iter()
            .map(|&k| writer.shard_range(k).map(|i| ds.sample_len(i) as u64).sum::<u64>())
            .sum();
        let mut done = 0u64;
        progress("hidden states", done, todo);
        let capture = Capture {
            layers: needs.aux_layers.clone(),
            logits: forge_models::LogitsMode::None,
        };
        for k in pending {
            let range = writer.shard_range(k);
            let mut rows: Vec<SampleRows> = vec![SampleRows::default(); range.len()];
            // batch neighbours of similar length to pad little; rows keep dataset order
            let mut order: Vec<usize> = range.clone().collect();
            order.sort_by_key(|&i| std::cmp::Reverse(ds.sample_len(i)));
            for chunk in order.chunks(opts.batch_size.max(1)) {
                let samples: Vec<(&[u32], &[u8])> = chunk.iter().map(|&i| (ds.input_ids(i), ds.mask(i))).collect();
                let batch = forge_data::Batch::collate(&samples, 0);
                let (b, l) = (batch.batch as i64, batch.len as i64);
                let ids = Tensor::from_slice(&batch.input_ids).view([b, l]);
                // Right padding under a causal mask: real tokens never see the padding.
                let out = tch::no_grad(|| model.forward(&ids, None, None, None, &capture))?;
                let aux = if out.layers.is_empty() {
                    None
                } else {
                    Some(Tensor::cat(&out.layers, -1))
                };
                let topk = (topk > 0).then(|| {
                    let logp = model
                        .logits(&out.hidden_normed)
                        .to_kind(Kind::Float)
                        .log_softmax(-1, Kind::Float);
                    logp.topk(topk as i64, -1, true, true)
                });
                for (r, &i) in chunk.iter().enumerate() {
                    let n = ds.sample_len(i) as i64;
                    let row = |t: &Tensor| t.get(r as i64).narrow(0, 0, n);
                    let mut s = SampleRows {
                        id: ds.ids[i].clone(),
                        input_ids: ds.input_ids(i).to_vec(),
                        loss_mask: ds.mask(i).to_vec(),
                        ..Default::default()
                    };
                    if needs.last_hidden {
                        let what = format!("sample {}: hidden_state", s.id);
                        (s.hidden_state, s.hidden_scale) = state_rows(&row(&out.hidden_normed), storage, &what)?;
                    }
                    if let Some(a) = &aux {
                        let what = format!("sample {}: aux_hidden_state", s.id);
                        (s.aux_hidden_state, s.aux_scale) = state_rows(&row(a), storage, &what)?;
                    }
                    if let Some((vals, idx)) = &topk {
                        s.topk_logprobs = bf16_bytes(&row(vals));
                        let idx = row(idx).to_kind(Kind::Int).contiguous().view([-1]);
                        s.topk_ids = Vec::<i32>::try_from(&idx)?;
                    }
                    tokens_written += n as u64;
                    done += n as u64;
                    progress("hidden states", done, todo);
                    rows[i - range.start] = s;
                }
            }
            if writes {
                writer.write_shard(k, &rows)?;
            }
            shards_written += 1;
        }
    }
    let m = writer.manifest();
    Ok(HiddenReport {
        samples: ds.len(),
        shards_total,
        shards_written,
        tokens_written,
        seconds: t0.elapsed().as_secs_f64(),
        bytes_total: m.bytes,
        tokens_total: m.tokens,
        bytes_per_token: m.bytes_per_token,
        dtype: m.settings.dtype,
    })
}
