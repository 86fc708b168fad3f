//! Chat templates: built-in renderers that reproduce, character for character, what HF
//! `apply_chat_template` makes of a conversation with the common template families, and
//! detection of the family (and its parameters) from a tokenizer_config.json.
//!
//! Covered, and checked token for token against HF by tests/templates.rs and its fixture:
//! - ChatML: SmolLM2 (default system read from the template), Qwen2/2.5 (default system,
//!   tool results as `<tool_response>` blocks in a user turn);
//! - Llama 3: BOS, trimmed contents, both the original template (which adds the assistant
//!   header even without a generation prompt) and the later one;
//! - Llama 3.1 and later: the system header with "Cutting Knowledge Date" / "Today Date",
//!   tool results under `ipython`, JSON-quoted;
//! - Qwen3: reasoning (`<think>`) kept only after the last user query, the empty think block
//!   of the last assistant turn, and the generation prompt that can disable thinking.
//!
//! One file over ~500 lines: the template families share one renderer; its tests are half of it.

use crate::error::{DataError, Result};
use std::ops::Range;
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

/// A rendered conversation: the text and, per input message, the byte range of its content
/// and closing end-of-turn marker in `text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    pub text: String,
    pub spans: Vec<Range<usize>>,
}

/// A chat template family with the parameters that vary between models.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (SmolLM2, Qwen2/2.5), with the system prompt
    /// the template inserts when the conversation does not start with one.
    ChatMl {
        default_system: Option<String>,
        /// Qwen2.5 style: tool results become `<tool_response>\n…\n</tool_response>` blocks of
        /// one user turn per run of consecutive tool messages (else: a `tool` turn each).
        tool_responses: bool,
    },
    /// Llama 3 `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` with BOS, the
    /// contents trimmed. The original Llama-3-Instruct template appends the assistant header
    /// even without a generation prompt (`always_generation_prompt`).
    Llama3 {
        bos: String,
        always_generation_prompt: bool,
    },
    /// Llama 3.1 and later: Llama 3 plus a system turn that is always there, opening with
    /// "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"; tool results go in
    /// `ipython` turns as JSON strings.
    Llama31 { bos: String, date: String },
    /// Qwen3: ChatML with reasoning. `<think>` blocks of assistant turns before the last user
    /// query are dropped, later turns get `<think>\n…\n</think>\n\n` (empty for the last turn
    /// when it has none); with `enable_thinking: false` the generation prompt carries an
    /// empty think block.
    Qwen3 { enable_thinking: bool },
}

const LLAMA3_BOS: &str = "<|begin_of_text|>";
const LLAMA31_DEFAULT_DATE: &str = "26 Jul 2024";

impl ChatTemplate {
    pub const NAMES: &'static [&'static str] = &["auto", "chatml", "llama3", "qwen3"];

    /// A built-in template by name. `auto` reads the target's tokenizer_config.json; an explicit
    /// family takes its parameters (default system prompt, Llama 3.1 date header, ...) from
    /// that file too when the file's template is of the same family, and plain defaults
    /// otherwise.
    pub fn from_name(name: &str, tokenizer_dir: &Path) -> Result<Self> {
        let detected = || Self::detect(tokenizer_dir).ok();
        match name {
            "auto" => Self::detect(tokenizer_dir),
            "chatml" => Ok(match detected() {
                Some(t @ ChatTemplate::ChatMl { .. }) => t,
                _ => ChatTemplate::ChatMl {
                    default_system: None,
                    tool_responses: false,
                },
            }),
            "llama3" => Ok(match detected() {
                Some(t @ (ChatTemplate::Llama3 { .. } | ChatTemplate::Llama31 { .. })) => t,
                _ => ChatTemplate::Llama3 {
                    bos: LLAMA3_BOS.into(),
                    always_generation_prompt: false,
                },
            }),
            "qwen3" => Ok(ChatTemplate::Qwen3 { enable_thinking: false }),
            other => Err(DataError::Invalid(format!(
                "chat template '{other}' is not one of {}",
                Self::NAMES.join(", ")
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
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| DataError::Json {
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
                msg: "no chat_template: set data.chat_template to one of chatml, llama3, qwen3".into(),
            });
        }
        let bos = match v.get("bos_token") {
            Some(serde_json::Value::String(s)) => Some(s.as_str()),
            Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()),
            _ => None,
        };
        Self::from_template_source(&tpl, bos).ok_or_else(|| DataError::Template {
            path,
            msg: "chat_template matches none of the built-in templates (chatml: SmolLM2, \
                  Qwen2/2.5; llama3: Llama 3, 3.1+; qwen3: Qwen3 with enable_thinking): set \
                  data.chat_template to one of chatml, llama3, qwen3"
                .into(),
        })
    }

    /// Recognises a Jinja chat template's family, and its parameters, from its text.
    pub fn from_template_source(tpl: &str, bos: Option<&str>) -> Option<Self> {
        if tpl.contains("<|start_header_id|>") {
            let bos = bos.unwrap_or(LLAMA3_BOS).to_string();
            if tpl.contains("Cutting Knowledge Date") {
                return Some(ChatTemplate::Llama31 {
                    bos,
                    date: template_date(tpl),
                });
            }
            return Some(ChatTemplate::Llama3 {
                bos,
                always_generation_prompt: !tpl.contains("add_generation_prompt"),
            });
        }
        if tpl.contains("<|im_start|>") {
            let reasoning =
                tpl.contains("<think>") || tpl.contains("enable_thinking") || tpl.contains("reasoning_content");
            if reasoning {
                // Qwen3's template; other reasoning ChatML templates (QwQ, ...) differ.
                if tpl.contains("enable_thinking") && tpl.contains("last_query_index") {
                    return Some(ChatTemplate::Qwen3 { enable_thinking: false });
                }
                return None;
            }
            return Some(ChatTemplate::ChatMl {
                default_system: literal_default_system(tpl),
                tool_responses: tpl.contains("<tool_response>"),
            });
        }
        None
    }

    /// The family's short name: chatml, llama3, llama3.1 or qwen3.
    pub fn family(&self) -> &'static str {
        match self {
            ChatTemplate::ChatMl { .. } => "chatml",
            ChatTemplate::Llama3 { .. } => "llama3",
            ChatTemplate::Llama31 { .. } => "llama3.1",
            ChatTemplate::Qwen3 { .. } => "qwen3",
        }
    }

    /// Renders a conversation as text (special tokens as text), optionally followed by the
    /// assistant generation prompt.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        self.render_with_spans(messages, add_generation_prompt).text
    }

    /// Renders a conversation and reports, for every input message (same index), the byte
    /// range of `text` that holds its content as rendered plus the end-of-turn marker that
    /// closes it. The loss mask is built from the spans of the trainable (assistant) messages.
    ///
    /// "As rendered" means after the template's own changes: trimmed for Llama, with the think
    /// block Qwen3 writes into (or removes from) that assistant turn, JSON-quoted for Llama
    /// 3.1 tool results. A tool result that Qwen groups with the next one into one user turn
    /// ends at its `</tool_response>`; the last of the group includes the `<|im_end|>`.
    pub fn render_with_spans(&self, messages: &[Message], add_generation_prompt: bool) -> RenderedChat {
        let mut out = Out::default();
        match self {
            ChatTemplate::ChatMl {
                default_system,
                tool_responses,
            } => {
                if let (Some(sys), Some(first)) = (default_system, messages.first()) {
                    if first.role != Role::System {
                        out.push("<|im_start|>system\n");
                        out.push(sys);
                        out.push("<|im_end|>\n");
                    }
                }
                for (i, m) in messages.iter().enumerate() {
                    if m.role == Role::Tool && *tool_responses {
                        out.tool_response(messages, i);
                    } else {
                        out.chatml_turn(m.role.as_str(), &m.content);
                    }
                }
                if add_generation_prompt {
                    out.push("<|im_start|>assistant\n");
                }
            }
            ChatTemplate::Llama3 {
                bos,
                always_generation_prompt,
            } => {
                if !messages.is_empty() {
                    out.push(bos);
                }
                for m in messages {
                    out.llama_turn(m.role.as_str(), py_trim(&m.content));
                }
                if add_generation_prompt || *always_generation_prompt {
                    out.push("<|start_header_id|>assistant<|end_header_id|>\n\n");
                }
            }
            ChatTemplate::Llama31 { bos, date } => {
                out.push(bos);
                out.push("<|start_header_id|>system<|end_header_id|>\n\n");
                out.push("Cutting Knowledge Date: December 2023\n");
                out.push("Today Date: ");
                out.push(date);
                out.push("\n\n");
                let rest = match messages.first() {
                    Some(first) if first.role == Role::System => {
                        out.open();
                        out.push(py_trim(&first.content));
                        out.push("<|eot_id|>");
                        out.close();
                        &messages[1..]
                    }
                    _ => {
                        out.push("<|eot_id|>");
                        messages
                    }
                };
                for m in rest {
                    if m.role == Role::Tool {
                        out.llama_turn("ipython", &json_string(&m.content));
                    } else {
                        out.llama_turn(m.role.as_str(), py_trim(&m.content));
                    }
                }
                if add_generation_prompt {
                    out.push("<|start_header_id|>assistant<|end_header_id|>\n\n");
                }
            }
            ChatTemplate::Qwen3 { enable_thinking } => {
                let last_query = qwen3_last_query_index(messages);
                for (i, m) in messages.iter().enumerate() {
                    match m.role {
                        Role::Tool => out.tool_response(messages, i),
                        Role::Assistant => {
                            let (reasoning, content) = split_reasoning(&m.content);
                            out.push("<|im_start|>assistant\n");
                            out.open();
                            let last = i + 1 == messages.len();
                            if i > last_query && (last || !reasoning.is_empty()) {
                                out.push("<think>\n");
                                out.push(reasoning.trim_matches('\n'));
                                out.push("\n</think>\n\n");
                                out.push(content.trim_start_matches('\n'));
                            } else {
                                out.push(content);
                            }
                            out.push("<|im_end|>");
                            out.close();
                            out.push("\n");
                        }
                        _ => out.chatml_turn(m.role.as_str(), &m.content),
                    }
                }
                if add_generation_prompt {
                    out.push("<|im_start|>assistant\n");
                    if !enable_thinking {
                        out.push("<think>\n\n</think>\n\n");
                    }
                }
            }
        }
        RenderedChat {
            text: out.text,
            spans: out.spans,
        }
    }

    /// The text that ends an assistant turn (its token is trained on).
    pub fn end_of_turn(&self) -> &'static str {
        match self {
            ChatTemplate::ChatMl { .. } | ChatTemplate::Qwen3 { .. } => "<|im_end|>",
            ChatTemplate::Llama3 { .. } | ChatTemplate::Llama31 { .. } => "<|eot_id|>",
        }
    }
}

/// The text being rendered and the span of every message so far.
#[derive(Default)]
struct Out {
    text: String,
    spans: Vec<Range<usize>>,
    open: usize,
}

impl Out {
    fn push(&mut self, s: &str) {
        self.text.push_str(s);
    }

    /// Starts the span of the next message here.
    fn open(&mut self) {
        self.open = self.text.len();
    }

    /// Ends the span opened last here.
    fn close(&mut self) {
        self.spans.push(self.open..self.text.len());
    }

    /// `<|im_start|>role\ncontent<|im_end|>\n`.
    fn chatml_turn(&mut self, role: &str, content: &str) {
        self.push("<|im_start|>");
        self.push(role);
        self.push("\n");
        self.open();
        self.push(content);
        self.push("<|im_end|>");
        self.close();
        self.push("\n");
    }

    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`.
    fn llama_turn(&mut self, role: &str, content: &str) {
        self.push("<|start_header_id|>");
        self.push(role);
        self.push("<|end_header_id|>\n\n");
        self.open();
        self.push(content);
        self.push("<|eot_id|>");
        self.close();
    }

    /// Qwen's tool result: a run of consecutive tool messages is one user turn of
    /// `\n<tool_response>\n…\n</tool_response>` blocks.
    fn tool_response(&mut self, messages: &[Message], i: usize) {
        if i == 0 || messages[i - 1].role != Role::Tool {
            self.push("<|im_start|>user");
        }
        self.push("\n<tool_response>\n");
        self.open();
        self.push(&messages[i].content);
        self.push("\n</tool_response>");
        let ends_turn = messages.get(i + 1).is_none_or(|n| n.role != Role::Tool);
        if ends_turn {
            self.push("<|im_end|>");
        }
        self.close();
        if ends_turn {
            self.push("\n");
        }
    }
}

/// Python's `str.isspace`, which Jinja's `trim` (`str.strip()`) uses: Unicode White_Space
/// plus the ASCII information separators U+001C..U+001F.
fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Jinja's `| trim`.
fn py_trim(s: &str) -> &str {
    s.trim_matches(py_is_space)
}

/// Jinja's `| tojson` of a string as HF defines it (`json.dumps(x, ensure_ascii=False)`).
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Qwen3's `ns.last_query_index`: the last user message that is not a tool response written
/// as a user turn, or the last message when there is none.
fn qwen3_last_query_index(messages: &[Message]) -> usize {
    messages
        .iter()
        .rposition(|m| {
            m.role == Role::User
                && !(m.content.starts_with("<tool_response>") && m.content.ends_with("</tool_response>"))
        })
        .unwrap_or(messages.len().saturating_sub(1))
}

/// Qwen3's split of an assistant message into (reasoning, content): with a `</think>`, the
/// reasoning is what precedes the first `</think>` (after its last `<think>`, newlines
/// trimmed) and the content what follows the last one (leading newlines dropped).
fn split_reasoning(content: &str) -> (&str, &str) {
    let Some(first_end) = content.find("</think>") else {
        return ("", content);
    };
    let last_end = content.rfind("</think>").unwrap_or(first_end);
    let after = content[last_end + "</think>".len()..].trim_start_matches('\n');
    let before = content[..first_end].trim_end_matches('\n');
    let reasoning = match before.rfind("<think>") {
        Some(i) => &before[i + "<think>".len()..],
        None => before,
    };
    (reasoning.trim_start_matches('\n'), after)
}

/// The `Today Date` a Llama 3.1+ template writes: its `date_string` literal, or today's date
/// (UTC) for the templates that call `strftime_now` (Llama 3.2, 3.3) as HF does.
fn template_date(tpl: &str) -> String {
    if tpl.contains("strftime_now") {
        return today_utc();
    }
    let key = "date_string = \"";
    if let Some(i) = tpl.find(key) {
        let rest = &tpl[i + key.len()..];
        if let Some(end) = rest.find('"') {
            return rest[..end].to_string();
        }
    }
    LLAMA31_DEFAULT_DATE.to_string()
}

/// Today as `strftime("%d %b %Y")`, e.g. "05 Mar 2025".
fn today_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!("{d:02} {} {y}", MONTHS[(m - 1) as usize])
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The system prompt a ChatML template inserts when none is given, when it is a literal:
/// the body of the first `<|im_start|>system\n…<|im_end|>` in the source with no Jinja
/// expression in it. The newline may be written raw or as a `\n` escape of a Jinja string.
fn literal_default_system(tpl: &str) -> Option<String> {
    let open = "<|im_start|>system";
    let mut rest = tpl;
    while let Some(i) = rest.find(open) {
        let after = &rest[i + open.len()..];
        let body = after
            .strip_prefix('\n')
            .map(|b| (b, false))
            .or_else(|| after.strip_prefix("\\n").map(|b| (b, true)));
        if let Some((body, escaped)) = body {
            if let Some(end) = body.find("<|im_end|>") {
                let body = &body[..end];
                if !body.is_empty() && !body.contains(['\'', '"', '{', '}', '+']) {
                    return Some(if escaped {
                        unescape_jinja(body)
                    } else {
                        body.to_string()
                    });
                }
            }
        }
        rest = after;
    }
    None
}

/// The common escapes of a Jinja string literal.
fn unescape_jinja(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_whitespace_and_json_quoting() {
        assert_eq!(py_trim("\u{1f} \t\n x y \u{a0}\u{3000}\u{1c}"), "x y");
        assert_eq!(py_trim("\u{200b}x"), "\u{200b}x", "zero-width space is not whitespace");
        assert_eq!(json_string("a\"b\\c\nd\u{1}é🙂"), "\"a\\\"b\\\\c\\nd\\u0001é🙂\"");
    }

    #[test]
    fn qwen3_reasoning_split_follows_the_template() {
        assert_eq!(split_reasoning("plain"), ("", "plain"));
        assert_eq!(split_reasoning("<think>\n\nr\n\n</think>\n\nc"), ("r", "c"));
        assert_eq!(split_reasoning("a<think>b</think>c</think>\nd"), ("b", "d"));
        assert_eq!(split_reasoning("no open</think>x"), ("no open", "x"));
    }

    #[test]
    fn dates_and_default_systems_come_from_the_source() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_930), (2024, 7, 26));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        let t = ChatTemplate::from_template_source(
            "{%- set date_string = \"26 Jul 2024\" %}<|start_header_id|>Cutting Knowledge Date",
            None,
        );
        assert_eq!(
            t,
            Some(ChatTemplate::Llama31 {
                bos: LLAMA3_BOS.into(),
                date: "26 Jul 2024".into()
            })
        );
        let qwen25 = "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}<tool_response>";
        assert_eq!(
            ChatTemplate::from_template_source(qwen25, None),
            Some(ChatTemplate::ChatMl {
                default_system: Some("You are Qwen.".into()),
                tool_responses: true
            })
        );
        // a reasoning ChatML template that is not Qwen3's is not guessed at
        assert_eq!(
            ChatTemplate::from_template_source("<|im_start|>assistant\n<think>\n", None),
            None
        );
    }
}
