//! Errors of the trainer library: typed, each naming the file, field or flag and the fix
//! (the `forge` binary adds its own context on top).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Data(#[from] forge_data::DataError),
    #[error(transparent)]
    Model(#[from] forge_models::ModelError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A recipe value that cannot work with this target or data (names the field and the fix).
    #[error("{0}")]
    Config(String),
    /// Optimizer state that does not fit the parameters (names the tensor).
    #[error("optimizer state: {0}")]
    OptimizerState(String),
    /// A collective (or the rendezvous) failed; `op` names it (all_reduce, barrier, init...).
    #[error("distributed {op} failed: {message}")]
    Dist { op: String, message: String },
    /// A command-line value that cannot work (`flag` names it, the message says the fix).
    #[error("{flag}: {message}")]
    Flag { flag: String, message: String },
    /// A record of a file the command appends to that it cannot take (names file and line).
    #[error("{path}:{line}: {message}")]
    Record {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// `forge launch`: a worker failed or the launch was interrupted.
    #[error("forge launch: {0}")]
    Launch(String),
    /// An option (command-line flag or library option) with a value that cannot work; the
    /// message names the flag and what it takes.
    #[error("{flag}: {message}")]
    BadOption { flag: String, message: String },
    /// `error` while doing `what` (names the prompt, the file or the flag it came from).
    #[error("{what}: {source}")]
    Context {
        what: String,
        #[source]
        source: Box<TrainerError>,
    },
    /// The recipe's target folder lacks what training reads.
    #[error("target.path {}: {}: {fix}", path.display(), problems.join("; "))]
    TargetFolder {
        path: PathBuf,
        problems: Vec<String>,
        fix: String,
    },
    /// The recipe's drafter cannot be built on its target (each problem names the field).
    #[error("recipe does not fit the target {}:\n  {}", target.display(), problems.join("\n  "))]
    RecipeTargetMismatch { target: PathBuf, problems: Vec<String> },
    /// A draft trained for another target than the one it is evaluated against.
    #[error(
        "the draft {} was trained for a different target than {} ({}): pass the --target it was trained for",
        draft.display(),
        target.display(),
        differences.join(", ")
    )]
    DraftTargetMismatch {
        draft: PathBuf,
        target: PathBuf,
        differences: Vec<String>,
    },
    /// `forge eval --verify`: greedy speculative outputs that differ from plain greedy decoding.
    #[error("--verify: {errors} of {compared} greedy speculative outputs differ from plain greedy decoding beyond a floating-point tie (divergence per prompt in --json)")]
    VerifyFailed { errors: usize, compared: usize },
}

impl TrainerError {
    /// This error as the cause of `what` went wrong (`what: error`).
    pub fn context(self, what: impl Into<String>) -> TrainerError {
        TrainerError::Context {
            what: what.into(),
            source: Box::new(self),
        }
    }

    /// A bad option value: `flag: message`.
    pub fn bad_option(flag: impl Into<String>, message: impl Into<String>) -> TrainerError {
        TrainerError::BadOption {
            flag: flag.into(),
            message: message.into(),
        }
    }
}

/// `.context(..)` / `.with_context(|| ..)` on library results, wrapping the error in
/// [`TrainerError::Context`] (the library's typed context).
pub trait ResultExt<T> {
    fn context(self, what: impl Into<String>) -> Result<T>;
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<TrainerError>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| e.into().context(what))
    }

    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| e.into().context(what()))
    }
}

pub type Result<T> = std::result::Result<T, TrainerError>;
