//! The one conversation reader: every data file forge reads (training data, `forge
//! regenerate` and `forge build-knowledge` input, `forge eval --prompts`) goes through here.
//!
//! Files are JSONL (one record per line, blank lines ignored) or one JSON array of records.
//! Records (any mix):
//! - ShareGPT `{"id"?, "system"?, "conversations": [{"from": "human"|"gpt"|"system"|..., "value": "..."}]}`
//! - OpenAI `{"id"?, "system"?, "conversations"|"messages": [{"role": "user"|"assistant"|"system"|"tool", "content": ...}]}`
//!   where `content` is a string or a list of `{"type": "text", "text": "..."}` parts.
//! - Prompts only ([`read_prompts`]): `{"id"?, "system"?, "prompt": "..."}` and MT-Bench /
//!   vicuna-bench questions `{"question_id", "category"?, "turns": ["...", "..."]}`.
//!
//! Two views of a file:
//! - [`read_conversations`] (training, the knowledge cache): whole conversations with which
//!   messages are trained on. Assistant turns (`gpt`, `assistant`, ...) are trainable;
//!   `function_call` turns are rendered as assistant turns but not trained on; `observation`,
//!   `tool`, `function`, `ipython` turns are tool results (never trained on).
//! - [`read_prompts`] (regenerate, eval): the system and user turns of each record, each user
//!   turn to be answered in order; assistant turns are dropped.
//!
//! Errors name `file:line` (the line a JSON array element starts on) and what to change.
//!
//! One file over ~500 lines: it is the one reader, and half of it is its tests of every form.

use crate::chat::{Message, Role};
use crate::error::{DataError, Result};
use serde_json::{Map, Value};
use std::collections::HashMap;
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

/// One prompt record: system and user turns, an answer to be generated after every user turn
/// (`forge regenerate`, `forge eval --prompts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptConversation {
    /// The record's `id` (or MT-Bench `question_id`); `regen-<index>` when it has none.
    pub id: String,
    /// 1-based line of the record in the input (its array element's line for JSON arrays).
    pub line: usize,
    /// System and user messages in order; an answer is generated after every user message.
    pub messages: Vec<Message>,
    /// MT-Bench `category`, when the record has one.
    pub category: Option<String>,
}

impl PromptConversation {
    pub fn user_turns(&self) -> usize {
        self.messages.iter().filter(|m| m.role == Role::User).count()
    }

    /// The conversation up to and including user turn `k` (0-based), with `answers[j]`
    /// after user turn j < k; `system` is added first when the conversation has none.
    pub fn context(&self, k: usize, answers: &[String], system: Option<&str>) -> Vec<Message> {
        let mut out = Vec::new();
        if let Some(sys) = system {
            if self.messages.first().map(|m| m.role) != Some(Role::System) {
                out.push(Message::new(Role::System, sys));
            }
        }
        let mut users = 0;
        for m in &self.messages {
            out.push(m.clone());
            if m.role == Role::User {
                if users == k {
                    break;
                }
                out.push(Message::new(Role::Assistant, answers[users].clone()));
                users += 1;
            }
        }
        out
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a conversation file (JSON or JSONL). A malformed record stops the read with an error
/// naming file and line, unless `skip_invalid`, in which case it is skipped and listed.
pub fn read_conversations(path: &Path, skip_invalid: bool) -> Result<ReadResult> {
    parse_conversations(&read_text(path)?, path, skip_invalid)
}

/// [`read_conversations`] on text already read (`path` is used in messages and default ids).
pub fn parse_conversations(text: &str, path: &Path, skip_invalid: bool) -> Result<ReadResult> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let mut out = ReadResult::default();
    for (line, parsed) in records(text, path)? {
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
    }
    Ok(out)
}

/// Reads a prompt file (JSON or JSONL; see the module docs). Every record must hold a user
/// turn; ids must be unique (outputs are resumed by id). Errors name `file:line`.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptConversation>> {
    parse_prompts(&read_text(path)?, path)
}

/// [`read_prompts`] on text already read (`path` is used in messages).
pub fn parse_prompts(text: &str, path: &Path) -> Result<Vec<PromptConversation>> {
    let p = path.display();
    let records = records(text, path)?;
    let mut out = Vec::with_capacity(records.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (index, (line, parsed)) in records.into_iter().enumerate() {
        let bad = |reason: String| DataError::Record(format!("{p}:{line}: {reason}"));
        let v = parsed.map_err(bad)?;
        let (id, messages, category) = record_to_prompt(&v).map_err(bad)?;
        let id = id.unwrap_or_else(|| format!("regen-{index}"));
        if let Some(first) = seen.insert(id.clone(), line) {
            return Err(bad(format!(
                "id '{id}' is already used on line {first} (ids must be unique: outputs are resumed by id; rename or drop one)"
            )));
        }
        out.push(PromptConversation {
            id,
            line,
            messages,
            category,
        });
    }
    Ok(out)
}

/// The records of a file with the line each starts on; a record that is not JSON is an `Err`
/// reason (JSONL). A JSON array with a syntax error fails as a whole (its line and column).
fn records(text: &str, path: &Path) -> Result<Vec<(usize, std::result::Result<Value, String>)>> {
    if text.trim_start().starts_with('[') {
        // A JSON array: parse it whole (syntax errors carry their line), then each element;
        // element lines come from a scan of the top-level array.
        let value: Value = serde_json::from_str(text).map_err(|e| {
            DataError::Record(format!(
                "{}:{}:{}: invalid JSON: {e} (a file starting with '[' is read as one JSON array)",
                path.display(),
                e.line(),
                e.column()
            ))
        })?;
        let lines = array_element_lines(text);
        let Value::Array(items) = value else {
            return Ok(Vec::new());
        };
        Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, item)| (lines.get(i).copied().unwrap_or(1), Ok(item)))
            .collect())
    } else {
        Ok(text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                let parsed = serde_json::from_str::<Value>(line).map_err(|e| {
                    format!(
                        "invalid JSON at column {}: {e} (JSONL: one JSON object per line)",
                        e.column()
                    )
                });
                (i + 1, parsed)
            })
            .collect())
    }
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

/// A turn's role name -> (role, trained on).
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

/// Roles a prompt record may hold (a tool or function call turn has no user turn to answer).
fn prompt_role(name: &str) -> Option<Role> {
    match role_of(name) {
        Some((role @ (Role::User | Role::System), _)) | Some((role @ Role::Assistant, true)) => Some(role),
        _ => None,
    }
}

/// Text of a content value: a string, or a list of `{"type": "text", "text"}` parts (`what`
/// names the value in messages).
fn content_text(v: &Value, what: &str) -> std::result::Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text") | None, Some(Value::String(t))) => s.push_str(t),
                    _ => {
                        return Err(format!(
                            "{what}: content parts must be {{\"type\": \"text\", \"text\": \"...\"}} (images and other parts are not supported)"
                        ))
                    }
                }
            }
            Ok(s)
        }
        Value::Null => Err(format!("{what} is null (expected a string)")),
        other => Err(format!("{what} must be a string, got {}", kind_of(other))),
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

fn as_object(v: &Value) -> std::result::Result<&Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("expected a JSON object, got {}", kind_of(v)))
}

/// The record's `id`, else its MT-Bench `question_id` (a non-empty string or a number).
fn id_of(obj: &Map<String, Value>) -> std::result::Result<Option<String>, String> {
    let (key, v) = match (obj.get("id"), obj.get("question_id")) {
        (Some(v), _) if !v.is_null() => ("id", v),
        (_, Some(v)) => ("question_id", v),
        _ => return Ok(None),
    };
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(n.to_string())),
        other => Err(format!("\"{key}\" must be a string or number, got {}", kind_of(other))),
    }
}

/// The record's `system` message, when it has a non-empty one.
fn system_of(obj: &Map<String, Value>) -> std::result::Result<Option<Message>, String> {
    match obj.get("system") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let s = content_text(v, "\"system\"")?;
            Ok((!s.is_empty()).then(|| Message::new(Role::System, s)))
        }
    }
}

/// One turn of a `conversations` / `messages` list: (role name, content).
fn turn_of(key: &str, i: usize, t: &Value) -> std::result::Result<(String, String), String> {
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
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(at(format!("\"{role_key}\" must be a string, got {}", kind_of(other)))),
        None => {
            return Err(at(format!(
                "missing \"{role_key}\" (turns are {{\"from\", \"value\"}} or {{\"role\", \"content\"}})"
            )))
        }
    };
    let content = match t.get(content_key) {
        Some(c) => content_text(c, &format!("{key}[{i}].{content_key}"))?,
        None => return Err(at(format!("missing \"{content_key}\""))),
    };
    Ok((role_name, content))
}

/// The `conversations` or `messages` list of a record, if it has one.
fn turn_list(obj: &Map<String, Value>) -> std::result::Result<Option<(&'static str, &Vec<Value>)>, String> {
    let (key, turns) = match (obj.get("conversations"), obj.get("messages")) {
        (Some(t), _) => ("conversations", t),
        (None, Some(t)) => ("messages", t),
        (None, None) => return Ok(None),
    };
    let turns = turns
        .as_array()
        .ok_or_else(|| format!("\"{key}\" must be a list, got {}", kind_of(turns)))?;
    Ok(Some((key, turns)))
}

fn keys_of(obj: &Map<String, Value>) -> Vec<&str> {
    obj.keys().map(String::as_str).collect()
}

fn record_to_conversation(v: &Value, default_id: &str) -> std::result::Result<Conversation, String> {
    let obj = as_object(v)?;
    let id = id_of(obj)?.unwrap_or_else(|| default_id.to_string());
    let Some((key, turns)) = turn_list(obj)? else {
        return Err(format!(
            "no \"conversations\" or \"messages\" list (keys: {:?}); prompt-only records (\"prompt\", \"turns\") have no answers to train on",
            keys_of(obj)
        ));
    };
    let mut messages = Vec::with_capacity(turns.len() + 1);
    let mut trainable = Vec::with_capacity(turns.len() + 1);
    if let Some(sys) = system_of(obj)? {
        messages.push(sys);
        trainable.push(false);
    }
    for (i, t) in turns.iter().enumerate() {
        let (role_name, content) = turn_of(key, i, t)?;
        let (role, train) = role_of(&role_name)
            .ok_or_else(|| format!("{key}[{i}]: unknown role \"{role_name}\" (expected one of {ROLES})"))?;
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

type PromptRecord = (Option<String>, Vec<Message>, Option<String>);

/// One prompt record -> (id if given, system + user messages, category).
fn record_to_prompt(v: &Value) -> std::result::Result<PromptRecord, String> {
    let obj = as_object(v)?;
    let id = id_of(obj)?;
    let mut messages: Vec<Message> = system_of(obj)?.into_iter().collect();
    if let Some((key, turns)) = turn_list(obj)? {
        for (i, t) in turns.iter().enumerate() {
            let (role_name, content) = turn_of(key, i, t)?;
            let role = prompt_role(&role_name).ok_or_else(|| {
                format!(
                    "{key}[{i}]: role '{role_name}' is not supported (prompts keep system and user turns, drop assistant turns, and the target answers every user turn)"
                )
            })?;
            if role != Role::Assistant {
                messages.push(Message::new(role, content));
            }
        }
    } else if let Some(turns) = obj.get("turns") {
        let turns = turns
            .as_array()
            .ok_or_else(|| format!("\"turns\" must be a list of strings, got {}", kind_of(turns)))?;
        for (i, t) in turns.iter().enumerate() {
            messages.push(Message::new(Role::User, content_text(t, &format!("turns[{i}]"))?));
        }
    } else if let Some(p) = obj.get("prompt") {
        messages.push(Message::new(Role::User, content_text(p, "\"prompt\"")?));
    } else {
        return Err(format!(
            "expected \"conversations\", \"messages\", \"turns\" (MT-Bench) or \"prompt\" (keys: {:?})",
            keys_of(obj)
        ));
    }
    if !messages.iter().any(|m| m.role == Role::User) {
        return Err("no user turn to answer (a prompt record needs at least one human/user turn)".into());
    }
    if let Some(i) = messages
        .iter()
        .position(|m| m.role == Role::User && m.content.trim().is_empty())
    {
        let n = messages[..i].iter().filter(|m| m.role == Role::User).count();
        return Err(format!(
            "user turn {} is empty (give it text, or drop the record)",
            n + 1
        ));
    }
    let category = match obj.get("category") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) => Some(c.clone()),
        Some(other) => return Err(format!("\"category\" must be a string, got {}", kind_of(other))),
    };
    Ok((id, messages, category))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("dir/in.jsonl")
    }

    fn shape(m: &[Message]) -> Vec<(Role, &str)> {
        m.iter().map(|m| (m.role, m.content.as_str())).collect()
    }

    fn conv_err(text: &str) -> String {
        parse_conversations(text, p(), false).expect_err(text).to_string()
    }

    fn prompt_err(text: &str) -> String {
        parse_prompts(text, p()).expect_err(text).to_string()
    }

    const SHAREGPT: &str = r#"{"id": "a", "system": "S", "conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}"#;
    const OPENAI: &str = r#"{"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": [{"type": "text", "text": "p1 "}, {"text": "p2"}]}, {"role": "assistant", "content": "r"}]}"#;
    const TOOLS: &str = r#"{"conversations": [{"from": "human", "value": "call"}, {"from": "function_call", "value": "f()"}, {"from": "observation", "value": "42"}, {"from": "gpt", "value": "It is 42."}]}"#;
    const PROMPT: &str = r#"{"id": 3, "system": "Be brief.", "prompt": "Just a prompt"}"#;
    const MT_BENCH: &str = r#"{"question_id": 81, "category": "writing", "turns": ["One", "Two"]}"#;

    #[test]
    fn conversations_sharegpt_openai_tools_multi_turn_jsonl() {
        let text = format!("{SHAREGPT}\n\n{OPENAI}\n{TOOLS}\n");
        let r = parse_conversations(&text, p(), false).expect("read");
        let c = &r.conversations;
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].id, "a");
        assert_eq!(
            shape(&c[0].messages),
            [
                (Role::System, "S"),
                (Role::User, "q1"),
                (Role::Assistant, "a1"),
                (Role::User, "q2"),
                (Role::Assistant, "a2")
            ]
        );
        assert_eq!(c[0].trainable, [false, false, true, false, true]);
        // default id: stem and line (line 2 is blank)
        assert_eq!(c[1].id, "in:3");
        assert_eq!(
            shape(&c[1].messages),
            [(Role::System, "sys"), (Role::User, "p1 p2"), (Role::Assistant, "r")]
        );
        assert_eq!(c[2].trainable, [false, false, false, true]);
        assert_eq!(c[2].messages[2].role, Role::Tool);
    }

    #[test]
    fn conversations_json_array_lines_and_errors() {
        let text = format!("[\n  {SHAREGPT},\n  {OPENAI}\n]\n");
        let r = parse_conversations(&text, Path::new("x.json"), false).expect("array");
        assert_eq!(r.conversations[1].id, "x:3");
        let err = parse_conversations("[\n{\"a\": 1,,}\n]", Path::new("x.json"), false)
            .expect_err("syntax")
            .to_string();
        assert!(err.starts_with("x.json:2:") && err.contains("invalid JSON"), "{err}");
        // prompt-only records have nothing to train on, and the error says so
        let err = conv_err(&format!("{SHAREGPT}\n{PROMPT}\n"));
        assert!(err.starts_with("dir/in.jsonl:2: no \"conversations\""), "{err}");
        assert!(
            err.contains("no answers to train on") && err.contains("skip_invalid"),
            "{err}"
        );
        let err = conv_err("{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\nnot json\n");
        assert!(err.contains("in.jsonl:1: messages[0]: unknown role \"robot\""), "{err}");
        let r = parse_conversations("{\"messages\": []}\nnot json\n", p(), true).expect("skip");
        let lines: Vec<usize> = r.skipped.iter().map(|s| s.line).collect();
        assert_eq!(lines, [1, 2]);
        assert!(
            r.skipped[1].reason.contains("invalid JSON at column"),
            "{}",
            r.skipped[1]
        );
    }

    #[test]
    fn prompts_every_form() {
        let user_only = r#"{"conversations": [{"role": "user", "content": "u"}]}"#;
        let text = format!("{SHAREGPT}\n{OPENAI}\n{PROMPT}\n\n{MT_BENCH}\n{user_only}\n");
        let c = parse_prompts(&text, p()).expect("prompts");
        let ids: Vec<&str> = c.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["a", "regen-1", "3", "81", "regen-4"]);
        let lines: Vec<usize> = c.iter().map(|c| c.line).collect();
        assert_eq!(lines, [1, 2, 3, 5, 6]);
        // assistant turns are dropped, system and user turns kept
        assert_eq!(
            shape(&c[0].messages),
            [(Role::System, "S"), (Role::User, "q1"), (Role::User, "q2")]
        );
        assert_eq!(shape(&c[1].messages), [(Role::System, "sys"), (Role::User, "p1 p2")]);
        assert_eq!(
            shape(&c[2].messages),
            [(Role::System, "Be brief."), (Role::User, "Just a prompt")]
        );
        assert_eq!(c[3].user_turns(), 2);
        assert_eq!(c[3].category.as_deref(), Some("writing"));
        assert_eq!(c[0].category, None);
        // multi-turn context: earlier answers interleaved; --system only where none is given
        let ctx = c[0].context(1, &["A0".into()], Some("ignored"));
        assert_eq!(
            shape(&ctx),
            [
                (Role::System, "S"),
                (Role::User, "q1"),
                (Role::Assistant, "A0"),
                (Role::User, "q2")
            ]
        );
        assert_eq!(
            shape(&c[3].context(0, &[], Some("D"))),
            [(Role::System, "D"), (Role::User, "One")]
        );
        // the same JSON array
        let text = format!("[{PROMPT},\n {MT_BENCH}]");
        let c = parse_prompts(&text, Path::new("q.json")).expect("array");
        assert_eq!(c.iter().map(|c| c.line).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn prompt_errors_name_file_line_and_fix() {
        for (text, want) in [
            ("{\"prompt\": \"ok\"}\n{\"prompt\": \"cut\n", "in.jsonl:2: invalid JSON"),
            (
                "{\"conversations\": [{\"from\": \"robot\", \"value\": \"x\"}]}",
                "in.jsonl:1: conversations[0]: role 'robot' is not supported",
            ),
            (
                "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}",
                "in.jsonl:1: messages[0]: role 'tool' is not supported",
            ),
            (
                "{\"text\": \"hello\"}",
                "in.jsonl:1: expected \"conversations\", \"messages\"",
            ),
            (
                "{\"id\": 1, \"prompt\": \"a\"}\n{\"id\": \"1\", \"prompt\": \"b\"}",
                "in.jsonl:2: id '1' is already used on line 1",
            ),
            (
                "{\"conversations\": [{\"from\": \"gpt\", \"value\": \"hi\"}]}",
                "in.jsonl:1: no user turn to answer",
            ),
            ("{\"turns\": [\"a\", \" \"]}", "in.jsonl:1: user turn 2 is empty"),
            (
                "{\"prompt\": 1}",
                "in.jsonl:1: \"prompt\" must be a string, got a number",
            ),
            ("{\"turns\": \"a\"}", "in.jsonl:1: \"turns\" must be a list of strings"),
            (
                "{\"prompt\": \"a\", \"category\": 2}",
                "in.jsonl:1: \"category\" must be a string",
            ),
            (
                "{\"id\": [1], \"prompt\": \"a\"}",
                "in.jsonl:1: \"id\" must be a string or number",
            ),
            ("\"just a string\"", "in.jsonl:1: expected a JSON object, got a string"),
        ] {
            let err = prompt_err(text);
            assert!(
                err.starts_with("dir/") && err.contains(want),
                "expected '{want}' in: {err}"
            );
        }
    }
}
