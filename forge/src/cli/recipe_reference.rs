//! `forge recipe-reference` (hidden): the recipe reference, docs/recipes.md.

use anyhow::Result;

pub fn run() -> Result<()> {
    print!("{}", forge_trainer::recipe::reference::markdown());
    Ok(())
}
