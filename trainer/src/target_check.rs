//! Checks of a recipe against its target's config.json (when the target is present).

use crate::error::{Result, TrainerError};
use crate::recipe::Recipe;
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
    let mut drafter = crate::knowledge::drafter_section(recipe)?;
    let kind_notes = drafter.check_notes(&cfg);
    if let Err(e) = drafter.to_spec(&cfg, Some(path)) {
        problems.push(e.to_string());
    }
    notes.extend(kind_notes);
    for f in &recipe.data.train {
        if !f.exists() {
            notes.push(format!("data.train file {} does not exist (yet)", f.display()));
        }
    }
    if !problems.is_empty() {
        return Err(TrainerError::RecipeTargetMismatch {
            target: path.clone(),
            problems,
        });
    }
    Ok(notes)
}
