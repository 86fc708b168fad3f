//! `forge check`: validate a recipe without training.

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
}

pub fn run(a: CheckArgs) -> Result<()> {
    let recipe = load_recipe(&a.recipe, &a.set)?;
    let notes = target_check::check_against_target(&recipe)?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    if a.print {
        print!("{}", recipe.to_yaml().map_err(anyhow::Error::msg)?);
    }
    eprintln!("{}: ok (drafter {})", a.recipe.display(), recipe.drafter.kind());
    Ok(())
}
