//! EAGLE-3 draft vocabulary: the `draft_vocab_size` most frequent target tokens on trainable
//! positions, ascending by id; `d2t[i] = used[i] - i` (target id = i + d2t[i]) and
//! `t2d[t]` = whether target token t is in the draft vocabulary.

use crate::dataset::{tensor_bytes, with_tensors, write_tensors, CacheStatus, TokenDataset};
use crate::error::{DataError, Result};
use crate::hash::ContentHash;
use safetensors::tensor::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabMapping {
    pub d2t: Vec<i64>,
    pub t2d: Vec<bool>,
    /// Trainable tokens whose target id is in the draft vocabulary.
    pub covered_tokens: u64,
    pub trainable_tokens: u64,
}

impl VocabMapping {
    /// Builds the mapping from token frequencies on loss-masked positions. Ties are broken by
    /// the lower id; when fewer distinct tokens occur than `draft_vocab`, the lowest unused ids
    /// fill the rest.
    pub fn build(ds: &TokenDataset, target_vocab: usize, draft_vocab: usize) -> Result<Self> {
        if draft_vocab == 0 || draft_vocab > target_vocab {
            return Err(DataError::Invalid(format!(
                "draft_vocab_size must be in 1..={target_vocab} (the target vocabulary), got {draft_vocab}"
            )));
        }
        let mut counts = vec![0u64; target_vocab];
        let mut trainable = 0u64;
        for (&t, &m) in ds.tokens.iter().zip(&ds.loss_mask) {
            if m != 0 {
                let t = t as usize;
                if t >= target_vocab {
                    return Err(DataError::Invalid(format!(
                        "token id {t} is outside the target vocabulary ({target_vocab}): the data was tokenised with another tokenizer"
                    )));
                }
                counts[t] += 1;
                trainable += 1;
            }
        }
        let mut by_freq: Vec<usize> = (0..target_vocab).collect();
        by_freq.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
        let mut used: Vec<usize> = by_freq[..draft_vocab].to_vec();
        used.sort_unstable();
        let covered = used.iter().map(|&t| counts[t]).sum();
        Ok(Self::from_used(&used, target_vocab, covered, trainable))
    }

    fn from_used(used: &[usize], target_vocab: usize, covered: u64, trainable: u64) -> Self {
        let mut t2d = vec![false; target_vocab];
        let d2t = used
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                t2d[t] = true;
                t as i64 - i as i64
            })
            .collect();
        VocabMapping {
            d2t,
            t2d,
            covered_tokens: covered,
            trainable_tokens: trainable,
        }
    }

    pub fn draft_vocab(&self) -> usize {
        self.d2t.len()
    }

    /// Target id of draft id i.
    pub fn target_id(&self, i: usize) -> i64 {
        i as i64 + self.d2t[i]
    }

    /// Fraction of trainable tokens the draft vocabulary covers.
    pub fn coverage(&self) -> f64 {
        if self.trainable_tokens == 0 {
            return 0.0;
        }
        self.covered_tokens as f64 / self.trainable_tokens as f64
    }

    /// `d2t` consistent with `t2d` and ascending.
    pub fn check(&self) -> Result<()> {
        let mut prev = -1i64;
        for i in 0..self.d2t.len() {
            let t = self.target_id(i);
            if t <= prev || t < 0 || t as usize >= self.t2d.len() || !self.t2d[t as usize] {
                return Err(DataError::Invalid(format!(
                    "vocabulary mapping is inconsistent at draft id {i} (target id {t})"
                )));
            }
            prev = t;
        }
        if self.t2d.iter().filter(|&&b| b).count() != self.d2t.len() {
            return Err(DataError::Invalid(
                "vocabulary mapping: t2d marks a different number of tokens than d2t has".into(),
            ));
        }
        Ok(())
    }

    pub fn cache_path(cache_dir: &Path, data_key: &str, target_vocab: usize, draft_vocab: usize) -> PathBuf {
        let mut h = ContentHash::new();
        h.field(b"forge-vocab-v1")
            .field(data_key.as_bytes())
            .field(&(target_vocab as u64).to_le_bytes())
            .field(&(draft_vocab as u64).to_le_bytes());
        cache_dir.join(format!("vocab-{draft_vocab}-{}.safetensors", &h.hex()[..16]))
    }

    /// Writes `d2t` (int64) and `t2d` (bool) as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let d2t: Vec<u8> = self.d2t.iter().flat_map(|x| x.to_le_bytes()).collect();
        let t2d: Vec<u8> = self.t2d.iter().map(|&b| b as u8).collect();
        let mut meta = HashMap::new();
        meta.insert("format".into(), "forge-vocab-v1".into());
        meta.insert("covered_tokens".into(), self.covered_tokens.to_string());
        meta.insert("trainable_tokens".into(), self.trainable_tokens.to_string());
        write_tensors(
            path,
            &[
                ("d2t", Dtype::I64, vec![self.d2t.len()], &d2t),
                ("t2d", Dtype::BOOL, vec![self.t2d.len()], &t2d),
            ],
            meta,
        )
    }

    pub fn load(path: &Path) -> Result<Self> {
        with_tensors(path, |st, meta| {
            let (_, d2t) = tensor_bytes(path, st, "d2t", Dtype::I64)?;
            let (_, t2d) = tensor_bytes(path, st, "t2d", Dtype::BOOL)?;
            let num = |k: &str| -> u64 { meta.and_then(|m| m.get(k)).and_then(|v| v.parse().ok()).unwrap_or(0) };
            let m = VocabMapping {
                d2t: d2t
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
                t2d: t2d.iter().map(|&b| b != 0).collect(),
                covered_tokens: num("covered_tokens"),
                trainable_tokens: num("trainable_tokens"),
            };
            m.check()?;
            Ok(m)
        })
    }

    /// Loads the cached mapping for a dataset, or builds and caches it.
    pub fn load_or_build(
        ds: &TokenDataset,
        data_key: &str,
        cache_dir: Option<&Path>,
        target_vocab: usize,
        draft_vocab: usize,
    ) -> Result<(Self, CacheStatus)> {
        let Some(dir) = cache_dir else {
            return Ok((Self::build(ds, target_vocab, draft_vocab)?, CacheStatus::Off));
        };
        let path = Self::cache_path(dir, data_key, target_vocab, draft_vocab);
        if path.is_file() {
            if let Ok(m) = Self::load(&path) {
                if m.t2d.len() == target_vocab && m.d2t.len() == draft_vocab {
                    return Ok((m, CacheStatus::Hit(path)));
                }
            }
        }
        let m = Self::build(ds, target_vocab, draft_vocab)?;
        m.save(&path)?;
        Ok((m, CacheStatus::Built(path)))
    }
}
