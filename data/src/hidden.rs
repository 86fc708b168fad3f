//! Hidden-state datasets for offline training: safetensors shards of N samples plus a JSON
//! manifest. Samples are stored flat (no padding): within a shard, sample j covers token rows
//! `offsets[j]..offsets[j+1]` of every tensor.
//!
//! Shard tensors (only those the drafter needs):
//! - `input_ids` u32 `[T]`, `loss_mask` u8 `[T]`, `offsets` u64 `[n+1]` (always)
//! - `hidden_state` `[T, H]`: the target's last hidden state after the final norm (what
//!   its lm_head reads; target logits are recomputed from it with the lm_head alone)
//! - `aux_hidden_state` `[T, A*H]`: outputs of the captured layers, concatenated
//! - `topk_ids` i32 `[T, k]` and `topk_logprobs` bf16 `[T, k]`: optional target top-k
//!
//! The two states are stored as the folder's [`HiddenDtype`] says (manifest `settings.dtype`,
//! and each shard's header metadata `dtype`): bf16, or float8 e4m3fn with one f32 scale per
//! token in `hidden_state_scale` / `aux_hidden_state_scale` `[T, 1]` (see [`crate::fp8`]).
//! Reading gives bf16 bytes either way (fp8 dequantised), so training does not see the
//! difference. Shards without a `dtype` in their header (written before fp8 existed) are bf16.
//!
//! A shard file is written under a temporary name and renamed; the manifest is rewritten after
//! every shard, so an interrupted run keeps its finished shards and continues from them.
//!
//! One file over ~500 lines: the shard writer and reader share one on-disk layout.

use crate::dataset::{tensor_bytes, u32s, u64s, with_tensors, write_tensors};
use crate::error::{DataError, Result};
use crate::fp8;
use safetensors::tensor::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const HIDDEN_FORMAT: &str = "forge-hidden-v1";
pub const MANIFEST: &str = "manifest.json";

/// How `hidden_state` and `aux_hidden_state` are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HiddenDtype {
    /// bfloat16, 2 bytes per value.
    #[default]
    Bf16,
    /// float8 e4m3fn, 1 byte per value, plus one f32 scale per token and tensor.
    Fp8,
}

impl HiddenDtype {
    pub const NAMES: &'static [&'static str] = &["bf16", "fp8"];

    pub fn as_str(self) -> &'static str {
        match self {
            HiddenDtype::Bf16 => "bf16",
            HiddenDtype::Fp8 => "fp8",
        }
    }

    /// Bytes of one stored value.
    pub fn value_bytes(self) -> usize {
        match self {
            HiddenDtype::Bf16 => 2,
            HiddenDtype::Fp8 => 1,
        }
    }

    fn tensor_dtype(self) -> Dtype {
        match self {
            HiddenDtype::Bf16 => Dtype::BF16,
            HiddenDtype::Fp8 => Dtype::F8_E4M3,
        }
    }
}

impl std::fmt::Display for HiddenDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for HiddenDtype {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bf16" => Ok(HiddenDtype::Bf16),
            "fp8" => Ok(HiddenDtype::Fp8),
            other => Err(DataError::Invalid(format!(
                "hidden-state dtype '{other}' is not one of {}",
                Self::NAMES.join(", ")
            ))),
        }
    }
}

/// The scale tensor stored beside an fp8 state tensor.
fn scale_name(name: &str) -> String {
    format!("{name}_scale")
}

/// What a hidden-state dataset holds and where it came from. Two runs with equal settings
/// produce identical shards; resuming requires equal settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HiddenSettings {
    pub format: String,
    /// The target folder, as given.
    pub target: String,
    /// Content hash of the target's config.json and weights index/first file size.
    pub target_fingerprint: String,
    /// Key of the token dataset (data files + tokenizer + template + max_length).
    pub data_key: String,
    pub hidden_size: usize,
    /// Stores `hidden_state` (normed last hidden state).
    pub last_hidden: bool,
    /// Layers whose outputs are concatenated into `aux_hidden_state` (empty = none).
    pub aux_layers: Vec<usize>,
    /// Target top-k logits stored per token (0 = none).
    pub topk: usize,
    /// Storage of `hidden_state` and `aux_hidden_state` (top-k log-probabilities stay bf16).
    pub dtype: HiddenDtype,
    pub samples_per_shard: usize,
    pub num_samples: usize,
}

/// One finished shard.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub first_sample: usize,
    pub samples: usize,
    pub tokens: u64,
    pub bytes: u64,
    /// Token count of each sample (for length-aware batching without opening the shard).
    pub lengths: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HiddenManifest {
    pub settings: HiddenSettings,
    pub shards: Vec<ShardInfo>,
    pub complete: bool,
    pub tokens: u64,
    pub bytes: u64,
    pub bytes_per_token: f64,
}

impl HiddenManifest {
    pub fn new(settings: HiddenSettings) -> Self {
        HiddenManifest {
            settings,
            shards: Vec::new(),
            complete: false,
            tokens: 0,
            bytes: 0,
            bytes_per_token: 0.0,
        }
    }

    pub fn num_shards(&self) -> usize {
        self.settings
            .num_samples
            .div_ceil(self.settings.samples_per_shard.max(1))
    }

    pub fn shard_file(k: usize) -> String {
        format!("shard_{k:05}.safetensors")
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| DataError::Json { path, source })
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        let tmp = dir.join(format!("{MANIFEST}.tmp.{}", std::process::id()));
        let text = serde_json::to_string_pretty(self).map_err(|source| DataError::Json {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|source| DataError::Io { path, source })
    }

    fn record(&mut self, info: ShardInfo) {
        self.shards.retain(|s| s.file != info.file);
        self.shards.push(info);
        self.shards.sort_by_key(|s| s.first_sample);
        self.tokens = self.shards.iter().map(|s| s.tokens).sum();
        self.bytes = self.shards.iter().map(|s| s.bytes).sum();
        self.bytes_per_token = if self.tokens > 0 {
            self.bytes as f64 / self.tokens as f64
        } else {
            0.0
        };
        self.complete = self.shards.len() == self.num_shards();
    }
}

/// Opens (resuming) or creates a hidden-state dataset folder for writing.
pub struct HiddenWriter {
    dir: PathBuf,
    manifest: HiddenManifest,
}

/// The rows of one sample to store, as raw little-endian bytes in the dataset's
/// [`HiddenDtype`] (bf16 bytes, or e4m3fn codes with their per-token scales).
#[derive(Debug, Clone, Default)]
pub struct SampleRows {
    pub id: String,
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
    /// `[T, H]` bf16 bytes or e4m3fn codes (empty when not stored).
    pub hidden_state: Vec<u8>,
    /// `[T]` scales of `hidden_state` (fp8 only).
    pub hidden_scale: Vec<f32>,
    /// `[T, A*H]` bf16 bytes or e4m3fn codes.
    pub aux_hidden_state: Vec<u8>,
    /// `[T]` scales of `aux_hidden_state` (fp8 only).
    pub aux_scale: Vec<f32>,
    /// `[T, k]` i32 ids and bf16 log-probabilities.
    pub topk_ids: Vec<i32>,
    pub topk_logprobs: Vec<u8>,
}

impl HiddenWriter {
    /// Creates `dir`, or reopens it when its manifest has the same settings (finished shards
    /// are kept). Different settings are refused, naming what differs.
    pub fn open(dir: &Path, settings: HiddenSettings) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let manifest = if dir.join(MANIFEST).is_file() {
            let mut old = HiddenManifest::read(dir)?;
            if old.settings != settings {
                let a = serde_json::to_value(&old.settings).unwrap_or_default();
                let b = serde_json::to_value(&settings).unwrap_or_default();
                let diff: Vec<String> = b
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .filter(|(k, v)| a.get(k.as_str()) != Some(v))
                            .map(|(k, _)| k.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                return Err(DataError::Invalid(format!(
                    "{} holds hidden states made with other settings ({} differ): use another --out folder or remove this one",
                    dir.display(),
                    diff.join(", ")
                )));
            }
            // keep only shards whose file is really there; drop temporaries of a killed run
            old.shards.retain(|s| dir.join(&s.file).is_file());
            old.complete = old.shards.len() == old.num_shards();
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().contains(".tmp.") {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
            old
        } else {
            HiddenManifest::new(settings)
        };
        Ok(HiddenWriter {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    pub fn manifest(&self) -> &HiddenManifest {
        &self.manifest
    }

    /// Shard indices still to write.
    pub fn pending_shards(&self) -> Vec<usize> {
        (0..self.manifest.num_shards())
            .filter(|&k| {
                let f = HiddenManifest::shard_file(k);
                !self.manifest.shards.iter().any(|s| s.file == f)
            })
            .collect()
    }

    /// Sample index range of shard k.
    pub fn shard_range(&self, k: usize) -> std::ops::Range<usize> {
        let n = self.manifest.settings.samples_per_shard;
        k * n..((k + 1) * n).min(self.manifest.settings.num_samples)
    }

    /// Writes shard k from its samples and records it in the manifest.
    pub fn write_shard(&mut self, k: usize, samples: &[SampleRows]) -> Result<()> {
        let s = &self.manifest.settings;
        let range = self.shard_range(k);
        if samples.len() != range.len() {
            return Err(DataError::Invalid(format!(
                "shard {k} needs {} samples, got {}",
                range.len(),
                samples.len()
            )));
        }
        let h = s.hidden_size;
        let a = s.aux_layers.len() * h;
        let (vb, is_fp8) = (s.dtype.value_bytes(), s.dtype == HiddenDtype::Fp8);
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        let mut offsets = vec![0u64];
        let mut hidden = Vec::new();
        let mut hidden_scale = Vec::new();
        let mut aux = Vec::new();
        let mut aux_scale = Vec::new();
        let mut topk_ids = Vec::new();
        let mut topk_lp = Vec::new();
        let mut lengths = Vec::with_capacity(samples.len());
        for r in samples {
            let t = r.input_ids.len();
            let want = |name: &str, got: usize, per_row: usize| -> Result<()> {
                if got != t * per_row {
                    return Err(DataError::Invalid(format!(
                        "sample {}: {name} has {got} values, expected {t} x {per_row}",
                        r.id
                    )));
                }
                Ok(())
            };
            want("loss_mask", r.loss_mask.len(), 1)?;
            want(
                "hidden_state bytes",
                r.hidden_state.len(),
                if s.last_hidden { vb * h } else { 0 },
            )?;
            want("aux_hidden_state bytes", r.aux_hidden_state.len(), vb * a)?;
            want(
                "hidden_state scales",
                r.hidden_scale.len(),
                usize::from(is_fp8 && s.last_hidden),
            )?;
            want(
                "aux_hidden_state scales",
                r.aux_scale.len(),
                usize::from(is_fp8 && a > 0),
            )?;
            want("topk_ids", r.topk_ids.len(), s.topk)?;
            want("topk_logprobs bytes", r.topk_logprobs.len(), 2 * s.topk)?;
            ids.extend_from_slice(&r.input_ids);
            mask.extend_from_slice(&r.loss_mask);
            offsets.push(ids.len() as u64);
            hidden.extend_from_slice(&r.hidden_state);
            hidden_scale.extend(r.hidden_scale.iter().flat_map(|x| x.to_le_bytes()));
            aux.extend_from_slice(&r.aux_hidden_state);
            aux_scale.extend(r.aux_scale.iter().flat_map(|x| x.to_le_bytes()));
            topk_ids.extend_from_slice(&r.topk_ids);
            topk_lp.extend_from_slice(&r.topk_logprobs);
            lengths.push(t);
        }
        let tcount = ids.len();
        let ids_b: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        let off_b: Vec<u8> = offsets.iter().flat_map(|x| x.to_le_bytes()).collect();
        let tk_b: Vec<u8> = topk_ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut tensors: Vec<(&str, Dtype, Vec<usize>, &[u8])> = vec![
            ("input_ids", Dtype::U32, vec![tcount], &ids_b),
            ("loss_mask", Dtype::U8, vec![tcount], &mask),
            ("offsets", Dtype::U64, vec![offsets.len()], &off_b),
        ];
        let state = s.dtype.tensor_dtype();
        if s.last_hidden {
            tensors.push(("hidden_state", state, vec![tcount, h], &hidden));
            if is_fp8 {
                tensors.push(("hidden_state_scale", Dtype::F32, vec![tcount, 1], &hidden_scale));
            }
        }
        if a > 0 {
            tensors.push(("aux_hidden_state", state, vec![tcount, a], &aux));
            if is_fp8 {
                tensors.push(("aux_hidden_state_scale", Dtype::F32, vec![tcount, 1], &aux_scale));
            }
        }
        if s.topk > 0 {
            tensors.push(("topk_ids", Dtype::I32, vec![tcount, s.topk], &tk_b));
            tensors.push(("topk_logprobs", Dtype::BF16, vec![tcount, s.topk], &topk_lp));
        }
        let mut meta = HashMap::new();
        meta.insert("format".into(), HIDDEN_FORMAT.into());
        meta.insert("first_sample".into(), range.start.to_string());
        meta.insert("dtype".into(), s.dtype.as_str().into());
        if is_fp8 {
            meta.insert(
                "scale".into(),
                "per token: <tensor>_scale f32 [T, 1] = max(amax(|row|) / 448, 1e-12); value = e4m3fn * scale".into(),
            );
        }
        let sample_ids: Vec<&str> = samples.iter().map(|r| r.id.as_str()).collect();
        meta.insert("ids".into(), serde_json::to_string(&sample_ids).unwrap_or_default());
        let file = HiddenManifest::shard_file(k);
        let path = self.dir.join(&file);
        write_tensors(&path, &tensors, meta)?;
        let bytes = std::fs::metadata(&path)
            .map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        self.manifest.record(ShardInfo {
            file,
            first_sample: range.start,
            samples: samples.len(),
            tokens: tcount as u64,
            bytes,
            lengths,
        });
        self.manifest.write(&self.dir)
    }
}

/// One loaded shard.
#[derive(Debug, Clone)]
pub struct HiddenShard {
    pub ids: Vec<String>,
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
    pub offsets: Vec<u64>,
    pub hidden_state: Vec<u8>,
    pub aux_hidden_state: Vec<u8>,
    pub topk_ids: Vec<i32>,
    pub topk_logprobs: Vec<u8>,
}

/// Borrowed rows of one sample.
#[derive(Debug, Clone, Copy)]
pub struct SampleView<'a> {
    pub id: &'a str,
    pub input_ids: &'a [u32],
    pub loss_mask: &'a [u8],
    /// bf16 bytes `[T, H]` (empty if not stored; fp8 shards dequantised).
    pub hidden_state: &'a [u8],
    /// bf16 bytes `[T, A*H]` (empty if not stored; fp8 shards dequantised).
    pub aux_hidden_state: &'a [u8],
    pub topk_ids: &'a [i32],
    pub topk_logprobs: &'a [u8],
}

impl HiddenShard {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn sample(&self, j: usize, s: &HiddenSettings) -> SampleView<'_> {
        let (a, b) = (self.offsets[j] as usize, self.offsets[j + 1] as usize);
        let h = if s.last_hidden { s.hidden_size * 2 } else { 0 };
        let x = s.aux_layers.len() * s.hidden_size * 2;
        SampleView {
            id: &self.ids[j],
            input_ids: &self.input_ids[a..b],
            loss_mask: &self.loss_mask[a..b],
            hidden_state: &self.hidden_state[a * h..b * h],
            aux_hidden_state: &self.aux_hidden_state[a * x..b * x],
            topk_ids: &self.topk_ids[a * s.topk..b * s.topk],
            topk_logprobs: &self.topk_logprobs[a * s.topk * 2..b * s.topk * 2],
        }
    }
}

/// Reads a finished hidden-state dataset shard by shard (the target is not needed).
pub struct HiddenDataset {
    pub dir: PathBuf,
    pub manifest: HiddenManifest,
    loaded: Option<(usize, HiddenShard)>,
}

impl HiddenDataset {
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = HiddenManifest::read(dir)?;
        if manifest.settings.format != HIDDEN_FORMAT {
            return Err(DataError::Invalid(format!(
                "{}: format '{}' is not {HIDDEN_FORMAT}: re-run forge prepare-hidden",
                dir.join(MANIFEST).display(),
                manifest.settings.format
            )));
        }
        if !manifest.complete {
            return Err(DataError::Invalid(format!(
                "{}: incomplete ({} of {} shards): run forge prepare-hidden again with the same recipe and --out to finish it",
                dir.display(),
                manifest.shards.len(),
                manifest.num_shards()
            )));
        }
        Ok(HiddenDataset {
            dir: dir.to_path_buf(),
            manifest,
            loaded: None,
        })
    }

    pub fn settings(&self) -> &HiddenSettings {
        &self.manifest.settings
    }

    pub fn len(&self) -> usize {
        self.manifest.settings.num_samples
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token count of every sample, in order.
    pub fn lengths(&self) -> Vec<usize> {
        self.manifest
            .shards
            .iter()
            .flat_map(|s| s.lengths.iter().copied())
            .collect()
    }

    /// Sample index ranges of the shards, in order.
    pub fn shard_ranges(&self) -> Vec<std::ops::Range<usize>> {
        self.manifest
            .shards
            .iter()
            .map(|s| s.first_sample..s.first_sample + s.samples)
            .collect()
    }

    /// Reads shard k from disk.
    pub fn read_shard(&self, k: usize) -> Result<HiddenShard> {
        let info = self
            .manifest
            .shards
            .get(k)
            .ok_or_else(|| DataError::Invalid(format!("{}: no shard {k}", self.dir.display())))?;
        let path = self.dir.join(&info.file);
        let s = &self.manifest.settings;
        with_tensors(&path, |st, meta| {
            let ids: Vec<String> = meta
                .and_then(|m| m.get("ids"))
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default();
            // the shard's own header says how its states are stored (none: bf16, from before
            // fp8); one folder holds one dtype
            let dtype = match meta.and_then(|m| m.get("dtype")) {
                None => HiddenDtype::Bf16,
                Some(d) => d.parse().map_err(|e: DataError| DataError::Safetensors {
                    path: path.clone(),
                    msg: format!("header metadata 'dtype': {e}"),
                })?,
            };
            if dtype != s.dtype {
                return Err(DataError::Safetensors {
                    path: path.clone(),
                    msg: format!(
                        "holds {dtype} hidden states but {} says {}: a folder holds one dtype, prepare it again into an empty --out folder",
                        self.dir.join(MANIFEST).display(),
                        s.dtype
                    ),
                });
            }
            // bf16 bytes of a state tensor: as stored, or dequantised from fp8
            let states = |name: &str, width: usize, on: bool| -> Result<Vec<u8>> {
                if !on {
                    return Ok(Vec::new());
                }
                let (_, data) = tensor_bytes(&path, st, name, dtype.tensor_dtype())?;
                if dtype == HiddenDtype::Bf16 {
                    return Ok(data.to_vec());
                }
                let (_, sc) = tensor_bytes(&path, st, &scale_name(name), Dtype::F32)?;
                let scales: Vec<f32> = sc
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let values = fp8::dequantize_rows(data, &scales, width).map_err(|e| DataError::Safetensors {
                    path: path.clone(),
                    msg: format!("tensor '{name}': {e}"),
                })?;
                Ok(f32_to_bf16_bytes(&values))
            };
            let (_, input_ids) = tensor_bytes(&path, st, "input_ids", Dtype::U32)?;
            let (_, loss_mask) = tensor_bytes(&path, st, "loss_mask", Dtype::U8)?;
            let (_, offsets) = tensor_bytes(&path, st, "offsets", Dtype::U64)?;
            let opt_bytes = |name: &str, dtype: Dtype, on: bool| -> Result<Vec<u8>> {
                if on {
                    Ok(tensor_bytes(&path, st, name, dtype)?.1.to_vec())
                } else {
                    Ok(Vec::new())
                }
            };
            let shard = HiddenShard {
                ids,
                input_ids: u32s(input_ids),
                loss_mask: loss_mask.to_vec(),
                offsets: u64s(offsets),
                hidden_state: states("hidden_state", s.hidden_size, s.last_hidden)?,
                aux_hidden_state: states(
                    "aux_hidden_state",
                    s.aux_layers.len() * s.hidden_size,
                    !s.aux_layers.is_empty(),
                )?,
                topk_ids: opt_bytes("topk_ids", Dtype::I32, s.topk > 0)?
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                topk_logprobs: opt_bytes("topk_logprobs", Dtype::BF16, s.topk > 0)?,
            };
            if shard.ids.len() != info.samples || shard.offsets.len() != info.samples + 1 {
                return Err(DataError::Safetensors {
                    path: path.clone(),
                    msg: format!(
                        "holds {} samples, the manifest says {}: the folder is corrupt, re-run forge prepare-hidden",
                        shard.ids.len(),
                        info.samples
                    ),
                });
            }
            Ok(shard)
        })
    }

    /// Sample i (global index), loading its shard if it is not the one in memory. Plans that
    /// visit samples shard by shard (see `batch::global_plan_grouped`) read each shard once.
    pub fn sample(&mut self, i: usize) -> Result<SampleView<'_>> {
        let k = self
            .manifest
            .shards
            .iter()
            .position(|s| i >= s.first_sample && i < s.first_sample + s.samples)
            .ok_or_else(|| DataError::Invalid(format!("sample {i} is out of range ({})", self.len())))?;
        if self.loaded.as_ref().map(|(j, _)| *j) != Some(k) {
            let shard = self.read_shard(k)?;
            self.loaded = Some((k, shard));
        }
        let first = self.manifest.shards[k].first_sample;
        let (_, shard) = self
            .loaded
            .as_ref()
            .ok_or_else(|| DataError::Invalid("no shard".into()))?;
        Ok(shard.sample(i - first, &self.manifest.settings))
    }
}

/// Converts f32 values to bf16 bytes with round-to-nearest-even (what torch does).
pub fn f32_to_bf16_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 2);
    for &x in v {
        let bits = x.to_bits();
        let b = if x.is_nan() {
            ((bits >> 16) | 0x40) as u16
        } else {
            let round = 0x7fff + ((bits >> 16) & 1);
            (bits.wrapping_add(round) >> 16) as u16
        };
        out.extend_from_slice(&b.to_le_bytes());
    }
    out
}

/// bf16 bytes back to f32.
pub fn bf16_bytes_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
        .collect()
}
