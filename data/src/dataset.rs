//! Tokenised conversations with loss masks, built in parallel and cached on disk.
//!
//! A conversation is rendered once with the chat template, tokenised once with byte offsets,
//! and a token is trainable when its first byte lies inside the span of a trainable assistant
//! message (content + the end-of-turn marker that closes it). Samples are truncated to
//! `max_length`; samples left with no trainable token are dropped and counted.
//!
//! One file over ~500 lines: tokenising, masking and the cache share one sample layout.

use crate::chat::ChatTemplate;
use crate::conversation::{read_conversations, Conversation, InvalidRecord};
use crate::error::{DataError, Result};
use crate::hash::ContentHash;
use crate::tokenizer::TextTokenizer;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bumped whenever the cache layout or the tokenisation rules change.
const CACHE_VERSION: &str = "forge-token-cache-v1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizeOptions {
    pub max_length: usize,
    pub train_only_last_turn: bool,
    pub skip_invalid: bool,
}

/// Why a readable conversation produced no sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// No assistant turn to learn from (or only empty ones).
    NoAssistantTurn,
    /// The assistant tokens all lie beyond `max_length`.
    TruncatedAway,
}

impl DropReason {
    pub fn describe(self) -> &'static str {
        match self {
            DropReason::NoAssistantTurn => "no assistant tokens to train on",
            DropReason::TruncatedAway => "no assistant tokens within max_length",
        }
    }
}

/// One tokenised sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub id: String,
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
    pub truncated: bool,
}

/// Tokenises one conversation with its loss mask.
pub fn tokenize_conversation(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    conv: &Conversation,
    opts: &TokenizeOptions,
) -> Result<std::result::Result<Sample, DropReason>> {
    let rendered = template.render_with_spans(&conv.messages, false);
    let mut spans: Vec<std::ops::Range<usize>> = conv
        .trainable
        .iter()
        .zip(&rendered.spans)
        .filter(|(t, _)| **t)
        .map(|(_, s)| s.clone())
        .collect();
    if opts.train_only_last_turn && spans.len() > 1 {
        spans.drain(..spans.len() - 1);
    }
    if spans.is_empty() {
        return Ok(Err(DropReason::NoAssistantTurn));
    }
    let (ids, offsets) = tok.encode_with_offsets(&rendered.text)?;
    let mut mask = vec![0u8; ids.len()];
    let mut si = 0;
    for (i, &(start, _)) in offsets.iter().enumerate() {
        while si < spans.len() && spans[si].end <= start {
            si += 1;
        }
        if si == spans.len() {
            break;
        }
        let s = &spans[si];
        // A token that starts before the span (e.g. the template's "\n" merged with a leading
        // space of the content) belongs to the prompt side: at inference it is never generated.
        if start >= s.start && start < s.end {
            mask[i] = 1;
        }
    }
    if !mask.contains(&1) {
        return Ok(Err(DropReason::NoAssistantTurn));
    }
    let truncated = ids.len() > opts.max_length;
    let (mut ids, mut mask) = (ids, mask);
    if truncated {
        ids.truncate(opts.max_length);
        mask.truncate(opts.max_length);
        if !mask.contains(&1) {
            return Ok(Err(DropReason::TruncatedAway));
        }
    }
    Ok(Ok(Sample {
        id: conv.id.clone(),
        input_ids: ids,
        loss_mask: mask,
        truncated,
    }))
}

/// The first samples of one file (see [`read_first_samples`]).
#[derive(Debug, Clone)]
pub struct FirstSamples {
    pub samples: Vec<Sample>,
    /// Conversations in the file (valid records).
    pub conversations: usize,
    /// [`crate::hash::data_hash`] of the file's bytes.
    pub data_hash: String,
}

/// Reads a conversation file and tokenises conversations from its start until `limit` of
/// them give a sample (an answer within `max_length`); fewer when the file runs out.
pub fn read_first_samples(
    path: &Path,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    opts: &TokenizeOptions,
    limit: usize,
) -> Result<FirstSamples> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let read = crate::conversation::parse_conversations(&text, path, opts.skip_invalid)?;
    let mut samples = Vec::new();
    for conv in &read.conversations {
        if samples.len() == limit {
            break;
        }
        if let Ok(s) = tokenize_conversation(tok, template, conv, opts)? {
            samples.push(s);
        }
    }
    Ok(FirstSamples {
        samples,
        conversations: read.conversations.len(),
        data_hash: crate::hash::data_hash(text.as_bytes()),
    })
}

/// Counts of what a data file produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataStats {
    /// Records read (valid conversations).
    pub conversations: u64,
    pub samples: u64,
    pub tokens: u64,
    pub trainable_tokens: u64,
    /// Samples cut to max_length (kept).
    pub truncated: u64,
    pub dropped_no_assistant: u64,
    pub dropped_truncated_away: u64,
    /// Malformed records skipped (`skip_invalid`), as `file:line: reason`.
    pub skipped_invalid: Vec<String>,
}

impl DataStats {
    pub fn add(&mut self, o: &DataStats) {
        self.conversations += o.conversations;
        self.samples += o.samples;
        self.tokens += o.tokens;
        self.trainable_tokens += o.trainable_tokens;
        self.truncated += o.truncated;
        self.dropped_no_assistant += o.dropped_no_assistant;
        self.dropped_truncated_away += o.dropped_truncated_away;
        self.skipped_invalid.extend(o.skipped_invalid.iter().cloned());
    }
}

/// Tokenised samples stored flat: sample i is `tokens[offsets[i]..offsets[i+1]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenDataset {
    pub ids: Vec<String>,
    pub tokens: Vec<u32>,
    pub loss_mask: Vec<u8>,
    pub offsets: Vec<u64>,
    pub stats: DataStats,
}

impl TokenDataset {
    fn from_samples(samples: Vec<Sample>, stats: DataStats) -> Self {
        let mut d = TokenDataset {
            offsets: vec![0],
            stats,
            ..Default::default()
        };
        for s in samples {
            d.push(&s.id, &s.input_ids, &s.loss_mask);
        }
        d
    }

    fn push(&mut self, id: &str, ids: &[u32], mask: &[u8]) {
        self.ids.push(id.to_string());
        self.tokens.extend_from_slice(ids);
        self.loss_mask.extend_from_slice(mask);
        self.offsets.push(self.tokens.len() as u64);
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.offsets[i] as usize..self.offsets[i + 1] as usize
    }

    pub fn input_ids(&self, i: usize) -> &[u32] {
        &self.tokens[self.range(i)]
    }

    pub fn mask(&self, i: usize) -> &[u8] {
        &self.loss_mask[self.range(i)]
    }

    pub fn sample_len(&self, i: usize) -> usize {
        self.range(i).len()
    }

    pub fn lengths(&self) -> Vec<usize> {
        (0..self.len()).map(|i| self.sample_len(i)).collect()
    }

    /// Appends another dataset (several data files make one dataset).
    pub fn extend(&mut self, other: &TokenDataset) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        for i in 0..other.len() {
            self.push(&other.ids[i], other.input_ids(i), other.mask(i));
        }
        self.stats.add(&other.stats);
    }
}

/// Whether a dataset came from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    Hit(PathBuf),
    Built(PathBuf),
    /// No cache folder given.
    Off,
}

/// Renders and tokenises every conversation of one file in parallel.
pub fn tokenize_file(
    path: &Path,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    opts: &TokenizeOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<TokenDataset> {
    let read = read_conversations(path, opts.skip_invalid)?;
    let total = read.conversations.len() as u64;
    let done = AtomicU64::new(0);
    let results: Vec<Result<std::result::Result<Sample, DropReason>>> = read
        .conversations
        .par_iter()
        .map(|c| {
            let r = tokenize_conversation(tok, template, c, opts);
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            progress(n, total);
            r
        })
        .collect();
    let mut stats = DataStats {
        conversations: total,
        skipped_invalid: read.skipped.iter().map(InvalidRecord::to_string).collect(),
        ..Default::default()
    };
    let mut samples = Vec::with_capacity(results.len());
    for r in results {
        match r? {
            Ok(s) => {
                stats.samples += 1;
                stats.tokens += s.input_ids.len() as u64;
                stats.trainable_tokens += s.loss_mask.iter().map(|&m| m as u64).sum::<u64>();
                stats.truncated += s.truncated as u64;
                samples.push(s);
            }
            Err(DropReason::NoAssistantTurn) => stats.dropped_no_assistant += 1,
            Err(DropReason::TruncatedAway) => stats.dropped_truncated_away += 1,
        }
    }
    Ok(TokenDataset::from_samples(samples, stats))
}

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The cache key of a data file under a tokenizer, template and options.
pub fn cache_key(
    data_file: &Path,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    opts: &TokenizeOptions,
) -> Result<String> {
    let mut h = ContentHash::new();
    h.field(CACHE_VERSION.as_bytes())
        .field(&read_bytes(data_file)?)
        .field(&read_bytes(tok.path())?)
        .field(format!("{template:?}").as_bytes())
        .field(&(opts.max_length as u64).to_le_bytes())
        .field(&[opts.train_only_last_turn as u8]);
    Ok(h.hex())
}

/// The cache file for a data file (`<cache_dir>/tokens-<stem>-<key>.safetensors`).
pub fn cache_path(cache_dir: &Path, data_file: &Path, key: &str) -> PathBuf {
    let stem = data_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    cache_dir.join(format!("tokens-{stem}-{}.safetensors", &key[..16]))
}

/// Loads one data file from the cache, or tokenises it and writes the cache.
pub fn load_or_build(
    data_file: &Path,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    opts: &TokenizeOptions,
    cache_dir: Option<&Path>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(TokenDataset, CacheStatus, String)> {
    let key = cache_key(data_file, tok, template, opts)?;
    let Some(dir) = cache_dir else {
        let ds = tokenize_file(data_file, tok, template, opts, progress)?;
        return Ok((ds, CacheStatus::Off, key));
    };
    let path = cache_path(dir, data_file, &key);
    if path.is_file() {
        if let Ok(ds) = read_cache(&path, &key) {
            if !opts.skip_invalid {
                if let Some(first) = ds.stats.skipped_invalid.first() {
                    return Err(DataError::Record(format!(
                        "{first}\n  (fix the record, or set data.skip_invalid: true to skip and count malformed records)"
                    )));
                }
            }
            return Ok((ds, CacheStatus::Hit(path), key));
        }
        // An unreadable cache file is rebuilt below.
    }
    let ds = tokenize_file(data_file, tok, template, opts, progress)?;
    write_cache(&path, &key, data_file, &ds)?;
    Ok((ds, CacheStatus::Built(path), key))
}

fn st_err(path: &Path, msg: impl std::fmt::Display) -> DataError {
    DataError::Safetensors {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// Little-endian bytes of a slice of plain numbers.
pub(crate) fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * N);
    for &x in v {
        out.extend_from_slice(&f(x));
    }
    out
}

/// Writes named tensors `(name, dtype, shape, bytes)` to a safetensors file atomically
/// (temporary name, then rename), creating the folder.
pub(crate) fn write_tensors(
    path: &Path,
    tensors: &[(&str, Dtype, Vec<usize>, &[u8])],
    metadata: HashMap<String, String>,
) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| DataError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    let mut views = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, data) in tensors {
        let v = TensorView::new(*dtype, shape.clone(), data).map_err(|e| st_err(path, e))?;
        views.push((name.to_string(), v));
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    safetensors::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| st_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a safetensors file's bytes and hands the parsed view to `f`.
pub(crate) fn with_tensors<R>(
    path: &Path,
    f: impl FnOnce(&SafeTensors, Option<&HashMap<String, String>>) -> Result<R>,
) -> Result<R> {
    let bytes = read_bytes(path)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| st_err(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| st_err(path, e))?;
    f(&st, meta.metadata().as_ref())
}

pub(crate) fn tensor_bytes<'a>(
    path: &Path,
    st: &'a SafeTensors,
    name: &str,
    dtype: Dtype,
) -> Result<(Vec<usize>, &'a [u8])> {
    let t = st
        .tensor(name)
        .map_err(|e| st_err(path, format!("tensor '{name}': {e}")))?;
    if t.dtype() != dtype {
        return Err(st_err(
            path,
            format!("tensor '{name}' has dtype {:?}, expected {dtype:?}", t.dtype()),
        ));
    }
    Ok((t.shape().to_vec(), t.data()))
}

pub(crate) fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub(crate) fn u64s(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

fn write_cache(path: &Path, key: &str, source: &Path, ds: &TokenDataset) -> Result<()> {
    let ids = le_bytes(&ds.tokens, u32::to_le_bytes);
    let offsets = le_bytes(&ds.offsets, u64::to_le_bytes);
    let mut meta = HashMap::new();
    meta.insert("format".into(), CACHE_VERSION.into());
    meta.insert("key".into(), key.into());
    meta.insert("source".into(), source.display().to_string());
    meta.insert(
        "ids".into(),
        serde_json::to_string(&ds.ids).map_err(|e| st_err(path, e))?,
    );
    meta.insert(
        "stats".into(),
        serde_json::to_string(&ds.stats).map_err(|e| st_err(path, e))?,
    );
    write_tensors(
        path,
        &[
            ("input_ids", Dtype::U32, vec![ds.tokens.len()], &ids),
            ("loss_mask", Dtype::U8, vec![ds.loss_mask.len()], &ds.loss_mask),
            ("offsets", Dtype::U64, vec![ds.offsets.len()], &offsets),
        ],
        meta,
    )
}

fn read_cache(path: &Path, key: &str) -> Result<TokenDataset> {
    with_tensors(path, |st, meta| {
        let meta = meta.ok_or_else(|| st_err(path, "no metadata"))?;
        if meta.get("key").map(String::as_str) != Some(key)
            || meta.get("format").map(String::as_str) != Some(CACHE_VERSION)
        {
            return Err(st_err(path, "stale cache"));
        }
        let ids: Vec<String> = serde_json::from_str(meta.get("ids").map_or("", |s| s)).map_err(|e| st_err(path, e))?;
        let stats: DataStats =
            serde_json::from_str(meta.get("stats").map_or("", |s| s)).map_err(|e| st_err(path, e))?;
        let (_, tokens) = tensor_bytes(path, st, "input_ids", Dtype::U32)?;
        let (_, mask) = tensor_bytes(path, st, "loss_mask", Dtype::U8)?;
        let (_, offsets) = tensor_bytes(path, st, "offsets", Dtype::U64)?;
        let ds = TokenDataset {
            ids,
            tokens: u32s(tokens),
            loss_mask: mask.to_vec(),
            offsets: u64s(offsets),
            stats,
        };
        if ds.offsets.len() != ds.ids.len() + 1
            || ds.tokens.len() != ds.loss_mask.len()
            || ds.offsets.last().copied() != Some(ds.tokens.len() as u64)
        {
            return Err(st_err(path, "inconsistent cache"));
        }
        Ok(ds)
    })
}

/// A dataset loaded from one or more data files.
#[derive(Debug, Clone)]
pub struct LoadedDataset {
    pub dataset: TokenDataset,
    pub statuses: Vec<CacheStatus>,
    /// Combined cache key of the files (keys derived caches such as the vocabulary mapping).
    pub key: String,
}

/// Loads (or builds and caches) every data file and concatenates them in order.
pub fn load_dataset(
    files: &[PathBuf],
    tok: &TextTokenizer,
    template: &ChatTemplate,
    opts: &TokenizeOptions,
    cache_dir: Option<&Path>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<LoadedDataset> {
    if files.is_empty() {
        return Err(DataError::Invalid(
            "no data files: set data.train to one or more ShareGPT JSON/JSONL files".into(),
        ));
    }
    let mut all = TokenDataset {
        offsets: vec![0],
        ..Default::default()
    };
    let mut statuses = Vec::new();
    let mut h = ContentHash::new();
    for f in files {
        let (ds, st, key) = load_or_build(f, tok, template, opts, cache_dir, progress)?;
        h.field(key.as_bytes());
        if files.len() == 1 {
            all = ds;
        } else {
            all.extend(&ds);
        }
        statuses.push(st);
    }
    Ok(LoadedDataset {
        dataset: all,
        statuses,
        key: h.hex(),
    })
}
