//! TensorBoard event files: TFRecord framing and the few protobuf fields TensorBoard reads
//! (`Event.wall_time/step/file_version/summary/session_log`, `Summary.Value.tag/
//! simple_value`).
//!
//! Our own writer rather than a crate: it is small (this file), tested against an
//! independent reader (CRC-32C, TFRecord and protobuf decoding in `metrics/tests.rs`), and
//! avoids a dependency with protobuf code generation. The design doc named tensorboard-rs,
//! whose writer also panics on I/O errors (in a background thread and in `Drop`), flushes
//! asynchronously, truncates an earlier file opened in the same second by the same process,
//! and pulls in `image` 0.23.

use super::{io, unix_seconds};
use crate::error::Result;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) lookup table.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

pub(super) fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC.
fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: u64 length, masked CRC of the length bytes, data, masked CRC of the data
/// (all little-endian).
fn tfrecord(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Minimal protobuf encoding.
mod pb {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
        varint(out, (u64::from(field) << 3) | u64::from(wire));
    }
    pub fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
        key(out, field, 0);
        varint(out, v);
    }
    pub fn double(out: &mut Vec<u8>, field: u32, v: f64) {
        key(out, field, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }
    pub fn float(out: &mut Vec<u8>, field: u32, v: f32) {
        key(out, field, 5);
        out.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
        key(out, field, 2);
        varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }
}

// tensorflow/core/util/event.proto and summary.proto field numbers.
const EVENT_WALL_TIME: u32 = 1;
const EVENT_STEP: u32 = 2;
const EVENT_FILE_VERSION: u32 = 3;
const EVENT_SUMMARY: u32 = 5;
const EVENT_SESSION_LOG: u32 = 7;
const SUMMARY_VALUE: u32 = 1;
const VALUE_TAG: u32 = 1;
const VALUE_SIMPLE_VALUE: u32 = 2;
const SESSION_LOG_STATUS: u32 = 1;
const SESSION_LOG_START: u64 = 1;

fn event_header(time: f64, step: u64) -> Vec<u8> {
    let mut e = Vec::new();
    pb::double(&mut e, EVENT_WALL_TIME, time);
    if step > 0 {
        pb::uint(&mut e, EVENT_STEP, step);
    }
    e
}

fn file_version_event(time: f64) -> Vec<u8> {
    let mut e = event_header(time, 0);
    pb::bytes(&mut e, EVENT_FILE_VERSION, b"brain.Event:2");
    e
}

fn session_start_event(time: f64, step: u64) -> Vec<u8> {
    let mut log = Vec::new();
    pb::uint(&mut log, SESSION_LOG_STATUS, SESSION_LOG_START);
    let mut e = event_header(time, step);
    pb::bytes(&mut e, EVENT_SESSION_LOG, &log);
    e
}

pub(super) fn scalar_event(time: f64, step: u64, scalars: &[(&str, f64)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, value) in scalars {
        let mut v = Vec::new();
        pb::bytes(&mut v, VALUE_TAG, tag.as_bytes());
        pb::float(&mut v, VALUE_SIMPLE_VALUE, *value as f32);
        pb::bytes(&mut summary, SUMMARY_VALUE, &v);
    }
    let mut e = event_header(time, step);
    pb::bytes(&mut e, EVENT_SUMMARY, &summary);
    e
}

/// Distinguishes event files one process opens within the same second.
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

/// One event file of a run.
pub(super) struct EventWriter {
    pub(super) path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// A new `events.out.tfevents.<secs>.<host>.<pid>.<n>` file in `dir` (never truncating an
    /// existing one), opened with the file-version event and a session start at `first_step`.
    pub(super) fn create(dir: &Path, first_step: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let time = unix_seconds();
        let host = hostname();
        let (path, file) = loop {
            let n = FILE_COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!(
                "events.out.tfevents.{:010}.{host}.{}.{n}",
                time as u64,
                std::process::id()
            );
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(&path)(e)),
            }
        };
        let mut w = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        w.write_event(&file_version_event(time))?;
        w.write_event(&session_start_event(time, first_step))?;
        w.flush()?;
        Ok(w)
    }

    pub(super) fn write_event(&mut self, event: &[u8]) -> Result<()> {
        self.out.write_all(&tfrecord(event)).map_err(io(&self.path))
    }

    pub(super) fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(io(&self.path))
    }
}
