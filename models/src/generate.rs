//! Plain autoregressive decoding with the target's KV cache: one sequence ([`generate`]) or a
//! left-padded batch of independent prompts ([`generate_batch`]).

use crate::error::{ModelError, Result};
use crate::llm::{Capture, LogitsMode, TargetModel};
use std::time::Instant;
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax); > 0 = sample from softmax(logits / temperature).
    pub temperature: f64,
    /// Nucleus sampling threshold (1.0 = off). Only used when sampling.
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after emitting any of these ids (the id is kept in the output).
    pub stop_ids: Vec<i64>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
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

/// Picks the next token from logits `[V]` (fp32).
pub fn sample_next(logits: &Tensor, temperature: f64, top_p: f64) -> Result<i64> {
    let logits = logits.to_kind(Kind::Float);
    let id = if temperature <= 0.0 {
        logits.argmax(-1, false)
    } else {
        let mut probs = (logits / temperature).softmax(-1, Kind::Float);
        if top_p < 1.0 {
            let (sorted, idx) = probs.sort(-1, true);
            let cum = sorted.cumsum(-1, Kind::Float);
            // keep tokens whose preceding mass is < top_p (always keeps the top token)
            let keep = (&cum - &sorted).lt(top_p);
            let filtered = sorted * keep.to_kind(Kind::Float);
            probs = Tensor::zeros_like(&probs).scatter(-1, &idx, &filtered);
        }
        probs.multinomial(1, false).squeeze()
    };
    i64::try_from(&id).map_err(ModelError::Torch)
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

/// Picks one token per row from logits `[B, V]`: argmax when `temperature <= 0`, else
/// inverse-CDF sampling from softmax(logits / temperature) restricted to the top-p nucleus,
/// with `uniforms[i]` in [0, 1) as row i's random draw.
pub fn sample_rows(logits: &Tensor, temperature: f64, top_p: f64, uniforms: &[f64]) -> Result<Vec<i64>> {
    let logits = logits.to_kind(Kind::Float);
    let (b, v) = logits.size2().map_err(ModelError::Torch)?;
    let ids = if temperature <= 0.0 {
        logits.argmax(-1, false)
    } else {
        if uniforms.len() as i64 != b {
            return Err(ModelError::Invalid(format!(
                "sample_rows: {} random draws for {b} rows",
                uniforms.len()
            )));
        }
        let probs = (&logits / temperature).softmax(-1, Kind::Float);
        let (mut sorted, idx) = probs.sort(-1, true);
        if top_p < 1.0 {
            let cum = sorted.cumsum(-1, Kind::Float);
            // keep tokens whose preceding mass is < top_p (always keeps the top token)
            let keep = (&cum - &sorted).lt(top_p);
            sorted *= keep.to_kind(Kind::Float);
        }
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
    let sampling = opts.temperature > 0.0;
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
            let next = sample_rows(&logits, opts.temperature, opts.top_p, &uniforms)?;
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
