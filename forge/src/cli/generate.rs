//! `forge generate`: plain autoregressive decoding with a target model, streamed.

use anyhow::{bail, Context, Result};
use forge_data::{ChatTemplate, Message, Role, TextTokenizer};
use forge_models::generate::{generate, GenerateOptions, Sampling};
use forge_models::{parse_device, TargetModel};
use forge_trainer::regenerate::resolve_dtype;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    target: PathBuf,
    /// The prompt text (a user message with --chat).
    #[arg(long)]
    prompt: String,
    /// Render the prompt with the target's chat template (as a user turn) and stop at end of turn.
    #[arg(long)]
    chat: bool,
    /// System message for --chat (default: the template's own, if any).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy; > 0 samples from softmax(logits / T).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling threshold (with --temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Keep only the K most likely tokens before top-p (with --temperature > 0; 0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weight format: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Print a JSON object with the prompt and output token ids instead of plain text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let sampling = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
    };
    if let Err(e) = sampling.check() {
        bail!("--{e}");
    }
    let device = parse_device(&a.device)?;
    let dtype = resolve_dtype(&a.dtype, device)?;
    let tokenizer = TextTokenizer::from_dir(&a.target)?;
    let t0 = std::time::Instant::now();
    let model = TargetModel::load(&a.target, dtype, device)
        .with_context(|| format!("loading target {}", a.target.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut stop_ids = model.config.eos_token_ids.clone();
    let text = if a.chat {
        let template = ChatTemplate::detect(&a.target)?;
        if let Some(id) = tokenizer.token_id(template.end_of_turn()) {
            stop_ids.push(id);
        }
        let mut messages = Vec::new();
        if let Some(sys) = &a.system {
            messages.push(Message::new(Role::System, sys.clone()));
        }
        messages.push(Message::new(Role::User, a.prompt.clone()));
        template.render(&messages, true)
    } else {
        a.prompt.clone()
    };
    let prompt_ids = tokenizer.encode(&text)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        seed: a.seed,
        stop_ids: stop_ids.clone(),
    };
    let mut stdout = std::io::stdout();
    let mut printed = String::new();
    let mut so_far: Vec<i64> = Vec::new();
    let gen = generate(&model, &prompt_ids, &opts, |id| {
        if a.json || stop_ids.contains(&id) {
            return;
        }
        // Stream text: print what the decoded text gained (multi-byte safe).
        so_far.push(id);
        if let Ok(s) = tokenizer.decode(&so_far, true) {
            if s.len() > printed.len() && s.starts_with(&printed) && !s.ends_with('\u{FFFD}') {
                let _ = write!(stdout, "{}", &s[printed.len()..]);
                let _ = stdout.flush();
                printed = s;
            }
        }
    })?;
    let content: Vec<i64> = gen.tokens.iter().copied().filter(|id| !stop_ids.contains(id)).collect();
    let out_text = tokenizer.decode(&content, true)?;
    if a.json {
        let v = serde_json::json!({
            "prompt": text,
            "prompt_ids": prompt_ids,
            "output_ids": gen.tokens,
            "text": out_text,
            "stopped": gen.stopped,
            "prefill_seconds": gen.prefill_seconds,
            "decode_tokens_per_second": gen.decode_tokens_per_second(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if out_text.len() > printed.len() {
            print!("{}", &out_text[printed.len().min(out_text.len())..]);
        }
        println!();
    }
    eprintln!(
        "forge generate: {} on {:?} ({}), load {:.2}s, prompt {} tokens, prefill {:.3}s, {} new tokens, decode {:.1} tokens/s",
        a.target.display(),
        device,
        dtype.name(),
        load_s,
        prompt_ids.len(),
        gen.prefill_seconds,
        gen.tokens.len(),
        gen.decode_tokens_per_second()
    );
    Ok(())
}
