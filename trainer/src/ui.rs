//! SHARED UI, TRANSITIONAL: indicatif progress bars still drawn from inside the library by
//! train.rs, regenerate.rs and build_knowledge.rs (through `data::progress_bar` and
//! `data::styled_bar`), and by the `show_progress: bool` entry points of data.rs kept for
//! their callers. New library code takes a [`crate::progress::Progress`] instead and lets the
//! `forge` binary draw it (forge/src/cli/progress.rs); this module goes once those callers
//! have moved.

use crate::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar on stderr (hidden when `show` is false).
pub fn progress_bar(total: u64, what: &str, show: bool) -> ProgressBar {
    let pb = styled_bar(total, "{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}", show);
    pb.set_message(what.to_string());
    pb
}

/// A progress bar on stderr with an indicatif template, or a hidden one when `show` is false.
pub fn styled_bar(total: u64, template: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

/// [`progress_bar`]s as a [`Progress`]: one bar per phase, named by it.
pub struct LegacyBars {
    show: bool,
    bar: ProgressBar,
}

impl LegacyBars {
    pub fn new(show: bool) -> Self {
        LegacyBars {
            show,
            bar: ProgressBar::hidden(),
        }
    }
}

impl Progress for LegacyBars {
    fn start(&mut self, what: &str, len: u64) {
        self.bar = progress_bar(len, what, self.show);
    }
    fn set_len(&mut self, len: u64) {
        if self.bar.length() != Some(len) {
            self.bar.set_length(len);
            self.bar.set_position(0);
        }
    }
    fn set_position(&mut self, pos: u64) {
        self.bar.set_position(pos);
    }
    fn inc(&mut self, n: u64) {
        self.bar.inc(n);
    }
    fn set_message(&mut self, msg: &str) {
        self.bar.set_message(msg.to_string());
    }
    fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}
