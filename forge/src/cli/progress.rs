//! Progress bars on stderr (indicatif) for the commands' library callbacks.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;

/// `--progress auto|always|never`: whether to draw a progress bar.
pub fn show(flag: &str) -> bool {
    match flag {
        "always" => true,
        "never" => false,
        _ => std::io::stderr().is_terminal(),
    }
}

/// A bar with an indicatif template, or a hidden one when `show` is false.
pub fn bar(total: u64, template: &str, show: bool) -> ProgressBar {
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

/// One bar per step for a `(what, done, total)` callback (forge_trainer::data::Progress): a
/// new `what` finishes the bar before it.
pub struct Steps {
    show: bool,
    current: Mutex<Option<(String, ProgressBar)>>,
}

impl Steps {
    pub fn new(show: bool) -> Self {
        Self {
            show,
            current: Mutex::new(None),
        }
    }

    /// Clears the current bar (the last step is done).
    pub fn finish(&self) {
        if let Ok(mut cur) = self.current.lock() {
            if let Some((_, pb)) = cur.take() {
                pb.finish_and_clear();
            }
        }
    }

    pub fn update(&self, what: &str, done: u64, total: u64) {
        let Ok(mut cur) = self.current.lock() else { return };
        if cur.as_ref().is_none_or(|(w, _)| w != what) {
            if let Some((_, pb)) = cur.take() {
                pb.finish_and_clear();
            }
            let pb = bar(total, "{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}", self.show);
            pb.set_message(what.to_string());
            *cur = Some((what.to_string(), pb));
        }
        if let Some((_, pb)) = cur.as_ref() {
            if pb.length() != Some(total) {
                pb.set_length(total);
            }
            pb.set_position(done);
        }
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        if let Ok(Some((_, pb))) = self.current.lock().map(|mut c| c.take()) {
            pb.finish_and_clear();
        }
    }
}
