//! Training metrics: TensorBoard event files under `<dir>/tb/` and the same rows in
//! `<dir>/metrics.jsonl` (`{"step": N, "time": unix_seconds, "<name>": value, ...}`).
//!
//! The event file is written here (TFRecord framing + the few protobuf fields TensorBoard
//! reads: `Event.wall_time/step/file_version/summary/session_log`, `Summary.Value.tag/
//! simple_value`) rather than with tensorboard-rs, whose writer panics on I/O errors (in a
//! background thread and in `Drop`), flushes asynchronously, truncates an earlier file
//! opened in the same second by the same process, and pulls in `image` 0.23.
//!
//! Every opened event file starts with a `SessionLog START` event at the first step the run
//! will log; TensorBoard then drops the events of earlier files with steps >= that step,
//! which is what a resumed (or restarted) run needs. metrics.jsonl gets the same treatment
//! by rewriting it.

use crate::error::{Result, TrainerError};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub const JSONL_FILE: &str = "metrics.jsonl";
pub const TB_DIR: &str = "tb";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainerError + '_ {
    move |source| TrainerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Writes scalars to TensorBoard and/or metrics.jsonl (rank 0 only, by the caller).
pub struct MetricsLogger {
    tb: Option<EventWriter>,
    jsonl: Option<(PathBuf, BufWriter<File>)>,
    /// First error of a `flush` (which returns nothing); reported by the next `log`.
    deferred: Option<TrainerError>,
}

impl MetricsLogger {
    /// Opens the logs of a new run: metrics.jsonl starts empty, and TensorBoard hides the
    /// events of earlier runs in the same folder (session start at step 0).
    pub fn new(dir: &Path, tensorboard: bool, jsonl: bool) -> Result<Self> {
        Self::open(dir, tensorboard, jsonl, None)
    }

    /// Opens the logs of a run that continues after optimizer step `resume_step`:
    /// metrics.jsonl keeps only the rows with step <= resume_step (rewritten atomically:
    /// temp file + rename; torn or unreadable lines are dropped too), and TensorBoard hides
    /// earlier events with step > resume_step.
    pub fn open_resume(dir: &Path, tensorboard: bool, jsonl: bool, resume_step: u64) -> Result<Self> {
        Self::open(dir, tensorboard, jsonl, Some(resume_step))
    }

    fn open(dir: &Path, tensorboard: bool, jsonl: bool, resume_step: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let jsonl = if jsonl {
            let path = dir.join(JSONL_FILE);
            let file = match resume_step {
                None => File::create(&path).map_err(io(&path))?,
                Some(step) => {
                    truncate_jsonl(&path, step)?;
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .map_err(io(&path))?
                }
            };
            Some((path, BufWriter::new(file)))
        } else {
            None
        };
        let tb = if tensorboard {
            let first_step = resume_step.map_or(0, |s| s + 1);
            Some(EventWriter::create(&dir.join(TB_DIR), first_step)?)
        } else {
            None
        };
        Ok(MetricsLogger {
            tb,
            jsonl,
            deferred: None,
        })
    }

    /// Path of metrics.jsonl when JSONL logging is on.
    pub fn jsonl_path(&self) -> Option<&Path> {
        self.jsonl.as_ref().map(|(p, _)| p.as_path())
    }

    /// Path of this run's event file when TensorBoard logging is on.
    pub fn event_file(&self) -> Option<&Path> {
        self.tb.as_ref().map(|w| w.path.as_path())
    }

    /// Logs one row of scalars at optimizer step `step` (written through to the files).
    /// JSON has no NaN/inf: such values are written as `null` there (TensorBoard keeps them).
    pub fn log(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let time = unix_seconds();
        if let Some((path, w)) = self.jsonl.as_mut() {
            let line = jsonl_row(step, time, scalars);
            w.write_all(line.as_bytes()).and_then(|_| w.flush()).map_err(io(path))?;
        }
        if let Some(tb) = self.tb.as_mut() {
            tb.write_event(&scalar_event(time, step, scalars))?;
            tb.flush()?;
        }
        Ok(())
    }

    /// Flushes both files; an error is returned by the next `log` (see `try_flush`).
    pub fn flush(&mut self) {
        if let Err(e) = self.try_flush() {
            self.deferred.get_or_insert(e);
        }
    }

    /// Flushes both files, reporting an error now.
    pub fn try_flush(&mut self) -> Result<()> {
        if let Some((path, w)) = self.jsonl.as_mut() {
            w.flush().map_err(io(path))?;
        }
        if let Some(tb) = self.tb.as_mut() {
            tb.flush()?;
        }
        Ok(())
    }
}

impl Drop for MetricsLogger {
    fn drop(&mut self) {
        let _ = self.try_flush();
    }
}

/// One metrics.jsonl line (with its newline).
fn jsonl_row(step: u64, time: f64, scalars: &[(&str, f64)]) -> String {
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
fn truncate_jsonl(path: &Path, keep_through: u64) -> Result<()> {
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

// ---------------------------------------------------------------------------------------
// TensorBoard event files: TFRecord framing and the protobuf fields TensorBoard reads.

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

fn crc32c(data: &[u8]) -> u32 {
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

fn scalar_event(time: f64, step: u64, scalars: &[(&str, f64)]) -> Vec<u8> {
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

struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// A new `events.out.tfevents.<secs>.<host>.<pid>.<n>` file in `dir` (never truncating an
    /// existing one), opened with the file-version event and a session start at `first_step`.
    fn create(dir: &Path, first_step: u64) -> Result<Self> {
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

    fn write_event(&mut self, event: &[u8]) -> Result<()> {
        self.out.write_all(&tfrecord(event)).map_err(io(&self.path))
    }

    fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(io(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("forge-metrics-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    // --- an independent reader: bitwise CRC-32C, TFRecord, protobuf -------------------

    /// CRC-32C bit by bit (no table), to check the writer's table-driven one.
    fn crc32c_bitwise(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                let lsb = crc & 1;
                crc >>= 1;
                if lsb == 1 {
                    crc ^= 0x82F6_3B78;
                }
            }
        }
        crc ^ 0xFFFF_FFFF
    }

    // Spelled out as in TensorFlow's crc32c.h, independently of the writer's rotate_right.
    #[allow(clippy::manual_rotate)]
    fn masked(data: &[u8]) -> u32 {
        let c = crc32c_bitwise(data);
        ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
    }

    #[test]
    fn crc32c_known_vectors() {
        // RFC 3720 / iSCSI check value
        assert_eq!(crc32c_bitwise(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c_bitwise(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    /// Splits a TFRecord stream, checking lengths and both masked CRCs.
    fn read_records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        while i < bytes.len() {
            assert!(i + 12 <= bytes.len(), "truncated header at {i}");
            let len_bytes = &bytes[i..i + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
            assert_eq!(u32_at(i + 8), masked(len_bytes), "length CRC of record at {i}");
            let data = &bytes[i + 12..i + 12 + len];
            assert_eq!(u32_at(i + 12 + len), masked(data), "data CRC of record at {i}");
            out.push(data.to_vec());
            i += 12 + len + 4;
        }
        assert_eq!(i, bytes.len());
        out
    }

    #[derive(Debug, Clone)]
    enum Field {
        Varint(u64),
        Fixed64([u8; 8]),
        Bytes(Vec<u8>),
        Fixed32([u8; 4]),
    }

    fn read_varint(b: &[u8], i: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let byte = b[*i];
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }

    fn decode(b: &[u8]) -> Vec<(u64, Field)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let key = read_varint(b, &mut i);
            let (field, wire) = (key >> 3, key & 7);
            let f = match wire {
                0 => Field::Varint(read_varint(b, &mut i)),
                1 => {
                    i += 8;
                    Field::Fixed64(b[i - 8..i].try_into().expect("8"))
                }
                2 => {
                    let n = read_varint(b, &mut i) as usize;
                    i += n;
                    Field::Bytes(b[i - n..i].to_vec())
                }
                5 => {
                    i += 4;
                    Field::Fixed32(b[i - 4..i].try_into().expect("4"))
                }
                w => panic!("unexpected wire type {w}"),
            };
            out.push((field, f));
        }
        out
    }

    /// What a test needs of an Event.
    #[derive(Debug, Default)]
    struct Ev {
        wall_time: f64,
        step: u64,
        file_version: Option<String>,
        session_status: Option<u64>,
        scalars: Vec<(String, f32)>,
    }

    fn parse_event(b: &[u8]) -> Ev {
        let mut ev = Ev::default();
        for (field, f) in decode(b) {
            match (field, f) {
                (1, Field::Fixed64(x)) => ev.wall_time = f64::from_le_bytes(x),
                (2, Field::Varint(s)) => ev.step = s,
                (3, Field::Bytes(s)) => ev.file_version = Some(String::from_utf8(s).expect("utf8")),
                (5, Field::Bytes(summary)) => {
                    for (vf, value) in decode(&summary) {
                        let Field::Bytes(value) = value else {
                            panic!("Summary.value")
                        };
                        assert_eq!(vf, 1);
                        let (mut tag, mut simple) = (None, None);
                        for (k, x) in decode(&value) {
                            match (k, x) {
                                (1, Field::Bytes(t)) => tag = Some(String::from_utf8(t).expect("utf8")),
                                (2, Field::Fixed32(x)) => simple = Some(f32::from_le_bytes(x)),
                                other => panic!("unexpected Summary.Value field {other:?}"),
                            }
                        }
                        ev.scalars.push((tag.expect("tag"), simple.expect("simple_value")));
                    }
                }
                (7, Field::Bytes(log)) => {
                    for (k, x) in decode(&log) {
                        if let (1, Field::Varint(s)) = (k, x) {
                            ev.session_status = Some(s);
                        }
                    }
                }
                other => panic!("unexpected Event field {other:?}"),
            }
        }
        ev
    }

    fn event_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join(TB_DIR))
            .expect("tb dir")
            .map(|e| e.expect("entry").path())
            .collect();
        v.sort();
        v
    }

    fn read_events(path: &Path) -> Vec<Ev> {
        let bytes = std::fs::read(path).expect("event file");
        read_records(&bytes).iter().map(|r| parse_event(r)).collect()
    }

    fn read_jsonl(dir: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join(JSONL_FILE))
            .expect("metrics.jsonl")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json row"))
            .collect()
    }

    // --- tests -------------------------------------------------------------------------

    #[test]
    fn jsonl_rows_read_back() {
        let dir = tmpdir("jsonl");
        let mut log = MetricsLogger::new(&dir, false, true).expect("open");
        assert!(log.event_file().is_none());
        log.log(1, &[("train/loss", 2.5), ("train/lr", 1.0e-4)]).expect("log");
        log.log(2, &[("train/loss", 0.1 + 0.2), ("weird \"name\"", f64::NAN)])
            .expect("log");
        log.flush();
        let rows = read_jsonl(&dir);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["step"], 1);
        assert_eq!(rows[0]["train/loss"].as_f64(), Some(2.5));
        assert_eq!(rows[0]["train/lr"].as_f64(), Some(1.0e-4));
        let t = rows[0]["time"].as_f64().expect("time");
        assert!((t - unix_seconds()).abs() < 600.0, "{t}");
        assert_eq!(rows[1]["step"], 2);
        assert_eq!(rows[1]["train/loss"].as_f64(), Some(0.1 + 0.2)); // exact f64 round trip
        assert!(rows[1]["weird \"name\""].is_null());
        // a new run starts the file over
        drop(log);
        let mut log = MetricsLogger::new(&dir, false, true).expect("reopen");
        log.log(1, &[("a", 1.0)]).expect("log");
        drop(log);
        assert_eq!(read_jsonl(&dir).len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tensorboard_file_is_a_valid_tfrecord_stream_with_tagged_scalars() {
        let dir = tmpdir("tb");
        let mut log = MetricsLogger::new(&dir, true, false).expect("open");
        assert!(log.jsonl_path().is_none());
        log.log(0, &[("eval/loss", 3.0)]).expect("log");
        log.log(10, &[("train/loss", 1.25), ("train/lr", 3.0e-4)]).expect("log");
        log.log(300, &[("train/loss", 0.5)]).expect("log");
        log.flush();
        let files = event_files(&dir);
        assert_eq!(files.len(), 1);
        assert_eq!(log.event_file(), Some(files[0].as_path()));
        let name = files[0].file_name().and_then(|n| n.to_str()).expect("name");
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let ev = read_events(&files[0]);
        assert_eq!(ev.len(), 5);
        assert_eq!(ev[0].file_version.as_deref(), Some("brain.Event:2"));
        assert!(ev[0].wall_time > 1.6e9);
        assert_eq!((ev[1].session_status, ev[1].step), (Some(1), 0)); // START at step 0
        assert_eq!(ev[2].step, 0);
        assert_eq!(ev[2].scalars, [("eval/loss".to_string(), 3.0f32)]);
        assert_eq!(ev[3].step, 10);
        assert_eq!(
            ev[3].scalars,
            [("train/loss".to_string(), 1.25f32), ("train/lr".to_string(), 3.0e-4f32)]
        );
        assert_eq!(ev[4].step, 300);
        assert_eq!(ev[4].scalars, [("train/loss".to_string(), 0.5f32)]);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn resume_keeps_rows_through_the_resumed_step() {
        let dir = tmpdir("resume");
        let mut log = MetricsLogger::new(&dir, true, true).expect("open");
        for step in 1..=5 {
            log.log(step, &[("train/loss", step as f64)]).expect("log");
        }
        drop(log);
        // a kill mid-write leaves a torn last line
        let p = dir.join(JSONL_FILE);
        let mut f = OpenOptions::new().append(true).open(&p).expect("append");
        f.write_all(b"{\"step\":6,\"ti").expect("write");
        drop(f);

        let mut log = MetricsLogger::open_resume(&dir, true, true, 3).expect("resume");
        let steps: Vec<u64> = read_jsonl(&dir).iter().filter_map(|r| r["step"].as_u64()).collect();
        assert_eq!(steps, [1, 2, 3]);
        assert!(!dir.join("metrics.jsonl.tmp").exists());
        log.log(4, &[("train/loss", 40.0)]).expect("log");
        drop(log);
        let rows = read_jsonl(&dir);
        let steps: Vec<u64> = rows.iter().filter_map(|r| r["step"].as_u64()).collect();
        assert_eq!(steps, [1, 2, 3, 4]);
        assert_eq!(rows[3]["train/loss"].as_f64(), Some(40.0));

        // TensorBoard: the old file is kept, the new one opens with a session start at 4
        // (TensorBoard then drops the old file's steps >= 4).
        let files = event_files(&dir);
        assert_eq!(files.len(), 2);
        let new = files
            .iter()
            .map(|f| read_events(f))
            .find(|ev| ev.iter().any(|e| e.session_status == Some(1) && e.step == 4))
            .expect("resumed event file");
        assert_eq!(
            new.last().map(|e| (e.step, e.scalars.clone())),
            Some((4, vec![("train/loss".to_string(), 40.0f32)]))
        );

        // resuming without JSONL logging leaves the file alone
        drop(MetricsLogger::open_resume(&dir, false, false, 1).expect("resume"));
        assert_eq!(read_jsonl(&dir).len(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn loggers_opened_in_the_same_second_get_distinct_event_files() {
        let dir = tmpdir("same-second");
        let mut a = MetricsLogger::new(&dir, true, false).expect("a");
        a.log(1, &[("a", 1.0)]).expect("log");
        drop(a);
        let mut b = MetricsLogger::open_resume(&dir, true, false, 1).expect("b");
        b.log(2, &[("b", 2.0)]).expect("log");
        drop(b);
        let files = event_files(&dir);
        assert_eq!(files.len(), 2);
        let tags: Vec<String> = files
            .iter()
            .flat_map(|f| read_events(f))
            .flat_map(|e| e.scalars.into_iter().map(|(t, _)| t))
            .collect();
        assert_eq!(tags.len(), 2);
        assert!(tags.contains(&"a".to_string()) && tags.contains(&"b".to_string()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unusable_directory_is_an_error_not_a_panic() {
        let dir = tmpdir("bad");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("not-a-dir");
        std::fs::write(&file, b"x").expect("write");
        for (tb, jsonl) in [(true, false), (false, true), (true, true)] {
            let r = MetricsLogger::new(&file.join("run"), tb, jsonl);
            assert!(matches!(r, Err(TrainerError::Io { .. })), "{tb} {jsonl}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
