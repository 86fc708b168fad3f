//! `forge regenerate`, the library part: answer every user turn of a conversation set with the
//! target itself (the command, forge/src/cli/regenerate.rs, reads its flags, loads the target
//! and draws the progress).
//!
//! Drafters learn best from the target's own distribution. Regeneration keeps the system and
//! user turns of each input conversation, drops its assistant turns and lets the target
//! answer every user turn in order (turn k sees the target's own earlier answers), rendered
//! with the target's chat template and stopped at its end-of-turn token. Conversations are
//! decoded in batches (turn k of every conversation in the batch together) and written as
//! ShareGPT JSONL; a run that finds its output file continues it, skipping ids already there.
//!
//! Input: any prompt file [`forge_data::conversation::read_prompts`] reads (ShareGPT,
//! OpenAI messages, `{"prompt"}` records, MT-Bench questions; JSONL or a JSON array).

use crate::error::{Result, TrainerError};
use forge_data::conversation::PromptConversation;
use forge_data::{ChatTemplate, Message, Role, TextTokenizer};
use forge_models::generate::{generate_batch_seeded, GenerateOptions};
use forge_models::{DType, TargetModel};
use serde_json::Value;
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// What an existing output file holds.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// The ids already answered.
    pub ids: HashSet<String>,
    /// The line of an incomplete last record (an interrupted write) that was cut off.
    pub dropped_incomplete_line: Option<usize>,
}

fn id_of(v: &Value) -> Option<String> {
    match v.get("id")? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The ids already in an output file. A last line cut off by an interrupted run is removed
/// (it is regenerated, and reported); any other unreadable line is an error.
pub fn resume(out: &Path) -> Result<Resume> {
    let mut r = Resume::default();
    if !out.exists() {
        return Ok(r);
    }
    let io = |source| TrainerError::Io {
        path: out.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(out).map_err(io)?;
    let mut offset = 0usize;
    let n_lines = text.lines().count();
    for (i, line) in text.lines().enumerate() {
        let start = offset;
        offset += line.len() + 1;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line).ok().and_then(|v| id_of(&v)) {
            Some(id) => {
                r.ids.insert(id);
            }
            None if i + 1 == n_lines && !text.ends_with('\n') => {
                let f = std::fs::OpenOptions::new().write(true).open(out).map_err(io)?;
                f.set_len(start as u64).map_err(io)?;
                r.dropped_incomplete_line = Some(i + 1);
            }
            None => {
                return Err(TrainerError::Record {
                    path: out.to_path_buf(),
                    line: i + 1,
                    message:
                        "not a ShareGPT record with an \"id\" (is --out the right file? forge regenerate appends to it)"
                            .into(),
                })
            }
        }
    }
    Ok(r)
}

/// Opens an output file for appending (its folder created), starting a new line when its last
/// one is unterminated.
pub fn open_output(out: &Path) -> Result<std::fs::File> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainerError::Io { path, source }
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let needs_newline = out.exists()
        && std::fs::read(out)
            .map(|b| !b.is_empty() && !b.ends_with(b"\n"))
            .unwrap_or(false);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .map_err(io(out))?;
    if needs_newline {
        writeln!(file).map_err(io(out))?;
    }
    Ok(file)
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
    pub fn run_batch(&self, convs: &[&PromptConversation], mut on_token: impl FnMut()) -> Result<Vec<Regenerated>> {
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

/// Totals of a regeneration run.
#[derive(Debug, Clone, Default)]
pub struct RegenerateReport {
    /// Conversations written.
    pub written: usize,
    pub answers: usize,
    /// Tokens generated (stop tokens included).
    pub tokens: usize,
    /// Answers that ended at max_new_tokens, and empty answers.
    pub hit_max: usize,
    pub empty: usize,
    pub seconds: f64,
}

/// What [`Regenerator::run_all`] reports as it goes.
pub trait RegenerateProgress {
    /// A token was generated; `tokens` so far in this run.
    fn token(&mut self, _tokens: usize, _seconds: f64) {}
    /// A batch of `conversations` was written; the totals so far.
    fn batch(&mut self, _conversations: usize, _so_far: &RegenerateReport) {}
}

impl Regenerator<'_> {
    /// Regenerates `pending` in batches of `batch_size`, appending each finished batch as
    /// ShareGPT JSONL to `out` (`out_path` names it in errors) and flushing it.
    pub fn run_all(
        &self,
        pending: &[&PromptConversation],
        batch_size: usize,
        out: &mut dyn Write,
        out_path: &Path,
        progress: &mut dyn RegenerateProgress,
    ) -> Result<RegenerateReport> {
        let t0 = Instant::now();
        let io = |source| TrainerError::Io {
            path: out_path.to_path_buf(),
            source,
        };
        let mut r = RegenerateReport::default();
        for batch in pending.chunks(batch_size.max(1)) {
            let mut live = r.tokens;
            let results = self.run_batch(batch, || {
                live += 1;
                progress.token(live, t0.elapsed().as_secs_f64());
            })?;
            for g in &results {
                let line = g.to_jsonl().map_err(|e| io(std::io::Error::other(e)))?;
                writeln!(out, "{line}").map_err(io)?;
                r.tokens += g.new_tokens;
                r.answers += g.answers.len();
                r.hit_max += g.hit_max;
                r.empty += g.empty;
                r.written += 1;
            }
            out.flush().map_err(io)?;
            r.seconds = t0.elapsed().as_secs_f64();
            progress.batch(batch.len(), &r);
        }
        r.seconds = t0.elapsed().as_secs_f64();
        Ok(r)
    }
}

/// `--dtype`: auto (bf16 on CUDA, fp32 on CPU) or a named dtype.
pub fn resolve_dtype(name: &str, device: tch::Device) -> Result<DType> {
    if name == "auto" {
        return Ok(if device.is_cuda() { DType::BF16 } else { DType::F32 });
    }
    DType::parse(name).ok_or_else(|| TrainerError::Flag {
        flag: format!("--dtype '{name}'"),
        message: format!("is not one of auto, {}", DType::NAMES.join(", ")),
    })
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
        None => {
            return Err(TrainerError::Flag {
                flag: format!("--chat-template {template_flag}"),
                message: format!(
                    "the target's tokenizer has no token for the chat template's end of turn {:?} (pick the template the target was trained with)",
                    template.end_of_turn()
                ),
            })
        }
    }
    Ok(stop_ids)
}
