//! Checks of a recipe against its target: the folder holds what training reads (config.json,
//! every weight file, tokenizer.json), and the drafter fits the target's config.

use crate::error::{Result, TrainerError};
use crate::recipe::Recipe;
use forge_models::{weight_files, TargetConfig};
use std::path::Path;

/// What is missing from a target folder for training and evaluation to read it: config.json,
/// the weights (`model.safetensors`, or every shard `model.safetensors.index.json` lists) and
/// tokenizer.json. Empty when the folder is complete.
pub fn target_folder_problems(path: &Path) -> Vec<String> {
    if !path.is_dir() {
        return vec![format!("{} does not exist (or is not a folder)", path.display())];
    }
    let mut problems = Vec::new();
    if !path.join("config.json").is_file() {
        problems.push("no config.json".to_string());
    }
    match weight_files(path) {
        Ok(files) => {
            let missing: Vec<String> = files
                .iter()
                .filter(|f| !f.is_file())
                .map(|f| {
                    f.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
                .collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "weight shards listed in model.safetensors.index.json are missing: {}",
                    missing.join(", ")
                ));
            }
        }
        Err(e) => problems.push(format!("weights: {e}")),
    }
    if !path.join("tokenizer.json").is_file() {
        problems.push("no tokenizer.json (the target's Hugging Face tokenizer)".to_string());
    }
    problems
}

/// How to get a target folder into place.
fn fetch_hint(path: &Path) -> String {
    if path.ends_with(".forge/models/SmolLM2-135M-Instruct") {
        "run `make demo-model` to download the demo target there".into()
    } else {
        format!(
            "download the model there (e.g. `huggingface-cli download <org>/<model> --local-dir {}`) or point target.path at a complete Hugging Face folder",
            path.display()
        )
    }
}

/// Returns notes (warnings) and fails on values the target makes impossible. With
/// `require_target`, a target folder that is missing or incomplete is an error naming each
/// missing piece and the fix; without it, a note (the target-dependent checks are skipped).
pub fn check_against_target(recipe: &Recipe, require_target: bool) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let Some(path) = &recipe.target.path else {
        return Ok(notes);
    };
    let missing = target_folder_problems(path);
    if !missing.is_empty() {
        if require_target {
            return Err(TrainerError::TargetFolder {
                path: path.clone(),
                problems: missing,
                fix: fetch_hint(path),
            });
        }
        if !path.join("config.json").is_file() {
            notes.push(format!(
                "target.path {}: {}; target-dependent checks skipped",
                path.display(),
                missing.join("; ")
            ));
            return Ok(notes);
        }
        notes.push(format!("target.path {}: {}", path.display(), missing.join("; ")));
    }
    let cfg_path = path.join("config.json");
    let cfg = TargetConfig::from_file(&cfg_path)?;
    let mut problems = Vec::new();
    // the drafter spec resolved against this target: layer indices, head shapes, ...; a
    // knowledge cache not built yet is a note (the spec is checked without it)
    let mut drafter = crate::artifacts::resolved_section(recipe)?;
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
