//! `forge eval`: what a draft is worth. Speculative decoding of every prompt with the trained
//! draft against its target (`forge_models::speculative`), and plain target decoding of the
//! same prompts in the same run for the speedup; greedy outputs are compared token for token.
//!
//! Prompts: MT-Bench `question.jsonl` (`{"question_id", "category", "turns": [...]}`) or
//! ShareGPT / messages / `{"prompt"}` records (user turns), rendered with the target's chat
//! template. Multi-turn: turn k's context holds the model's own answers to turns < k (the
//! speculative run's for the speculative run, the plain run's for the plain run).

use crate::engines::load_drafter_with_target;
use crate::regenerate::{read_input, resolve_dtype, show_progress, stop_ids, turn_seed, ChatArgs, InputConversation};
use anyhow::{bail, Context, Result};
use forge_data::{ChatTemplate, Message, Role, TextTokenizer};
use forge_models::generate::{generate, GenerateOptions};
use forge_models::speculative::{greedy_divergence, speculative_generate, Acceptance, Round, SpecOptions};
use forge_models::{parse_device, TargetConfig, TargetModel};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Options of `forge eval`.

/// `--acceptance` (see [`Acceptance`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AcceptanceArg {
    Engine,
    Exact,
}

impl From<AcceptanceArg> for Acceptance {
    fn from(a: AcceptanceArg) -> Self {
        match a {
            AcceptanceArg::Engine => Acceptance::Engine,
            AcceptanceArg::Exact => Acceptance::Exact,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// The target's Hugging Face folder (default: the target the draft was trained for).
    #[arg(long)]
    pub target: Option<PathBuf>,
    /// The draft: a step_<N> checkpoint, a checkpoint.dir (its newest checkpoint), a forge export, or an engine-format folder (SGLang/vLLM EAGLE-3 or EAGLE-1, vLLM or FasterDecoding Medusa; needs --target).
    #[arg(long)]
    pub draft: PathBuf,
    /// Prompt file(s): MT-Bench question.jsonl or ShareGPT (repeat for several files).
    #[arg(long = "prompts", value_name = "FILE", required = true)]
    pub prompts: Vec<PathBuf>,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Draft length (with --dynamic-gamma the starting length, at least --min-gamma). Medusa proposes at most one token per head.
    #[arg(long, default_value_t = 5)]
    pub gamma: usize,
    /// Dynamic gamma: +1 after a round with every proposal accepted, else max(--min-gamma, gamma / 2).
    #[arg(long)]
    pub dynamic_gamma: bool,
    /// Floor of dynamic gamma.
    #[arg(long, default_value_t = 4)]
    pub min_gamma: usize,
    /// Ceiling of dynamic gamma.
    #[arg(long, default_value_t = 32)]
    pub max_gamma: usize,
    /// 0 = greedy; > 0 = speculative sampling at this temperature.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Sampled acceptance (temperature > 0): engine = a greedy draft chain accepted with
    /// probability p(d), as vLLM and SGLang serve; exact = drafts sampled from the draft's
    /// distribution q, accepted with min(1, p/q). Both follow the target's distribution.
    #[arg(long, value_enum, default_value_t = AcceptanceArg::Engine)]
    pub acceptance: AcceptanceArg,
    /// Sampling seed (each prompt turn draws from its own stream: seed, id, turn).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the full report (summary, per category, per prompt) as JSON here.
    #[arg(long, value_name = "OUT.json")]
    pub json: Option<PathBuf>,
    /// Greedy only: fail (exit 1) unless every speculative output equals plain greedy output.
    #[arg(long)]
    pub verify: bool,
    /// Skip plain decoding (no speedup, no verification).
    #[arg(long)]
    pub no_baseline: bool,
    /// A draft option, KEY=VALUE (repeatable), e.g. knowledge=off: the knowledge drafter
    /// without its knowledge cache.
    #[arg(long = "draft-option", value_name = "KEY=VALUE")]
    pub draft_options: Vec<String>,
    /// After the main run, decode the same prompts again with this draft option added (e.g.
    /// knowledge=off: tau without the knowledge cache) and report that run too, its speedup
    /// against the main run's plain decoding (repeatable: one more run each).
    #[arg(long = "ablate", value_name = "KEY=VALUE")]
    pub ablate: Vec<String>,
    /// Only the first N prompts of each file.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub chat: ChatArgs,
}

fn check_args(a: &EvalArgs) -> Result<()> {
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if a.gamma == 0 {
        bail!("--gamma must be at least 1");
    }
    if a.dynamic_gamma && (a.min_gamma == 0 || a.min_gamma > a.max_gamma) {
        bail!(
            "--min-gamma must be in 1..=--max-gamma ({}), got {}",
            a.max_gamma,
            a.min_gamma
        );
    }
    if a.gamma > a.max_gamma {
        bail!("--gamma {} is above --max-gamma {}", a.gamma, a.max_gamma);
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be >= 0 (0 = greedy), got {}", a.temperature);
    }
    if a.verify && a.temperature > 0.0 {
        bail!("--verify compares with plain greedy decoding: use it with --temperature 0");
    }
    if a.verify && a.no_baseline {
        bail!("--verify needs the plain decoding that --no-baseline skips");
    }
    if a.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    Ok(())
}

/// Sums over turns, turned into the report's figures.
#[derive(Debug, Default, Clone)]
struct Tally {
    turns: usize,
    spec_tokens: usize,
    rounds: usize,
    round_tokens: usize,
    /// Per draft position i: rounds that proposed it, that reached it (every earlier proposal
    /// accepted) and that accepted it.
    proposed: Vec<usize>,
    reached: Vec<usize>,
    accepted: Vec<usize>,
    gammas: BTreeMap<usize, usize>,
    /// Draft tokens proposed (all rounds).
    drafted: usize,
    /// The draft sessions' named event counts (the hybrid: block choices), summed.
    counters: BTreeMap<String, u64>,
    draft_s: f64,
    target_s: f64,
    prefill_s: f64,
    spec_s: f64,
    base_tokens: usize,
    base_s: f64,
    /// Plain decoding without its prefill: the target's time per decoded token.
    base_decode_s: f64,
    base_decode_tokens: usize,
    compared: usize,
    mismatches: usize,
    /// Mismatches whose first differing token is a floating-point tie of the target's
    /// logits (`speculative::Divergence::tie`): not errors of the speculative decoder.
    mismatches_at_ties: usize,
}

impl Tally {
    fn add_rounds(&mut self, rounds: &[Round]) {
        for r in rounds {
            self.rounds += 1;
            self.round_tokens += r.emitted;
            *self.gammas.entry(r.proposed).or_default() += 1;
            self.drafted += r.proposed;
            if self.proposed.len() < r.proposed {
                self.proposed.resize(r.proposed, 0);
                self.reached.resize(r.proposed, 0);
                self.accepted.resize(r.proposed, 0);
            }
            for i in 0..r.proposed {
                self.proposed[i] += 1;
                if i <= r.accepted {
                    self.reached[i] += 1;
                }
                if i < r.accepted {
                    self.accepted[i] += 1;
                }
            }
        }
    }

    fn merge(&mut self, o: &Tally) {
        self.turns += o.turns;
        self.spec_tokens += o.spec_tokens;
        self.rounds += o.rounds;
        self.round_tokens += o.round_tokens;
        for (v, w) in [
            (&mut self.proposed, &o.proposed),
            (&mut self.reached, &o.reached),
            (&mut self.accepted, &o.accepted),
        ] {
            if v.len() < w.len() {
                v.resize(w.len(), 0);
            }
            for (a, b) in v.iter_mut().zip(w) {
                *a += b;
            }
        }
        for (g, n) in &o.gammas {
            *self.gammas.entry(*g).or_default() += n;
        }
        self.drafted += o.drafted;
        for (k, n) in &o.counters {
            *self.counters.entry(k.clone()).or_default() += n;
        }
        self.draft_s += o.draft_s;
        self.target_s += o.target_s;
        self.prefill_s += o.prefill_s;
        self.spec_s += o.spec_s;
        self.base_tokens += o.base_tokens;
        self.base_s += o.base_s;
        self.base_decode_s += o.base_decode_s;
        self.base_decode_tokens += o.base_decode_tokens;
        self.compared += o.compared;
        self.mismatches += o.mismatches;
        self.mismatches_at_ties += o.mismatches_at_ties;
    }

    fn tau(&self) -> f64 {
        ratio(self.round_tokens as f64, self.rounds as f64)
    }

    fn speedup(&self) -> Option<f64> {
        (self.base_s > 0.0 && self.spec_s > 0.0 && self.base_tokens > 0)
            .then(|| ratio(self.spec_tokens as f64, self.spec_s) / ratio(self.base_tokens as f64, self.base_s))
    }

    /// Takes `o`'s plain decoding as this tally's baseline (a pass that ran none of its own).
    fn baseline_of(&mut self, o: &Tally) {
        self.base_tokens = o.base_tokens;
        self.base_s = o.base_s;
        self.base_decode_s = o.base_decode_s;
        self.base_decode_tokens = o.base_decode_tokens;
    }

    /// The draft's time per drafted token over the target's per plainly decoded token.
    fn draft_time_ratio(&self) -> Option<f64> {
        (self.drafted > 0 && self.base_decode_tokens > 0 && self.base_decode_s > 0.0).then(|| {
            ratio(self.draft_s, self.drafted as f64) / ratio(self.base_decode_s, self.base_decode_tokens as f64)
        })
    }

    fn to_json(&self, baseline: bool) -> Value {
        let per = |num: &[usize], den: &[usize]| -> Vec<f64> {
            num.iter()
                .zip(den)
                .map(|(&a, &b)| round4(ratio(a as f64, b as f64)))
                .collect()
        };
        let mut v = json!({
            "turns": self.turns,
            "new_tokens": self.spec_tokens,
            "target_forwards": self.rounds,
            "tau": round4(self.tau()),
            "accept_rate_per_position": per(&self.accepted, &self.reached),
            "accept_prob_per_position": per(&self.accepted, &self.proposed),
            "proposed_per_position": self.proposed,
            "gamma_histogram": self.gammas.iter().map(|(g, n)| (g.to_string(), json!(n))).collect::<serde_json::Map<String, Value>>(),
            "draft_seconds": round4(self.draft_s),
            "drafted_tokens": self.drafted,
            "draft_ms_per_token": round4(1e3 * ratio(self.draft_s, self.drafted as f64)),
            "target_seconds": round4(self.target_s),
            "prefill_seconds": round4(self.prefill_s),
            "seconds": round4(self.spec_s),
            "draft_time_share": round4(ratio(self.draft_s, self.spec_s)),
            "target_time_share": round4(ratio(self.target_s + self.prefill_s, self.spec_s)),
            "tokens_per_second": round4(ratio(self.spec_tokens as f64, self.spec_s)),
        });
        if !self.counters.is_empty() {
            let all: u64 = self.counters.values().sum();
            v["draft_counters"] = json!(self.counters);
            v["draft_counter_shares"] = self
                .counters
                .iter()
                .map(|(k, n)| (k.clone(), json!(round4(ratio(*n as f64, all as f64)))))
                .collect::<serde_json::Map<String, Value>>()
                .into();
        }
        if baseline {
            v["baseline"] = json!({
                "new_tokens": self.base_tokens,
                "seconds": round4(self.base_s),
                "tokens_per_second": round4(ratio(self.base_tokens as f64, self.base_s)),
            });
            v["speedup"] = json!(self.speedup().map(round4));
            v["target_ms_per_token"] = json!(round4(1e3 * ratio(self.base_decode_s, self.base_decode_tokens as f64)));
            v["draft_time_ratio"] = json!(self.draft_time_ratio().map(round4));
            v["greedy_compared"] = json!(self.compared);
            v["greedy_mismatches"] = json!(self.mismatches);
            v["greedy_mismatches_at_ties"] = json!(self.mismatches_at_ties);
        }
        v
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// The draft must fit the target: same hidden size and vocabulary, auxiliary layers inside it.
fn check_fit(draft_cfg: &Value, draft_src: &Path, target: &TargetConfig, target_dir: &Path) -> Result<()> {
    let d = TargetConfig::from_value(draft_cfg.clone()).map_err(|e| {
        anyhow::anyhow!(
            "{}: the target config recorded with the draft: {e}",
            draft_src.display()
        )
    })?;
    let mut problems = Vec::new();
    if d.hidden_size != target.hidden_size {
        problems.push(format!("hidden size {} vs {}", d.hidden_size, target.hidden_size));
    }
    if d.vocab_size != target.vocab_size {
        problems.push(format!("vocabulary {} vs {}", d.vocab_size, target.vocab_size));
    }
    if d.num_layers != target.num_layers {
        problems.push(format!("{} vs {} layers", d.num_layers, target.num_layers));
    }
    if !problems.is_empty() {
        bail!(
            "the draft {} was trained for a different target than {} ({}): pass the --target it was trained for",
            draft_src.display(),
            target_dir.display(),
            problems.join(", ")
        );
    }
    Ok(())
}

/// One answered turn, for the per-prompt part of the report.
#[derive(serde::Serialize)]
struct TurnRecord {
    id: String,
    category: String,
    turn: usize,
    new_tokens: usize,
    target_forwards: usize,
    tau: f64,
    seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_seconds: Option<f64>,
    /// Greedy: index of the first token where speculative and plain outputs differ.
    #[serde(skip_serializing_if = "Option::is_none")]
    first_mismatch: Option<usize>,
    /// Greedy: the first difference, classified (tie or error).
    #[serde(skip_serializing_if = "Option::is_none")]
    divergence: Option<forge_models::speculative::Divergence>,
    stopped: bool,
}

struct Ctx<'a> {
    a: &'a EvalArgs,
    model: &'a TargetModel,
    drafter: &'a dyn forge_models::drafters::Drafter,
    tokenizer: &'a TextTokenizer,
    template: &'a ChatTemplate,
    stop: Vec<i64>,
}

impl Ctx<'_> {
    fn encode(&self, conv: &InputConversation, k: usize, answers: &[String]) -> Result<Vec<i64>> {
        let msgs: Vec<Message> = conv.context(k, answers, self.a.chat.system.as_deref());
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
            temperature: a.temperature,
            max_new_tokens: a.max_new_tokens,
            stop_ids: self.stop.clone(),
            seed,
            acceptance: a.acceptance.into(),
        }
    }

    fn base_opts(&self, seed: u64) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.a.max_new_tokens,
            temperature: self.a.temperature,
            top_p: 1.0,
            seed,
            stop_ids: self.stop.clone(),
        }
    }

    /// Every turn of one conversation: speculative and (unless skipped) plain decoding.
    fn conversation(&self, conv: &InputConversation, tally: &mut Tally, records: &mut Vec<TurnRecord>) -> Result<()> {
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
                if self.a.temperature <= 0.0 && prompt_b == prompt {
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

fn print_summary(name: &str, t: &Tally, baseline: bool) {
    let acc: Vec<String> = t
        .accepted
        .iter()
        .zip(&t.reached)
        .map(|(&a, &r)| format!("{:.2}", ratio(a as f64, r as f64)))
        .collect();
    let mut line = format!(
        "  {name:<24} turns {:>3}  tokens {:>6}  tau {:.3}  accept/pos [{}]  draft {:.0}%  {:.1} tok/s",
        t.turns,
        t.spec_tokens,
        t.tau(),
        acc.join(" "),
        100.0 * ratio(t.draft_s, t.spec_s),
        ratio(t.spec_tokens as f64, t.spec_s)
    );
    line += &format!("  draft {:.2} ms/token", 1e3 * ratio(t.draft_s, t.drafted as f64));
    if !t.counters.is_empty() {
        let all: u64 = t.counters.values().sum();
        let shares: Vec<String> = t
            .counters
            .iter()
            .map(|(k, n)| format!("{k} {:.0}%", 100.0 * ratio(*n as f64, all as f64)))
            .collect();
        line += &format!("  [{}]", shares.join(" "));
    }
    if baseline {
        line += &format!(
            "  plain {:.1} tok/s  draft/target time {}  speedup {}",
            ratio(t.base_tokens as f64, t.base_s),
            t.draft_time_ratio()
                .map(|r| format!("{r:.3}"))
                .unwrap_or_else(|| "-".into()),
            t.speedup().map(|s| format!("{s:.3}x")).unwrap_or_else(|| "-".into())
        );
        if t.compared > 0 {
            line += &format!("  greedy mismatches {}/{}", t.mismatches, t.compared);
            if t.mismatches_at_ties > 0 {
                line += &format!(" ({} at ties)", t.mismatches_at_ties);
            }
        }
    }
    println!("{line}");
}

/// A KEY=VALUE draft option given with `flag`, split.
fn draft_option<'o>(opt: &'o str, flag: &str) -> Result<(&'o str, &'o str)> {
    opt.split_once('=')
        .ok_or_else(|| anyhow::anyhow!("{flag} {opt}: write KEY=VALUE"))
}

/// Applies a KEY=VALUE draft option given with `flag`.
fn set_draft_option(drafter: &mut dyn forge_models::drafters::Drafter, opt: &str, flag: &str) -> Result<()> {
    let (k, v) = draft_option(opt, flag)?;
    drafter.set_option(k, v).with_context(|| format!("{flag} {opt}"))
}

/// `forge eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    check_args(&a)?;
    let mut files = Vec::new();
    for p in &a.prompts {
        let mut convs = read_input(p).with_context(|| format!("--prompts {}", p.display()))?;
        if let Some(n) = a.limit {
            convs.truncate(n);
        }
        if convs.is_empty() {
            bail!("--prompts {}: no prompts", p.display());
        }
        files.push((p.clone(), convs));
    }
    let device = parse_device(&a.chat.device).context("--device")?;
    let dtype = resolve_dtype(&a.chat.dtype, device)?;
    let loaded = load_drafter_with_target(&a.draft, device, dtype.kind(), a.target.as_deref())
        .with_context(|| format!("--draft {}", a.draft.display()))?;
    let target_dir = a.target.clone().unwrap_or_else(|| loaded.target.clone());
    let model = TargetModel::load(&target_dir, dtype, device)
        .with_context(|| format!("loading target {}", target_dir.display()))?;
    check_fit(&loaded.target_config, &loaded.source, &model.config, &target_dir)?;
    let mut drafter = loaded.drafter;
    for opt in &a.draft_options {
        set_draft_option(drafter.as_mut(), opt, "--draft-option")?;
    }
    // the ablations' options are checked before the main run spends its time
    for opt in &a.ablate {
        let (k, v) = draft_option(opt, "--ablate")?;
        drafter.check_option(k, v).with_context(|| format!("--ablate {opt}"))?;
    }
    let description = drafter.describe();
    let tokenizer = TextTokenizer::from_dir(&target_dir)?;
    let template = ChatTemplate::from_name(&a.chat.chat_template, &target_dir)
        .with_context(|| format!("--chat-template {}", a.chat.chat_template))?;
    let stop = stop_ids(&model, &tokenizer, &template, &a.chat.chat_template)?;
    let ctx = Ctx {
        a: &a,
        model: &model,
        drafter: drafter.as_ref(),
        tokenizer: &tokenizer,
        template: &template,
        stop,
    };
    let baseline = !a.no_baseline;
    let total_turns: usize = files.iter().flat_map(|(_, c)| c.iter().map(|c| c.user_turns())).sum();
    // the draft's own weights (what it adds to the target's memory besides its KV cache)
    let draft_vars = drafter.var_store().variables();
    let draft_params: i64 = draft_vars.values().map(|t| t.numel() as i64).sum();
    let draft_bytes: i64 = draft_vars
        .values()
        .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as i64)
        .sum();
    eprintln!(
        "forge eval: {} draft {} ({:.2} M weights, {:.1} MB{}) against {} ({:?}, {}), {} prompt turns in {} file(s), gamma {}{}, temperature {}{}, max {} new tokens",
        loaded.spec.kind(),
        loaded.source.display(),
        draft_params as f64 / 1e6,
        draft_bytes as f64 / 1e6,
        description.iter().map(|d| format!("; {d}")).collect::<String>(),
        target_dir.display(),
        device,
        dtype.name(),
        total_turns,
        files.len(),
        a.gamma,
        if a.dynamic_gamma { format!(" (dynamic, min {}, max {})", a.min_gamma, a.max_gamma) } else { String::new() },
        a.temperature,
        if a.temperature > 0.0 { format!(" ({} acceptance)", Acceptance::from(a.acceptance).name()) } else { String::new() },
        a.max_new_tokens
    );
    // warm-up: the first forwards of a process pay one-time allocation costs
    {
        let warm = InputConversation {
            id: "warm-up".into(),
            line: 0,
            messages: vec![Message::new(Role::User, "Hello")],
            category: None,
        };
        let mut warm_args = a.clone();
        warm_args.max_new_tokens = a.max_new_tokens.min(8);
        let warm_ctx = Ctx {
            a: &warm_args,
            stop: ctx.stop.clone(),
            ..ctx
        };
        warm_ctx.conversation(&warm, &mut Tally::default(), &mut Vec::new())?;
    }

    let pb = crate::data::styled_bar(
        total_turns as u64,
        "eval [{bar:30}] {pos}/{len} turns {msg} eta {eta}",
        show_progress(&a.chat.progress),
    );
    let mut overall = Tally::default();
    let mut file_reports = Vec::new();
    // the report names its draft; on a terminal the header above (stderr) already did
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        println!("forge eval: {} draft {}", loaded.spec.kind(), loaded.source.display());
    }
    for (path, convs) in &files {
        let mut tally = Tally::default();
        let mut by_cat: BTreeMap<String, Tally> = BTreeMap::new();
        let mut records = Vec::new();
        for conv in convs {
            let mut t = Tally::default();
            ctx.conversation(conv, &mut t, &mut records)?;
            by_cat
                .entry(conv.category.clone().unwrap_or_else(|| "-".into()))
                .or_default()
                .merge(&t);
            tally.merge(&t);
            pb.inc(conv.user_turns() as u64);
            pb.set_message(format!("tau {:.2}", tally.tau()));
        }
        overall.merge(&tally);
        println!("{}:", path.display());
        print_summary("all", &tally, baseline);
        if by_cat.len() > 1 {
            for (c, t) in &by_cat {
                print_summary(c, t, baseline);
            }
        }
        file_reports.push(json!({
            "path": path.display().to_string(),
            "summary": tally.to_json(baseline),
            "categories": by_cat.iter().map(|(c, t)| (c.clone(), t.to_json(baseline))).collect::<serde_json::Map<String, Value>>(),
            "prompts": records,
        }));
    }
    pb.finish_and_clear();
    if files.len() > 1 {
        println!("all files:");
        print_summary("all", &overall, baseline);
    }
    // ablations: the same prompts decoded again with one more draft option each; the main
    // run's plain decoding is their baseline
    let stop = ctx.stop.clone();
    let mut ablations = serde_json::Map::new();
    for opt in &a.ablate {
        set_draft_option(drafter.as_mut(), opt, "--ablate")?;
        let mut args = a.clone();
        args.no_baseline = true;
        let actx = Ctx {
            a: &args,
            model: &model,
            drafter: drafter.as_ref(),
            tokenizer: &tokenizer,
            template: &template,
            stop: stop.clone(),
        };
        let mut t = Tally::default();
        for (_, convs) in &files {
            for conv in convs {
                actx.conversation(conv, &mut t, &mut Vec::new())
                    .with_context(|| format!("--ablate {opt}"))?;
            }
        }
        t.baseline_of(&overall);
        println!("with {opt} (all files):");
        print_summary("all", &t, baseline);
        let mut v = t.to_json(baseline);
        if let Some(m) = v.as_object_mut() {
            // no plain run was compared in this pass
            for k in ["greedy_compared", "greedy_mismatches", "greedy_mismatches_at_ties"] {
                m.remove(k);
            }
        }
        ablations.insert(opt.clone(), v);
    }
    if let Some(out) = &a.json {
        let report = json!({
            "draft": {"path": loaded.source.display().to_string(), "kind": loaded.spec.kind(), "spec": loaded.spec, "weights": draft_params, "weight_bytes": draft_bytes, "options": a.draft_options, "description": description},
            "target": target_dir.display().to_string(),
            "settings": {
                "gamma": a.gamma,
                "dynamic_gamma": a.dynamic_gamma,
                "min_gamma": a.min_gamma,
                "max_gamma": a.max_gamma,
                "temperature": a.temperature,
                "acceptance": if a.temperature > 0.0 { Acceptance::from(a.acceptance).name() } else { "greedy" },
                "max_new_tokens": a.max_new_tokens,
                "seed": a.seed,
                "device": format!("{device:?}"),
                "dtype": dtype.name(),
                "baseline": baseline,
            },
            "summary": overall.to_json(baseline),
            "ablations": ablations,
            "files": file_reports,
        });
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("--json: cannot create {}", dir.display()))?;
        }
        let mut f = std::fs::File::create(out).with_context(|| format!("--json {}: cannot create", out.display()))?;
        writeln!(f, "{}", serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("--json {}: write failed", out.display()))?;
        eprintln!("forge eval: wrote {}", out.display());
    }
    let errors = overall.mismatches - overall.mismatches_at_ties;
    if a.verify && errors > 0 {
        bail!(
            "--verify: {errors} of {} greedy speculative outputs differ from plain greedy decoding beyond a floating-point tie (divergence per prompt in --json)",
            overall.compared
        );
    }
    if a.verify && overall.mismatches_at_ties > 0 {
        eprintln!(
            "forge eval: verified: {} of {} greedy speculative outputs equal plain greedy decoding; {} depart at a tie of the target's two best logits (within 4 units in the last place of {}: verifying several positions in one forward rounds differently from decoding one at a time), none beyond",
            overall.compared - overall.mismatches,
            overall.compared,
            overall.mismatches_at_ties,
            dtype.name()
        );
    } else if a.verify {
        eprintln!(
            "forge eval: verified: all {} greedy speculative outputs equal plain greedy decoding",
            overall.compared
        );
    }
    Ok(())
}
