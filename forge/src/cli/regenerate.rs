//! `forge regenerate`: answer every user turn of a conversation set with the target itself
//! (batched), as ShareGPT JSONL; the library part is forge_trainer::regenerate.

use super::chat::ChatArgs;
use super::progress;
use anyhow::{bail, Context, Result};
use forge_data::conversation::{read_prompts, PromptConversation};
use forge_data::{ChatTemplate, TextTokenizer};
use forge_models::generate::{GenerateOptions, Sampling};
use forge_models::{parse_device, TargetModel};
use forge_trainer::recipe::Backend;
use forge_trainer::regenerate::{
    open_output, resolve_dtype, resume, stop_ids, RegenerateProgress, RegenerateReport, Regenerator,
};
use indicatif::ProgressBar;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `forge regenerate`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Hugging Face model folder of the target (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub target: PathBuf,
    /// Input conversations or prompts (JSONL, or a JSON array).
    #[arg(long = "in", value_name = "FILE")]
    pub input: PathBuf,
    /// Output ShareGPT JSONL; if it exists, conversations whose ids it holds are skipped and
    /// the rest appended (an interrupted run continues).
    #[arg(long, value_name = "OUT.jsonl")]
    pub out: PathBuf,
    /// Conversations decoded together.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Most tokens per answer (answers that reach it are kept, and counted in the summary).
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// 0 = greedy; > 0 samples from softmax(logits / T).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Nucleus sampling threshold (with --temperature > 0).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f64,
    /// Keep only the K most likely tokens before top-p (with --temperature > 0; 0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sampling seed (each conversation turn draws from its own stream: seed, id, turn).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Only the first N input conversations.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Split the target over N ranks (tensor parallelism): run as forge launch --nproc N (or --gpus N) -- regenerate ... --tensor-parallel N; rank 0 writes.
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel: usize,
    #[command(flatten)]
    pub chat: ChatArgs,
}

impl Args {
    fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
        }
    }
}

fn check_args(a: &Args) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if let Err(e) = a.sampling().check() {
        bail!("--{e}");
    }
    if a.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if a.input == a.out
        || (a.out.exists() && std::fs::canonicalize(&a.input).ok() == std::fs::canonicalize(&a.out).ok())
    {
        bail!("--out must not be the --in file ({})", a.input.display());
    }
    Ok(())
}

/// The bar (on a terminal) or a line per batch (otherwise).
struct Progress {
    pb: ProgressBar,
    show: bool,
    pending: usize,
}

impl RegenerateProgress for Progress {
    fn token(&mut self, tokens: usize, seconds: f64) {
        if self.show && tokens.is_multiple_of(8) {
            self.pb.set_message(format!(
                "{tokens} tokens {:.1} tokens/s",
                tokens as f64 / seconds.max(1e-9)
            ));
        }
    }

    fn batch(&mut self, conversations: usize, r: &RegenerateReport) {
        self.pb.inc(conversations as u64);
        if !self.show {
            eprintln!(
                "forge regenerate: {}/{} conversations, {} tokens, {:.1} tokens/s",
                r.written,
                self.pending,
                r.tokens,
                r.tokens as f64 / r.seconds.max(1e-9)
            );
        }
    }
}

/// `forge regenerate`.
pub fn run(a: Args) -> Result<()> {
    check_args(&a)?;
    let device = parse_device(&a.chat.device).context("--device")?;
    let tp = forge_trainer::parallel::tensor::target_group(a.tensor_parallel, Backend::Auto, device, 1800)
        .context("--tensor-parallel")?;
    let device = forge_trainer::parallel::tensor::rank_device(device, &tp);
    // rank 0 writes the output: it drops an interrupted record before the others read it
    let writes = tp.as_ref().is_none_or(|t| t.rank() == 0);
    if let (Some(t), false) = (&tp, writes) {
        t.sync()?;
    }
    let mut convs = read_prompts(&a.input).context("--in")?;
    let total_input = convs.len();
    if let Some(n) = a.limit {
        convs.truncate(n);
    }
    let done = resume(&a.out).context("--out")?;
    if let (Some(t), true) = (&tp, writes) {
        t.sync()?;
    }
    if let (Some(line), true) = (done.dropped_incomplete_line, writes) {
        eprintln!(
            "forge regenerate: {}:{line}: dropped an incomplete last record (an interrupted write; it is regenerated)",
            a.out.display()
        );
    }
    let pending: Vec<&PromptConversation> = convs.iter().filter(|c| !done.ids.contains(&c.id)).collect();
    let skipped = convs.len() - pending.len();
    if pending.is_empty() {
        if !writes {
            return Ok(());
        }
        eprintln!(
            "forge regenerate: nothing to do: all {} conversations are already in {}",
            convs.len(),
            a.out.display()
        );
        return Ok(());
    }

    let dtype = resolve_dtype(&a.chat.dtype, device)?;
    let tokenizer = TextTokenizer::from_dir(&a.target)?;
    let template = ChatTemplate::from_name(&a.chat.chat_template, &a.target)
        .with_context(|| format!("--chat-template {}", a.chat.chat_template))?;
    let t_load = Instant::now();
    let model = TargetModel::load_parallel(&a.target, dtype, device, tp)
        .with_context(|| format!("loading target {}", a.target.display()))?;
    let load_s = t_load.elapsed().as_secs_f64();
    let stop_ids = stop_ids(&model, &tokenizer, &template, &a.chat.chat_template)?;
    let regen = Regenerator {
        model: &model,
        tokenizer: &tokenizer,
        template: &template,
        system: a.chat.system.clone(),
        opts: GenerateOptions {
            max_new_tokens: a.max_new_tokens,
            sampling: a.sampling(),
            seed: a.seed,
            stop_ids,
        },
    };
    // the other ranks of a tensor-parallel target decode the same answers and write nothing
    let mut file: Box<dyn std::io::Write> = if writes {
        Box::new(open_output(&a.out).context("--out")?)
    } else {
        Box::new(std::io::sink())
    };

    let show = writes && progress::show(&a.chat.progress);
    let mut bar = Progress {
        pb: progress::bar(
            pending.len() as u64,
            "regenerate [{bar:30}] {pos}/{len} conversations {msg} eta {eta}",
            show,
        ),
        show,
        pending: pending.len(),
    };
    if writes {
        eprintln!(
            "forge regenerate: {} conversations to answer ({} in {}, {} already in {}), batch {}, {} on {:?} ({}), load {:.1}s",
            pending.len(),
            total_input,
            a.input.display(),
            skipped,
            a.out.display(),
            a.batch_size,
            a.target.display(),
            device,
            dtype.name(),
            load_s
        );
    }
    let r = regen.run_all(&pending, a.batch_size, file.as_mut(), &a.out, &mut bar)?;
    bar.pb.finish_and_clear();
    if !writes {
        return Ok(());
    }
    eprintln!(
        "forge regenerate: done: {} conversations ({skipped} skipped, already in {}), {} answers, {} generated tokens in {:.1}s ({:.1} tokens/s), {} answers hit --max-new-tokens {}, {} empty; wrote {}",
        r.written,
        a.out.display(),
        r.answers,
        r.tokens,
        r.seconds,
        r.tokens as f64 / r.seconds.max(1e-9),
        r.hit_max,
        a.max_new_tokens,
        r.empty,
        a.out.display()
    );
    Ok(())
}
