//! Frozen target LLMs loaded from Hugging Face folders, with hidden-state capture and a
//! KV cache for decoding.

mod config;
mod load;
mod model;

pub use config::{Family, TargetConfig};
pub use load::{read_named_tensors, weight_files};
pub use model::{layer_inputs, Capture, KvCache, LayerHook, LayerInputs, LogitsMode, TargetModel, TargetOutput};
