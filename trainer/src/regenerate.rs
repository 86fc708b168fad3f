//! `forge regenerate`: answer every user turn of a conversation set with the target itself.
//!
//! Drafters learn best from the target's own distribution. This command keeps the system and
//! user turns of each input conversation, drops its assistant turns and lets the target
//! answer every user turn in order (turn k sees the target's own earlier answers), rendered
//! with the target's chat template and stopped at its end-of-turn token. Conversations are
//! decoded in batches (turn k of every conversation in the batch together) and written as
//! ShareGPT JSONL; a run that finds its output file continues it, skipping ids already there.
//!
//! Input: JSONL (or one JSON array) of any of
//! - ShareGPT `{"id"?, "system"?, "conversations": [{"from": "human"|"gpt"|"system", "value"}]}`,
//! - `{"id"?, "conversations"|"messages": [{"role": "user"|"assistant"|"system", "content"}]}`,
//! - prompts `{"id"?, "system"?, "prompt": "..."}`,
//! - MT-Bench questions `{"question_id", "turns": ["...", "..."]}`.

use anyhow::{anyhow, bail, Context, Result};
use forge_data::{ChatTemplate, Message, Role, TextTokenizer};
use forge_models::generate::{generate_batch_seeded, GenerateOptions};
use forge_models::{parse_device, DType, TargetModel};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of `forge regenerate`.
#[derive(clap::Args, Debug, Clone)]
pub struct RegenerateArgs {
    /// Hugging Face model folder of the target (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub target: PathBuf,
    /// Input conversations or prompts (JSONL, or a JSON array).
    #[arg(long = "in", value_name = "FILE")]
    pub input: PathBuf,
    /// Output ShareGPT JSONL; if it exists, conversations whose ids it holds are skipped and
    /// the rest appended (an interrupted run continues).
    #[arg(long, value_name = "OUT.jsonl")]
    pub out: PathBuf,
    /// Conversations decoded together.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Most tokens per answer (answers that reach it are kept, and counted in the summary).
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// 0 = greedy; > 0 samples from softmax(logits / T).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Nucleus sampling threshold (with --temperature > 0).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f64,
    /// Sampling seed (each conversation turn draws from its own stream: seed, id, turn).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Only the first N input conversations.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub chat: ChatArgs,
}

/// How a target is run on chat prompts: the flags `forge regenerate` and `forge eval` share.
#[derive(clap::Args, Debug, Clone)]
pub struct ChatArgs {
    /// System message for conversations that have none (default: the template's own, if any).
    #[arg(long)]
    pub system: Option<String>,
    /// Chat template: auto (from the target's tokenizer_config.json), chatml, llama3, llama3.1, qwen3.
    #[arg(long, default_value = "auto")]
    pub chat_template: String,
    /// Weight format of the target: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Progress bar on stderr: auto (when stderr is a terminal), always, never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub progress: String,
}

/// One input conversation, reduced to what regeneration keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputConversation {
    pub id: String,
    /// 1-based line of the record in the input (its array element's line for JSON arrays).
    pub line: usize,
    /// System and user messages in order; an answer is generated after every user message.
    pub messages: Vec<Message>,
    /// MT-Bench `category`, when the record has one.
    pub category: Option<String>,
}

impl InputConversation {
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

fn role_of(name: &str) -> Option<Role> {
    match name {
        "human" | "user" => Some(Role::User),
        "gpt" | "assistant" | "chatgpt" | "bard" | "bing" | "model" => Some(Role::Assistant),
        "system" => Some(Role::System),
        _ => None,
    }
}

fn text_of(v: &Value, what: &str) -> std::result::Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        // OpenAI-style content parts: [{"type": "text", "text": "..."}]
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                (Some("text") | None, Some(Value::String(t))) => Ok(t.as_str()),
                _ => Err(format!("{what}: only text content parts are supported")),
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(|v| v.concat()),
        Value::Null => Err(format!("{what} is missing")),
        other => Err(format!("{what} must be a string, got {other}")),
    }
}

fn id_of(v: Option<&Value>) -> std::result::Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(format!("id must be a non-empty string or a number, got {other}")),
    }
}

/// One record -> (id if given, system + user messages).
fn parse_record(v: &Value) -> std::result::Result<(Option<String>, Vec<Message>), String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, got {}", short(v)))?;
    let id = match obj.get("id") {
        Some(x) => id_of(Some(x))?,
        None => id_of(obj.get("question_id"))?,
    };
    let mut messages = Vec::new();
    if let Some(sys) = obj.get("system") {
        let sys = text_of(sys, "\"system\"")?;
        if !sys.is_empty() {
            messages.push(Message::new(Role::System, sys));
        }
    }
    let list = obj
        .get("conversations")
        .map(|l| ("conversations", l))
        .or_else(|| obj.get("messages").map(|l| ("messages", l)));
    if let Some((key, list)) = list {
        let list = list
            .as_array()
            .ok_or_else(|| format!("\"{key}\" must be an array of turns"))?;
        for (i, turn) in list.iter().enumerate() {
            let (role_key, text_key) = if turn.get("from").is_some() {
                ("from", "value")
            } else {
                ("role", "content")
            };
            let role_name = turn
                .get(role_key)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{key}[{i}]: expected {{\"from\", \"value\"}} or {{\"role\", \"content\"}}"))?;
            let role = role_of(role_name).ok_or_else(|| {
                format!("{key}[{i}]: role '{role_name}' is not supported (regenerate keeps system and user turns and answers the user turns)")
            })?;
            let text = text_of(
                turn.get(text_key).unwrap_or(&Value::Null),
                &format!("{key}[{i}].{text_key}"),
            )?;
            if role != Role::Assistant {
                messages.push(Message::new(role, text));
            }
        }
    } else if let Some(turns) = obj.get("turns") {
        let turns = turns.as_array().ok_or("\"turns\" must be an array of strings")?;
        for (i, t) in turns.iter().enumerate() {
            messages.push(Message::new(Role::User, text_of(t, &format!("turns[{i}]"))?));
        }
    } else if let Some(p) = obj.get("prompt") {
        messages.push(Message::new(Role::User, text_of(p, "\"prompt\"")?));
    } else {
        return Err("expected \"conversations\", \"messages\", \"turns\" (MT-Bench) or \"prompt\"".into());
    }
    if !messages.iter().any(|m| m.role == Role::User) {
        return Err("no user turn to answer".into());
    }
    if let Some(i) = messages
        .iter()
        .position(|m| m.role == Role::User && m.content.trim().is_empty())
    {
        let n = messages[..i].iter().filter(|m| m.role == Role::User).count();
        return Err(format!("user turn {} is empty", n + 1));
    }
    Ok((id, messages))
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

/// The 1-based line of every element start of a top-level JSON array (by a light scan).
fn array_element_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    let (mut depth, mut line) = (0i32, 1usize);
    let (mut in_str, mut esc, mut expect) = (false, false, false);
    for c in text.chars() {
        if c == '\n' {
            line += 1;
        }
        if in_str {
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                in_str = false;
            }
            continue;
        }
        if expect && !c.is_whitespace() && !(depth == 1 && c == ']') {
            lines.push(line);
            expect = false;
        }
        match c {
            '"' => in_str = true,
            '[' | '{' => {
                depth += 1;
                if depth == 1 {
                    expect = true;
                }
            }
            ']' | '}' => depth -= 1,
            ',' if depth == 1 => expect = true,
            _ => {}
        }
    }
    lines
}

/// Parses input text (JSONL, or a JSON array); errors name `path:line`.
pub fn parse_input(text: &str, path: &Path) -> Result<Vec<InputConversation>> {
    let p = path.display();
    let mut records: Vec<(usize, Value)> = Vec::new();
    if text.trim_start().starts_with('[') {
        let values: Vec<Value> =
            serde_json::from_str(text).map_err(|e| anyhow!("{p}:{}: not a valid JSON array: {e}", e.line()))?;
        let lines = array_element_lines(text);
        for (i, v) in values.into_iter().enumerate() {
            records.push((lines.get(i).copied().unwrap_or(1), v));
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| anyhow!("{p}:{}: not valid JSON: {e}", i + 1))?;
            records.push((i + 1, v));
        }
    }
    let mut out = Vec::with_capacity(records.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (index, (line, v)) in records.into_iter().enumerate() {
        let (id, messages) = parse_record(&v).map_err(|e| anyhow!("{p}:{line}: {e}"))?;
        let category = match v.get("category") {
            None | Some(Value::Null) => None,
            Some(Value::String(c)) => Some(c.clone()),
            Some(other) => bail!("{p}:{line}: \"category\" must be a string, got {}", short(other)),
        };
        let id = id.unwrap_or_else(|| format!("regen-{index}"));
        if let Some(first) = seen.insert(id.clone(), line) {
            bail!("{p}:{line}: id '{id}' is already used on line {first} (ids must be unique: the output is resumed by id)");
        }
        out.push(InputConversation {
            id,
            line,
            messages,
            category,
        });
    }
    Ok(out)
}

/// Reads an input file (see [`parse_input`]).
pub fn read_input(path: &Path) -> Result<Vec<InputConversation>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--in {}: cannot read", path.display()))?;
    parse_input(&text, path)
}

/// The ids already in an output file. A last line cut off by an interrupted run is removed
/// (it is regenerated); any other unreadable line is an error.
pub fn done_ids(out: &Path) -> Result<HashSet<String>> {
    let mut ids = HashSet::new();
    if !out.exists() {
        return Ok(ids);
    }
    let text = std::fs::read_to_string(out).with_context(|| format!("--out {}: cannot read", out.display()))?;
    let mut offset = 0usize;
    let n_lines = text.lines().count();
    for (i, line) in text.lines().enumerate() {
        let start = offset;
        offset += line.len() + 1;
        if line.trim().is_empty() {
            continue;
        }
        let id = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| id_of(v.get("id")).ok().flatten());
        match id {
            Some(id) => {
                ids.insert(id);
            }
            None if i + 1 == n_lines && !text.ends_with('\n') => {
                eprintln!(
                    "forge regenerate: {}:{}: dropping an incomplete last record (an interrupted write)",
                    out.display(),
                    i + 1
                );
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(out)
                    .with_context(|| format!("--out {}: cannot open", out.display()))?;
                f.set_len(start as u64)
                    .with_context(|| format!("--out {}: cannot truncate", out.display()))?;
            }
            None => bail!(
                "--out {}:{}: not a ShareGPT record with an \"id\" (is --out the right file? forge regenerate appends to it)",
                out.display(),
                i + 1
            ),
        }
    }
    Ok(ids)
}

/// A stable per-(seed, conversation, turn) sampling seed, independent of batching and resume.
pub fn turn_seed(seed: u64, id: &str, turn: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (turn as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// What regeneration needs besides the conversations.
pub struct Regenerator<'a> {
    pub model: &'a TargetModel,
    pub tokenizer: &'a TextTokenizer,
    pub template: &'a ChatTemplate,
    pub system: Option<String>,
    pub opts: GenerateOptions,
}

/// One regenerated conversation.
#[derive(Debug, Clone)]
pub struct Regenerated {
    pub id: String,
    /// The full conversation: input system/user turns with the target's answers.
    pub messages: Vec<Message>,
    pub answers: Vec<String>,
    pub new_tokens: usize,
    /// Answers that ended at max_new_tokens rather than at a stop token.
    pub hit_max: usize,
    pub empty: usize,
}

impl Regenerated {
    /// ShareGPT record `{"id", "conversations": [{"from", "value"}]}`.
    pub fn to_sharegpt(&self) -> Value {
        serde_json::to_value(self.record()).unwrap_or(Value::Null)
    }

    /// The ShareGPT JSONL line (fields in the usual order: id, conversations).
    pub fn to_jsonl(&self) -> serde_json::Result<String> {
        serde_json::to_string(&self.record())
    }

    fn record(&self) -> ShareGptRecord<'_> {
        ShareGptRecord {
            id: &self.id,
            conversations: self
                .messages
                .iter()
                .map(|m| ShareGptTurn {
                    from: match m.role {
                        Role::System => "system",
                        Role::User => "human",
                        Role::Assistant => "gpt",
                        Role::Tool => "tool",
                    },
                    value: &m.content,
                })
                .collect(),
        }
    }
}

#[derive(serde::Serialize)]
struct ShareGptRecord<'a> {
    id: &'a str,
    conversations: Vec<ShareGptTurn<'a>>,
}

#[derive(serde::Serialize)]
struct ShareGptTurn<'a> {
    from: &'static str,
    value: &'a str,
}

impl Regenerator<'_> {
    /// Regenerates a batch of conversations: turn k of every conversation that has one is
    /// decoded in one batch. `on_token` is called for each new token.
    pub fn run_batch(&self, convs: &[&InputConversation], mut on_token: impl FnMut()) -> Result<Vec<Regenerated>> {
        let mut answers: Vec<Vec<String>> = vec![Vec::new(); convs.len()];
        let mut new_tokens = vec![0usize; convs.len()];
        let mut hit_max = vec![0usize; convs.len()];
        let mut empty = vec![0usize; convs.len()];
        let turns = convs.iter().map(|c| c.user_turns()).max().unwrap_or(0);
        let stop = &self.opts.stop_ids;
        for k in 0..turns {
            let rows: Vec<usize> = (0..convs.len()).filter(|&i| convs[i].user_turns() > k).collect();
            let mut prompts = Vec::with_capacity(rows.len());
            let mut seeds = Vec::with_capacity(rows.len());
            for &i in &rows {
                let msgs = convs[i].context(k, &answers[i], self.system.as_deref());
                let text = self.template.render(&msgs, true);
                prompts.push(self.tokenizer.encode(&text)?);
                seeds.push(turn_seed(self.opts.seed, &convs[i].id, k));
            }
            let gens = generate_batch_seeded(self.model, &prompts, &seeds, &self.opts, |_, _| on_token())?;
            for (&i, g) in rows.iter().zip(gens) {
                new_tokens[i] += g.tokens.len();
                if !g.stopped {
                    hit_max[i] += 1;
                }
                let content: Vec<i64> = g.tokens.iter().copied().filter(|id| !stop.contains(id)).collect();
                let text = self.tokenizer.decode(&content, true)?;
                if text.trim().is_empty() {
                    empty[i] += 1;
                }
                answers[i].push(text);
            }
        }
        Ok(convs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let n = c.user_turns();
                let mut messages = c.context(n.saturating_sub(1), &answers[i], self.system.as_deref());
                if let Some(last) = answers[i].last() {
                    messages.push(Message::new(Role::Assistant, last.clone()));
                }
                Regenerated {
                    id: c.id.clone(),
                    messages,
                    answers: std::mem::take(&mut answers[i]),
                    new_tokens: new_tokens[i],
                    hit_max: hit_max[i],
                    empty: empty[i],
                }
            })
            .collect())
    }
}

/// `--dtype`: auto (bf16 on CUDA, fp32 on CPU) or a named dtype.
pub fn resolve_dtype(name: &str, device: tch::Device) -> Result<DType> {
    if name == "auto" {
        return Ok(if device.is_cuda() { DType::BF16 } else { DType::F32 });
    }
    DType::parse(name).with_context(|| format!("--dtype '{name}' is not one of auto, {}", DType::NAMES.join(", ")))
}

/// The ids an answer ends at: the target's eos ids and the chat template's end-of-turn token
/// (`template_flag` is the --chat-template value, for the error message).
pub fn stop_ids(
    model: &TargetModel,
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    template_flag: &str,
) -> Result<Vec<i64>> {
    let mut stop_ids = model.config.eos_token_ids.clone();
    match tokenizer.token_id(template.end_of_turn()) {
        Some(id) => stop_ids.push(id),
        None => bail!(
            "the target's tokenizer has no token for the chat template's end of turn {:?} (--chat-template {template_flag})",
            template.end_of_turn(),
        ),
    }
    Ok(stop_ids)
}

/// `--progress auto|always|never`: whether to draw a progress bar.
pub fn show_progress(flag: &str) -> bool {
    match flag {
        "always" => true,
        "never" => false,
        _ => std::io::stderr().is_terminal(),
    }
}

fn check_args(a: &RegenerateArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be >= 0 (0 = greedy), got {}", a.temperature);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    if a.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if a.input == a.out
        || (a.out.exists() && std::fs::canonicalize(&a.input).ok() == std::fs::canonicalize(&a.out).ok())
    {
        bail!("--out must not be the --in file ({})", a.input.display());
    }
    Ok(())
}

/// `forge regenerate`.
pub fn run(a: RegenerateArgs) -> Result<()> {
    check_args(&a)?;
    let mut convs = read_input(&a.input)?;
    let total_input = convs.len();
    if let Some(n) = a.limit {
        convs.truncate(n);
    }
    let done = done_ids(&a.out)?;
    let pending: Vec<&InputConversation> = convs.iter().filter(|c| !done.contains(&c.id)).collect();
    let skipped = convs.len() - pending.len();
    if pending.is_empty() {
        eprintln!(
            "forge regenerate: nothing to do: all {} conversations are already in {}",
            convs.len(),
            a.out.display()
        );
        return Ok(());
    }

    let device = parse_device(&a.chat.device).context("--device")?;
    let dtype = resolve_dtype(&a.chat.dtype, device)?;
    let tokenizer = TextTokenizer::from_dir(&a.target)?;
    let template = ChatTemplate::from_name(&a.chat.chat_template, &a.target)
        .with_context(|| format!("--chat-template {}", a.chat.chat_template))?;
    let t_load = Instant::now();
    let model = TargetModel::load(&a.target, dtype, device)
        .with_context(|| format!("loading target {}", a.target.display()))?;
    let load_s = t_load.elapsed().as_secs_f64();
    let stop_ids = stop_ids(&model, &tokenizer, &template, &a.chat.chat_template)?;
    let regen = Regenerator {
        model: &model,
        tokenizer: &tokenizer,
        template: &template,
        system: a.chat.system.clone(),
        opts: GenerateOptions {
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
            stop_ids,
        },
    };

    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("--out: cannot create {}", dir.display()))?;
    }
    let needs_newline = a.out.exists()
        && std::fs::read(&a.out)
            .map(|b| !b.is_empty() && !b.ends_with(b"\n"))
            .unwrap_or(false);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.out)
        .with_context(|| format!("--out {}: cannot open for appending", a.out.display()))?;
    if needs_newline {
        writeln!(file)?;
    }

    let show = show_progress(&a.chat.progress);
    let pb = crate::data::styled_bar(
        pending.len() as u64,
        "regenerate [{bar:30}] {pos}/{len} conversations {msg} eta {eta}",
        show,
    );
    eprintln!(
        "forge regenerate: {} conversations to answer ({} in {}, {} already in {}), batch {}, {} on {:?} ({}), load {:.1}s",
        pending.len(),
        total_input,
        a.input.display(),
        skipped,
        a.out.display(),
        a.batch_size,
        a.target.display(),
        device,
        dtype.name(),
        load_s
    );

    let t0 = Instant::now();
    let (mut tokens, mut turns, mut hit_max, mut empty, mut written) = (0usize, 0, 0, 0, 0);
    for batch in pending.chunks(a.batch_size) {
        let mut live_tokens = tokens;
        let results = regen.run_batch(batch, || {
            live_tokens += 1;
            if show && live_tokens % 8 == 0 {
                let s = t0.elapsed().as_secs_f64();
                pb.set_message(format!(
                    "{live_tokens} tokens {:.1} tokens/s",
                    live_tokens as f64 / s.max(1e-9)
                ));
            }
        })?;
        for r in &results {
            let line = r.to_jsonl()?;
            writeln!(file, "{line}").with_context(|| format!("--out {}: write failed", a.out.display()))?;
            tokens += r.new_tokens;
            turns += r.answers.len();
            hit_max += r.hit_max;
            empty += r.empty;
            written += 1;
        }
        file.flush()?;
        pb.inc(batch.len() as u64);
        if !show {
            let s = t0.elapsed().as_secs_f64();
            eprintln!(
                "forge regenerate: {written}/{} conversations, {tokens} tokens, {:.1} tokens/s",
                pending.len(),
                tokens as f64 / s.max(1e-9)
            );
        }
    }
    pb.finish_and_clear();
    let s = t0.elapsed().as_secs_f64();
    eprintln!(
        "forge regenerate: done: {written} conversations ({skipped} skipped, already in {}), {turns} answers, {tokens} generated tokens in {s:.1}s ({:.1} tokens/s), {hit_max} answers hit --max-new-tokens {}, {empty} empty; wrote {}",
        a.out.display(),
        tokens as f64 / s.max(1e-9),
        a.max_new_tokens,
        a.out.display()
    );
    Ok(())
}
