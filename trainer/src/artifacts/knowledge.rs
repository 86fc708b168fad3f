//! The knowledge drafter's artifact: its cache from a question file
//! (docs/methods/knowledge.md), for `forge build-knowledge` and for `forge train`, which
//! builds a missing cache itself (through [`super::prepare`], this file's [`ARTIFACTS`] line
//! in its table).
//!
//! - Answers: by default the target answers every question itself (greedy, at most
//!   `max_answer_tokens` tokens per answer, rendered with its chat template and stopped at its
//!   end of turn: [`crate::regenerate::Regenerator`], what `forge regenerate` runs), so the
//!   cache holds the target's states over its own text; [`AnswerSource::Data`] keeps the file's
//!   answers instead (the caller warns).
//! - Disjointness: the cache's questions (each conversation's first user turn, by
//!   [`question_key`]) must not be training conversations' ([`check_disjoint`]): the draft
//!   would otherwise learn to look up the answers it is trained on.
//! - A recipe with `knowledge_data` but no `knowledge_cache` finds its cache under
//!   `data.cache_dir`, named by a key over the data's bytes, the target's fingerprint and every
//!   option that changes the states ([`cache_key`]): a second run reuses it, any change builds
//!   another. [`prepare_cache`] builds a missing cache on rank 0 while the other ranks wait.

use super::{Artifacts, Prepared};
use crate::error::{Result, TrainerError};
use crate::parallel::Comm;
use crate::recipe::{DrafterSection, Recipe};
use crate::regenerate::{stop_ids, Regenerator};
use crate::target::{self, target_placement};
use forge_data::conversation::{parse_conversations, parse_prompts, Conversation};
use forge_data::dataset::{tokenize_conversation, Sample};
use forge_data::hash::{data_hash, target_fingerprint, ContentHash};
use forge_data::{ChatTemplate, Message, Role, TextTokenizer, TokenizeOptions};
use forge_models::drafters::knowledge::{AnswerSource, KnowledgeSection};
use forge_models::drafters::knowledge_cache::{
    build_cache as build_states, question_key, CacheOptions, CacheSource, KnowledgeCache, CACHE_FORMAT,
};
use forge_models::generate::GenerateOptions;
use forge_models::TargetModel;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How a cache is built from a question file.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The question file (ShareGPT, messages or prompt records; with [`AnswerSource::Data`]
    /// conversations with answers).
    pub data: PathBuf,
    /// Conversations taken from the start of the file.
    pub entries: usize,
    pub answers: AnswerSource,
    /// The most tokens the target generates per answer, and the answer tokens stored per entry.
    pub max_answer_tokens: usize,
    /// Longest tokenised conversation read (longer ones are cut).
    pub max_length: usize,
    /// Width of the stored states (`None`: the hidden size, no projection).
    pub cache_dim: Option<i64>,
    /// Target layers stored (`None`: every layer).
    pub layers: Option<Vec<i64>>,
    /// Questions answered together.
    pub batch_size: usize,
}

/// A built cache and what building it did.
pub struct Built {
    pub cache: KnowledgeCache,
    /// Answers the target generated (0 with the data's answers), those that reached
    /// `max_answer_tokens` before the end of turn, and the tokens generated.
    pub generated: usize,
    pub hit_max: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
}

/// The first user turn of a conversation (its question), if it has one.
pub fn first_user_turn(messages: &[Message]) -> Option<&str> {
    messages
        .iter()
        .find(|m| m.role == Role::User)
        .map(|m| m.content.as_str())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| TrainerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The questions (first user turns) of the first `entries` conversations a cache over `data`
/// takes, with their ids: every record for the target's answers, records with an answer for
/// the data's.
pub fn cache_questions(data: &Path, entries: usize, answers: AnswerSource) -> Result<Vec<(String, String)>> {
    let text = read(data)?;
    let all: Vec<(String, String)> = match answers {
        AnswerSource::Target => parse_prompts(&text, data)?
            .into_iter()
            .filter_map(|c| first_user_turn(&c.messages).map(|q| (c.id.clone(), q.to_string())))
            .collect(),
        AnswerSource::Data => parse_conversations(&text, data, false)?
            .conversations
            .into_iter()
            .filter(|c| c.trainable.contains(&true))
            .filter_map(|c| first_user_turn(&c.messages).map(|q| (c.id.clone(), q.to_string())))
            .collect(),
    };
    Ok(all.into_iter().take(entries).collect())
}

/// Builds a cache: the first `o.entries` conversations of `o.data`, answered by the target
/// (or with the file's answers), through the target's layers. `progress(what, done, total)`
/// hears of the answers ("answering") and the states ("states").
pub fn build(
    model: &TargetModel,
    target_dir: &Path,
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
    stop: Vec<i64>,
    o: &BuildOptions,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Built> {
    let t0 = Instant::now();
    let shown = o.data.display();
    if o.entries == 0 || o.max_answer_tokens == 0 {
        return Err(TrainerError::Config(
            "a knowledge cache needs at least 1 entry and 1 answer token".into(),
        ));
    }
    let text = read(&o.data)?;
    let tokenize = TokenizeOptions {
        max_length: o.max_length,
        train_only_last_turn: false,
        skip_invalid: false,
    };
    let mut samples: Vec<Sample> = Vec::new();
    let mut questions = Vec::new();
    let (mut generated, mut hit_max, mut generated_tokens) = (0, 0, 0);
    match o.answers {
        AnswerSource::Target => {
            let convs = parse_prompts(&text, &o.data)?;
            if convs.len() < o.entries {
                return Err(TrainerError::Config(format!(
                    "{shown} has {} questions, the knowledge cache takes {}: take fewer entries or a larger file",
                    convs.len(),
                    o.entries
                )));
            }
            let take: Vec<_> = convs.iter().take(o.entries).collect();
            let regen = Regenerator {
                model,
                tokenizer,
                template,
                system: None,
                opts: GenerateOptions {
                    max_new_tokens: o.max_answer_tokens,
                    // greedy answers
                    sampling: forge_models::generate::Sampling::greedy(),
                    seed: 0,
                    stop_ids: stop,
                },
            };
            let total = take.len() as u64;
            progress("answering", 0, total);
            for batch in take.chunks(o.batch_size.max(1)) {
                for g in regen.run_batch(batch, || {})? {
                    generated += g.answers.len();
                    hit_max += g.hit_max;
                    generated_tokens += g.new_tokens;
                    let q = first_user_turn(&g.messages).unwrap_or_default().to_string();
                    let trainable = g.messages.iter().map(|m| m.role == Role::Assistant).collect();
                    let conv = Conversation {
                        id: g.id.clone(),
                        messages: g.messages,
                        trainable,
                    };
                    let s = tokenize_conversation(tokenizer, template, &conv, &tokenize)?.map_err(|why| {
                        TrainerError::Config(format!(
                            "{shown}: the target's answer to '{}' gives {} (within max_length {})",
                            conv.id,
                            why.describe(),
                            o.max_length
                        ))
                    })?;
                    samples.push(s);
                    questions.push(question_key(&q));
                }
                progress("answering", samples.len() as u64, total);
            }
        }
        AnswerSource::Data => {
            let read = parse_conversations(&text, &o.data, false)?;
            for conv in &read.conversations {
                if samples.len() == o.entries {
                    break;
                }
                if let Ok(s) = tokenize_conversation(tokenizer, template, conv, &tokenize)? {
                    questions.push(question_key(first_user_turn(&conv.messages).unwrap_or_default()));
                    samples.push(s);
                }
            }
            if samples.len() < o.entries {
                return Err(TrainerError::Config(format!(
                    "{shown} has only {} conversations with an answer (of {} read), the knowledge cache takes {}: take fewer entries or a larger file",
                    samples.len(),
                    read.conversations.len(),
                    o.entries
                )));
            }
        }
    }
    let cfg = &model.config;
    let opts = CacheOptions {
        layers: o.layers.clone().unwrap_or_else(|| (0..cfg.num_layers).collect()),
        cache_dim: o.cache_dim.unwrap_or(cfg.hidden_size),
        max_answer_tokens: o.max_answer_tokens,
    };
    let source = CacheSource {
        target: target_dir.display().to_string(),
        target_fingerprint: target_fingerprint(target_dir)?,
        data: o.data.display().to_string(),
        data_hash: data_hash(text.as_bytes()),
        answers: o.answers.manifest_name().to_string(),
        questions,
    };
    let total = samples.len() as u64;
    let mut done = 0;
    progress("states", 0, total);
    let cache = build_states(model, &samples, &opts, source, &mut |n| {
        done += n;
        progress("states", done, total);
    })?;
    Ok(Built {
        cache,
        generated,
        hit_max,
        generated_tokens,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Training conversations whose question is also one of the cache's (`cache_keys`, each a
/// [`question_key`]): (file, id, question) in file order.
pub fn overlap(cache_keys: &[String], train_files: &[PathBuf]) -> Result<Vec<(PathBuf, String, String)>> {
    let mut out = Vec::new();
    for f in train_files {
        let read = parse_conversations(&read(f)?, f, true)?;
        for c in read.conversations {
            if let Some(q) = first_user_turn(&c.messages) {
                if cache_keys.contains(&question_key(q)) {
                    out.push((f.clone(), c.id.clone(), q.to_string()));
                }
            }
        }
    }
    Ok(out)
}

/// Checks that no cache question (`cache_keys`) is a training conversation's: an error naming
/// them, or with `allow` a warning (returned) naming them; `None` when they are disjoint.
pub fn check_disjoint(cache_keys: &[String], train_files: &[PathBuf], allow: bool) -> Result<Option<String>> {
    let both = overlap(cache_keys, train_files)?;
    if both.is_empty() {
        return Ok(None);
    }
    let mut distinct: Vec<&str> = both.iter().map(|(_, _, q)| q.as_str()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let named: Vec<String> = both
        .iter()
        .take(3)
        .map(|(f, id, q)| {
            let short: String = q.chars().take(60).collect();
            let more = if short.len() < q.len() { "..." } else { "" };
            format!("{} {id} \"{short}{more}\"", f.display())
        })
        .collect();
    let what = format!(
        "{} of the knowledge cache's {} questions are also data.train conversations ({} conversations: {}{}): the draft would learn to look up answers it is trained on",
        distinct.len(),
        cache_keys.len(),
        both.len(),
        named.join(", "),
        if both.len() > 3 { ", ..." } else { "" }
    );
    if allow {
        Ok(Some(format!(
            "LOOKUP LEAK (drafter.allow_training_overlap: true): {what}"
        )))
    } else {
        Err(TrainerError::Config(format!(
            "drafter.knowledge_data: {what}; point knowledge_data at questions outside data.train (or set drafter.allow_training_overlap: true to train anyway)"
        )))
    }
}

/// The key of the cache a recipe's knowledge section builds: the question file's bytes, the
/// target's fingerprint, the weight format the target runs in, and every option that changes
/// the stored states.
pub fn cache_key(recipe: &Recipe, k: &KnowledgeSection, data: &Path) -> Result<String> {
    let dir = target::target_dir(recipe)?;
    let bytes = std::fs::read(data).map_err(|source| TrainerError::Io {
        path: data.to_path_buf(),
        source,
    })?;
    let (dtype, _) = target_placement(recipe)?;
    let mut h = ContentHash::new();
    h.field(CACHE_FORMAT.as_bytes())
        .field(data_hash(&bytes).as_bytes())
        .field(target_fingerprint(dir)?.as_bytes())
        .field(dtype.name().as_bytes())
        .field(k.knowledge_answers.as_str().as_bytes())
        .field(&k.num_knowledge_entries.to_le_bytes())
        .field(&k.max_answer_tokens.to_le_bytes())
        .field(&k.cache_dim.unwrap_or(0).to_le_bytes())
        .field(recipe.data.chat_template.as_str().as_bytes())
        .field(&recipe.data.max_length.to_le_bytes());
    Ok(h.hex())
}

/// Where a recipe's knowledge cache is: `knowledge_cache` when set, else (with
/// `knowledge_data`) `data.cache_dir/knowledge-<cache_key>.safetensors`; `None` without either.
pub fn cache_path(recipe: &Recipe) -> Result<Option<PathBuf>> {
    let DrafterSection::Knowledge(k) = &recipe.drafter else {
        return Ok(None);
    };
    Ok(match (&k.knowledge_cache, &k.knowledge_data) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(d)) => Some(
            recipe
                .data
                .cache_dir
                .join(format!("knowledge-{}.safetensors", cache_key(recipe, k, d)?)),
        ),
        (None, None) => None,
    })
}

/// The recipe's drafter section with its knowledge cache's path filled in ([`cache_path`]):
/// what resolves into the drafter's spec.
fn drafter_section(recipe: &Recipe) -> Result<DrafterSection> {
    let mut section = recipe.drafter.clone();
    if let DrafterSection::Knowledge(k) = &mut section {
        if k.knowledge_cache.is_none() && k.knowledge_data.is_some() {
            k.knowledge_cache = cache_path(recipe)?;
        }
    }
    Ok(section)
}

/// Before training a knowledge drafter: builds its cache when it is missing and the recipe
/// names its questions (rank 0 builds; the other ranks wait for it), then checks that the
/// cache's questions are not training conversations. Other drafters: nothing.
fn prepare_cache(recipe: &Recipe, dp: &mut dyn Comm) -> Result<Prepared> {
    let mut out = Prepared::default();
    let DrafterSection::Knowledge(k) = &recipe.drafter else {
        return Ok(out);
    };
    let Some(path) = cache_path(recipe)? else {
        return Ok(out);
    };
    if k.knowledge_answers == AnswerSource::Data {
        out.warnings.push(format!(
            "THE KNOWLEDGE CACHE HOLDS THE DATA'S ANSWERS, NOT THE TARGET'S (drafter.knowledge_answers: data): the draft looks up text the target would not have written; the source system's cache holds the target's own answers (drop the key for them){}",
            k.knowledge_data.as_ref().map(|d| format!(" [{}]", d.display())).unwrap_or_default()
        ));
    }
    let missing = !path.exists();
    if missing {
        let Some(data) = &k.knowledge_data else {
            // the spec's resolution names the command that builds it
            return Ok(out);
        };
        // the questions are checked before the target spends its time answering them
        let keys: Vec<String> = cache_questions(data, k.num_knowledge_entries.max(0) as usize, k.knowledge_answers)?
            .iter()
            .map(|(_, q)| question_key(q))
            .collect();
        if let Some(w) = check_disjoint(&keys, &recipe.data.train, k.allow_training_overlap)? {
            out.warnings.push(w);
        }
        let built = if crate::parallel::leads(dp) {
            build_for_recipe(recipe, k, data, &path)
        } else {
            Ok(String::new())
        };
        // every rank waits for rank 0's file (its error, if any, is rank 0's to report)
        dp.barrier()?;
        let line = built?;
        if crate::parallel::leads(dp) {
            out.notes.push(line);
        } else if dp.writes() && !path.exists() {
            // (a tensor-parallel run's other target shards wait for it in `train`)
            return Err(TrainerError::Config(format!(
                "the knowledge cache {} was not built on rank 0 (see rank 0's error)",
                path.display()
            )));
        }
        return Ok(out);
    }
    let m = KnowledgeCache::read_manifest(&path)?;
    if m.questions.is_empty() {
        out.warnings.push(format!(
            "the knowledge cache {} records no question keys (built by an older forge): its questions cannot be checked against data.train, nor forge eval report prompts in and out of it; rebuild it",
            path.display()
        ));
    } else if let Some(w) = check_disjoint(&m.questions, &recipe.data.train, k.allow_training_overlap)? {
        out.warnings.push(w);
    }
    if k.knowledge_cache.is_none() {
        out.notes.push(format!(
            "knowledge: reusing the cache {} ({} entries, {} answers, keyed by the data, the target and the options)",
            path.display(),
            m.entries,
            m.answers
        ));
    }
    Ok(out)
}

/// Rank 0's part of [`prepare_cache`]: loads the target as the recipe runs it, builds the
/// cache and writes it (and its manifest) at `path`; returns the line saying so.
fn build_for_recipe(recipe: &Recipe, k: &KnowledgeSection, data: &Path, path: &Path) -> Result<String> {
    let dir = target::target_dir(recipe)?;
    let (dtype, device) = target_placement(recipe)?;
    let model = TargetModel::load(dir, dtype, device)?;
    let tokenizer = TextTokenizer::from_dir(dir)?;
    let template = target::chat_template(recipe)?;
    let stop = stop_ids(&model, &tokenizer, &template, recipe.data.chat_template.as_str())?;
    let o = BuildOptions {
        data: data.to_path_buf(),
        entries: k.num_knowledge_entries.max(0) as usize,
        answers: k.knowledge_answers,
        max_answer_tokens: k.max_answer_tokens.max(1) as usize,
        max_length: recipe.data.max_length.max(1) as usize,
        cache_dim: k.cache_dim,
        layers: None,
        batch_size: 8,
    };
    let built = build(&model, dir, &tokenizer, &template, stop, &o, &mut |_, _, _| {})?;
    if let Some(parent) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| TrainerError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    built.cache.write(path)?;
    built.cache.write_manifest_json(path)?;
    let m = &built.cache.manifest;
    Ok(format!(
        "knowledge: built the cache {} from {} ({} entries, {}{} answer tokens stored, {} layers x {} wide, {:.1}s)",
        path.display(),
        data.display(),
        m.entries,
        match k.knowledge_answers {
            AnswerSource::Target => format!(
                "the target's greedy answers: {} tokens generated, {} of {} answers cut at max_answer_tokens {}; ",
                built.generated_tokens, built.hit_max, built.generated, k.max_answer_tokens
            ),
            AnswerSource::Data => "the data's answers; ".into(),
        },
        m.tokens,
        m.layers.len(),
        m.cache_dim,
        built.seconds
    ))
}

/// The recipe's drafter section for what never reads a knowledge cache (the target features a
/// drafter needs, its data preparation): the cache left out, so that one not built yet is no
/// obstacle.
fn section_without_cache(recipe: &Recipe) -> DrafterSection {
    let mut section = recipe.drafter.clone();
    if let DrafterSection::Knowledge(k) = &mut section {
        k.knowledge_cache = None;
        k.knowledge_data = None;
        k.cache_dim = None;
    }
    section
}

/// The knowledge drafter's line in [`super::KINDS`].
pub(crate) const ARTIFACTS: Artifacts = Artifacts {
    kind: "knowledge",
    resolved: drafter_section,
    without: section_without_cache,
    prepare: prepare_cache,
};
