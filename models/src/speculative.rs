//! Speculative decoding (docs/eval.md): a draft proposes a chain of gamma
//! tokens, the target verifies all of them in one forward with its KV cache, and the cache is
//! rolled back past the first rejected token.
//!
//! State between rounds: the target's cache holds every committed token but the last one
//! (`last`); the draft has been told ([`DraftSession::commit`]) the target's features at every
//! cached position. A round feeds `[last, d_1..d_g]` to the target, which gives g + 1
//! next-token distributions:
//! - greedy (temperature 0): d_i is accepted iff it equals the target's arg-max after d_1..d_{i-1};
//! - sampling: p is the target's distribution as sampled ([`Sampling::probs`]: temperature,
//!   then top-k, then top-p, renormalised, the order vLLM and SGLang apply them in), q the
//!   draft's ([`draft_sampling`]); d_i is accepted with probability min(1, p(d_i) / q(d_i)); on
//!   the first rejection a token is drawn from norm(max(0, p - q)) instead. With [`Acceptance::Engine`]
//!   (the default, what vLLM and SGLang do) the draft chain is greedy, q is one-hot, and
//!   this is: accept d_i with probability p(d_i), else draw from p without d_i;
//! - after a accepted drafts the target's token at position a (the correction, or the bonus
//!   token when all g were accepted) is emitted too, so a round emits a + 1 tokens.
//!
//! Greedy output equals plain greedy decoding token for token; sampled output follows the
//! target's distribution exactly (Leviathan et al. 2023; Chen et al. 2023).
//!
//! One file over ~500 lines: the verification loop and its acceptance rules read one state.

use crate::error::{ModelError, Result};
use crate::features::FeatureNeeds;
use crate::generate::{sample_rows, RowRng, Sampling};
use crate::llm::{Capture, LogitsMode, TargetModel};
use std::time::Instant;
use tch::{Kind, Tensor};

/// The target's features at consecutive positions, as a draft reads them.
#[derive(Debug)]
pub struct StepFeatures {
    /// Last hidden state after the final norm, `[k, H]`.
    pub hidden_normed: Tensor,
    /// Outputs of the draft's auxiliary target layers, concatenated, `[k, A*H]`.
    pub aux: Option<Tensor>,
}

/// A chain of proposed tokens.
#[derive(Debug)]
pub struct Proposal {
    /// Target-vocabulary ids `d_1..d_g`.
    pub tokens: Vec<i64>,
    /// The draft's logits over the target vocabulary for each proposed position, `[g, V]`
    /// fp32 (-inf outside a reduced draft vocabulary). A sampled draft drew d_i from
    /// `sampling.probs(logits_i)` (temperature, top-k, top-p); verification uses the same
    /// distribution as q.
    pub logits: Tensor,
}

/// The draft side of speculative decoding for one sequence. Each drafter kind implements it
/// in its own file (`Drafter::session`).
pub trait DraftSession {
    /// The most tokens one proposal can hold (Medusa: its number of heads).
    fn max_gamma(&self) -> Option<usize> {
        None
    }
    /// Called once with the prompt before the target's prefill (a draft that reads tokens
    /// rather than the target's features, such as the knowledge drafter, runs its own
    /// prefill here). Default: nothing.
    fn begin(&mut self, _prompt: &[i64]) -> Result<()> {
        Ok(())
    }
    /// Positions `start..start+k` are final: `features` are the target's there and `next[i]`
    /// is the token at position `start + i + 1`. Called with consecutive ranges; anything the
    /// draft computed past `start` during earlier proposals is discarded.
    fn commit(&mut self, start: i64, features: &StepFeatures, next: &[i64]) -> Result<()>;
    /// Proposes `gamma` tokens to follow the committed sequence (whose last token is the
    /// `next` of the latest commit). Greedy (arg-max) when `sampling` is, otherwise each
    /// token drawn from `sampling.probs(logits)` with uniforms from `rng` (see [`pick`]).
    fn propose(&mut self, gamma: usize, sampling: &Sampling, rng: &mut RowRng) -> Result<Proposal>;
    /// Named event counts of this session (the hybrid drafter: how often each block ran),
    /// summed and reported by `forge eval`. Default: none.
    fn counters(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
    /// A draft that runs inside the target (SpAF) owns the target's KV cache and runs the
    /// target's forwards itself, reusing what drafting computed. Default: none (the engine
    /// keeps the cache and runs full forwards).
    fn shared_target(&mut self) -> Option<&mut dyn SharedTarget> {
        None
    }
}

/// The target's side of speculative decoding, run by a draft that shares the target's KV
/// cache ([`DraftSession::shared_target`]).
pub trait SharedTarget {
    /// Positions whose keys and values are final in every layer.
    fn cached(&self) -> i64;
    /// The target's forward over `ids` at positions `cached()..`, appending them to the
    /// cache: what [`TargetModel::forward`] returns with a cache of `cached()` positions.
    fn forward(&mut self, ids: &[i64], capture: &Capture) -> Result<crate::llm::TargetOutput>;
    /// Keeps the first `len` positions (rollback of rejected drafts).
    fn truncate(&mut self, len: i64);
}

/// The target's forward of speculative decoding: through the draft when it shares the
/// target's cache, otherwise a full forward over the engine's own `cache`.
fn target_forward(
    target: &TargetModel,
    draft: &mut dyn DraftSession,
    cache: &mut crate::llm::KvCache,
    ids: &[i64],
    capture: &Capture,
) -> Result<crate::llm::TargetOutput> {
    match draft.shared_target() {
        Some(s) => s.forward(ids, capture),
        None => {
            let t = Tensor::from_slice(ids).view([1, -1]).to_device(target.device());
            target.forward(&t, None, None, Some(cache), capture)
        }
    }
}

fn cached(draft: &mut dyn DraftSession, cache: &crate::llm::KvCache) -> i64 {
    match draft.shared_target() {
        Some(s) => s.cached(),
        None => cache.len(),
    }
}

fn truncate(draft: &mut dyn DraftSession, cache: &mut crate::llm::KvCache, len: i64) {
    match draft.shared_target() {
        Some(s) => s.truncate(len),
        None => cache.truncate(len),
    }
}

/// A chain of `gamma` proposals from a draft that reads its own predicted features (EAGLE-1,
/// the hybrid): proposal i is picked from `readout(feature_i)` (`[1, h]` -> `[1, V]` logits
/// over the target vocabulary), starting from `first` (the predicted feature after the last
/// committed position); `advance(feature_i, token_i, i)` gives feature_{i+1}, and is not
/// called after the last proposal.
pub fn propose_chain(
    first: &Tensor,
    gamma: usize,
    sampling: &Sampling,
    rng: &mut RowRng,
    readout: impl Fn(&Tensor) -> Tensor,
    mut advance: impl FnMut(&Tensor, i64, usize) -> Result<Tensor>,
) -> Result<Proposal> {
    let mut feature = first.shallow_clone();
    let (mut tokens, mut logits) = (Vec::with_capacity(gamma), Vec::with_capacity(gamma));
    for i in 0..gamma {
        let l = readout(&feature.view([1, -1])).view([-1]);
        let token = pick(&l, sampling, rng)?;
        tokens.push(token);
        logits.push(l);
        if i + 1 < gamma {
            feature = advance(&feature, token, i)?;
        }
    }
    Ok(Proposal {
        tokens,
        logits: Tensor::stack(&logits, 0),
    })
}

/// Dynamic gamma (AIMD, docs/eval.md): +1 after a round whose proposals were all accepted,
/// otherwise halved, never below `min_gamma`.
pub fn next_gamma(gamma: usize, all_accepted: bool, min_gamma: usize) -> usize {
    if all_accepted {
        gamma + 1
    } else {
        (gamma / 2).max(min_gamma)
    }
}

/// How sampled drafts are accepted (temperature > 0; greedy decoding accepts while the draft
/// equals the target's arg-max in both). Both give exactly the target's distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acceptance {
    /// As vLLM and SGLang serve by default: the draft chain is greedy (arg-max), so its
    /// distribution q is one-hot, and a draft token d is accepted with probability p(d); on a
    /// rejection the token is drawn from p with d removed (renormalised).
    #[default]
    Engine,
    /// Draft tokens sampled from q = softmax(draft logits / T) (no top-k or top-p on q, as
    /// the engines' probabilistic drafting) and accepted with probability min(1, p(d) / q(d));
    /// on a rejection drawn from norm(max(0, p - q)).
    Exact,
}

impl Acceptance {
    pub fn name(self) -> &'static str {
        match self {
            Acceptance::Engine => "engine",
            Acceptance::Exact => "exact",
        }
    }
}

/// How to decode.
#[derive(Debug, Clone)]
pub struct SpecOptions {
    /// Draft length (the starting length with dynamic gamma).
    pub gamma: usize,
    /// Dynamic gamma with this floor (`None` = fixed gamma).
    pub dynamic_min_gamma: Option<usize>,
    /// Upper bound on any draft length (dynamic gamma grows up to it).
    pub max_gamma: usize,
    /// Greedy, or the target's sampling (temperature, top-k, top-p) as the engine serves it.
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    /// Decoding stops after emitting any of these ids (kept in the output).
    pub stop_ids: Vec<i64>,
    pub seed: u64,
    /// How sampled drafts are accepted.
    pub acceptance: Acceptance,
}

impl Default for SpecOptions {
    fn default() -> Self {
        Self {
            gamma: 5,
            dynamic_min_gamma: None,
            max_gamma: 32,
            sampling: Sampling::greedy(),
            max_new_tokens: 128,
            stop_ids: Vec::new(),
            seed: 0,
            acceptance: Acceptance::Engine,
        }
    }
}

/// One verification round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Round {
    /// The gamma in force for this round (dynamic gamma's state).
    pub gamma: usize,
    /// Tokens actually proposed (gamma capped by the draft and the tokens left; when a stop
    /// id among the accepted proposals ends the answer, only those up to it).
    pub proposed: usize,
    /// Leading proposals the target accepted (up to a stop id, as `proposed`).
    pub accepted: usize,
    /// Tokens this round added to the output (accepted + 1, fewer at a stop or the limit).
    pub emitted: usize,
}

/// The result of [`speculative_generate`].
#[derive(Debug, Clone, Default)]
pub struct SpecOutput {
    pub tokens: Vec<i64>,
    /// Ended at a stop id (rather than at `max_new_tokens`).
    pub stopped: bool,
    /// One per verification forward (the prefill forward, which emits the first token, is
    /// not a round).
    pub rounds: Vec<Round>,
    pub prefill_seconds: f64,
    /// Time in the draft (commit + propose).
    pub draft_seconds: f64,
    /// Time in target verification forwards and acceptance.
    pub target_seconds: f64,
    pub total_seconds: f64,
}

impl SpecOutput {
    /// Mean acceptance length: tokens emitted per verification forward (bonus included).
    pub fn tau(&self) -> f64 {
        let emitted: usize = self.rounds.iter().map(|r| r.emitted).sum();
        if self.rounds.is_empty() {
            0.0
        } else {
            emitted as f64 / self.rounds.len() as f64
        }
    }
}

/// Picks from logits `[V]` (arg-max when greedy, else from `sampling.probs(logits)`) using one
/// uniform from `rng`.
pub fn pick(logits: &Tensor, sampling: &Sampling, rng: &mut RowRng) -> Result<i64> {
    let u = if sampling.is_greedy() { 0.0 } else { rng.next_f64() };
    let ids = sample_rows(&logits.reshape([1, -1]), sampling, &[u])?;
    ids.first()
        .copied()
        .ok_or_else(|| ModelError::Invalid("pick: no token".into()))
}

/// Draws from an unnormalised distribution `[V]` (non-negative weights).
fn draw(weights: &Tensor, rng: &mut RowRng) -> Result<i64> {
    pick(&weights.clamp_min(0.0).log(), &Sampling::at(1.0), rng)
}

/// How the draft samples its chain: greedy under [`Acceptance::Engine`] (also when the target
/// samples); under [`Acceptance::Exact`] from softmax(logits / T) with the target's
/// temperature and no top-k or top-p, as vLLM's `probabilistic` draft sampling and SGLang's
/// `--speculative-use-rejection-sampling` build q (either q keeps the output exact).
pub fn draft_sampling(opts: &SpecOptions) -> Sampling {
    match opts.acceptance {
        Acceptance::Engine => Sampling::greedy(),
        Acceptance::Exact => Sampling::at(opts.sampling.temperature),
    }
}

/// One-hot rows at `tokens`, shaped like the first `tokens.len()` rows of `like` `[n, V]`.
fn one_hot(tokens: &[i64], like: &Tensor) -> Tensor {
    let ids = Tensor::from_slice(tokens).view([-1, 1]).to_device(like.device());
    like.narrow(0, 0, tokens.len() as i64)
        .zeros_like()
        .scatter_value(1, &ids, 1.0)
}

/// Speculative sampling's verification of one chain: `p` `[g+1, V]` is the target's sampled
/// distribution after each prefix (`Sampling::probs`: temperature, top-k, top-p), `q` `[g, V]`
/// the distribution each draft token was drawn from (one-hot for a greedy chain). Draft d_i
/// is accepted with probability min(1, p(d_i) / q(d_i)); at the first rejection a token is
/// drawn from norm(max(0, p - q)) (from p when that is empty); when all are accepted the
/// bonus token is drawn from the last row of p. Returns (accepted drafts, the next token).
///
/// Each emitted token follows p exactly; the chance that d_i is accepted, given it is
/// reached, is sum_x min(p(x), q(x)) (p(d_i) for a greedy chain), so accepted / reached
/// counts estimate it without bias.
pub fn accept_sampled(p: &Tensor, q: &Tensor, tokens: &[i64], rng: &mut RowRng) -> Result<(usize, i64)> {
    let g = tokens.len() as i64;
    if p.size().first() != Some(&(g + 1)) || q.size().first() != Some(&g) {
        return Err(ModelError::Invalid(format!(
            "accept_sampled: {g} drafts with target rows {:?} and draft rows {:?}",
            p.size(),
            q.size()
        )));
    }
    let q = q.to_kind(Kind::Float);
    for (i, &d) in tokens.iter().enumerate() {
        let (pi, qi) = (p.get(i as i64), q.get(i as i64));
        let (pd, qd) = (pi.double_value(&[d]), qi.double_value(&[d]));
        let u = rng.next_f64();
        // accept with probability min(1, p/q); q(d) > 0 since d was drawn from q
        // (engine: q(d) = 1, so with probability p(d))
        if u * qd < pd {
            continue;
        }
        let residual = (&pi - &qi).clamp_min(0.0);
        let mass = residual.sum(Kind::Double).double_value(&[]);
        let new = if mass > 0.0 {
            draw(&residual, rng)?
        } else {
            draw(&pi, rng)?
        };
        return Ok((i, new));
    }
    Ok((tokens.len(), draw(&p.get(g), rng)?))
}

fn features_at(out: &crate::llm::TargetOutput, start: i64, len: i64) -> StepFeatures {
    StepFeatures {
        hidden_normed: out.hidden_normed.get(0).narrow(0, start, len),
        aux: (!out.layers.is_empty()).then(|| Tensor::cat(&out.layers, -1).get(0).narrow(0, start, len)),
    }
}

/// Speculative decoding of one sequence after `prompt` with a draft session that reads the
/// target features `needs` says (its spec's `feature_needs()`).
pub fn speculative_generate(
    target: &TargetModel,
    draft: &mut dyn DraftSession,
    needs: &FeatureNeeds,
    prompt: &[i64],
    opts: &SpecOptions,
) -> Result<SpecOutput> {
    if prompt.is_empty() {
        return Err(ModelError::Invalid("cannot decode from an empty prompt".into()));
    }
    if opts.gamma == 0 || opts.max_gamma == 0 {
        return Err(ModelError::Invalid("gamma must be at least 1".into()));
    }
    if opts.dynamic_min_gamma == Some(0) {
        return Err(ModelError::Invalid("the minimum gamma must be at least 1".into()));
    }
    opts.sampling.check()?;
    if opts.max_new_tokens == 0 {
        return Ok(SpecOutput::default());
    }
    let t_start = Instant::now();
    let device = target.device();
    let sampling = &opts.sampling;
    let mut rng = RowRng::new(opts.seed);
    let cap = draft.max_gamma().unwrap_or(usize::MAX).min(opts.max_gamma).max(1);
    // dynamic gamma never goes below its minimum, so it starts there at least
    let mut gamma = opts.gamma.max(opts.dynamic_min_gamma.unwrap_or(1)).min(cap);
    let capture_last = Capture {
        layers: needs.aux_layers.clone(),
        logits: LogitsMode::Last,
    };
    let capture_all = Capture {
        layers: needs.aux_layers.clone(),
        logits: LogitsMode::All,
    };
    let mut cache = target.new_cache();
    let (mut draft_s, mut target_s) = (0.0, 0.0);
    let mut out = SpecOutput::default();

    // prefill: the whole prompt, the first new token from the target alone
    if cached(draft, &cache) != 0 {
        return Err(ModelError::Invalid(
            "a draft session decodes one sequence: start a new session for another prompt".into(),
        ));
    }
    tch::no_grad(|| draft.begin(prompt))?;
    let pre = tch::no_grad(|| target_forward(target, draft, &mut cache, prompt, &capture_last))?;
    let logits = pre
        .logits
        .as_ref()
        .ok_or_else(|| ModelError::Invalid("prefill gave no logits".into()))?;
    let mut last = pick(&logits.reshape([-1]), sampling, &mut rng)?;
    out.prefill_seconds = t_start.elapsed().as_secs_f64();
    out.tokens.push(last);
    if opts.stop_ids.contains(&last) {
        out.stopped = true;
    }
    if !out.stopped && out.tokens.len() < opts.max_new_tokens {
        let t = Instant::now();
        let mut next: Vec<i64> = prompt[1..].to_vec();
        next.push(last);
        tch::no_grad(|| draft.commit(0, &features_at(&pre, 0, prompt.len() as i64), &next))?;
        draft_s += t.elapsed().as_secs_f64();
    }
    drop(pre);

    while !out.stopped && out.tokens.len() < opts.max_new_tokens {
        let left = opts.max_new_tokens - out.tokens.len();
        let g = gamma.min(left - 1);
        let t = Instant::now();
        let proposal = if g > 0 {
            let draft_sampling = draft_sampling(opts);
            let p = tch::no_grad(|| draft.propose(g, &draft_sampling, &mut rng))?;
            if p.tokens.len() != g || p.logits.size().first() != Some(&(g as i64)) {
                return Err(ModelError::Invalid(format!(
                    "the draft proposed {} tokens with {:?} logits, {g} were asked for",
                    p.tokens.len(),
                    p.logits.size()
                )));
            }
            Some(p)
        } else {
            None
        };
        draft_s += t.elapsed().as_secs_f64();

        let t = Instant::now();
        let start = cached(draft, &cache);
        let mut input = vec![last];
        if let Some(p) = &proposal {
            input.extend_from_slice(&p.tokens);
        }
        let ver = tch::no_grad(|| target_forward(target, draft, &mut cache, &input, &capture_all))?;
        let logits = ver
            .logits
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("verification gave no logits".into()))?
            .get(0)
            .to_kind(Kind::Float); // [g+1, V]
        let (accepted, new) = match &proposal {
            None => (0, pick(&logits.get(0), sampling, &mut rng)?),
            Some(p) if sampling.is_greedy() => {
                let best = Vec::<i64>::try_from(&logits.argmax(-1, false).to_device(tch::Device::Cpu))?;
                let a = p.tokens.iter().zip(&best).take_while(|(d, b)| d == b).count();
                (a, best[a])
            }
            Some(p) => {
                let pt = sampling.probs(&logits);
                let q = match opts.acceptance {
                    // a greedy chain: q is one-hot at each proposal
                    Acceptance::Engine => one_hot(&p.tokens, &pt),
                    Acceptance::Exact => draft_sampling(opts).probs(&p.logits.to_device(device)),
                };
                accept_sampled(&pt, &q, &p.tokens, &mut rng)?
            }
        };
        // keep `last` and the accepted drafts in the cache
        truncate(draft, &mut cache, start + accepted as i64 + 1);
        target_s += t.elapsed().as_secs_f64();

        let mut emitted: Vec<i64> = proposal
            .as_ref()
            .map(|p| p.tokens[..accepted].to_vec())
            .unwrap_or_default();
        emitted.push(new);
        let mut keep = emitted.len().min(left);
        if let Some(i) = emitted[..keep].iter().position(|id| opts.stop_ids.contains(id)) {
            keep = i + 1;
            out.stopped = true;
        }
        out.tokens.extend_from_slice(&emitted[..keep]);
        // a stop among the accepted drafts ends the answer: the drafts after it do not count
        let stop_in_drafts = out.stopped && keep <= accepted;
        out.rounds.push(Round {
            gamma,
            proposed: if stop_in_drafts { keep } else { g },
            accepted: if stop_in_drafts { keep } else { accepted },
            emitted: keep,
        });
        if out.stopped || out.tokens.len() >= opts.max_new_tokens {
            break;
        }
        let t = Instant::now();
        tch::no_grad(|| draft.commit(start, &features_at(&ver, 0, accepted as i64 + 1), &emitted))?;
        draft_s += t.elapsed().as_secs_f64();
        last = new;
        if let Some(min) = opts.dynamic_min_gamma {
            gamma = next_gamma(gamma, g > 0 && accepted == g, min).min(cap);
        }
    }
    out.draft_seconds = draft_s;
    out.target_seconds = target_s;
    out.total_seconds = t_start.elapsed().as_secs_f64();
    Ok(out)
}

/// Where a greedy speculative output first departs from plain greedy output, and whether the
/// departure is a floating-point tie.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Divergence {
    /// Index in the new tokens.
    pub index: usize,
    pub plain_token: i64,
    pub spec_token: i64,
    /// The target's logit of the plain token minus that of the speculative token, from one
    /// full forward over the prompt and the common prefix.
    pub gap: f64,
    /// The largest gap that counts as a tie: 4 units in the last place of the largest logit
    /// at that position in the target's dtype (bf16: 8 significant bits, fp16: 11, fp32:
    /// 24): the rounding of any logit there is on that scale.
    pub tolerance: f64,
    /// `|gap| <= tolerance`: the two tokens tie within the target's precision, so either is
    /// the greedy choice (verifying several positions in one forward rounds differently
    /// from decoding one at a time). Otherwise the speculative output is wrong.
    pub tie: bool,
}

/// 4 units in the last place of `x` in `kind` (fp32 for kinds that are not floating).
pub fn tie_tolerance(kind: Kind, x: f64) -> f64 {
    let mantissa_bits = match kind {
        Kind::BFloat16 => 7,
        Kind::Half => 10,
        Kind::Double => 52,
        _ => 23,
    };
    let e = x.abs().max(f64::MIN_POSITIVE).log2().floor();
    4.0 * 2f64.powf(e - mantissa_bits as f64)
}

/// Compares greedy outputs token for token; at the first difference, classifies it with one
/// full forward of the target over `prompt` and the common prefix (see [`Divergence`]).
/// `None` when the outputs are equal.
pub fn greedy_divergence(
    target: &TargetModel,
    prompt: &[i64],
    plain: &[i64],
    spec: &[i64],
) -> Result<Option<Divergence>> {
    let n = plain.len().max(spec.len());
    let Some(i) = (0..n).find(|&i| plain.get(i) != spec.get(i)) else {
        return Ok(None);
    };
    let (Some(&p), Some(&s)) = (plain.get(i), spec.get(i)) else {
        // one output stopped (end of sequence or length) where the other went on: not a tie
        return Ok(Some(Divergence {
            index: i,
            plain_token: plain.get(i).copied().unwrap_or(-1),
            spec_token: spec.get(i).copied().unwrap_or(-1),
            gap: f64::INFINITY,
            tolerance: 0.0,
            tie: false,
        }));
    };
    let seq: Vec<i64> = prompt.iter().chain(&plain[..i]).copied().collect();
    let ids = Tensor::from_slice(&seq).view([1, -1]).to_device(target.device());
    let out = tch::no_grad(|| target.forward(&ids, None, None, None, &Capture::logits(LogitsMode::Last)))?;
    let logits = out
        .logits
        .ok_or_else(|| ModelError::Invalid("the target's forward returned no logits".into()))?
        .to_kind(Kind::Double)
        .view(-1);
    let (lp, ls) = (logits.double_value(&[p]), logits.double_value(&[s]));
    let tolerance = tie_tolerance(target.kind(), logits.abs().max().double_value(&[]));
    let gap = lp - ls;
    Ok(Some(Divergence {
        index: i,
        plain_token: p,
        spec_token: s,
        gap,
        tolerance,
        tie: gap.abs() <= tolerance,
    }))
}
