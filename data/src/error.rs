use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: cannot load tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Template { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
    /// A malformed data record (the message names file:line).
    #[error("{0}")]
    Record(String),
    #[error("{path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, DataError>;
