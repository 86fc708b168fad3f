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
use crate::spec_tree::{build_tree, DraftTree, TreeSpec};
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
    /// Whether the draft can branch ([`Self::path_logits`]): tree drafting. Default: chains only.
    fn can_branch(&self) -> bool {
        false
    }
    /// Tree drafting ([`crate::spec_tree`]): the draft's logits `[V]` over the target
    /// vocabulary (fp32, -inf outside a reduced draft vocabulary) for the token after the
    /// committed sequence followed by the drafted tokens `path` (empty: right after it). Calls
    /// between two commits may follow any paths in any order; what the draft computes past
    /// the committed positions is dropped at the next commit or proposal.
    fn path_logits(&mut self, _path: &[i64]) -> Result<Tensor> {
        Err(ModelError::Invalid(
            "this draft proposes chains only (no tree drafting)".into(),
        ))
    }
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

/// Tree drafting for a draft that reads its own predicted features (EAGLE-1, EAGLE-3, the
/// hybrid): the drafted tokens past the committed positions whose keys and values the draft's
/// caches hold, in order, and the predicted feature after each. Following a new path keeps the
/// common prefix and recomputes the rest.
#[derive(Debug, Default)]
pub struct DraftedPath {
    tokens: Vec<i64>,
    /// `features[0]` is the feature after the last committed position; `features[i]` the one
    /// after `tokens[i - 1]`.
    features: Vec<Tensor>,
}

impl DraftedPath {
    /// Nothing drafted; `first` is the feature after the last committed position.
    pub fn reset(&mut self, first: &Tensor) {
        self.tokens.clear();
        self.features = vec![first.shallow_clone()];
    }

    /// Keeps the longest common prefix of the drafted tokens and `path`; returns its length:
    /// the drafted positions whose keys the caches must keep (truncate them to committed + it).
    pub fn keep_common(&mut self, path: &[i64]) -> Result<usize> {
        if self.features.is_empty() {
            return Err(ModelError::Invalid("tree drafting before a commit".into()));
        }
        let c = self.tokens.iter().zip(path).take_while(|(a, b)| a == b).count();
        self.tokens.truncate(c);
        self.features.truncate(c + 1);
        Ok(c)
    }

    /// After [`Self::keep_common`]: runs `advance(feature, token, i)` (the feature after drafted
    /// token i at position committed + i, as [`propose_chain`] calls it) for the rest of `path`;
    /// returns the feature after the whole path.
    pub fn extend(
        &mut self,
        path: &[i64],
        mut advance: impl FnMut(&Tensor, i64, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        for (i, &token) in path.iter().enumerate().skip(self.tokens.len()) {
            let f = advance(&self.features[i], token, i)?;
            self.tokens.push(token);
            self.features.push(f);
        }
        self.features
            .last()
            .map(Tensor::shallow_clone)
            .ok_or_else(|| ModelError::Invalid("tree drafting before a commit".into()))
    }
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
    /// Draft a tree instead of a chain ([`crate::spec_tree`]; `gamma` is then unused).
    pub tree: Option<TreeSpec>,
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
            tree: None,
        }
    }
}

/// One verification round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Round {
    /// The gamma in force for this round (dynamic gamma's state).
    pub gamma: usize,
    /// Tokens actually proposed (gamma capped by the draft and the tokens left; when a stop
    /// id among the accepted proposals ends the answer, only those up to it). A tree's
    /// drafted nodes (draft_tokens - 1).
    pub proposed: usize,
    /// The deepest draft position this round could accept: `proposed` for a chain, the
    /// tree's depth for a tree (both cut at a stop as `proposed`).
    pub depth: usize,
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

/// The target's features at `rows` of a verification forward: consecutive rows from 0 (a
/// chain) as [`features_at`] gives them, otherwise gathered (a tree's accepted path).
fn features_rows(out: &crate::llm::TargetOutput, rows: &[i64]) -> StepFeatures {
    let n = rows.len() as i64;
    if rows.iter().enumerate().all(|(i, &r)| r == i as i64) {
        return features_at(out, 0, n);
    }
    let idx = Tensor::from_slice(rows).to_device(out.hidden_normed.device());
    StepFeatures {
        hidden_normed: out.hidden_normed.get(0).index_select(0, &idx),
        aux: (!out.layers.is_empty()).then(|| Tensor::cat(&out.layers, -1).get(0).index_select(0, &idx)),
    }
}

/// What one verification round decided.
struct Verified {
    /// Cached positions before the round (the root's, `last`'s, position).
    start: i64,
    /// The accepted drafts, in order.
    drafts: Vec<i64>,
    /// The target's token after them (the correction, or the bonus token).
    new: i64,
    /// Rows of `ver` at the root and the accepted drafts (what the cache now keeps).
    rows: Vec<i64>,
    ver: crate::llm::TargetOutput,
}

/// Verifies a chain (or nothing, when no draft fit) in one target forward over `[last, d_1..]`
/// and rolls the cache back past the first rejected draft.
#[allow(clippy::too_many_arguments)]
fn verify_chain(
    target: &TargetModel,
    draft: &mut dyn DraftSession,
    cache: &mut crate::llm::KvCache,
    last: i64,
    proposal: Option<&Proposal>,
    capture_all: &Capture,
    opts: &SpecOptions,
    rng: &mut RowRng,
) -> Result<Verified> {
    let sampling = &opts.sampling;
    let start = cached(draft, cache);
    let mut input = vec![last];
    if let Some(p) = proposal {
        input.extend_from_slice(&p.tokens);
    }
    let ver = tch::no_grad(|| target_forward(target, draft, cache, &input, capture_all))?;
    let logits = ver
        .logits
        .as_ref()
        .ok_or_else(|| ModelError::Invalid("verification gave no logits".into()))?
        .get(0)
        .to_kind(Kind::Float); // [g+1, V]
    let (accepted, new) = match proposal {
        None => (0, pick(&logits.get(0), sampling, rng)?),
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
                Acceptance::Exact => draft_sampling(opts).probs(&p.logits.to_device(target.device())),
            };
            accept_sampled(&pt, &q, &p.tokens, rng)?
        }
    };
    // keep `last` and the accepted drafts in the cache
    truncate(draft, cache, start + accepted as i64 + 1);
    Ok(Verified {
        start,
        drafts: proposal.map(|p| p.tokens[..accepted].to_vec()).unwrap_or_default(),
        new,
        rows: (0..=accepted as i64).collect(),
        ver,
    })
}

/// A tree of the root alone (no draft fits in the tokens left).
fn build_tree_of_root(last: i64) -> DraftTree {
    DraftTree {
        tokens: vec![last],
        parents: vec![0],
        depths: vec![0],
        scores: vec![1.0],
    }
}

/// Verifies a draft tree in one target forward under its tree mask and keeps the root and the
/// accepted path in the cache. Greedy: from the root, follow the child whose token is the
/// target's arg-max at the current node, as long as there is one. Sampled (the engines'
/// target-only tree sampling, SGLang's `tree_speculative_sampling_target_only` with both
/// thresholds 1): at the current node draw x from the target's p with one uniform u by
/// inverse CDF over the children's tokens first: the first child c with u < sum of p over the
/// children up to c is accepted; when u falls past them all, the next token is drawn from p
/// without the children's tokens (renormalised). Each emitted token follows p exactly.
fn verify_tree(
    target: &TargetModel,
    cache: &mut crate::llm::KvCache,
    tree: &DraftTree,
    capture_all: &Capture,
    sampling: &Sampling,
    rng: &mut RowRng,
) -> Result<Verified> {
    let start = cache.len();
    let device = target.device();
    let ver = tch::no_grad(|| {
        target.forward_tree(
            &tree.tokens,
            &tree.positions(start),
            &tree.mask(device),
            cache,
            capture_all,
        )
    })?;
    let logits = ver
        .logits
        .as_ref()
        .ok_or_else(|| ModelError::Invalid("verification gave no logits".into()))?
        .get(0)
        .to_kind(Kind::Float); // [n, V]
    let mut node = 0;
    let new = if sampling.is_greedy() {
        let best = Vec::<i64>::try_from(&logits.argmax(-1, false).to_device(tch::Device::Cpu))?;
        loop {
            let want = best[node];
            match tree.children(node).into_iter().find(|&c| tree.tokens[c] == want) {
                Some(c) => node = c,
                None => break want,
            }
        }
    } else {
        loop {
            let p = sampling.probs(&logits.get(node as i64)).to_device(tch::Device::Cpu);
            let children = tree.children(node);
            let u = rng.next_f64();
            let mut cum = 0.0;
            let hit = children.iter().copied().find(|&c| {
                cum += p.double_value(&[tree.tokens[c]]);
                u < cum
            });
            match hit {
                Some(c) => node = c,
                None => {
                    let ids: Vec<i64> = children.iter().map(|&c| tree.tokens[c]).collect();
                    let rest = if ids.is_empty() {
                        p.shallow_clone()
                    } else {
                        p.index_fill(0, &Tensor::from_slice(&ids), 0.0)
                    };
                    let mass = rest.sum(Kind::Double).double_value(&[]);
                    break if mass > 0.0 { draw(&rest, rng)? } else { draw(&p, rng)? };
                }
            }
        }
    };
    let path = tree.path_nodes(node);
    let rows: Vec<i64> = std::iter::once(0).chain(path.iter().map(|&n| n as i64)).collect();
    cache.keep(start, &rows);
    Ok(Verified {
        start,
        drafts: path.iter().map(|&n| tree.tokens[n]).collect(),
        new,
        rows,
        ver,
    })
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
    if let Some(t) = &opts.tree {
        t.check().map_err(ModelError::Invalid)?;
        if !draft.can_branch() {
            return Err(ModelError::Invalid(format!(
                "tree {t}: this draft proposes chains only (trees need a draft that can branch: medusa, eagle1, eagle3, hybrid, knowledge)"
            )));
        }
        if draft.shared_target().is_some() {
            return Err(ModelError::Invalid(format!(
                "tree {t}: a draft inside the target drafts chains only"
            )));
        }
        if opts.dynamic_min_gamma.is_some() {
            return Err(ModelError::Invalid(format!(
                "tree {t}: dynamic gamma applies to chains only"
            )));
        }
        if !opts.sampling.is_greedy() && opts.acceptance == Acceptance::Exact {
            return Err(ModelError::Invalid(format!(
                "tree {t}: sampled trees are accepted as the engines do (acceptance engine); exact acceptance is for chains"
            )));
        }
    }
    if opts.max_new_tokens == 0 {
        return Ok(SpecOutput::default());
    }
    let t_start = Instant::now();
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
        let (v, g, depth, round_gamma) = match &opts.tree {
            Some(spec) => {
                let capped = spec.capped(left);
                let t = Instant::now();
                let tree = match &capped {
                    Some(c) => tch::no_grad(|| build_tree(c, last, |path| draft.path_logits(path)))?,
                    None => build_tree_of_root(last),
                };
                draft_s += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let v = verify_tree(target, &mut cache, &tree, &capture_all, sampling, &mut rng)?;
                target_s += t.elapsed().as_secs_f64();
                let depth = tree.depths.iter().copied().max().unwrap_or(0);
                (v, tree.len() - 1, depth, spec.steps)
            }
            None => {
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
                let v = verify_chain(
                    target,
                    draft,
                    &mut cache,
                    last,
                    proposal.as_ref(),
                    &capture_all,
                    opts,
                    &mut rng,
                )?;
                target_s += t.elapsed().as_secs_f64();
                (v, g, g, gamma)
            }
        };
        let accepted = v.drafts.len();
        let mut emitted = v.drafts.clone();
        emitted.push(v.new);
        let mut keep = emitted.len().min(left);
        if let Some(i) = emitted[..keep].iter().position(|id| opts.stop_ids.contains(id)) {
            keep = i + 1;
            out.stopped = true;
        }
        out.tokens.extend_from_slice(&emitted[..keep]);
        // a stop among the accepted drafts ends the answer: the drafts after it do not count
        let stop_in_drafts = out.stopped && keep <= accepted;
        out.rounds.push(Round {
            gamma: round_gamma,
            proposed: if stop_in_drafts { keep } else { g },
            depth: if stop_in_drafts { keep } else { depth },
            accepted: if stop_in_drafts { keep } else { accepted },
            emitted: keep,
        });
        if out.stopped || out.tokens.len() >= opts.max_new_tokens {
            break;
        }
        let t = Instant::now();
        tch::no_grad(|| draft.commit(v.start, &features_rows(&v.ver, &v.rows), &emitted))?;
        draft_s += t.elapsed().as_secs_f64();
        last = v.new;
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
