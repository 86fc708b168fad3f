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
    PrepareData(prepare::DataArgs),
    /// Run the frozen target over the recipe's data and write hidden-state shards (offline mode).
    PrepareHidden(prepare::HiddenArgs),
    /// Build a knowledge drafter's cache: the target's layer outputs at the answers of
    /// question/answer conversations, with a manifest (target fingerprint, data hash).
    BuildKnowledge(cli::build_knowledge::Args),
    /// Answer every user turn of a conversation set with the target itself (batched), as ShareGPT JSONL.
    Regenerate(cli::regenerate::Args),
    /// Predict the speedup a draft with a measured tau gives on real GPUs (a roofline model;
    /// `--gpus` lists the GPUs and their sources).
    Predict(cli::predict::PredictArgs),
}

fn main() {
    // before anything allocates: freed host buffers stay for the next step (FORGE_MALLOC=default
    // keeps glibc's defaults)
    forge_trainer::host_memory::keep_freed_memory();
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
        Command::PrepareData(a) => prepare::run_prepare_data(a),
        Command::Regenerate(a) => cli::regenerate::run(a),
        Command::BuildKnowledge(a) => cli::build_knowledge::run(a),
        Command::PrepareHidden(a) => prepare::run_prepare_hidden(a),
        Command::Predict(a) => cli::predict::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", cli::error_chain(&e));
        std::process::exit(1);
    }
}
