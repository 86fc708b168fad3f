//! ShareGPT-style conversation readers (JSON arrays and JSONL).
//!
//! Accepted records (any mix, one per line in JSONL or as array elements in JSON):
//! - `{"id"?, "system"?, "conversations": [{"from": "human"|"gpt"|"system"|..., "value": "..."}]}`
//! - `{"id"?, "conversations"|"messages": [{"role": "user"|"assistant"|"system"|"tool", "content": ...}]}`
//!   where `content` is a string or a list of `{"type": "text", "text": "..."}` parts.
//!
//! Assistant turns (`gpt`, `assistant`, ...) are trainable; `function_call` turns are rendered as
//! assistant turns but not trained on; `observation`, `tool`, `function`, `ipython` turns are tool
//! results (never trained on).

use crate::chat::{Message, Role};
use crate::error::{DataError, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One conversation, with which of its messages the loss is computed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: String,
    pub messages: Vec<Message>,
    /// `trainable[i]`: message i is an assistant turn the drafter learns to predict.
    pub trainable: Vec<bool>,
}

/// A record that could not be read, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRecord {
    pub path: PathBuf,
    /// 1-based line (JSONL) or line of the array element's start (JSON).
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for InvalidRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.reason)
    }
}

/// Everything read from one file.
#[derive(Debug, Clone, Default)]
pub struct ReadResult {
    pub conversations: Vec<Conversation>,
    /// Skipped records (only with `skip_invalid`; otherwise the first one is an error).
    pub skipped: Vec<InvalidRecord>,
}

/// Reads a ShareGPT-style JSON or JSONL file. A malformed record stops the read with an error
/// naming file and line, unless `skip_invalid`, in which case it is skipped and listed.
pub fn read_conversations(path: &Path, skip_invalid: bool) -> Result<ReadResult> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_conversations(&text, path, skip_invalid)
}

/// [`read_conversations`] on text already read (`path` is used in messages and default ids).
pub fn parse_conversations(text: &str, path: &Path, skip_invalid: bool) -> Result<ReadResult> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let mut out = ReadResult::default();
    let mut handle = |line: usize, parsed: std::result::Result<Value, String>| -> Result<()> {
        let rec = parsed.and_then(|v| record_to_conversation(&v, &format!("{stem}:{line}")));
        match rec {
            Ok(c) => out.conversations.push(c),
            Err(reason) => {
                let bad = InvalidRecord {
                    path: path.to_path_buf(),
                    line,
                    reason,
                };
                if !skip_invalid {
                    return Err(DataError::Record(format!(
                        "{bad}\n  (fix the record, or set data.skip_invalid: true to skip and count malformed records)"
                    )));
                }
                out.skipped.push(bad);
            }
        }
        Ok(())
    };
    let first = text.trim_start().chars().next();
    if first == Some('[') {
        // A JSON array: parse it whole (syntax errors carry their line), then each element;
        // element lines come from a scan of the top-level array.
        let value: Value = serde_json::from_str(text).map_err(|e| {
            DataError::Record(format!(
                "{}:{}:{}: invalid JSON: {e}",
                path.display(),
                e.line(),
                e.column()
            ))
        })?;
        let lines = array_element_lines(text);
        if let Value::Array(items) = value {
            for (i, item) in items.into_iter().enumerate() {
                handle(lines.get(i).copied().unwrap_or(1), Ok(item))?;
            }
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parsed =
                serde_json::from_str::<Value>(line).map_err(|e| format!("invalid JSON at column {}: {e}", e.column()));
            handle(i + 1, parsed)?;
        }
    }
    Ok(out)
}

/// 1-based line numbers where each element of a top-level JSON array starts.
fn array_element_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    let (mut depth, mut line, mut in_str, mut esc) = (0usize, 1usize, false, false);
    let mut expect_elem = false;
    for ch in text.chars() {
        if ch == '\n' {
            line += 1;
        }
        if in_str {
            if esc {
                esc = false;
            } else if ch == '\\' {
                esc = true;
            } else if ch == '"' {
                in_str = false;
            }
            continue;
        }
        if depth == 1 && expect_elem && !ch.is_whitespace() && ch != ',' && ch != ']' {
            lines.push(line);
            expect_elem = false;
        }
        match ch {
            '"' => in_str = true,
            '[' | '{' => {
                depth += 1;
                if depth == 1 {
                    expect_elem = true;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => expect_elem = true,
            _ => {}
        }
    }
    lines
}

fn role_of(name: &str) -> Option<(Role, bool)> {
    Some(match name {
        "human" | "user" => (Role::User, false),
        "gpt" | "assistant" | "chatgpt" | "bard" | "bing" | "model" => (Role::Assistant, true),
        "system" => (Role::System, false),
        "function_call" => (Role::Assistant, false),
        "observation" | "tool" | "function" | "ipython" => (Role::Tool, false),
        _ => return None,
    })
}

const ROLES: &str = "human/user, gpt/assistant, system, function_call, observation/tool/function/ipython";

fn content_text(v: &Value) -> std::result::Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text") | None, Some(Value::String(t))) => s.push_str(t),
                    _ => {
                        return Err(
                            "content parts must be {\"type\": \"text\", \"text\": \"...\"} (images and other parts are not supported)"
                                .into(),
                        )
                    }
                }
            }
            Ok(s)
        }
        Value::Null => Err("content is null (expected a string)".into()),
        other => Err(format!("content must be a string, got {}", kind_of(other))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn record_to_conversation(v: &Value, default_id: &str) -> std::result::Result<Conversation, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, got {}", kind_of(v)))?;
    let id = match obj.get("id") {
        None | Some(Value::Null) => default_id.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => return Err(format!("\"id\" must be a string or number, got {}", kind_of(other))),
    };
    let (key, turns) = match (obj.get("conversations"), obj.get("messages")) {
        (Some(t), _) => ("conversations", t),
        (None, Some(t)) => ("messages", t),
        (None, None) => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            return Err(format!("no \"conversations\" or \"messages\" list (keys: {keys:?})"));
        }
    };
    let turns = turns
        .as_array()
        .ok_or_else(|| format!("\"{key}\" must be a list, got {}", kind_of(turns)))?;
    let mut messages = Vec::with_capacity(turns.len() + 1);
    let mut trainable = Vec::with_capacity(turns.len() + 1);
    if let Some(sys) = obj.get("system") {
        match sys {
            Value::String(s) if !s.is_empty() => {
                messages.push(Message::new(Role::System, s.clone()));
                trainable.push(false);
            }
            Value::String(_) | Value::Null => {}
            other => return Err(format!("\"system\" must be a string, got {}", kind_of(other))),
        }
    }
    for (i, t) in turns.iter().enumerate() {
        let at = |msg: String| format!("{key}[{i}]: {msg}");
        let t = t
            .as_object()
            .ok_or_else(|| at(format!("expected an object, got {}", kind_of(t))))?;
        let (role_key, content_key) = if t.contains_key("from") || t.contains_key("value") {
            ("from", "value")
        } else {
            ("role", "content")
        };
        let role_name = match t.get(role_key) {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => return Err(at(format!("\"{role_key}\" must be a string, got {}", kind_of(other)))),
            None => return Err(at(format!("missing \"{role_key}\""))),
        };
        let (role, train) =
            role_of(role_name).ok_or_else(|| at(format!("unknown role \"{role_name}\" (expected one of {ROLES})")))?;
        let content = match t.get(content_key) {
            Some(c) => content_text(c).map_err(|m| at(format!("\"{content_key}\": {m}")))?,
            None => return Err(at(format!("missing \"{content_key}\""))),
        };
        messages.push(Message::new(role, content));
        trainable.push(train);
    }
    if messages.is_empty() {
        return Err(format!("\"{key}\" is empty"));
    }
    Ok(Conversation {
        id,
        messages,
        trainable,
    })
}
