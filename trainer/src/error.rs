//! Errors of the trainer library (the binary adds context with anyhow).

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
}

pub type Result<T> = std::result::Result<T, TrainerError>;
