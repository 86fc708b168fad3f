//! The metric writers against an independent reader of both formats.

use super::tensorboard::crc32c;
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
