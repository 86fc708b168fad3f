//! Plain autoregressive decoding with the target's KV cache.

use crate::error::{ModelError, Result};
use crate::target::{Capture, LogitsMode, TargetModel};
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
    Ok(i64::try_from(&id).map_err(ModelError::Torch)?)
}

/// Generates up to `max_new_tokens` after `prompt`, calling `on_token` for each new token.
pub fn generate(
    model: &TargetModel,
    prompt: &[i64],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(i64),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(ModelError::Invalid(
            "cannot generate from an empty prompt".into(),
        ));
    }
    tch::manual_seed(opts.seed as i64);
    let mut tokens = Vec::new();
    let mut stopped = false;
    let mut prefill_seconds = 0.0;
    let t0 = Instant::now();
    tch::no_grad(|| -> Result<()> {
        let mut cache = model.new_cache();
        let capture = Capture::logits(LogitsMode::Last);
        let mut input = Tensor::from_slice(prompt).view([1, -1]);
        for step in 0..opts.max_new_tokens {
            let out = model.forward(&input, None, None, Some(&mut cache), &capture)?;
            let logits = out
                .logits
                .ok_or_else(|| ModelError::Invalid("no logits".into()))?;
            let next = sample_next(&logits.view([-1]), opts.temperature, opts.top_p)?;
            if step == 0 {
                prefill_seconds = t0.elapsed().as_secs_f64();
            }
            tokens.push(next);
            on_token(next);
            if opts.stop_ids.contains(&next) {
                stopped = true;
                break;
            }
            input = Tensor::from_slice(&[next]).view([1, 1]);
        }
        Ok(())
    })?;
    let total = t0.elapsed().as_secs_f64();
    Ok(Generation {
        tokens,
        stopped,
        prefill_seconds,
        decode_seconds: total - prefill_seconds,
    })
}
