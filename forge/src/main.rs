//! The `forge` command-line tool.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use forge_data::{ChatTemplate, Message, Role, TextTokenizer};
use forge_models::generate::{generate, GenerateOptions};
use forge_models::{parse_device, TargetModel};
use forge_trainer::recipe::Recipe;
use forge_trainer::target_check;
use std::io::Write;
use std::path::PathBuf;

mod cli;
use cli::{dist as dist_cmd, prepare, train as train_cmd};

#[derive(Parser)]
#[command(
    name = "forge",
    version,
    about = "Train draft models for speculative decoding (Medusa, EAGLE-1/3, gated hybrid, SpAF, knowledge drafters)",
    long_about = "forge trains the small draft models used for speculative decoding of large language models.\n\
                  One YAML recipe picks the drafter and every hyper-parameter: `forge train recipes/medusa-smollm2.yaml`.\n\
                  See docs/recipes.md for the recipe reference."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode text with a target model (plain autoregressive decoding with a KV cache).
    Generate(GenerateArgs),
    /// Validate a recipe (all problems at once, with their lines) without training.
    Check {
        /// The recipe YAML file.
        recipe: PathBuf,
        /// Override a recipe value before validation, e.g. --set train.max_steps=20 (repeatable).
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        set: Vec<String>,
        /// Print the resolved recipe (every default filled in).
        #[arg(long)]
        print: bool,
    },
    /// Train the drafter a recipe describes.
    Train {
        recipe: PathBuf,
        /// Override a recipe value before validation, e.g. --set train.lr=2e-4 (repeatable).
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        set: Vec<String>,
        /// Resume: `auto` = newest complete checkpoint in checkpoint.dir, or a checkpoint folder.
        #[arg(long, value_name = "auto|DIR")]
        resume: Option<String>,
    },
    /// Print the recipe reference (docs/recipes.md) generated from the schema.
    #[command(hide = true)]
    RecipeReference,
    /// Launch data-parallel workers like torchrun: `forge launch --nproc 2 -- train recipe.yaml`.
    Launch(forge_trainer::launch::LaunchArgs),
    /// Benchmarks (run under `forge launch`): `forge launch --nproc 2 -- bench allreduce`.
    #[command(subcommand)]
    Bench(dist_cmd::BenchCommand),
    /// Runs every collective with known numbers and prints them as JSON (for the tests).
    #[command(hide = true)]
    DistSelftest {
        #[command(flatten)]
        comm: dist_cmd::CommArgs,
        /// This rank exits with an error before the rendezvous.
        #[arg(long)]
        fail_rank: Option<usize>,
        /// With --fail-rank: fail right after the rendezvous instead.
        #[arg(long)]
        fail_after_rendezvous: bool,
    },
    /// Export a checkpoint for an inference engine (vLLM, SGLang, original Medusa) or forge.
    Export {
        /// A step_<N> checkpoint folder, a checkpoint.dir (its newest checkpoint), or a forge export.
        checkpoint: PathBuf,
        /// vllm | sglang | speculators | medusa | forge (which ones fit depends on the drafter kind).
        #[arg(long)]
        format: String,
        #[arg(long)]
        out: PathBuf,
        /// Weight dtype of the export: bf16, fp16 or fp32.
        #[arg(long, default_value = "bf16")]
        dtype: String,
    },
    /// Speculative decoding with a trained draft against its target: acceptance length tau,
    /// acceptance per draft position, speedup over plain decoding, and the greedy lossless check.
    Eval(forge_trainer::eval::EvalArgs),
    /// Tokenise a recipe's data into the token cache and print what it holds.
    PrepareData(prepare::DataArgs),
    /// Run the frozen target over the recipe's data and write hidden-state shards (offline mode).
    PrepareHidden(prepare::HiddenArgs),
    /// Build a knowledge drafter's cache: the target's layer outputs at the answers of
    /// question/answer conversations, with a manifest (target fingerprint, data hash).
    BuildKnowledge(cli::build_knowledge::Args),
    /// Answer every user turn of a conversation set with the target itself (batched), as ShareGPT JSONL.
    Regenerate(cli::regenerate::Args),
}

#[derive(clap::Args)]
struct GenerateArgs {
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

use forge_trainer::regenerate::resolve_dtype;

fn run_generate(a: GenerateArgs) -> Result<()> {
    if a.temperature < 0.0 || !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--temperature must be >= 0 and --top-p in (0, 1]");
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
        temperature: a.temperature,
        top_p: a.top_p,
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

pub(crate) fn load_recipe(path: &std::path::Path, set: &[String]) -> Result<Recipe> {
    match Recipe::load(path, set) {
        Ok(r) => Ok(r),
        Err(e) => bail!("{e}"),
    }
}

fn run_check(path: PathBuf, set: Vec<String>, print: bool) -> Result<()> {
    let recipe = load_recipe(&path, &set)?;
    let notes = target_check::check_against_target(&recipe)?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    if print {
        print!("{}", recipe.to_yaml().map_err(anyhow::Error::msg)?);
    }
    eprintln!("{}: ok (drafter {})", path.display(), recipe.drafter.kind());
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Check { recipe, set, print } => run_check(recipe, set, print),
        Command::Train { recipe, set, resume } => train_cmd::run_train(recipe, set, resume),
        Command::RecipeReference => {
            print!("{}", forge_trainer::recipe::reference::markdown());
            Ok(())
        }
        Command::Launch(a) => dist_cmd::run_launch(a),
        Command::Bench(b) => dist_cmd::run_bench(b),
        Command::DistSelftest {
            comm,
            fail_rank,
            fail_after_rendezvous,
        } => dist_cmd::run_selftest(comm, fail_rank, fail_after_rendezvous),
        Command::Export {
            checkpoint,
            format,
            out,
            dtype,
        } => train_cmd::run_export(checkpoint, format, out, dtype),
        Command::Eval(a) => forge_trainer::eval::run(a),
        Command::PrepareData(a) => prepare::run_prepare_data(a),
        Command::Regenerate(a) => cli::regenerate::run(a),
        Command::BuildKnowledge(a) => cli::build_knowledge::run(a),
        Command::PrepareHidden(a) => prepare::run_prepare_hidden(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message already
/// ends with (library errors such as `{path}: {source}` print their source themselves, and
/// anyhow's chain would repeat it).
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.is_empty() {
            msg = text;
        } else if !msg.ends_with(&text) {
            msg = format!("{msg}: {text}");
        }
    }
    msg
}
