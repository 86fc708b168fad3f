//! Plain autoregressive decoding with the target's KV cache: one sequence ([`generate`]) or a
//! left-padded batch of independent prompts ([`generate_batch`]).

use crate::error::{ModelError, Result};
use crate::llm::{Capture, LogitsMode, TargetModel};
use std::time::Instant;
use tch::{Kind, Tensor};

/// How the next token is picked from logits, as vLLM and SGLang apply their sampling
/// parameters: temperature first, then top-k, then top-p (nucleus) over what top-k kept, then
/// renormalised. Greedy (arg-max) when `temperature <= 0`, where top-k and top-p do nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 = greedy; > 0 = sample from softmax(logits / temperature), filtered as below.
    pub temperature: f64,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p` (every token
    /// whose preceding mass is below it; the most likely token always stays). 1.0 = off.
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (and any tied with the k-th, as vLLM does).
    /// 0 = off.
    pub top_k: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Self::greedy()
    }
}

impl Sampling {
    pub const fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
        }
    }

    /// Sampling at `temperature` with no top-p or top-k filter.
    pub const fn at(temperature: f64) -> Self {
        Self {
            temperature,
            top_p: 1.0,
            top_k: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// The values allowed: temperature >= 0 and finite, top_p in (0, 1]; the error starts with
    /// the parameter's name as the commands' flags spell it (`temperature`, `top-p`), so a
    /// command prefixes `--`, and says what it got.
    pub fn check(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::Invalid(format!(
                "temperature must be >= 0 (0 = greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Invalid(format!(
                "top-p must be in (0, 1] (1 = off), got {}",
                self.top_p
            )));
        }
        Ok(())
    }

    /// Says what is sampled, e.g. "temperature 0.7, top-p 0.9, top-k 50" or "greedy".
    pub fn describe(&self) -> String {
        if self.is_greedy() {
            return "greedy".into();
        }
        let mut s = format!("temperature {}", self.temperature);
        if self.top_p < 1.0 {
            s += &format!(", top-p {}", self.top_p);
        }
        if self.top_k > 0 {
            s += &format!(", top-k {}", self.top_k);
        }
        s
    }

    /// The distribution sampled from logits `[.., V]`: fp32 probabilities, zero outside the
    /// tokens top-k and top-p keep, each row summing to 1. Greedy sampling gives the one-hot
    /// row of the arg-max.
    pub fn probs(&self, logits: &Tensor) -> Tensor {
        let logits = logits.to_kind(Kind::Float);
        if self.is_greedy() {
            let best = logits.argmax(-1, true);
            return logits.zeros_like().scatter_value(-1, &best, 1.0);
        }
        if !self.filters(&logits) {
            return (&logits / self.temperature).softmax(-1, Kind::Float);
        }
        let (sorted, idx) = self.sorted_probs(&logits);
        let kept = &sorted / sorted.sum_dim_intlist(-1, true, Kind::Float);
        logits.zeros_like().scatter(-1, &idx, &kept)
    }

    /// Whether top-k or top-p removes anything from rows of `logits`.
    fn filters(&self, logits: &Tensor) -> bool {
        let v = logits.size().last().copied().unwrap_or(0);
        (self.top_k > 0 && (self.top_k as i64) < v) || self.top_p < 1.0
    }

    /// What [`Sampling::probs`] keeps, in descending order with one sort: (softmax(logits / T)
    /// through top-k, renormalised, then top-p, not renormalised after it; the token ids).
    fn sorted_probs(&self, logits: &Tensor) -> (Tensor, Tensor) {
        let (mut sorted, idx) = (logits / self.temperature).softmax(-1, Kind::Float).sort(-1, true);
        let v = logits.size().last().copied().unwrap_or(0);
        if self.top_k > 0 && (self.top_k as i64) < v {
            // every token tied with the k-th stays
            let kth = sorted.narrow(-1, self.top_k as i64 - 1, 1);
            sorted = &sorted * sorted.ge_tensor(&kth).to_kind(Kind::Float);
            sorted = &sorted / sorted.sum_dim_intlist(-1, true, Kind::Float);
        }
        if self.top_p < 1.0 {
            let cum = sorted.cumsum(-1, Kind::Float);
            // keep tokens whose preceding mass is < top_p (always keeps the top token)
            let keep = (&cum - &sorted).lt(self.top_p).to_kind(Kind::Float);
            sorted *= keep;
        }
        (sorted, idx)
    }
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Greedy or sampled, with its filters.
    pub sampling: Sampling,
    pub seed: u64,
    /// Generation stops after emitting any of these ids (the id is kept in the output).
    pub stop_ids: Vec<i64>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: Sampling::greedy(),
            seed: 0,
            stop_ids: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<i64>,
    pub stopped: bool,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl Generation {
    /// Decode throughput: new tokens after the first over the decode time.
    pub fn decode_tokens_per_second(&self) -> f64 {
        if self.tokens.len() <= 1 || self.decode_seconds <= 0.0 {
            return 0.0;
        }
        (self.tokens.len() - 1) as f64 / self.decode_seconds
    }
}

/// Generates up to `max_new_tokens` after `prompt`, calling `on_token` for each new token.
/// Sampling (temperature > 0) draws from a [`RowRng`] seeded with `opts.seed`.
pub fn generate(
    model: &TargetModel,
    prompt: &[i64],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(i64),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(ModelError::Invalid("cannot generate from an empty prompt".into()));
    }
    let mut gens = generate_batch_seeded(model, &[prompt], &[opts.seed], opts, |_, id| on_token(id))?;
    gens.pop().ok_or_else(|| ModelError::Invalid("no generation".into()))
}

/// A small deterministic random generator (SplitMix64) for sampling: one per row, so a
/// row's sampled tokens depend on its seed only, not on the batch it was decoded in.
#[derive(Debug, Clone)]
pub struct RowRng(u64);

impl RowRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Picks one token per row from logits `[B, V]`: arg-max when greedy, else inverse-CDF
/// sampling from [`Sampling::probs`] with `uniforms[i]` in [0, 1) as row i's random draw.
pub fn sample_rows(logits: &Tensor, sampling: &Sampling, uniforms: &[f64]) -> Result<Vec<i64>> {
    let logits = logits.to_kind(Kind::Float);
    let (b, v) = logits.size2().map_err(ModelError::Torch)?;
    let ids = if sampling.is_greedy() {
        logits.argmax(-1, false)
    } else {
        if uniforms.len() as i64 != b {
            return Err(ModelError::Invalid(format!(
                "sample_rows: {} random draws for {b} rows",
                uniforms.len()
            )));
        }
        let (sorted, idx) = sampling.sorted_probs(&logits);
        let cum = sorted.cumsum(-1, Kind::Float);
        let total = cum.narrow(1, v - 1, 1);
        let u: Vec<f32> = uniforms.iter().map(|&u| u as f32).collect();
        let u = Tensor::from_slice(&u).view([b, 1]).to_device(logits.device());
        let target = u * total;
        // first sorted position whose cumulative mass exceeds the draw, never past the
        // last token with non-zero probability (guards against rounding of u * total)
        let last_kept = sorted.gt(0.0).sum_dim_intlist(-1, true, Kind::Int64).clamp_min(1) - 1;
        let k = cum
            .le_tensor(&target)
            .sum_dim_intlist(-1, true, Kind::Int64)
            .minimum(&last_kept);
        idx.gather(-1, &k, false).view([b])
    };
    Vec::<i64>::try_from(&ids.to_device(tch::Device::Cpu)).map_err(ModelError::Torch)
}

/// The seed of row `row` in [`generate_batch`]: `seed + row`, so row i of a batch samples
/// exactly what [`generate`] samples alone with `seed + i`.
pub fn row_seed(seed: u64, row: usize) -> u64 {
    seed.wrapping_add(row as u64)
}

/// Batched generation: every prompt is decoded independently (left padding with a
/// key-validity mask, positions starting at 0 in every row, one KV cache for the batch).
/// Row i samples with seed `opts.seed + i` (see [`row_seed`]); greedy rows give what
/// [`generate`] gives for the prompt alone.
pub fn generate_batch<P: AsRef<[i64]>>(
    model: &TargetModel,
    prompts: &[P],
    opts: &GenerateOptions,
) -> Result<Vec<Generation>> {
    let seeds: Vec<u64> = (0..prompts.len()).map(|i| row_seed(opts.seed, i)).collect();
    generate_batch_seeded(model, prompts, &seeds, opts, |_, _| {})
}

/// [`generate_batch`] with an explicit sampling seed per row (`opts.seed` is not used) and a
/// callback `on_token(row, id)` for every new token of a row that is still generating.
///
/// A row stops at its first stop id (kept in its output) or after `max_new_tokens`; rows
/// that stopped keep being fed a pad token until the whole batch is done, but their output
/// does not grow.
pub fn generate_batch_seeded<P: AsRef<[i64]>>(
    model: &TargetModel,
    prompts: &[P],
    seeds: &[u64],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(usize, i64),
) -> Result<Vec<Generation>> {
    let b = prompts.len();
    if seeds.len() != b {
        return Err(ModelError::Invalid(format!(
            "generate_batch: {} seeds for {b} prompts",
            seeds.len()
        )));
    }
    if b == 0 {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(|p| p.as_ref().is_empty()) {
        return Err(ModelError::Invalid(format!(
            "cannot generate from an empty prompt (row {i} of the batch)"
        )));
    }
    let lens: Vec<i64> = prompts.iter().map(|p| p.as_ref().len() as i64).collect();
    let max_len = lens.iter().copied().max().unwrap_or(0);
    let padded = lens.iter().any(|&l| l != max_len);
    // Any id works as padding: padded keys are masked out and their rows' outputs ignored.
    let pad_id = 0i64;
    let bi = b as i64;
    let mut ids = Vec::with_capacity(b * max_len as usize);
    let mut valid = Vec::with_capacity(ids.capacity());
    let mut pos = Vec::with_capacity(ids.capacity());
    for (p, &l) in prompts.iter().zip(&lens) {
        let pad = (max_len - l) as usize;
        ids.extend(std::iter::repeat_n(pad_id, pad));
        ids.extend_from_slice(p.as_ref());
        valid.extend(std::iter::repeat_n(0i64, pad));
        valid.extend(std::iter::repeat_n(1i64, l as usize));
        pos.extend(std::iter::repeat_n(0i64, pad));
        pos.extend(0..l);
    }
    let device = model.device();
    let mut rngs: Vec<RowRng> = seeds.iter().map(|&s| RowRng::new(s)).collect();
    let sampling = !opts.sampling.is_greedy();
    let mut tokens: Vec<Vec<i64>> = vec![Vec::new(); b];
    let mut stopped = vec![false; b];
    let mut finished_at: Vec<Option<f64>> = vec![None; b];
    let mut prefill_seconds = 0.0;
    let t0 = Instant::now();
    tch::no_grad(|| -> Result<()> {
        let mut cache = model.new_cache();
        let capture = Capture::logits(LogitsMode::Last);
        let mut input = Tensor::from_slice(&ids).view([bi, max_len]);
        // Without padding the defaults (positions past.., every key valid) are exact and
        // keep the single-sequence fast path (no explicit mask).
        let mut positions = padded.then(|| Tensor::from_slice(&pos).view([bi, max_len]));
        let mut key_valid = padded.then(|| Tensor::from_slice(&valid).view([bi, max_len]).to_device(device));
        let mut active = b;
        for step in 0..opts.max_new_tokens {
            let out = model.forward(
                &input,
                positions.as_ref(),
                key_valid.as_ref(),
                Some(&mut cache),
                &capture,
            )?;
            let logits = out
                .logits
                .ok_or_else(|| ModelError::Invalid("no logits".into()))?
                .view([bi, -1]);
            let uniforms: Vec<f64> = if sampling {
                rngs.iter_mut().map(|r| r.next_f64()).collect()
            } else {
                Vec::new()
            };
            let next = sample_rows(&logits, &opts.sampling, &uniforms)?;
            if step == 0 {
                prefill_seconds = t0.elapsed().as_secs_f64();
            }
            for (i, &id) in next.iter().enumerate() {
                if finished_at[i].is_some() {
                    continue;
                }
                tokens[i].push(id);
                on_token(i, id);
                if opts.stop_ids.contains(&id) {
                    stopped[i] = true;
                    finished_at[i] = Some(t0.elapsed().as_secs_f64());
                    active -= 1;
                }
            }
            if active == 0 || step + 1 == opts.max_new_tokens {
                break;
            }
            let feed: Vec<i64> = next
                .iter()
                .zip(&finished_at)
                .map(|(&id, f)| if f.is_some() { pad_id } else { id })
                .collect();
            input = Tensor::from_slice(&feed).view([bi, 1]);
            if padded {
                let p: Vec<i64> = lens.iter().map(|&l| l + step as i64).collect();
                positions = Some(Tensor::from_slice(&p).view([bi, 1]));
                key_valid = key_valid.map(|kv| {
                    let col = Tensor::ones([bi, 1], (kv.kind(), device));
                    Tensor::cat(&[kv, col], 1)
                });
            }
        }
        Ok(())
    })?;
    let total = t0.elapsed().as_secs_f64();
    Ok(tokens
        .into_iter()
        .zip(stopped)
        .zip(finished_at)
        .map(|((tokens, stopped), end)| Generation {
            tokens,
            stopped,
            prefill_seconds,
            decode_seconds: end.unwrap_or(total) - prefill_seconds,
        })
        .collect())
}
