//! forge-data: conversations, chat templates and tokenisation (no tch in the public API).

pub mod chat;
pub mod error;
pub mod tokenizer;

pub use chat::{ChatTemplate, Message, Role};
pub use error::{DataError, Result};
pub use tokenizer::TextTokenizer;
