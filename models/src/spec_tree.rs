//! Tree drafting as SGLang serves EAGLE (`--speculative-num-steps`, `--speculative-eagle-topk`,
//! `--speculative-num-draft-tokens`; docs/eval.md "Draft trees"): the draft expands a beam of
//! `topk` paths for `steps` steps, every expansion's `topk` children become candidates scored
//! by their cumulative draft probability, and the best `draft_tokens - 1` candidates (plus the
//! root, the last committed token) are verified by the target in one forward under a tree
//! attention mask.
//!
//! Building the tree, step by step (SGLang's `select_top_k_tokens` and
//! `organize_draft_results`):
//! - step 0: the draft's distribution after the committed sequence; its `topk` most likely
//!   tokens are candidates 0..topk with score = their probability, and they form the beam;
//! - step i >= 1: each beam node (in beam order) is expanded with its `topk` most likely next
//!   tokens, score = the node's score x the token's probability: `topk^2` candidates; the
//!   `topk` best of them (by score, highest first) are the next beam;
//! - the `draft_tokens - 1` best candidates of all steps are kept and put back in candidate
//!   order. Ties in score go to the earlier candidate, so a kept node's parent (whose score is
//!   at least the child's, and whose index is lower) is always kept.
//!
//! A chain is the tree with `topk = 1` and `draft_tokens = steps + 1`.

use crate::error::{ModelError, Result};
use tch::{Device, Kind, Tensor};

/// A tree as SGLang's flags give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TreeSpec {
    /// Draft steps (tree depth): `--speculative-num-steps`.
    pub steps: usize,
    /// Children per expanded node and beam width: `--speculative-eagle-topk`.
    pub topk: usize,
    /// Nodes verified, the root included: `--speculative-num-draft-tokens`.
    pub draft_tokens: usize,
}

impl TreeSpec {
    /// The chain of `n` drafts as a tree.
    pub fn chain(n: usize) -> Self {
        Self {
            steps: n,
            topk: 1,
            draft_tokens: n + 1,
        }
    }

    /// Parses `steps=5,topk=4,draft_tokens=8` (any order, every key once), then [`Self::check`].
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let (mut steps, mut topk, mut draft_tokens) = (None, None, None);
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!("tree `{s}`: `{part}` is not key=value (write steps=5,topk=4,draft_tokens=8)")
            })?;
            let n: usize = value
                .trim()
                .parse()
                .map_err(|_| format!("tree `{s}`: {key} = `{value}` is not a whole number"))?;
            let slot = match key.trim() {
                "steps" => &mut steps,
                "topk" => &mut topk,
                "draft_tokens" => &mut draft_tokens,
                other => {
                    return Err(format!(
                        "tree `{s}`: unknown key `{other}` (the keys are steps, topk, draft_tokens)"
                    ))
                }
            };
            if slot.replace(n).is_some() {
                return Err(format!("tree `{s}`: {key} given twice"));
            }
        }
        let missing = |name: &str| format!("tree `{s}`: {name} is missing (write steps=5,topk=4,draft_tokens=8)");
        let t = Self {
            steps: steps.ok_or_else(|| missing("steps"))?,
            topk: topk.ok_or_else(|| missing("topk"))?,
            draft_tokens: draft_tokens.ok_or_else(|| missing("draft_tokens"))?,
        };
        t.check()?;
        Ok(t)
    }

    /// Candidates the steps produce: `topk` from step 0, `topk^2` from each later step.
    pub fn candidates(&self) -> usize {
        self.topk + self.steps.saturating_sub(1) * self.topk * self.topk
    }

    /// Sequential draft forwards per round: one per step.
    pub fn draft_forwards(&self) -> usize {
        self.steps
    }

    pub fn check(&self) -> std::result::Result<(), String> {
        if self.steps == 0 || self.topk == 0 {
            return Err(format!("tree {self}: steps and topk must be at least 1"));
        }
        if self.draft_tokens < 2 || self.draft_tokens - 1 > self.candidates() {
            return Err(format!(
                "tree {self}: draft_tokens must be 2..={} (the root plus at most the {} candidates these steps and topk draft)",
                self.candidates() + 1,
                self.candidates()
            ));
        }
        Ok(())
    }

    /// The tree for a round that may add at most `left` tokens (drafts + the bonus token):
    /// no deeper than `left - 1`, and no more nodes than those steps draft. `None` when no
    /// draft fits.
    pub fn capped(&self, left: usize) -> Option<Self> {
        let steps = self.steps.min(left.saturating_sub(1));
        if steps == 0 {
            return None;
        }
        let t = Self {
            steps,
            topk: self.topk,
            draft_tokens: 0,
        };
        Some(Self {
            draft_tokens: self.draft_tokens.min(t.candidates() + 1),
            ..t
        })
    }

    /// SGLang's flags for this tree.
    pub fn sglang_flags(&self) -> String {
        format!(
            "--speculative-num-steps {} --speculative-eagle-topk {} --speculative-num-draft-tokens {}",
            self.steps, self.topk, self.draft_tokens
        )
    }
}

impl std::fmt::Display for TreeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "steps={},topk={},draft_tokens={}",
            self.steps, self.topk, self.draft_tokens
        )
    }
}

/// A draft tree: node 0 is the root (the last committed token, the first input of the
/// verification forward), nodes 1.. the kept candidates in candidate order (a parent before
/// its children).
#[derive(Debug, Clone, PartialEq)]
pub struct DraftTree {
    pub tokens: Vec<i64>,
    /// `parents[0]` is 0 (the root has none; never read).
    pub parents: Vec<usize>,
    pub depths: Vec<usize>,
    /// Cumulative draft probability (the root's is 1).
    pub scores: Vec<f64>,
}

impl DraftTree {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The children of `node`, in node order.
    pub fn children(&self, node: usize) -> Vec<usize> {
        (1..self.len()).filter(|&c| self.parents[c] == node).collect()
    }

    /// The nodes from the root's child to `node` (empty for the root).
    pub fn path_nodes(&self, node: usize) -> Vec<usize> {
        let mut path = Vec::with_capacity(self.depths[node]);
        let mut n = node;
        while n != 0 {
            path.push(n);
            n = self.parents[n];
        }
        path.reverse();
        path
    }

    /// Whether node `q` may attend to node `k`: `k` is `q` or one of its ancestors.
    pub fn sees(&self, q: usize, k: usize) -> bool {
        let mut n = q;
        loop {
            if n == k {
                return true;
            }
            if n == 0 {
                return false;
            }
            n = self.parents[n];
        }
    }

    /// The tree attention mask `[n, n]` (true = attend): each node sees itself and its
    /// ancestors.
    pub fn mask(&self, device: Device) -> Tensor {
        let n = self.len();
        let flat: Vec<bool> = (0..n)
            .flat_map(|q| (0..n).map(move |k| (q, k)))
            .map(|(q, k)| self.sees(q, k))
            .collect();
        Tensor::from_slice(&flat).view([n as i64, n as i64]).to_device(device)
    }

    /// Positions of the nodes when the root is at `start`: start + depth.
    pub fn positions(&self, start: i64) -> Vec<i64> {
        self.depths.iter().map(|&d| start + d as i64).collect()
    }
}

struct Candidate {
    token: i64,
    /// Candidate index of the parent; `None` for step 0's (children of the root).
    parent: Option<usize>,
    score: f64,
    path: Vec<i64>,
}

/// The `k` most likely tokens of the distribution `softmax(logits)` `[V]` with their
/// probabilities, most likely first (lower id first on ties).
fn top_tokens(logits: &Tensor, k: usize) -> Result<Vec<(i64, f64)>> {
    let probs = logits
        .to_kind(Kind::Double)
        .softmax(-1, Kind::Double)
        .to_device(Device::Cpu);
    let probs = Vec::<f64>::try_from(&probs.view([-1]))?;
    if k > probs.len() {
        return Err(ModelError::Invalid(format!(
            "tree topk {k} is more than the {} tokens of the draft's vocabulary",
            probs.len()
        )));
    }
    let mut ids: Vec<usize> = (0..probs.len()).collect();
    ids.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    Ok(ids.into_iter().take(k).map(|i| (i as i64, probs[i])).collect())
}

/// Indices of the `k` best of `scores` (by score, then lower index), best first.
fn best(scores: &[(usize, f64)], k: usize) -> Vec<usize> {
    let mut s = scores.to_vec();
    s.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    s.into_iter().take(k).map(|(i, _)| i).collect()
}

/// Builds the draft tree after the committed sequence ending with `root`: `logits_after(path)`
/// is the draft's logits `[V]` over the target vocabulary for the token after the committed
/// sequence followed by `path`; it is called once per expanded node (1 + (steps-1) x topk
/// times), paths of one step in beam order.
pub fn build_tree(
    spec: &TreeSpec,
    root: i64,
    mut logits_after: impl FnMut(&[i64]) -> Result<Tensor>,
) -> Result<DraftTree> {
    spec.check().map_err(ModelError::Invalid)?;
    let k = spec.topk;
    let mut cands: Vec<Candidate> = top_tokens(&logits_after(&[])?, k)?
        .into_iter()
        .map(|(token, p)| Candidate {
            token,
            parent: None,
            score: p,
            path: vec![token],
        })
        .collect();
    let mut beam: Vec<usize> = (0..cands.len()).collect();
    for _ in 1..spec.steps {
        let base = cands.len();
        for &b in &beam {
            let children = top_tokens(&logits_after(&cands[b].path)?, k)?;
            for (token, p) in children {
                let mut path = cands[b].path.clone();
                path.push(token);
                cands.push(Candidate {
                    token,
                    parent: Some(b),
                    score: cands[b].score * p,
                    path,
                });
            }
        }
        let step: Vec<(usize, f64)> = (base..cands.len()).map(|i| (i, cands[i].score)).collect();
        beam = best(&step, k);
    }
    let all: Vec<(usize, f64)> = cands.iter().enumerate().map(|(i, c)| (i, c.score)).collect();
    let mut kept = best(&all, spec.draft_tokens - 1);
    kept.sort_unstable();
    let mut node_of = vec![None; cands.len()];
    let mut tree = DraftTree {
        tokens: vec![root],
        parents: vec![0],
        depths: vec![0],
        scores: vec![1.0],
    };
    for &c in &kept {
        let cand = &cands[c];
        let parent = match cand.parent {
            None => 0,
            Some(p) => node_of[p].ok_or_else(|| {
                ModelError::Invalid(format!("draft tree: candidate {c} was kept without its parent {p}"))
            })?,
        };
        node_of[c] = Some(tree.len());
        tree.tokens.push(cand.token);
        tree.parents.push(parent);
        tree.depths.push(tree.depths[parent] + 1);
        tree.scores.push(cand.score);
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_the_three_keys_and_names_what_is_wrong() {
        assert_eq!(
            TreeSpec::parse("steps=5,topk=4,draft_tokens=8"),
            Ok(TreeSpec {
                steps: 5,
                topk: 4,
                draft_tokens: 8
            })
        );
        assert_eq!(
            TreeSpec::parse("topk=1, draft_tokens=4, steps=3"),
            Ok(TreeSpec::chain(3))
        );
        for (bad, says) in [
            ("steps=5,topk=4", "draft_tokens is missing"),
            ("steps=5,topk=4,draft_tokens=8,depth=2", "unknown key `depth`"),
            ("steps=5,topk=x,draft_tokens=8", "not a whole number"),
            ("steps=5,steps=4,topk=1,draft_tokens=2", "given twice"),
            // 3 steps of topk 1 draft 3 candidates: at most 4 nodes
            ("steps=3,topk=1,draft_tokens=5", "draft_tokens must be 2..=4"),
            ("steps=0,topk=1,draft_tokens=2", "at least 1"),
        ] {
            let e = TreeSpec::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert_eq!(
            TreeSpec::parse("steps=5,topk=4,draft_tokens=8").map(|t| t.to_string()),
            Ok("steps=5,topk=4,draft_tokens=8".into())
        );
    }

    #[test]
    fn capped_trees_fit_the_tokens_left() {
        let t = TreeSpec {
            steps: 5,
            topk: 4,
            draft_tokens: 8,
        };
        assert_eq!(t.capped(10), Some(t));
        // 2 tokens left: one draft and the bonus token; one step of topk 4 drafts 4 candidates
        assert_eq!(
            t.capped(2),
            Some(TreeSpec {
                steps: 1,
                topk: 4,
                draft_tokens: 5
            })
        );
        assert_eq!(t.capped(1), None);
    }

    /// Logits whose softmax is `probs` (a 6-token vocabulary).
    fn dist(probs: [f64; 6]) -> Tensor {
        Tensor::from_slice(&probs).log()
    }

    /// steps 3, topk 2, draft_tokens 6 over a vocabulary of 6, by hand:
    /// - root: p = [.1 .5 .05 .3 .05 0]: candidates c0 = 1 (.5), c1 = 3 (.3); beam [c0, c1];
    /// - after [1]: p(4) = .58, p(0) = .22: c2 = 4 (.29), c3 = 0 (.11); after [3]: p(2) = .9,
    ///   p(5) = .05: c4 = 2 (.27), c5 = 5 (.015); beam [c2 (.29), c4 (.27)];
    /// - after [1 4]: p(5) = .5, p(1) = .4: c6 = 5 (.145), c7 = 1 (.116); after [3 2]:
    ///   p(0) = .7, p(2) = .2: c8 = 0 (.189), c9 = 2 (.054).
    ///
    /// Best 5 of all: c0 .5, c1 .3, c2 .29, c4 .27, c8 .189; in candidate order: c0 c1 c2 c4
    /// c8 = nodes 1..5 with parents root, root, c0 (node 1), c1 (node 2), c4 (node 4).
    #[test]
    fn the_tree_is_sglangs_for_fixed_draft_logits() {
        let spec = TreeSpec {
            steps: 3,
            topk: 2,
            draft_tokens: 6,
        };
        let mut calls: Vec<Vec<i64>> = Vec::new();
        let tree = build_tree(&spec, 42, |path| {
            calls.push(path.to_vec());
            Ok(match path {
                [] => dist([0.1, 0.5, 0.05, 0.3, 0.05, 0.0]),
                [1] => dist([0.22, 0.05, 0.05, 0.05, 0.58, 0.05]),
                [3] => dist([0.01, 0.01, 0.9, 0.02, 0.01, 0.05]),
                [1, 4] => dist([0.02, 0.4, 0.02, 0.03, 0.03, 0.5]),
                [3, 2] => dist([0.7, 0.03, 0.2, 0.03, 0.02, 0.02]),
                other => panic!("unexpected expansion of {other:?}"),
            })
        })
        .expect("tree");
        // expanded: the root, the beam [1] [3], then the beam [1 4] [3 2]; nothing after step 3
        assert_eq!(calls, vec![vec![], vec![1], vec![3], vec![1, 4], vec![3, 2]]);
        assert_eq!(tree.tokens, vec![42, 1, 3, 4, 2, 0]);
        assert_eq!(tree.parents, vec![0, 0, 0, 1, 2, 4]);
        assert_eq!(tree.depths, vec![0, 1, 1, 2, 2, 3]);
        let want = [1.0, 0.5, 0.3, 0.29, 0.27, 0.189];
        for (got, want) in tree.scores.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{:?}", tree.scores);
        }
        assert_eq!(tree.children(0), vec![1, 2]);
        assert_eq!(tree.children(2), vec![4]);
        assert_eq!(tree.path_nodes(5), vec![2, 4, 5]);
        assert_eq!(tree.positions(10), vec![10, 11, 11, 12, 12, 13]);
        #[rustfmt::skip]
        let want_mask = [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 0, 1, 0, 1, 0],
            [1, 0, 1, 0, 1, 1],
        ];
        let mask = Vec::<Vec<bool>>::try_from(&tree.mask(Device::Cpu)).expect("mask");
        let want_mask: Vec<Vec<bool>> = want_mask.iter().map(|r| r.iter().map(|&x| x == 1).collect()).collect();
        assert_eq!(mask, want_mask);
    }

    /// With topk 1 the tree is the chain of arg-maxes.
    #[test]
    fn topk_one_is_the_greedy_chain() {
        let tree = build_tree(&TreeSpec::chain(3), 7, |path| {
            // the arg-max after a path of length d is token d + 2
            let mut p = [0.1; 6];
            p[path.len() + 2] = 0.5;
            Ok(dist(p))
        })
        .expect("tree");
        assert_eq!(tree.tokens, vec![7, 2, 3, 4]);
        assert_eq!(tree.parents, vec![0, 0, 1, 2]);
        assert_eq!(tree.depths, vec![0, 1, 2, 3]);
    }
}
