//! metrics.jsonl: one JSON object per row, and the rewrite that keeps a resumed run's rows.

use super::io;
use crate::error::Result;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::Path;

/// One metrics.jsonl line (with its newline).
pub(super) fn jsonl_row(step: u64, time: f64, scalars: &[(&str, f64)]) -> String {
    let num = |v: f64| {
        if v.is_finite() {
            serde_json::to_string(&v).unwrap_or_else(|_| "null".into())
        } else {
            "null".into()
        }
    };
    let mut s = format!("{{\"step\":{step},\"time\":{}", num(time));
    for (name, value) in scalars {
        let key = serde_json::to_string(name).unwrap_or_else(|_| "\"?\"".into());
        s.push(',');
        s.push_str(&key);
        s.push(':');
        s.push_str(&num(*value));
    }
    s.push_str("}\n");
    s
}

/// Keeps the rows of `path` with step <= `keep_through` (temp file + rename).
pub(super) fn truncate_jsonl(path: &Path, keep_through: u64) -> Result<()> {
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(path)(e)),
    };
    let mut kept = Vec::with_capacity(text.len());
    for line in text.split(|&b| b == b'\n') {
        let step = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        if step.is_some_and(|s| s <= keep_through) {
            kept.extend_from_slice(line);
            kept.push(b'\n');
        }
    }
    if kept == text {
        return Ok(());
    }
    let tmp = path.with_extension("jsonl.tmp");
    let write = |tmp: &Path| -> std::io::Result<()> {
        let mut f = File::create(tmp)?;
        f.write_all(&kept)?;
        f.sync_all()
    };
    write(&tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}
