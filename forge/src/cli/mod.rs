//! One file per subcommand: argument parsing, progress bars and printing, errors with
//! context (`anyhow`), over the forge-trainer library.

pub mod bench;
pub mod build_knowledge;
pub mod chat;
pub mod check;
pub mod dist;
pub mod dist_selftest;
pub mod eval;
pub mod export;
pub mod generate;
pub mod launch;
pub mod predict;
pub mod prepare;
pub mod progress;
pub mod recipe_reference;
pub mod regenerate;
pub mod train;

use anyhow::{bail, Result};
use forge_trainer::recipe::Recipe;
use std::path::Path;

/// The recipe at `path` with the `--set` overrides, validated (every problem, with its line).
pub fn load_recipe(path: &Path, set: &[String]) -> Result<Recipe> {
    match Recipe::load(path, set) {
        Ok(r) => Ok(r),
        Err(e) => bail!("{e}"),
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message already
/// ends with (library errors such as `{path}: {source}` print their source themselves, and
/// anyhow's chain would repeat it).
pub fn error_chain(e: &anyhow::Error) -> String {
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
