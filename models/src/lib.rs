//! forge-models: target LLMs (Llama family, Qwen2/2.5/3, Mistral) loaded from Hugging Face
//! folders, the layers every drafter shares, and decoding with a KV cache.
//!
//! Weight names equal the names on disk: every module is built under a tch `nn::Path`
//! whose segments are the Hugging Face names (`model.layers.0.self_attn.q_proj.weight`),
//! so loading is name-for-name and needs no conversion table.

pub mod drafters;
pub mod dtype;
pub mod error;
pub mod features;
pub mod generate;
pub mod layers;
pub mod llm;
pub mod safetensors_io;
pub mod spec_tree;
pub mod speculative;

pub use dtype::{parse_device, synchronize, DType};
pub use error::{ModelError, Result};
pub use llm::{weight_files, Capture, KvCache, LogitsMode, TargetConfig, TargetModel, TargetOutput};
