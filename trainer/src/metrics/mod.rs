//! Training metrics: TensorBoard event files under `<dir>/tb/` and the same rows in
//! `<dir>/metrics.jsonl` (`{"step": N, "time": unix_seconds, "<name>": value, ...}`).
//!
//! [`MetricsLogger`] (here) writes each row to both; the formats live in their own files:
//! [`jsonl`] (rows, and the rewrite of a resumed run's file) and [`tensorboard`] (our own
//! event-file writer).
//!
//! Every opened event file starts with a `SessionLog START` event at the first step the run
//! will log; TensorBoard then drops the events of earlier files with steps >= that step,
//! which is what a resumed (or restarted) run needs. metrics.jsonl gets the same treatment
//! by rewriting it.

mod jsonl;
mod tensorboard;
#[cfg(test)]
mod tests;

use crate::error::{Result, TrainerError};
use jsonl::{jsonl_row, truncate_jsonl};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use tensorboard::{scalar_event, EventWriter};

pub const JSONL_FILE: &str = "metrics.jsonl";
pub const TB_DIR: &str = "tb";

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainerError + '_ {
    move |source| TrainerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn unix_seconds() -> f64 {
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
