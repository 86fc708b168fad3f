//! forge-data: conversations, chat templates, loss masks, tokenisation, token caches,
//! batching, vocabulary mapping and hidden-state datasets (no tch in the public API).

pub mod batch;
pub mod chat;
pub mod conversation;
pub mod dataset;
pub mod error;
pub mod fp8;
pub mod hash;
pub mod hidden;
pub mod tokenizer;
pub mod vocab;

pub use batch::{Batch, PlanOptions};
pub use chat::{ChatTemplate, Message, RenderedChat, Role};
pub use conversation::{read_conversations, read_prompts, Conversation, InvalidRecord, PromptConversation};
pub use dataset::{load_dataset, CacheStatus, DataStats, LoadedDataset, TokenDataset, TokenizeOptions};
pub use error::{DataError, Result};
pub use hidden::{HiddenDataset, HiddenDtype, HiddenManifest, HiddenSettings, HiddenWriter};
pub use tokenizer::TextTokenizer;
pub use vocab::VocabMapping;
