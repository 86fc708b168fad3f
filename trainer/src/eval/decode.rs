//! Decoding one conversation both ways: speculatively with the draft and (unless skipped)
//! plainly with the target, turn by turn, into a [`Tally`] and per-turn [`TurnRecord`]s.

use super::tally::{round4, Tally};
use super::EvalOptions;
use crate::error::{Result, ResultExt};
use crate::regenerate::turn_seed;
use forge_data::conversation::PromptConversation as InputConversation;
use forge_data::{ChatTemplate, Message, TextTokenizer};
use forge_models::generate::{generate, GenerateOptions};
use forge_models::speculative::{greedy_divergence, speculative_generate, SpecOptions};
use forge_models::TargetModel;
use std::collections::BTreeMap;

/// One answered turn, for the per-prompt part of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TurnRecord {
    pub id: String,
    pub category: String,
    pub turn: usize,
    pub new_tokens: usize,
    pub target_forwards: usize,
    pub tau: f64,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_seconds: Option<f64>,
    /// Greedy: index of the first token where speculative and plain outputs differ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_mismatch: Option<usize>,
    /// Greedy: the first difference, classified (tie or error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub divergence: Option<forge_models::speculative::Divergence>,
    pub stopped: bool,
}

/// What decoding a conversation needs: the options, the models, the chat rendering.
pub(super) struct Ctx<'a> {
    pub a: &'a EvalOptions,
    pub model: &'a TargetModel,
    pub drafter: &'a dyn forge_models::drafters::Drafter,
    pub tokenizer: &'a TextTokenizer,
    pub template: &'a ChatTemplate,
    pub stop: Vec<i64>,
}

impl Ctx<'_> {
    fn encode(&self, conv: &InputConversation, k: usize, answers: &[String]) -> Result<Vec<i64>> {
        let msgs: Vec<Message> = conv.context(k, answers, self.a.system.as_deref());
        Ok(self.tokenizer.encode(&self.template.render(&msgs, true))?)
    }

    fn answer_text(&self, tokens: &[i64]) -> Result<String> {
        let content: Vec<i64> = tokens.iter().copied().filter(|id| !self.stop.contains(id)).collect();
        Ok(self.tokenizer.decode(&content, true)?)
    }

    fn spec_opts(&self, seed: u64) -> SpecOptions {
        let a = self.a;
        SpecOptions {
            gamma: a.gamma,
            dynamic_min_gamma: a.dynamic_gamma.then_some(a.min_gamma),
            max_gamma: a.max_gamma,
            sampling: a.sampling,
            max_new_tokens: a.max_new_tokens,
            stop_ids: self.stop.clone(),
            seed,
            acceptance: a.acceptance,
            tree: a.tree,
        }
    }

    fn base_opts(&self, seed: u64) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.a.max_new_tokens,
            sampling: self.a.sampling,
            seed,
            stop_ids: self.stop.clone(),
        }
    }

    /// Every turn of one conversation: speculative and (unless skipped) plain decoding.
    pub fn conversation(
        &self,
        conv: &InputConversation,
        tally: &mut Tally,
        records: &mut Vec<TurnRecord>,
    ) -> Result<()> {
        let (mut spec_answers, mut base_answers) = (Vec::new(), Vec::new());
        let category = conv.category.clone().unwrap_or_else(|| "-".into());
        for k in 0..conv.user_turns() {
            let seed = turn_seed(self.a.seed, &conv.id, k);
            let prompt = self.encode(conv, k, &spec_answers)?;
            let mut session = self.drafter.session(self.model)?;
            let needs = self.drafter.spec().feature_needs();
            let s = speculative_generate(self.model, session.as_mut(), &needs, &prompt, &self.spec_opts(seed))
                .with_context(|| format!("speculative decoding of prompt {} turn {}", conv.id, k + 1))?;
            let counters: BTreeMap<String, u64> = session.counters().into_iter().collect();
            drop(session);
            let mut t = Tally {
                turns: 1,
                spec_tokens: s.tokens.len(),
                draft_s: s.draft_seconds,
                target_s: s.target_seconds,
                prefill_s: s.prefill_seconds,
                spec_s: s.total_seconds,
                counters,
                ..Default::default()
            };
            t.add_rounds(&s.rounds);
            let mut rec = TurnRecord {
                id: conv.id.clone(),
                category: category.clone(),
                turn: k + 1,
                new_tokens: s.tokens.len(),
                target_forwards: s.rounds.len(),
                tau: round4(s.tau()),
                seconds: round4(s.total_seconds),
                baseline_tokens: None,
                baseline_seconds: None,
                first_mismatch: None,
                divergence: None,
                stopped: s.stopped,
            };
            if !self.a.no_baseline {
                let prompt_b = if k == 0 {
                    prompt.clone()
                } else {
                    self.encode(conv, k, &base_answers)?
                };
                let b = generate(self.model, &prompt_b, &self.base_opts(seed), |_| {})
                    .with_context(|| format!("plain decoding of prompt {} turn {}", conv.id, k + 1))?;
                let base_s = b.prefill_seconds + b.decode_seconds;
                t.base_tokens = b.tokens.len();
                t.base_s = base_s;
                t.base_decode_s = b.decode_seconds;
                t.base_decode_tokens = b.tokens.len().saturating_sub(1);
                rec.baseline_tokens = Some(b.tokens.len());
                rec.baseline_seconds = Some(round4(base_s));
                if self.a.sampling.is_greedy() && prompt_b == prompt {
                    t.compared = 1;
                    let d = greedy_divergence(self.model, &prompt, &b.tokens, &s.tokens).with_context(|| {
                        format!("classifying the greedy mismatch of prompt {} turn {}", conv.id, k + 1)
                    })?;
                    if let Some(d) = d {
                        t.mismatches = 1;
                        t.mismatches_at_ties = d.tie as usize;
                        rec.first_mismatch = Some(d.index);
                        rec.divergence = Some(d);
                    }
                }
                base_answers.push(self.answer_text(&b.tokens)?);
            }
            spec_answers.push(self.answer_text(&s.tokens)?);
            tally.merge(&t);
            records.push(rec);
        }
        Ok(())
    }
}
