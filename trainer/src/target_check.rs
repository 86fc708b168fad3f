//! Checks of a recipe against its target's config.json (when the target is present).

use crate::recipe::{DrafterSection, Recipe};
use anyhow::{bail, Result};
use forge_models::TargetConfig;

/// Returns notes (warnings) and fails on values the target makes impossible.
pub fn check_against_target(recipe: &Recipe) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let Some(path) = &recipe.target.path else {
        return Ok(notes);
    };
    let cfg_path = path.join("config.json");
    if !cfg_path.is_file() {
        notes.push(format!(
            "target.path {} has no config.json here (yet); target-dependent checks skipped",
            path.display()
        ));
        return Ok(notes);
    }
    let cfg = TargetConfig::from_file(&cfg_path)?;
    let mut problems = Vec::new();
    // the drafter spec resolved against this target: layer indices, head shapes, ...
    if let Err(e) = recipe.drafter.to_spec(&cfg) {
        problems.push(e.to_string());
    }
    if let DrafterSection::Eagle3(e) = &recipe.drafter {
        if e.draft_vocab_size > cfg.vocab_size {
            notes.push(format!(
                "drafter.draft_vocab_size {} is capped at the target vocabulary {}",
                e.draft_vocab_size, cfg.vocab_size
            ));
        }
    }
    for f in &recipe.data.train {
        if !f.exists() {
            notes.push(format!(
                "data.train file {} does not exist (yet)",
                f.display()
            ));
        }
    }
    if !problems.is_empty() {
        bail!(
            "recipe does not fit the target {}:\n  {}",
            path.display(),
            problems.join("\n  ")
        );
    }
    Ok(notes)
}
