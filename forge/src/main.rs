//! The `forge` command-line tool.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

mod cli;
pub(crate) use cli::load_recipe;
use cli::{prepare, train as train_cmd};

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
    Generate(cli::generate::GenerateArgs),
    /// Validate a recipe (all problems at once, with their lines) without training.
    Check(cli::check::CheckArgs),
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
    Launch(cli::launch::LaunchArgs),
    /// Benchmarks (run under `forge launch`): `forge launch --nproc 2 -- bench allreduce`.
    #[command(subcommand)]
    Bench(cli::bench::BenchCommand),
    /// Runs every collective with known numbers and prints them as JSON (for the tests).
    #[command(hide = true)]
    DistSelftest(cli::dist_selftest::DistSelftestArgs),
    /// Export a checkpoint for an inference engine (vLLM, SGLang, original Medusa) or forge.
    Export(cli::export::ExportArgs),
    /// Speculative decoding with a trained draft against its target: acceptance length tau,
    /// acceptance per draft position, speedup over plain decoding, and the greedy lossless check.
    Eval(cli::eval::EvalArgs),
    /// Tokenise a recipe's data into the token cache and print what it holds.
    PrepareData {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        set: Vec<String>,
        /// Print the counts as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the frozen target over the recipe's data and write hidden-state shards (offline mode).
    PrepareHidden(PrepareHiddenArgs),
    /// Build a knowledge drafter's cache: the target's layer outputs at the answers of
    /// question/answer conversations, with a manifest (target fingerprint, data hash).
    BuildKnowledge(forge_trainer::build_knowledge::BuildKnowledgeArgs),
    /// Answer every user turn of a conversation set with the target itself (batched), as ShareGPT JSONL.
    Regenerate(forge_trainer::regenerate::RegenerateArgs),
}

#[derive(clap::Args)]
struct PrepareHiddenArgs {
    recipe: PathBuf,
    /// Output folder (shards + manifest.json); an interrupted run continues in it.
    #[arg(long)]
    out: PathBuf,
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    set: Vec<String>,
    /// Samples per target forward.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Samples per shard file.
    #[arg(long, default_value_t = 256)]
    samples_per_shard: usize,
    /// Also store the target's top-k log-probabilities per token (0 = no).
    #[arg(long, default_value_t = 0)]
    topk: usize,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => cli::generate::run(a),
        Command::Check(a) => cli::check::run(a),
        Command::Train { recipe, set, resume } => train_cmd::run_train(recipe, set, resume),
        Command::RecipeReference => cli::recipe_reference::run(),
        Command::Launch(a) => cli::launch::run(a),
        Command::Bench(b) => cli::bench::run(b),
        Command::DistSelftest(a) => cli::dist_selftest::run(a),
        Command::Export(a) => cli::export::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::PrepareData { recipe, set, json } => prepare::run_prepare_data(recipe, set, json),
        Command::Regenerate(a) => forge_trainer::regenerate::run(a),
        Command::BuildKnowledge(a) => forge_trainer::build_knowledge::run(a),
        Command::PrepareHidden(a) => prepare::run_prepare_hidden(
            a.recipe,
            a.set,
            forge_trainer::data::HiddenOptions {
                out: a.out,
                batch_size: a.batch_size,
                samples_per_shard: a.samples_per_shard,
                topk: a.topk,
                show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            },
        ),
    };
    if let Err(e) = result {
        eprintln!("error: {}", cli::error_chain(&e));
        std::process::exit(1);
    }
}
