//! `forge check`: validate a recipe without training, and that its target folder holds
//! what training reads.

use super::load_recipe;
use anyhow::Result;
use forge_trainer::target_check;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CheckArgs {
    /// The recipe YAML file.
    recipe: PathBuf,
    /// Override a recipe value before validation, e.g. --set train.max_steps=20 (repeatable).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    set: Vec<String>,
    /// Print the resolved recipe (every default filled in).
    #[arg(long)]
    print: bool,
    /// Check the recipe alone: a target folder that is not here yet is a note, not an error
    /// (by default the folder must hold config.json, every weight file and tokenizer.json).
    #[arg(long)]
    recipe_only: bool,
}

pub fn run(a: CheckArgs) -> Result<()> {
    let recipe = load_recipe(&a.recipe, &a.set)?;
    let notes = target_check::check_against_target(&recipe, !a.recipe_only)?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    if a.print {
        print!("{}", recipe.to_yaml().map_err(anyhow::Error::msg)?);
    }
    eprintln!("{}: ok (drafter {})", a.recipe.display(), recipe.drafter.kind());
    Ok(())
}
