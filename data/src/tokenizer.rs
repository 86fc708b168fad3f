//! The target's tokenizer (HF `tokenizer.json`) plus the special ids forge needs.

use crate::error::{DataError, Result};
use std::path::{Path, PathBuf};

/// Byte range of each token in the encoded text.
pub type ByteOffsets = Vec<(usize, usize)>;

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl TextTokenizer {
    /// Loads `<dir>/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(DataError::Tokenizer {
                path,
                msg: "file not found (the target folder needs a HF tokenizer.json)".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| DataError::Tokenizer {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Ok(Self { inner, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Encodes text without adding special tokens (templates write them as text, and
    /// special tokens written as text are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        Ok(self.encode_with_offsets(text)?.0.into_iter().map(i64::from).collect())
    }

    /// Encodes text (no special tokens added) and returns the ids with each token's byte
    /// range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, ByteOffsets)> {
        let enc = self.inner.encode(text, false).map_err(|e| DataError::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, skip_special).map_err(|e| DataError::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        })
    }

    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(|i| i as i64)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
