//! indicatif progress bars on stderr for the library's [`Progress`] reports.

use forge_trainer::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// `--progress auto|always|never`: whether to draw a progress bar.
pub fn wanted(flag: &str) -> bool {
    match flag {
        "always" => true,
        "never" => false,
        _ => std::io::IsTerminal::is_terminal(&std::io::stderr()),
    }
}

/// One bar per phase the library starts, drawn with an indicatif template (hidden when not
/// `show`n). With `name_in_message` the phase's name is the bar's message (the data bars of
/// `data::load_token_data_with` / `prepare_hidden_with`:
/// `"{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}"`).
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
        self.bar = if self.show {
            let pb = ProgressBar::new(len);
            pb.set_style(
                ProgressStyle::with_template(self.template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            pb
        } else {
            ProgressBar::hidden()
        };
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
