//! A small, stable, non-cryptographic 128-bit content hash for cache keys (two FNV-1a style
//! lanes over 8-byte words with a final avalanche). Stable across Rust versions and platforms,
//! unlike `std::hash`.

#[derive(Debug, Clone)]
pub struct ContentHash {
    a: u64,
    b: u64,
    len: u64,
    tail: [u8; 8],
    tail_len: usize,
}

const PRIME: u64 = 0x0000_0100_0000_01b3;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Default for ContentHash {
    fn default() -> Self {
        Self::new()
    }
}

impl ContentHash {
    pub fn new() -> Self {
        Self {
            a: 0xcbf2_9ce4_8422_2325,
            b: 0x6c62_272e_07bb_0142,
            len: 0,
            tail: [0; 8],
            tail_len: 0,
        }
    }

    fn word(&mut self, w: u64) {
        self.a = (self.a ^ w).wrapping_mul(PRIME);
        self.b = (self.b ^ w.rotate_left(29)).wrapping_mul(PRIME).rotate_left(17);
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.tail_len > 0 {
            let take = (8 - self.tail_len).min(data.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&data[..take]);
            self.tail_len += take;
            data = &data[take..];
            if self.tail_len < 8 {
                return;
            }
            let w = u64::from_le_bytes(self.tail);
            self.word(w);
            self.tail_len = 0;
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            self.word(u64::from_le_bytes(b));
        }
        let rest = chunks.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    /// Adds a length-prefixed field (so `("ab","c")` and `("a","bc")` differ).
    pub fn field(&mut self, data: &[u8]) -> &mut Self {
        self.update(&(data.len() as u64).to_le_bytes());
        self.update(data);
        self
    }

    pub fn finish(&self) -> u128 {
        let mut s = self.clone();
        if s.tail_len > 0 {
            let mut b = [0u8; 8];
            b[..s.tail_len].copy_from_slice(&s.tail[..s.tail_len]);
            s.word(u64::from_le_bytes(b) ^ ((s.tail_len as u64) << 56));
        }
        let hi = mix(s.a ^ s.len);
        let lo = mix(s.b ^ hi ^ s.len.rotate_left(32));
        ((hi as u128) << 64) | lo as u128
    }

    pub fn hex(&self) -> String {
        format!("{:032x}", self.finish())
    }
}

/// Hash of a byte slice.
pub fn hash_bytes(data: &[u8]) -> u128 {
    let mut h = ContentHash::new();
    h.update(data);
    h.finish()
}

/// A cheap fingerprint of a target folder: config.json, the weight files' names and sizes,
/// and the first and last MiB of each (their headers and some weights: two fine-tunes of one
/// base differ there).
pub fn target_fingerprint(dir: &std::path::Path) -> crate::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut h = ContentHash::new();
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| crate::DataError::Io { path, source }
    };
    let cfg = dir.join("config.json");
    let bytes = std::fs::read(&cfg).map_err(io(&cfg))?;
    h.field(&bytes);
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            // the file's size, through symlinks (Hugging Face hub snapshots link their blobs)
            let len = std::fs::metadata(e.path()).ok()?.len();
            name.ends_with(".safetensors").then_some((name, len))
        })
        .collect();
    files.sort();
    const SAMPLE: u64 = 1 << 20;
    for (name, len) in files {
        h.field(name.as_bytes()).field(&len.to_le_bytes());
        let path = dir.join(&name);
        let mut f = std::fs::File::open(&path).map_err(io(&path))?;
        let mut buf = vec![0u8; SAMPLE.min(len) as usize];
        f.read_exact(&mut buf).map_err(io(&path))?;
        h.field(&buf);
        if len > SAMPLE {
            let tail = SAMPLE.min(len - SAMPLE);
            f.seek(SeekFrom::Start(len - tail)).map_err(io(&path))?;
            let mut buf = vec![0u8; tail as usize];
            f.read_exact(&mut buf).map_err(io(&path))?;
            h.field(&buf);
        }
    }
    Ok(h.hex())
}

/// The hash of a data file's bytes stored in manifests built from it (the knowledge cache's
/// `data_hash`, what a recipe's `knowledge_data` is checked against).
pub fn data_hash(bytes: &[u8]) -> String {
    format!("{:032x}", hash_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_hash() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = hash_bytes(&data);
        for split in [1, 3, 7, 8, 9, 500, 999] {
            let mut h = ContentHash::new();
            h.update(&data[..split]);
            h.update(&data[split..]);
            assert_eq!(h.finish(), whole, "split at {split}");
        }
    }

    #[test]
    fn different_inputs_differ() {
        assert_ne!(hash_bytes(b"abc"), hash_bytes(b"abd"));
        assert_ne!(hash_bytes(b""), hash_bytes(b"\0"));
        assert_ne!(hash_bytes(b"\0"), hash_bytes(b"\0\0"));
        let mut x = ContentHash::new();
        x.field(b"ab").field(b"c");
        let mut y = ContentHash::new();
        y.field(b"a").field(b"bc");
        assert_ne!(x.finish(), y.finish());
    }
}
