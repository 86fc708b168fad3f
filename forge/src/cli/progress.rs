//! Progress bars on stderr (indicatif) for the library's progress reports: `(what, done,
//! total)` callbacks ([`Steps`]) and the [`Progress`] trait ([`Bar`]).

use forge_trainer::progress::Progress;
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

/// The recipe's `log.progress`, or (unset) whether stderr is a terminal.
pub fn for_recipe(recipe: &forge_trainer::recipe::Recipe) -> bool {
    recipe.log.progress.unwrap_or_else(|| std::io::stderr().is_terminal())
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

/// The template of a bar named by its phase (data loading, training).
pub const STEP_TEMPLATE: &str = "{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}";

/// One bar per step for a `(what, done, total)` callback (forge_trainer::data::PhaseReport): a
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
            let pb = bar(total, STEP_TEMPLATE, self.show);
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
        self.finish();
    }
}

/// One bar per phase the library starts ([`Progress::start`]), drawn with an indicatif
/// template (hidden when not `show`n); with `name_in_message` the phase's name is the bar's
/// message.
pub struct Bar {
    show: bool,
    template: &'static str,
    name_in_message: bool,
    bar: ProgressBar,
}

impl Bar {
    pub fn new(show: bool, template: &'static str, name_in_message: bool) -> Self {
        Bar {
            show,
            template,
            name_in_message,
            bar: ProgressBar::hidden(),
        }
    }
}

impl Progress for Bar {
    fn start(&mut self, what: &str, len: u64) {
        self.bar.finish_and_clear();
        self.bar = bar(len, self.template, self.show);
        if self.name_in_message {
            self.bar.set_message(what.to_string());
        }
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
