//! Chat templates: built-in renderers that reproduce the HF `apply_chat_template` output of
//! the common template families, and detection of the family from a tokenizer_config.json.

use crate::error::{DataError, Result};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    /// Tool / function results (never trained on).
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// A chat template family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (SmolLM2, Qwen2/2.5), with the system prompt
    /// the template inserts when the conversation has none.
    ChatMl { default_system: Option<String> },
    /// Llama 3 `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` with BOS.
    Llama3 { bos: String },
    /// Qwen3: ChatML whose generation prompt can disable thinking with an empty think block.
    Qwen3 { enable_thinking: bool },
}

impl ChatTemplate {
    pub const NAMES: &'static [&'static str] = &["auto", "chatml", "llama3", "qwen3"];

    /// A built-in template by name; `auto` reads the target's tokenizer_config.json.
    pub fn from_name(name: &str, tokenizer_dir: &Path) -> Result<Self> {
        match name {
            "auto" => Self::detect(tokenizer_dir),
            "chatml" => Ok(ChatTemplate::ChatMl {
                default_system: None,
            }),
            "llama3" => Ok(ChatTemplate::Llama3 {
                bos: "<|begin_of_text|>".into(),
            }),
            "qwen3" => Ok(ChatTemplate::Qwen3 {
                enable_thinking: false,
            }),
            other => Err(DataError::Invalid(format!(
                "chat template '{other}' is not one of {:?}",
                Self::NAMES
            ))),
        }
    }

    /// Reads `chat_template` from `<dir>/tokenizer_config.json` and picks the matching built-in.
    pub fn detect(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| DataError::Json {
                path: path.clone(),
                source,
            })?;
        let tpl = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|s| s.as_str()))
                .unwrap_or_default()
                .to_string(),
            _ => String::new(),
        };
        if tpl.is_empty() {
            return Err(DataError::Template {
                path,
                msg: "no chat_template: set data.chat_template to one of chatml, llama3, qwen3"
                    .into(),
            });
        }
        Self::from_template_source(&tpl, v.get("bos_token").and_then(|b| b.as_str()))
            .ok_or_else(|| DataError::Template {
                path,
                msg: "chat_template matches none of the built-in templates (chatml, llama3, qwen3): set data.chat_template explicitly".into(),
            })
    }

    /// Recognises a Jinja chat template's family from its text.
    pub fn from_template_source(tpl: &str, bos: Option<&str>) -> Option<Self> {
        if tpl.contains("<|start_header_id|>") {
            return Some(ChatTemplate::Llama3 {
                bos: bos.unwrap_or("<|begin_of_text|>").to_string(),
            });
        }
        if tpl.contains("<|im_start|>") {
            if tpl.contains("<think>") || tpl.contains("enable_thinking") {
                return Some(ChatTemplate::Qwen3 {
                    enable_thinking: false,
                });
            }
            return Some(ChatTemplate::ChatMl {
                default_system: literal_default_system(tpl),
            });
        }
        None
    }

    /// Renders a conversation as text (special tokens as text), optionally followed by the
    /// assistant generation prompt.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        match self {
            ChatTemplate::ChatMl { default_system } => {
                if let (Some(sys), Some(first)) = (default_system, messages.first()) {
                    if first.role != Role::System {
                        out.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
                    }
                }
                for m in messages {
                    out.push_str(&format!(
                        "<|im_start|>{}\n{}<|im_end|>\n",
                        m.role.as_str(),
                        m.content
                    ));
                }
                if add_generation_prompt {
                    out.push_str("<|im_start|>assistant\n");
                }
            }
            ChatTemplate::Llama3 { bos } => {
                out.push_str(bos);
                for m in messages {
                    let role = if m.role == Role::Tool {
                        "ipython"
                    } else {
                        m.role.as_str()
                    };
                    out.push_str(&format!(
                        "<|start_header_id|>{role}<|end_header_id|>\n\n{}<|eot_id|>",
                        m.content.trim()
                    ));
                }
                if add_generation_prompt {
                    out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
                }
            }
            ChatTemplate::Qwen3 { enable_thinking } => {
                for m in messages {
                    out.push_str(&format!(
                        "<|im_start|>{}\n{}<|im_end|>\n",
                        m.role.as_str(),
                        m.content
                    ));
                }
                if add_generation_prompt {
                    out.push_str("<|im_start|>assistant\n");
                    if !enable_thinking {
                        out.push_str("<think>\n\n</think>\n\n");
                    }
                }
            }
        }
        out
    }

    /// The text that ends an assistant turn (its token is trained on).
    pub fn end_of_turn(&self) -> &'static str {
        match self {
            ChatTemplate::ChatMl { .. } | ChatTemplate::Qwen3 { .. } => "<|im_end|>",
            ChatTemplate::Llama3 { .. } => "<|eot_id|>",
        }
    }
}

/// The system prompt a ChatML template inserts when none is given, when it is a literal.
fn literal_default_system(tpl: &str) -> Option<String> {
    let start = "<|im_start|>system\n";
    let mut rest = tpl;
    while let Some(i) = rest.find(start) {
        let after = &rest[i + start.len()..];
        if let Some(end) = after.find("<|im_end|>") {
            let body = &after[..end];
            if !body.is_empty() && !body.contains(['\'', '"', '{', '}', '+']) {
                return Some(body.to_string());
            }
        }
        rest = after;
    }
    None
}
