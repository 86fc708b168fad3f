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
    // the drafter spec resolved against this target: layer indices, head shapes, ...; a
    // knowledge cache not built yet is a note (the spec is checked without it)
    let mut drafter = recipe.drafter.clone();
    if let DrafterSection::Knowledge(k) = &mut drafter {
        if let Some(cache) = k.knowledge_cache.take_if(|c| !c.exists()) {
            notes.push(format!(
                "drafter.knowledge_cache {} does not exist (yet): build it with forge build-knowledge before training (the recipe's comment or docs/methods/knowledge.md has the command)",
                cache.display()
            ));
        }
    }
    if let Err(e) = drafter.to_spec(&cfg, Some(path)) {
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
            notes.push(format!("data.train file {} does not exist (yet)", f.display()));
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
