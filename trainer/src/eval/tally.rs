//! The figures of `forge eval`: sums over answered turns ([`Tally`]) and their JSON form.

use forge_models::speculative::Round;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Sums over turns, turned into the report's figures.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub turns: usize,
    pub spec_tokens: usize,
    pub rounds: usize,
    pub round_tokens: usize,
    /// Per draft position (depth) i: rounds that drafted it, that reached it (every earlier
    /// position accepted) and that accepted it.
    pub proposed: Vec<usize>,
    pub reached: Vec<usize>,
    pub accepted: Vec<usize>,
    pub gammas: BTreeMap<usize, usize>,
    /// Draft tokens proposed (all rounds).
    pub drafted: usize,
    /// The draft sessions' named event counts (the hybrid: block choices), summed.
    pub counters: BTreeMap<String, u64>,
    pub draft_s: f64,
    pub target_s: f64,
    pub prefill_s: f64,
    pub spec_s: f64,
    pub base_tokens: usize,
    pub base_s: f64,
    /// Plain decoding without its prefill: the target's time per decoded token.
    pub base_decode_s: f64,
    pub base_decode_tokens: usize,
    pub compared: usize,
    pub mismatches: usize,
    /// Mismatches whose first differing token is a floating-point tie of the target's
    /// logits (`speculative::Divergence::tie`): not errors of the speculative decoder.
    pub mismatches_at_ties: usize,
}

impl Tally {
    pub fn add_rounds(&mut self, rounds: &[Round]) {
        for r in rounds {
            self.rounds += 1;
            self.round_tokens += r.emitted;
            *self.gammas.entry(r.proposed).or_default() += 1;
            self.drafted += r.proposed;
            if self.proposed.len() < r.depth {
                self.proposed.resize(r.depth, 0);
                self.reached.resize(r.depth, 0);
                self.accepted.resize(r.depth, 0);
            }
            for i in 0..r.depth {
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

    pub fn merge(&mut self, o: &Tally) {
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

    pub fn tau(&self) -> f64 {
        ratio(self.round_tokens as f64, self.rounds as f64)
    }

    pub fn speedup(&self) -> Option<f64> {
        (self.base_s > 0.0 && self.spec_s > 0.0 && self.base_tokens > 0)
            .then(|| ratio(self.spec_tokens as f64, self.spec_s) / ratio(self.base_tokens as f64, self.base_s))
    }

    /// Takes `o`'s plain decoding as this tally's baseline (a pass that ran none of its own).
    pub fn baseline_of(&mut self, o: &Tally) {
        self.base_tokens = o.base_tokens;
        self.base_s = o.base_s;
        self.base_decode_s = o.base_decode_s;
        self.base_decode_tokens = o.base_decode_tokens;
    }

    /// The draft's time per drafted token over the target's per plainly decoded token.
    pub fn draft_time_ratio(&self) -> Option<f64> {
        (self.drafted > 0 && self.base_decode_tokens > 0 && self.base_decode_s > 0.0).then(|| {
            ratio(self.draft_s, self.drafted as f64) / ratio(self.base_decode_s, self.base_decode_tokens as f64)
        })
    }

    pub fn to_json(&self, baseline: bool) -> Value {
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

/// `a / b`, 0 when `b` is 0.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// `x` rounded to 4 decimals (the report's precision).
pub fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}
